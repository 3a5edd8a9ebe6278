"""``python -m helpers.bench model``: the assembled model against ``transformers`` (training step and decode).

- training throughput: forward + backward + AdamW step, tokens/s, of our model, ``DeepseekV3ForCausalLM`` with
  eager and ``grouped_mm`` experts (eager attention, its best on a CPU), and a dense model with the same
  activated FFN width (``first_k_dense_replace = num_hidden_layers``, ``intermediate_size = (N_s + K_r) I``);
- decode: ms per new token (greedy, 32 new tokens) after prompts of 128, 1k, 4k and 16k tokens, ours absorbed and
  naive against ``transformers`` ``generate`` on the same weights, split into attention, MoE and the rest by
  forward hooks (:class:`SplitTimer`). Each prompt is prefilled once, in chunks of 1,024 tokens through each
  cache (``transformers``' eager attention would need about 4 GB per layer for one 16k-token pass); the timed
  runs decode from it. 16k prompts get fewer timed runs (``--long-repeats``, default 3; 5 elsewhere).

Variants are interleaved after warm-ups (:func:`helpers.bench.benchmark`); medians and ratios
(and whether each target was met) are printed and saved to ``notebooks/results/bench_model.json``, which notebook 32 plots.
Never a test: timings depend on the machine and its load. On a busy shared 2-core machine with one thread the
whole command took 13 min (3.5 min of CPU time); on an idle one it should take a few minutes.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import time

import torch

from helpers.bench import benchmark, environment_line

ISSUE_CONFIG = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
                    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=2,
                    n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1, vocab_size=1024,
                    max_position_embeddings=20000, num_mtp_layers=0)
SMALL_CONFIG = dict(ISSUE_CONFIG, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                    num_hidden_layers=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, vocab_size=256)


def _step(model, ids, opt, hf: bool):
    def run():
        logits = model(ids).logits if hf else model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def training_benchmark(fields: dict, batch: int, seq: int, repeats: int, warmup: int):
    """Tokens/s of one training step for each variant; returns the :class:`helpers.bench.BenchResult`."""
    from transformers import DeepseekV3ForCausalLM

    from helpers.configs import tiny_config
    from helpers.model import DeepSeekV3
    from helpers.model.hf import model_to_hf

    torch.manual_seed(0)
    config = tiny_config(**fields)
    ours = DeepSeekV3(config).train()
    hf_eager = model_to_hf(ours).train()
    grouped_config = copy.deepcopy(hf_eager.config)
    grouped_config._experts_implementation = "grouped_mm"
    hf_grouped = DeepseekV3ForCausalLM(grouped_config).train()
    hf_grouped.load_state_dict(hf_eager.state_dict())
    dense_width = (config.n_shared_experts + config.num_experts_per_tok) * config.moe_intermediate_size
    dense = DeepSeekV3(tiny_config(**dict(fields, first_k_dense_replace=fields["num_hidden_layers"],
                                          intermediate_size=dense_width))).train()
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    models = {"ours": (ours, False), "transformers eager": (hf_eager, True),
              "transformers grouped_mm": (hf_grouped, True), "dense, same activated": (dense, False)}
    variants = {name: _step(m, ids, torch.optim.AdamW(m.parameters(), lr=1e-4), hf) for name, (m, hf) in models.items()}
    return benchmark(variants, repeats=repeats, warmup=warmup,
                     config=dict(fields, batch=batch, seq=seq, step="forward+backward+AdamW"))


class SplitTimer:
    """Wall time spent inside groups of modules (forward pre-hook to forward hook), summed per group.

    On a CPU every op is synchronous, so ``perf_counter`` around a module's forward is its time. The hooks
    cost two clock reads per call (a few microseconds per step here): every variant carries them alike.
    """

    def __init__(self, groups: dict[str, list[torch.nn.Module]]) -> None:
        self.seconds = dict.fromkeys(groups, 0.0)
        self._start: dict[int, float] = {}
        self._handles = []
        for name, modules in groups.items():
            for m in modules:
                self._handles.append(m.register_forward_pre_hook(self._enter))
                self._handles.append(m.register_forward_hook(functools.partial(self._leave, name)))

    def _enter(self, module, args) -> None:
        self._start[id(module)] = time.perf_counter()

    def _leave(self, name, module, args, output) -> None:
        self.seconds[name] += time.perf_counter() - self._start.pop(id(module))

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _timed(fn, timer: SplitTimer, splits: list[dict]):
    """``fn`` wrapped so that each call also records the timer's per-group seconds of that call."""
    def run():
        timer.reset()
        start = time.perf_counter()
        fn()
        splits.append(dict(timer.seconds, total=time.perf_counter() - start))
    return run


