"""Decode benchmark: MHA, GQA, MLA naive and MLA absorbed, one step at growing context lengths.

``python -m helpers.bench mla`` measures attention sized like DeepSeek-V2-Lite (hidden 2048, 16 heads,
``kv_lora_rank`` 512, ``qk_nope_head_dim`` 128, ``qk_rope_head_dim`` 64, ``v_head_dim`` 128, no query
compression), batch 1, fp32, against MHA with the same 16 heads of width 128 and GQA with 4 key/value
heads (``n_heads / 4``). For every context length each cache is filled with random entries in one write (no token-by-token
prefill), then single decode steps are timed interleaved with :func:`helpers.bench.benchmark`. After each
timed step the cache length is reset, so every step attends over exactly ``context + 1`` tokens.

All caches (``KVCache`` and ``LatentCache``) are preallocated for the whole run and written in place: the
same treatment for every variant. Cache bytes per token are measured from the cache tensors.

Options: ``--contexts 1024 2048 ...``, ``--repeats N`` (halved from 8k on, at least 3), ``--warmup N``,
``--threads N``, ``--batches 8`` (the absorbed MLA alone at larger batches), ``--small`` (a seconds-long run,
tiny sizes), ``--save results.json``: the medians with their
min..max ranges, the attention sizes, the thread count and the versions, read back by :func:`load_saved` and
drawn by :func:`plot_decode` (notebook 23 plots ``notebooks/results/bench_mla.json``). The full run::

    python -m helpers.bench mla --threads 2 --repeats 10 --save notebooks/results/bench_mla.json
"""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

import torch

from helpers import machine
from helpers.bench import benchmark, environment_line
from helpers.inputs import non_negative_int, output_path, positive_int
from helpers.mla.baselines import MultiHeadAttention
from helpers.mla.cache import KVCache, LatentCache
from helpers.mla.layer import MultiHeadLatentAttention
from helpers.utils import seed_everything

V2_LITE_ATTENTION = dict(hidden_size=2048, n_heads=16, kv_lora_rank=512, qk_nope_head_dim=128,
                         qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=None)
SMALL_ATTENTION = dict(hidden_size=256, n_heads=4, kv_lora_rank=64, qk_nope_head_dim=32,
                       qk_rope_head_dim=16, v_head_dim=32, q_lora_rank=None)
VARIANTS = ("MHA", "GQA", "MLA naive", "MLA absorbed")


