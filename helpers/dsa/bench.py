"""Decode benchmark: dense absorbed MLA against DeepSeek Sparse Attention (DSA) at a fixed k.

``python -m helpers.bench dsa`` measures one decode step (batch 1, fp32) of attention sized like
DeepSeek-V2-Lite (hidden 2048, 16 heads, ``kv_lora_rank`` 512, ``qk_nope_head_dim`` 128, ``qk_rope_head_dim``
64, ``v_head_dim`` 128) with query compression (``q_lora_rank`` 1536, which the indexer needs; V2-Lite has
none) and a DeepSeek-V3.2-like indexer (64 heads of 128, ``index_topk`` 2048). One
:class:`~helpers.dsa.SparseLatentAttention` layer is timed three ways on the same cache:

- ``MLA dense``: ``layer(x, cache, sparse=False)``, absorbed MLA over every cached token (the indexer keys of
  the new token are still appended, a negligible cost);
- ``DSA``: ``layer(x, cache)``, the indexer over every cached token, top-k, absorbed MLA over k tokens;
- ``indexer only``: ``layer.select(x, cache)``, the part of DSA that still grows with the context.

For each context the caches are filled with random entries in one write; after each step they are truncated
back, so every step attends over ``context + 1`` tokens. Variants run interleaved (:func:`helpers.bench.benchmark`).

Options: ``--contexts``, ``--repeats``, ``--warmup``, ``--topk``, ``--threads``, ``--small``,
``--save results.json`` (read back by :func:`load_saved`, drawn by :func:`plot_decode`). The saved run::

    python -m helpers.bench dsa --threads 2 --save notebooks/results/bench_dsa.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from typing import Any

import torch

from helpers.bench import benchmark, environment_line
from helpers.dsa.layer import SparseLatentAttention, SparseLatentCache
from helpers.inputs import non_negative_int, output_path, positive_int
from helpers.mla.bench import draw_medians
from helpers.mla.bench import load_saved as load_saved  # the same file layout as the MLA benchmark's
from helpers.utils import seed_everything

V2_LITE_WITH_INDEXER = dict(hidden_size=2048, n_heads=16, kv_lora_rank=512, qk_nope_head_dim=128,
                            qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=1536,
                            index_topk=2048, index_n_heads=64, index_head_dim=128)
SMALL = dict(hidden_size=256, n_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
             q_lora_rank=96, index_topk=128, index_n_heads=8, index_head_dim=32)
VARIANTS = ("MLA dense", "DSA", "indexer only")
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)


def filled_cache(layer: SparseLatentAttention, context: int) -> SparseLatentCache:
    """A cache with ``context`` random latents, RoPE keys and indexer keys, room for one more token."""
    cache = SparseLatentCache(max_length=context + 1)
    cache.append(torch.randn(1, context, layer.kv_lora_rank), torch.randn(1, context, layer.qk_rope_head_dim))
    cache.indexer.append(torch.randn(1, context, layer.indexer.head_dim))
    return cache


def decode_benchmark(attention: dict[str, Any] | None = None, contexts=CONTEXTS, repeats: int = 8,
                     warmup: int = 2, verbose: bool = True) -> list[dict]:
    """One row per (context, variant): ``context``, ``variant``, ``ms`` (median), ``min_ms``, ``max_ms``, ``runs``."""
    attention = dict(V2_LITE_WITH_INDEXER if attention is None else attention)
    seed_everything(0)
    layer = SparseLatentAttention(**attention)
    x = torch.randn(1, 1, attention["hidden_size"])  # (B, 1, H): the token being decoded
    rows = []
    with torch.inference_mode():
        for context in contexts:
            cache = filled_cache(layer, context)
            steps = _steps(layer, x, cache, context)
            result = benchmark(steps, baseline="MLA dense", warmup=warmup, repeats=repeats,
                               config=dict(context=context, batch=1, dtype="fp32"))
            if verbose:
                print(result.table().split("\n", 2)[2], flush=True)
            for name in VARIANTS:
                t = result.times[name]
                rows.append(dict(context=context, variant=name, ms=1e3 * result.median(name), min_ms=1e3 * min(t),
                                 max_ms=1e3 * max(t), runs=len(t)))
            del cache
    return rows


def _steps(layer: SparseLatentAttention, x: torch.Tensor, cache: SparseLatentCache, context: int) -> dict:
    """The three timed calls; each truncates the cache back to ``context`` tokens afterwards."""
    def step(run):
        def go() -> None:
            run()
            cache.truncate(context)
        return go

    return {"MLA dense": step(lambda: layer(x, cache, sparse=False)), "DSA": step(lambda: layer(x, cache)),
            "indexer only": step(lambda: layer.select(x, cache))}


def crossover(medians: dict[str, dict[int, float]]) -> float | None:
    """The context at which DSA becomes faster than dense MLA, interpolated in log-log between the two
    measured contexts around the first sign change (None if DSA is never faster, the first context if always)."""
    contexts = sorted(medians["DSA"])
    diff = [math.log(medians["DSA"][c] / medians["MLA dense"][c]) for c in contexts]
    if diff[0] < 0:
        return float(contexts[0])
    for (c0, d0), (c1, d1) in zip(zip(contexts, diff), zip(contexts[1:], diff[1:])):
        if d0 >= 0 > d1:
            f = d0 / (d0 - d1)
            return float(math.exp(math.log(c0) + f * (math.log(c1) - math.log(c0))))
    return None


def saved_results(rows: list[dict], attention: dict[str, Any], *, repeats: int, warmup: int) -> dict[str, Any]:
    import transformers

    contexts = sorted({r["context"] for r in rows})
    medians = {v: {c: r["ms"] for r in rows for c in contexts if (r["context"], r["variant"]) == (c, v)}
               for v in VARIANTS}
    return {
        "environment": environment_line(), "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "attention": dict(attention), "batch": 1, "dtype": "fp32", "repeats": repeats, "warmup": warmup,
        "contexts": contexts, "medians_ms": medians,
        "ranges_ms": {v: {c: [r["min_ms"], r["max_ms"]] for r in rows for c in contexts
                          if (r["context"], r["variant"]) == (c, v)} for v in VARIANTS},
        "crossover_context": crossover(medians), "rows": rows,
    }


def summary(saved: dict[str, Any]) -> str:
    """The table of medians and the DSA / dense ratio, with the crossover."""
    med = saved["medians_ms"]
    lines = [f"{'context':>8s}  " + "  ".join(f"{v + ' ms':>16s}" for v in VARIANTS) + f"  {'DSA/dense':>9s}"]
    for c in saved["contexts"]:
        lines.append(f"{c:8d}  " + "  ".join(f"{med[v][c]:16.2f}" for v in VARIANTS)
                     + f"  {med['DSA'][c] / med['MLA dense'][c]:9.2f}")
    x = saved["crossover_context"]
    lines.append("crossover: " + ("DSA never faster in this range" if x is None
                                  else f"DSA faster than dense from about {x:.0f} tokens of context"))
    return "\n".join(lines)


def plot_decode(saved: dict[str, Any], title: str = "One decode step: dense MLA against DSA", ax=None):
    """Median time per decode step against the context (log-log), min..max as bars, the crossover marked."""
    from helpers.teaching.plotting import axes

    ax = axes(title, "context length (tokens, log scale)", "time per decode step (ms, median, log scale)", ax=ax)
    draw_medians(ax, saved, VARIANTS, dotted="indexer only")
    k = saved["attention"]["index_topk"]
    ax.axvline(k, color="grey", linewidth=0.8, linestyle="--", label=f"k = {k}")
    if saved["crossover_context"] is not None:
        ax.axvline(saved["crossover_context"], color="black", linewidth=0.8, label="crossover")
    ax.legend(loc="upper left", fontsize=8)
    return ax


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.bench dsa", description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=positive_int, nargs="+", default=list(CONTEXTS))
    parser.add_argument("--repeats", type=positive_int, default=8)
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--topk", type=positive_int, default=None,
                        help="index_topk (default 2048, or 128 with --small)")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--small", action="store_true", help="tiny sizes, for a quick look")
    parser.add_argument("--save", type=output_path, default=None, help="write the medians and the environment as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    attention = dict(SMALL if args.small else V2_LITE_WITH_INDEXER)
    if args.topk:
        attention["index_topk"] = args.topk
    print(environment_line())
    print("attention: " + ", ".join(f"{k}={v}" for k, v in attention.items()) + "; batch 1, fp32")
    rows = decode_benchmark(attention, tuple(args.contexts), repeats=args.repeats, warmup=args.warmup)
    saved = saved_results(rows, attention, repeats=args.repeats, warmup=args.warmup)
    print(summary(saved))
    if args.save:
        with open(args.save, "w") as f:
            json.dump(saved, f, indent=1)
        print(f"saved to {args.save}")