def _ours_groups(model) -> dict[str, list[torch.nn.Module]]:
    return {"attention": [b.attn for b in model.layers], "moe": [b.ffn for b in model.layers if b.is_moe]}


def _hf_groups(hf) -> dict[str, list[torch.nn.Module]]:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    return {"attention": [layer.self_attn for layer in hf.model.layers],
            "moe": [layer.mlp for layer in hf.model.layers if isinstance(layer.mlp, DeepseekV3MoE)]}


@torch.no_grad()
def _prefill_ours(model, ids, chunk: int):
    """Our latent caches holding ``ids (1, P)``, filled ``chunk`` tokens at a time (bounded memory)."""
    caches = model.new_caches()
    for s in range(0, ids.shape[1], chunk):
        model.hidden(ids[:, s: s + chunk], caches)
    return caches


@torch.no_grad()
def _prefill_hf(hf, ids, chunk: int):
    """A ``DynamicCache`` holding ``ids (1, P)``, filled through ``transformers``' forward ``chunk`` tokens at a time.

    Eager attention materialises ``(heads, T, S)`` scores: one 16k-token prefill would need about 4 GB per
    layer, so long prompts go in chunks through the cache (the same result, bounded memory).
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    for s in range(0, ids.shape[1], chunk):
        hf(ids[:, s: s + chunk], past_key_values=cache, use_cache=True)
    return cache


def decode_benchmark(fields: dict, contexts: list[int], new_tokens: int, repeats: int, warmup: int,
                     long_repeats: int | None = None, chunk: int = 1024) -> dict:
    """ms per new token after each prompt length, split into attention, MoE and the rest.

    The prompt minus its last token is prefilled once per length (not timed); each timed run crops the cache
    back to it and generates ``new_tokens`` greedy tokens: ``new_tokens`` forward steps of one token (the last
    prompt token, then the new tokens but the last), for ours (:func:`helpers.model.generate.decode`,
    absorbed and naive) and for ``transformers`` ``generate`` given the prefilled ``DynamicCache``.

    Returns:
        ``{context: {"result": BenchResult, "split": {variant: {"attention", "moe", "rest", "total"} ms per
        token (medians)}, "same_tokens": bool}}``; prompts of 16k tokens and more use ``long_repeats``.
    """
    from helpers.configs import tiny_config
    from helpers.model import DeepSeekV3
    from helpers.model.generate import crop, decode
    from helpers.model.hf import model_to_hf

    torch.manual_seed(0)
    ours = DeepSeekV3(tiny_config(**fields)).eval()
    hf = model_to_hf(ours).eval()
    hf.generation_config.eos_token_id = None
    timers = {"ours absorbed": SplitTimer(_ours_groups(ours)), "transformers": SplitTimer(_hf_groups(hf))}
    timers["ours naive"] = timers["ours absorbed"]  # the same modules: runs never overlap
    results = {}
    for context in contexts:
        ids = torch.randint(0, fields["vocab_size"], (1, context))
        caches, hf_cache = _prefill_ours(ours, ids[:, :-1], chunk), _prefill_hf(hf, ids[:, :-1], chunk)
        outputs: dict[str, torch.Tensor] = {}

        def ours_run(absorb: bool, name: str, ids=ids, caches=caches, context=context, outputs=outputs):
            crop(caches, context - 1)
            logits = ours.logits(ours.run_blocks(ids[:, -1:], caches, absorb)[:, -1])  # (1, V)
            outputs[name] = decode(ours, logits, caches, new_tokens, absorb)

        def hf_run(ids=ids, cache=hf_cache, context=context, outputs=outputs):
            extra = cache.get_seq_length() - (context - 1)
            if extra:
                cache.crop(-extra)  # back to the prefilled prompt (this version takes tokens to remove)
            outputs["transformers"] = hf.generate(ids, past_key_values=cache, max_new_tokens=new_tokens,
                                                  do_sample=False)[:, context:]

        splits: dict[str, list[dict]] = {name: [] for name in ("ours absorbed", "ours naive", "transformers")}
        fns = {"ours absorbed": functools.partial(ours_run, True, "ours absorbed"),
               "ours naive": functools.partial(ours_run, False, "ours naive"), "transformers": hf_run}
        variants = {name: _timed(fn, timers[name], splits[name]) for name, fn in fns.items()}
        n_repeats = long_repeats if long_repeats and context >= 16384 else repeats
        with torch.no_grad():
            result = benchmark(variants, baseline="transformers", repeats=n_repeats, warmup=warmup,
                               config=dict(context=context, new_tokens=new_tokens))
        split = {}
        for name, runs in splits.items():
            timed = runs[-n_repeats:]  # the warm-up rounds come first
            med = {k: 1e3 * statistics.median(r[k] for r in timed) / new_tokens for k in ("attention", "moe", "total")}
            med["rest"] = med["total"] - med["attention"] - med["moe"]
            split[name] = med
        same = all(torch.equal(outputs["transformers"], outputs[n]) for n in ("ours absorbed", "ours naive"))
        results[context] = {"result": result, "split": split, "same_tokens": same, "repeats": n_repeats}
        del caches, hf_cache
    for t in set(timers.values()):
        t.remove()
    return results


def summary(train, decode: dict, fields: dict, batch: int, seq: int, new_tokens: int) -> dict:
    """The JSON record: medians, ratios, the decode split and each target (met or not)."""
    tokens = batch * seq
    train_rows = {r["variant"]: {"median_ms": r["median_ms"], "tokens_per_s": tokens / (r["median_ms"] / 1e3),
                                 "runs": r["runs"]} for r in train.rows()}
    ms = {k: v["median_ms"] for k, v in train_rows.items()}
    faster_hf = min(("transformers eager", "transformers grouped_mm"), key=ms.__getitem__)
    decode_out = {str(c): {"split_ms_per_token": d["split"], "same_tokens": d["same_tokens"],
                           "repeats": d["repeats"]} for c, d in decode.items()}
    speedups = {str(c): d["split"]["transformers"]["total"] / d["split"]["ours absorbed"]["total"]
                for c, d in decode.items()}
    longest = str(max(decode))
    goals = {
        "train: ours >= 1.2x the faster transformers path": {
            "value": ms[faster_hf] / ms["ours"], "versus": faster_hf, "met": ms[faster_hf] / ms["ours"] >= 1.2},
        "train: ours <= 1.1x the dense model's time": {
            "value": ms["ours"] / ms["dense, same activated"], "met": ms["ours"] / ms["dense, same activated"] <= 1.1},
        "decode: ours absorbed never slower than transformers": {
            "value": min(speedups.values()), "met": min(speedups.values()) >= 1.0},
        f"decode: ours absorbed >= 2x transformers at {longest} tokens": {
            "value": speedups[longest], "met": speedups[longest] >= 2.0},
    }
    return {"environment": environment_line(), "config": fields, "train_batch": [batch, seq],
            "new_tokens": new_tokens, "train": train_rows, "decode": decode_out,
            "decode_speedup_absorbed": speedups, "goals": goals}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.bench model", description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a 2-layer, hidden-64 config, for a quick look")
    from helpers.inputs import non_negative_int, output_path_or_empty, positive_int

    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seq", type=positive_int, default=256)
    parser.add_argument("--contexts", type=positive_int, nargs="+", default=[128, 1024, 4096, 16384])
    parser.add_argument("--new-tokens", type=positive_int, default=32)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--long-repeats", type=positive_int, default=3,
                        help="timed rounds for prompts of 16k tokens and more")
    parser.add_argument("--warmup", type=non_negative_int, default=1)
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--skip-train", action="store_true", help="decode only")
    parser.add_argument("--save", type=output_path_or_empty, default="notebooks/results/bench_model.json",
                        help="write the medians, the split and the goals as JSON ('' to skip)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = SMALL_CONFIG if args.small else ISSUE_CONFIG
    print(environment_line())
    start = time.perf_counter()
    train = None
    if not args.skip_train:
        train = training_benchmark(fields, args.batch, args.seq, args.repeats, args.warmup)
        print(train)
        tokens = args.batch * args.seq
        for row in train.rows():
            print(f"{row['variant']:24s} {tokens / (row['median_ms'] / 1e3):10.0f} tokens/s")
    decode = decode_benchmark(fields, args.contexts, args.new_tokens, args.repeats, args.warmup,
                              long_repeats=args.long_repeats)
    for context, d in decode.items():
        print(f"\nprompt {context} tokens, ms per new token ({d['repeats']} timed runs; "
              f"same tokens as transformers: {d['same_tokens']}):")
        hf_total = d["split"]["transformers"]["total"]
        for name, m in d["split"].items():
            print(f"  {name:14s} {m['total']:7.2f} = attention {m['attention']:6.2f} + MoE {m['moe']:6.2f} + rest "
                  f"{m['rest']:6.2f}   ({hf_total / m['total']:.2f}x transformers' speed)")
    print(f"\nbenchmark took {time.perf_counter() - start:.0f} s")
    if train is not None:
        record = summary(train, decode, fields, args.batch, args.seq, args.new_tokens)
        for goal, g in record["goals"].items():
            print(f"{'met ' if g['met'] else 'MISSED'} {goal}: {g['value']:.2f}")
        if args.save:
            with open(args.save, "w") as f:
                json.dump(record, f, indent=1)
            print(f"saved to {args.save}")


if __name__ == "__main__":
    main()
