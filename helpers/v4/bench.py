"""``python -m helpers.bench v4``: decode speed of our V4 miniature against ``DeepseekV4ForCausalLM``, same weights.

The model (:func:`bench_config`) keeps V4-Flash's proportions at a tiny width: ``head_dim`` four times
``index_head_dim`` (64 and 16), a RoPE slice of one eighth of the head, V4's compression rates 4 (CSA) and 128 (HCA),
V4's 128-token sliding window, ``index_topk`` 128 (so at 64k tokens each CSA query reads 128 of 16,384 entries),
one sliding-window layer then CSA and HCA alternating, four residual streams, random weights.

For each context length (1k, 4k, 16k and 64k tokens by default) our model prefills a random prompt once, in chunks
of 1,024 tokens (:meth:`DeepSeekV4.new_caches`, ``backend="auto"``), and ``transformers``' ``DynamicCache`` (V4's
cache layers) is filled with the same state (:func:`hf_cache_from_ours`: its own masked prefill is quadratic in
the prompt, over half an hour at 64k on two cores); one decode step of both checks that they continue alike.
Then each timed run decodes ``--tokens`` (8) greedy tokens, one forward step of one token each, continuing the
cache. Variants are interleaved after a warm-up
(:func:`helpers.bench.benchmark`); medians in ms per new token. A second, instrumented pass times the parts of a
decode step (:class:`Split`): the attention of the sliding-window layers, of the compressed layers (CSA and HCA,
without the indexer), the lightning indexer, the MoE layers, and the rest (embedding, hyper-connections, norms,
head, and ``transformers``' mask and RoPE set-up). Results go to ``notebooks/results/v4_bench_decode.json``, with
the cache bytes per token beside the miniature V3's latent cache (:class:`helpers.mla.cache.LatentCache`).

Never a test: timings depend on the machine and its load (the load average is recorded; ``--threads`` sets the
torch threads, default 2).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch

from helpers.bench import benchmark, environment_line

CHUNK = 1024
PARTS = ("sliding", "compressed", "indexer", "moe", "rest")


def bench_config(**overrides):
    """The benchmarked V4: V4-Flash's proportions at hidden size 128 (see the module docstring)."""
    from helpers.v4.model import tiny_v4_config

    swa, csa, hca = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
    fields = dict(vocab_size=1024, hidden_size=128, moe_intermediate_size=64, num_hidden_layers=5,
                  num_attention_heads=8, head_dim=64, q_lora_rank=64, partial_rotary_factor=0.125,
                  n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                  layer_types=[swa, csa, hca, csa, hca], mlp_layer_types=["hash_moe"] + ["moe"] * 4,
                  compress_rates={csa: 4, hca: 128}, hc_mult=4, sliding_window=128, o_groups=2, o_lora_rank=32,
                  index_n_heads=8, index_head_dim=16, index_topk=128, max_position_embeddings=1 << 17)
    fields.update(overrides)
    return tiny_v4_config(**fields)


