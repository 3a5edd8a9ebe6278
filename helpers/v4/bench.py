"""``python -m helpers.bench v4``: decode speed of our V4 miniature against ``DeepseekV4ForCausalLM``, same weights.

For each context length (1k, 4k and 16k tokens by default) both models prefill the same random prompt once, in
chunks of 1,024 tokens through their own caches (ours: :meth:`DeepSeekV4.new_caches`; ``transformers``: its
``DynamicCache`` with V4's cache layers); then each timed run decodes ``--tokens`` (8) greedy tokens, one forward
step of one token each, continuing the cache (so the context grows by a few dozen tokens over the runs, against
thousands). Variants are interleaved after a warm-up (:func:`helpers.bench.benchmark`); the medians, in ms per
new token, are printed and saved to ``notebooks/results/v4_bench_decode.json``.

The model is the trained miniature's architecture (:func:`helpers.v4.train.model_config`) with random weights and
``max_position_embeddings`` raised to fit the longest context. Never a test: timings depend on the machine and its
load (record the machine with the numbers; ``--threads`` sets the torch threads, default 1).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch

from helpers.bench import benchmark, environment_line

CHUNK = 1024


@torch.no_grad()
def _prefilled(ours, hf, prompt: torch.Tensor):
    """Our caches and ``transformers``' cache after ``prompt (1, P)``, prefilled in chunks of :data:`CHUNK`."""
    from transformers import DynamicCache

    caches, cache = ours.new_caches(), DynamicCache(config=hf.config)
    for start in range(0, prompt.shape[1], CHUNK):
        chunk = prompt[:, start:start + CHUNK]
        ours.run_blocks(chunk, caches)
        hf(input_ids=chunk, past_key_values=cache, use_cache=True)
    return caches, cache


def _decode_ours(model, caches, token: torch.Tensor, n: int):
    @torch.no_grad()
    def run():
        tok = token
        for _ in range(n):
            tok = model.logits(model.run_blocks(tok, caches)[:, -1:]).argmax(-1)  # (1, 1)
    return run


def _decode_hf(hf, cache, token: torch.Tensor, n: int):
    @torch.no_grad()
    def run():
        tok = token
        for _ in range(n):
            tok = hf(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)  # (1, 1)
    return run


def decode_benchmark(contexts: list[int], tokens: int = 8, repeats: int = 5, warmup: int = 1) -> dict:
    """ms per decoded token of ours and ``transformers`` at each context length; a JSON-ready dict."""
    from helpers.hf import model_to_hf
    from helpers.v4.model import DeepSeekV4
    from helpers.v4.train import model_config

    torch.manual_seed(0)
    config = model_config(max_position_embeddings=max(contexts) + 4 * tokens * (repeats + warmup) + 8)
    ours = DeepSeekV4(config).eval()
    hf = model_to_hf(ours)
    rows = []
    for context in contexts:
        prompt = torch.randint(0, config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
        caches, cache = _prefilled(ours, hf, prompt)
        token = prompt[:, -1:]
        result = benchmark({"ours": _decode_ours(ours, caches, token, tokens),
                            "transformers": _decode_hf(hf, cache, token, tokens)},
                           repeats=repeats, warmup=warmup, config=dict(context=context, new_tokens_per_run=tokens))
        print(result)
        rows.append({"context": context, "cache_bytes_ours": sum(c.nbytes() for c in caches),
                     **{f"{name}_ms_per_token": 1e3 * result.median(name) / tokens for name in result.times},
                     "transformers_over_ours": result.ratio("transformers")})
    return {"environment": environment_line(), "config": {k: v for k, v in config.to_dict().items()
                                                          if k in ("hidden_size", "num_hidden_layers", "layer_types",
                                                                   "mlp_layer_types", "compress_rates", "hc_mult",
                                                                   "sliding_window", "index_topk", "head_dim")},
            "chunk": CHUNK, "tokens_per_run": tokens, "repeats": repeats, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    from helpers.inputs import output_path, positive_int

    parser = argparse.ArgumentParser(prog="python -m helpers.bench v4", description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=positive_int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--tokens", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--out", type=output_path, default="notebooks/results/v4_bench_decode.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = decode_benchmark(args.contexts, args.tokens, args.repeats)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)