def build_layers(attention: dict[str, Any], gqa_kv_heads: int | None = None) -> dict[str, torch.nn.Module]:
    """The four layers compared: MHA and GQA (default ``n_heads / 4`` key/value heads) with ``v_head_dim``-wide
    heads, and one MLA layer used twice."""
    mla = MultiHeadLatentAttention(**attention)
    h, n, d = attention["hidden_size"], attention["n_heads"], attention["v_head_dim"]
    gqa_kv_heads = max(1, n // 4) if gqa_kv_heads is None else gqa_kv_heads
    return {"MHA": MultiHeadAttention(h, n, d), "GQA": MultiHeadAttention(h, n, d, n_kv_heads=gqa_kv_heads),
            "MLA naive": mla, "MLA absorbed": mla}


def filled_cache(name: str, layer: torch.nn.Module, context: int, batch: int = 1) -> KVCache | LatentCache:
    """A cache holding ``context`` random entries, with room for one more token."""
    if name.startswith("MLA"):
        cache = LatentCache(max_length=context + 1)
        cache.append(torch.randn(batch, context, layer.kv_lora_rank), torch.randn(batch, context, layer.qk_rope_head_dim))
        return cache
    cache = KVCache(max_length=context + 1)
    shape = (batch, layer.n_kv_heads, context, layer.head_dim)
    cache.append(torch.randn(shape), torch.randn(shape))
    return cache


def decode_work(name: str, layer: torch.nn.Module, attention: dict[str, Any], context: int, batch: int,
                cache_bytes_per_token: float) -> tuple[float, float]:
    """``(bytes that must be read, FLOPs)`` of one decode step of variant ``name``, fp32.

    Bytes: every weight of the layer once, plus the whole cache (``context + 1`` tokens, per sequence).
    FLOPs: ``2 B`` per weight (the projections; for the absorbed MLA the absorptions of ``W^{UK}`` and
    ``W^{UV}`` cost the same) plus the attention over ``S = context + 1`` tokens:
    MHA/GQA ``4 B n_h S d_h``; MLA absorbed ``2 B n_h S (2 d_c + d_r)`` (scores over the 576-wide
    latent+RoPE key, then the latent values); MLA naive adds re-expanding the cache,
    ``2 B S d_c n_h (d_h + d_v)``, to ``2 B n_h S (d_h + d_r + d_v)``.
    """
    s, n_h = context + 1, attention["n_heads"]
    params = sum(p.numel() for p in layer.parameters())
    d_c, d_r, d_n, d_v = (attention[k] for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"))
    if name == "MLA absorbed":
        attend = 2 * batch * n_h * s * (2 * d_c + d_r)
    elif name == "MLA naive":
        attend = 2 * batch * s * d_c * n_h * (d_n + d_v) + 2 * batch * n_h * s * (d_n + d_r + d_v)
    else:
        attend = 4 * batch * n_h * s * layer.head_dim
    return 4 * params + batch * s * cache_bytes_per_token, 2 * batch * params + attend


def decode_benchmark(attention: dict[str, Any] | None = None, contexts: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384),
                     repeats: int = 6, warmup: int = 1, gqa_kv_heads: int | None = None, verbose: bool = True,
                     batch: int = 1, variants: tuple[str, ...] = VARIANTS,
                     probes: dict[str, Any] | None = None) -> list[dict]:
    """Time one decode step of each variant at each context length (fp32).

    With ``probes`` (:func:`helpers.machine.probe`) each row also has ``floor_ms`` (:func:`decode_work`
    at the measured rates) and ``x_floor``.

    Returns:
        One row per (context, variant): ``context``, ``variant``, ``batch``, ``ms`` (median), ``min_ms``,
        ``max_ms``, ``runs``, ``bytes_per_token`` (measured on the cache), ``x_MHA`` (median time relative to
        the first variant's, MHA's by default).
    """
    attention = dict(V2_LITE_ATTENTION if attention is None else attention)
    seed_everything(0)
    layers = build_layers(attention, gqa_kv_heads)
    x = torch.randn(batch, 1, attention["hidden_size"])  # (B, 1, H): the token being decoded
    rows = []
    with torch.inference_mode():
        for context in contexts:
            caches = {name: filled_cache(name, layers[name], context, batch) for name in variants}
            steps = {name: _step(layers[name], caches[name], x, context, name) for name in variants}
            n = repeats if context < 8192 else max(3, repeats // 2)  # the naive path takes seconds per step at 16k
            floors = {name: machine.floor_seconds(*decode_work(name, layers[name], attention, context, batch,
                                                               caches[name].bytes_per_token()), probes)
                      for name in variants} if probes else None
            result = benchmark(steps, baseline=variants[0], warmup=warmup, repeats=n, floors=floors,
                               config=dict(context=context, batch=batch, dtype="fp32", **attention))
            if verbose:
                print(result.table().split("\n", 1)[1], flush=True)
            for name in variants:
                times = result.times[name]
                rows.append(dict(context=context, variant=name, batch=batch, ms=1e3 * result.median(name),
                                 min_ms=1e3 * min(times), max_ms=1e3 * max(times), runs=n,
                                 bytes_per_token=caches[name].bytes_per_token(), x_MHA=result.ratio(name),
                                 **({"floor_ms": 1e3 * floors[name], "x_floor": result.floor_ratio(name)}
                                    if floors else {})))
    return rows


def _step(layer: torch.nn.Module, cache: KVCache | LatentCache, x: torch.Tensor, context: int, name: str):
    absorb = {"MLA naive": False, "MLA absorbed": True}.get(name)

    def step() -> None:
        layer(x, cache) if absorb is None else layer(x, cache, absorb=absorb)
        cache.length = context  # forget the decoded token: every step sees context + 1 tokens

    return step


def summary(rows: list[dict], attention: dict[str, Any]) -> str:
    """The table of times and bytes, and the three goals checked against the measurements."""
    by = {(r["context"], r["variant"]): r for r in rows}
    contexts = sorted({r["context"] for r in rows})
    lines = [f"{'context':>8s}  " + "  ".join(f"{v + ' ms':>16s}" for v in VARIANTS)
             + f"  {'naive/absorbed':>14s}  {'MHA/absorbed':>12s}"]
    for c in contexts:
        ms = [by[c, v]["ms"] for v in VARIANTS]
        lines.append(f"{c:8d}  " + "  ".join(f"{m:16.2f}" for m in ms) + f"  {ms[2] / ms[3]:14.1f}  {ms[0] / ms[3]:12.2f}")
    c0 = contexts[0]
    lines.append("cache bytes per token per layer (measured): " + ", ".join(
        f"{v} {by[c0, v]['bytes_per_token']:.0f}" for v in VARIANTS))
    expected = (attention["kv_lora_rank"] + attention["qk_rope_head_dim"]) * 4
    lines.append(f"goal: MLA bytes/token == (kv_lora_rank + qk_rope_head_dim) x 4 = {expected}: "
                 f"{'met' if by[c0, 'MLA absorbed']['bytes_per_token'] == expected else 'NOT met'}")
    top = contexts[-1]
    speedup = by[top, "MLA naive"]["ms"] / by[top, "MLA absorbed"]["ms"]
    lines.append(f"goal: absorbed >= 10x faster than naive at {top}: {speedup:.1f}x, "
                 f"{'met' if speedup >= 10 else 'NOT met'}")
    faster = [c for c in contexts if by[c, "MLA absorbed"]["ms"] < by[c, "MHA"]["ms"]]
    long = [c for c in contexts if c >= 4096]
    verdict = ("not measured (no context >= 4096)" if not long
               else "met" if all(c in faster for c in long) else "NOT met")
    lines.append(f"goal: absorbed faster than MHA from 4096 on: faster at {faster}, {verdict}")
    return "\n".join(lines)


def by_context(rows: list[dict], key: str) -> dict[str, dict[int, Any]]:
    """``{variant: {context: row[key]}}`` for the rows that have ``key``."""
    out: dict[str, dict[int, Any]] = {}
    for r in rows:
        if key in r:
            out.setdefault(r["variant"], {})[r["context"]] = r[key]
    return out


def saved_results(rows: list[dict], attention: dict[str, Any], *, repeats: int, warmup: int,
                  gqa_kv_heads: int | None = None, probes: dict[str, Any] | None = None,
                  batched_rows: list[dict] | None = None) -> dict[str, Any]:
    """What ``--save`` writes: medians and min..max ranges (ms) per variant and context, and what was measured."""
    import transformers

    contexts = sorted({r["context"] for r in rows})
    return {
        "environment": environment_line(),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "attention": dict(attention),
        "gqa_kv_heads": max(1, attention["n_heads"] // 4) if gqa_kv_heads is None else gqa_kv_heads,
        "batch": 1, "dtype": "fp32", "repeats": repeats, "warmup": warmup, "contexts": contexts,
        "medians_ms": {v: {c: r["ms"] for c in contexts for r in rows if (r["context"], r["variant"]) == (c, v)}
                       for v in VARIANTS},
        "ranges_ms": {v: {c: [r["min_ms"], r["max_ms"]] for c in contexts for r in rows
                          if (r["context"], r["variant"]) == (c, v)} for v in VARIANTS},
        "bytes_per_token": {v: next(r["bytes_per_token"] for r in rows if r["variant"] == v) for v in VARIANTS},
        "rows": rows,
        **({"machine": probes} if probes else {}),
        "floors_ms": by_context(rows, "floor_ms"),
        "batched": {str(b): {"medians_ms": by_context(batch_rows, "ms"), "floors_ms": by_context(batch_rows, "floor_ms"),
                             "ranges_ms": {v: {c: [lo, hi] for c, lo in by_context(batch_rows, "min_ms")[v].items()
                                               for hi in [by_context(batch_rows, "max_ms")[v][c]]}
                                           for v in by_context(batch_rows, "ms")}}
                    for b in sorted({r["batch"] for r in batched_rows or []})
                    for batch_rows in [[r for r in batched_rows if r["batch"] == b]]},
    }


def load_saved(path) -> dict[str, Any]:
    """Read a ``--save`` file back, with the context lengths of ``medians_ms`` and ``ranges_ms`` as ints."""
    with open(path) as f:
        saved = json.load(f)
    def as_ints(table: dict) -> dict:
        return {v: {int(c): x for c, x in per_context.items()} for v, per_context in table.items()}

    for key in ("medians_ms", "ranges_ms", "floors_ms"):
        saved[key] = as_ints(saved.get(key, {}))
    saved["batched"] = {int(b): {k: as_ints(t) for k, t in tables.items()}
                        for b, tables in saved.get("batched", {}).items()}
    return saved


def plot_decode(saved: dict[str, Any], title: str = "One decode step against the context length", ax=None):
    """Median time per decode step against the context (log-log), one line per variant, min..max as bars.

    Args:
        saved: :func:`load_saved`'s result (or :func:`saved_results`'s).
        title: the plot's title; ax: an Axes to draw on (default: a new figure).
    Returns:
        The Axes.
    """
    from helpers.teaching.plotting import axes

    ax = axes(title, "context length (tokens, log scale)", "time per decode step (ms, median, log scale)", ax=ax)
    draw_medians(ax, saved, VARIANTS, dashed="MLA naive")
    draw_floor(ax, saved.get("floors_ms", {}).get("MLA absorbed"), "floor of the absorbed MLA step")
    ax.legend(loc="upper left", fontsize=8)
    return ax


def draw_floor(ax, floors: dict[int, float] | None, label: str) -> None:
    """The floor (ms per context, :func:`decode_work` at the measured rates) as a thick grey line, if any."""
    if floors:
        contexts = sorted(floors)
        ax.plot(contexts, [floors[c] for c in contexts], color="grey", linewidth=4, alpha=0.5, label=label)


def draw_medians(ax, saved: dict[str, Any], names, dashed: str | None = None, dotted: str | None = None) -> None:
    """One line per variant: median ms against the context (log-log), the rounds' min..max as error bars."""
    for name in names:
        points = sorted(saved["medians_ms"][name].items())
        contexts, ms = [c for c, _ in points], [m for _, m in points]
        low_high = [saved["ranges_ms"][name][c] for c in contexts]
        err = [[m - lo for m, (lo, _) in zip(ms, low_high)], [hi - m for m, (_, hi) in zip(ms, low_high)]]
        style = "--" if name == dashed else ":" if name == dotted else "-"
        ax.errorbar(contexts, ms, yerr=err, marker="o", capsize=3, label=name, linestyle=style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.bench mla", description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=positive_int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=positive_int, default=6)
    parser.add_argument("--warmup", type=non_negative_int, default=1)
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--small", action="store_true", help="tiny attention sizes, for a quick look")
    parser.add_argument("--batches", type=positive_int, nargs="*", default=[8],
                        help="larger batches to time the absorbed MLA decode at (the other variants only at batch 1)")
    parser.add_argument("--save", type=output_path, default=None, help="write the rows and the environment as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    attention = SMALL_ATTENTION if args.small else V2_LITE_ATTENTION
    print(environment_line())
    print("attention: " + ", ".join(f"{k}={v}" for k, v in attention.items()) + "; batch 1, fp32; "
          f"MHA {attention['n_heads']} heads of {attention['v_head_dim']}, GQA {max(1, attention['n_heads'] // 4)} "
          "kv heads; caches preallocated, written in place")
    probes = machine.probe()
    print(machine.describe(probes), flush=True)
    rows = decode_benchmark(attention, tuple(args.contexts), repeats=args.repeats, warmup=args.warmup, probes=probes)
    print(summary(rows, attention))
    batched = []
    for batch in [b for b in args.batches if b > 1]:
        print(f"MLA absorbed, batch {batch}:", flush=True)
        batched += decode_benchmark(attention, tuple(args.contexts), repeats=args.repeats, warmup=args.warmup,
                                    batch=batch, variants=("MLA absorbed",), probes=probes)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(saved_results(rows, attention, repeats=args.repeats, warmup=args.warmup, probes=probes,
                                    batched_rows=batched), f, indent=1)
        print(f"saved to {args.save}")