class Split:
    """Wall time of the parts of a decode step, by wrapping the parts' methods with timers (instrumented runs only).

    ``add(obj, method, part)`` replaces ``obj.method`` by a timed copy; nested parts (the indexer inside a CSA
    layer's attention) are subtracted from their parent, so the parts add up to the wrapped total.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []
        self._wrapped: list[tuple[object, str]] = []

    def add(self, obj: object, method: str, part: str) -> None:
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            frame = [part, time.perf_counter(), 0.0]  # part, start, seconds spent in nested parts
            self._stack.append(frame)
            try:
                return inner(*args, **kwargs)
            finally:
                self._stack.pop()
                spent = time.perf_counter() - frame[1]
                self.seconds[part] += spent - frame[2]
                if self._stack:
                    self._stack[-1][2] += spent

        obj.__dict__[method] = timed  # shadows the class's method on this object only
        self._wrapped.append((obj, method))

    def remove(self) -> None:
        for obj, method in self._wrapped:
            del obj.__dict__[method]
        self._wrapped.clear()


def _attention_part(layer_type: str) -> str:
    return "sliding" if layer_type == "sliding_attention" else "compressed"


def split_ours(model, split: Split) -> None:
    for block in model.layers:
        split.add(block.attn, "forward", _attention_part(block.attn.kind))
        if block.attn.indexer is not None:
            split.add(block.attn.indexer, "step", "indexer")
            split.add(block.attn.indexer, "forward", "indexer")
        split.add(block.ffn, "forward", "moe")


def split_hf(hf, split: Split) -> None:
    for layer in hf.model.layers:
        split.add(layer.self_attn, "forward", _attention_part(layer.self_attn.layer_type))
        compressor = layer.self_attn.compressor
        if compressor is not None and hasattr(compressor, "indexer"):
            split.add(compressor.indexer, "forward", "indexer")
        split.add(layer.mlp, "forward", "moe")


def hf_cache_from_ours(caches, config):
    """A ``transformers`` ``DynamicCache`` holding the same state as our caches (window, pending tokens, CSA
    overlaps, compressed entries of the compressor and the indexer), so that ``DeepseekV4ForCausalLM`` continues
    where our model is. Lets the benchmark skip ``transformers``' own prefill, whose masked attention over every
    entry makes a long prompt quadratic (checked: both models' next logits agree, ``first_step_max_abs_diff``)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for layer, ours in zip(cache.layers, caches):
        kv = ours.window.kv[:, None]  # (B, 1, S, d)
        layer.lazy_initialization(kv, kv)
        layer.keys = layer.values = kv
        layer.cumulative_length = ours.length
        for name, state in (("compressor", ours.compressor), ("indexer", ours.indexer)):
            if state is None:
                continue
            layer.buffer_kv[name], layer.buffer_gate[name] = state.pending_kv, state.pending_gate
            layer.compressed_kv[name] = state.entries.views()[0].clone()
            layer.entry_count[name] = state.n_entries
            if hasattr(layer, "overlap_kv"):
                layer.overlap_kv[name], layer.overlap_gate[name] = state.overlap_kv, state.overlap_gate
    return cache


@torch.no_grad()
def _prefilled(ours, hf, prompt: torch.Tensor):
    """Our caches after ``prompt (1, P)``, prefilled in chunks of :data:`CHUNK`, and ``transformers``' cache
    holding the same state (:func:`hf_cache_from_ours`)."""
    caches = ours.new_caches()
    for start in range(0, prompt.shape[1], CHUNK):
        ours.run_blocks(prompt[:, start:start + CHUNK], caches)
    return caches, hf_cache_from_ours(caches, hf.config)


@torch.no_grad()
def _first_step_diff(ours, hf, caches, cache, token: torch.Tensor) -> float:
    """Max abs difference of the two models' logits for ``token`` after the prefill (advances both caches)."""
    mine = ours.logits(ours.run_blocks(token, caches))[:, -1]
    return (mine - hf(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]).abs().max().item()


def _decode_ours(model, caches, token: torch.Tensor, n: int) -> Callable[[], None]:
    @torch.no_grad()
    def run():
        tok = token
        for _ in range(n):
            tok = model.logits(model.run_blocks(tok, caches)[:, -1:]).argmax(-1)  # (1, 1)
    return run


def _decode_hf(hf, cache, token: torch.Tensor, n: int) -> Callable[[], None]:
    @torch.no_grad()
    def run():
        tok = token
        for _ in range(n):
            tok = hf(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)  # (1, 1)
    return run


def _split_times(runs: dict[str, tuple[Callable[[], None], Callable[[Split], None]]], rounds: int, tokens: int
                 ) -> dict[str, dict[str, float]]:
    """ms per token of each part, median over ``rounds`` instrumented runs per variant (interleaved)."""
    per_round: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (run, instrument) in runs.items():
            split = Split()
            instrument(split)
            start = time.perf_counter()
            try:
                run()
            finally:
                split.remove()
            total = time.perf_counter() - start
            parts = {p: split.seconds.get(p, 0.0) for p in PARTS[:-1]}
            parts["rest"] = total - sum(parts.values())
            per_round[name].append({p: 1e3 * s / tokens for p, s in parts.items()})
    return {name: {p: statistics.median(r[p] for r in rows) for p in PARTS} for name, rows in per_round.items()}


def v3_latent_bytes_per_token() -> dict:
    """Bytes per token of the miniature V3's latent caches (:func:`helpers.model.train.model_config`), measured."""
    from helpers.model import DeepSeekV3
    from helpers.model.train import model_config

    v3 = DeepSeekV3(model_config()).eval()
    caches = v3.new_caches()
    with torch.no_grad():
        v3.run_blocks(torch.zeros(1, 64, dtype=torch.long), caches)
    per_token = sum(c.nbytes() for c in caches) / 64
    return {"layers": len(caches), "bytes_per_token": per_token, "bytes_per_token_per_layer": per_token / len(caches)}


def decode_benchmark(contexts: list[int], tokens: int = 8, repeats: int = 5, warmup: int = 1) -> dict:
    """ms per decoded token of ours and ``transformers`` at each context length, and the split; a JSON-ready dict."""
    from helpers.hf import model_to_hf
    from helpers.v4.model import DeepSeekV4

    torch.manual_seed(0)
    config = bench_config()
    ours = DeepSeekV4(config).eval()
    hf = model_to_hf(ours)
    rows = []
    for context in contexts:
        prompt = torch.randint(0, config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
        start = time.perf_counter()
        caches, cache = _prefilled(ours, hf, prompt)
        prefill_s = time.perf_counter() - start
        token = prompt[:, -1:]
        diff = _first_step_diff(ours, hf, caches, cache, token)
        run_ours, run_hf = _decode_ours(ours, caches, token, tokens), _decode_hf(hf, cache, token, tokens)
        result = benchmark({"ours": run_ours, "transformers": run_hf}, repeats=repeats, warmup=warmup,
                           config=dict(context=context, new_tokens_per_run=tokens))
        print(result, flush=True)
        split = _split_times({"ours": (run_ours, lambda s: split_ours(ours, s)),
                              "transformers": (run_hf, lambda s: split_hf(hf, s))}, rounds=repeats, tokens=tokens)
        length = caches[0].length
        rows.append({"context": context, "prefill_s_ours": prefill_s, "first_step_max_abs_diff": diff, "load_average": os.getloadavg()[0],
                     "cache_bytes_ours": sum(c.nbytes() for c in caches),
                     "cache_bytes_per_token_ours": sum(c.nbytes() for c in caches) / length,
                     **{f"{name}_ms_per_token": 1e3 * result.median(name) / tokens for name in result.times},
                     "transformers_over_ours": result.ratio("transformers"),
                     "split_ms_per_token": split,
                     "attention_transformers_over_ours": (sum(split["transformers"][p] for p in PARTS[:3])
                                                          / sum(split["ours"][p] for p in PARTS[:3]))})
        print({k: v for k, v in rows[-1].items() if k != "split_ms_per_token"}, flush=True)
        print(json.dumps(split, indent=None), flush=True)
    keep = ("hidden_size", "num_hidden_layers", "layer_types", "mlp_layer_types", "compress_rates", "hc_mult",
            "sliding_window", "index_topk", "index_n_heads", "index_head_dim", "head_dim", "num_attention_heads",
            "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts", "num_experts_per_tok")
    return {"environment": environment_line(), "config": {k: getattr(config, k) for k in keep},
            "chunk": CHUNK, "tokens_per_run": tokens, "repeats": repeats, "parts": list(PARTS),
            "v3_latent_cache": v3_latent_bytes_per_token(), "rows": rows}


def main(argv: list[str] | None = None) -> None:
    from helpers.inputs import output_path, positive_int

    parser = argparse.ArgumentParser(prog="python -m helpers.bench v4", description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=positive_int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--tokens", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--out", type=output_path, default="notebooks/results/v4_bench_decode.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = decode_benchmark(args.contexts, args.tokens, args.repeats)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)


def plot_decode_benchmark(result: dict) -> None:
    """Left: decode ms per token against the context, ours and ``transformers``. Right: each one's step split into
    :data:`PARTS` (instrumented runs), a pair of bars per context (``result``: the saved JSON of this command)."""
    import matplotlib.pyplot as plt

    rows = result["rows"]
    contexts = [r["context"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for name, marker in (("ours", "o"), ("transformers", "s")):
        left.plot(contexts, [r[f"{name}_ms_per_token"] for r in rows], marker=marker, label=name)
    left.set(xscale="log", xlabel="context (tokens)", ylabel="ms per decoded token (median)",
             title="decode step, same weights")
    left.set_xscale("log", base=2)
    left.set_ylim(bottom=0)
    left.legend()
    width, colors = 0.38, plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, name in enumerate(("ours", "transformers")):
        bottom = [0.0] * len(rows)
        for c, part in enumerate(result["parts"]):
            heights = [r["split_ms_per_token"][name][part] for r in rows]
            right.bar([i + (j - 0.5) * width for i in range(len(rows))], heights, width, bottom=bottom,
                      color=colors[c], edgecolor="black" if j else "white", label=part if j == 0 else None)
            bottom = [b + h for b, h in zip(bottom, heights)]
    right.set_xticks(range(len(rows)), [f"{c // 1024}k\nours | tf" for c in contexts])
    right.set(ylabel="ms per token (instrumented)", title="where a decode step goes")
    right.legend(fontsize=8)
    fig.tight_layout()
    plt.show()
