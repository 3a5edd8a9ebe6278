"""MoE dispatch benchmark: naive loop, our sorted dispatch, the FLOP-equivalent dense SwiGLU, transformers.

``python -m helpers.bench moe`` times, on one standard layer (hidden 512, expert width 256, 64 routed
experts, top-6, 2 shared, ``n_group`` 1, fp32, the machine's threads):

- ``dense SwiGLU``: one SwiGLU of width ``(top_k + n_shared) * I = 2048``, the same activated
  parameters and FLOPs per token as the MoE layer (the baseline of every ratio);
- ``ours``: :class:`helpers.moe.DeepSeekMoE` (router + the ``auto`` backend + shared experts);
- ``transformers eager`` / ``transformers grouped_mm``: ``DeepseekV3MoE`` with the identical weights
  (built by :func:`helpers.moe.hf.moe_to_hf`), with its eager and its ``grouped_mm`` experts paths;
- ``naive loop``: the definition, one token and one chosen expert at a time (only up to
  ``--naive-max-tokens`` tokens: it is far too slow beyond).

Forward (under ``torch.no_grad``) and forward+backward (gradients of every weight and the input),
for the standard token count (4096) and a sweep (1, 8, 32, 128, 512 tokens). Speed is measured here,
never in tests.

The floor: the run first measures this machine's fp32 GEMM rate and read bandwidth
(:func:`helpers.machine.probe`), and every variant is printed beside the floor of its work,
``max(bytes / bandwidth, FLOPs / GEMM rate)`` (:func:`moe_work`: the MoE layer must read the router,
the shared experts and every expert the input chose once; the dense SwiGLU all of its weights),
and its ratio to it. ``--paths`` adds the named backends (``ours, loop``, ``ours, grouped``, ``ours, sorted``)
to the forward sweep, to see where the ``auto`` backend (:class:`helpers.moe.backends.auto.Auto`) should
switch. ``--compiled`` adds ``ours compiled`` (the ``compiled`` backend: ``torch.compile`` of the reference
loop) to every table, and saves its compile times (seconds, first forward and first forward+backward) under
``"compile seconds"``. The full run (about 3 minutes on 2 idle cores, without ``--compiled``)::

    python -m helpers.bench moe --threads 2 --paths --save notebooks/results/bench_moe.json

``make bench`` runs the forward part a second time with ``OMP_WAIT_POLICY=PASSIVE`` in the environment (PyTorch's
OpenMP threads then sleep between parallel operations instead of spinning; why that matters for the thread pool:
:mod:`helpers.moe.backends.threads`) and saves it as
``bench_moe_passive.json``; the environment line of every table names the policy when it is set.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import torch.nn.functional as F

from helpers import machine
from helpers.bench import BenchResult, benchmark, environment_line
from helpers.inputs import non_negative_int, output_path, positive_int
from helpers.layers import SwiGLU
from helpers.moe.layer import DeepSeekMoE

STANDARD = dict(hidden_size=512, moe_intermediate_size=256, n_routed_experts=64, num_experts_per_tok=6,
                n_shared_experts=2, n_group=1, topk_group=1)
BASELINE = "dense SwiGLU"


def naive_moe(layer: DeepSeekMoE, u: torch.Tensor) -> torch.Tensor:
    """V3 eq. 12 read literally: for every token, for every chosen expert, one small SwiGLU (slow)."""
    x = u.reshape(-1, layer.hidden_size)  # (T, H)
    logits = x @ layer.gate_weight.T  # (T, E)
    scores = torch.sigmoid(logits) if layer.scoring_func == "sigmoid" else logits.softmax(-1)
    indices = (scores + layer.bias).topk(layer.top_k, dim=-1).indices  # (T, k)
    weights = scores.gather(1, indices)  # (T, k)
    if layer.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights * layer.routed_scaling_factor
    rows = []
    for t in range(x.shape[0]):
        y_t = layer.shared_experts(x[t]) if layer.shared_experts is not None else torch.zeros_like(x[t])
        for g, e in zip(weights[t], indices[t].tolist()):
            gate, up = (layer.w_gate_up[e] @ x[t]).chunk(2)  # (I,) each
            y_t = y_t + g * (layer.w_down[e] @ (F.silu(gate) * up))  # (H,)
        rows.append(y_t)
    return torch.stack(rows).reshape(u.shape)


def build(seed: int = 0, **sizes: Any) -> dict[str, Any]:
    """The layers of one comparison: ours, transformers (eager, grouped_mm) on the same weights, dense."""
    from helpers.configs import tiny_config
    from helpers.moe.hf import moe_to_hf

    fields = {**STANDARD, **sizes}
    torch.manual_seed(seed)
    config = tiny_config("v3", **fields, norm_topk_prob=True, routed_scaling_factor=1.0)  # eager experts
    ours = DeepSeekMoE.from_config(config)
    hf_eager = moe_to_hf(ours, config)
    config._experts_implementation = "grouped_mm"
    hf_grouped = moe_to_hf(ours, config)
    width = (fields["num_experts_per_tok"] + fields["n_shared_experts"]) * fields["moe_intermediate_size"]
    dense = SwiGLU(fields["hidden_size"], width)
    return dict(ours=ours, hf_eager=hf_eager, hf_grouped=hf_grouped, dense=dense, fields=fields)


def moe_work(fields: dict[str, int], tokens: int, hit_experts: int, *, backward: bool = False,
             dense: bool = False) -> tuple[float, float]:
    """``(bytes that must be read, FLOPs)`` of one MoE layer (or its dense SwiGLU) pass, fp32.

    Forward: the router ``E x H``, the shared experts ``3 H I N_s`` and the ``hit_experts`` chosen
    experts ``3 H I`` each, read once, plus the input and output rows; ``2 T E H`` router FLOPs and
    ``6 T H I (K_r + N_s)`` expert FLOPs. The dense SwiGLU of width ``(K_r + N_s) I`` reads all of its
    ``3 H (K_r + N_s) I`` weights and does the same expert FLOPs. Forward+backward: three times both
    (the backward reads the weights again and writes their gradients; its FLOPs are twice the forward's).
    """
    h, i, e = fields["hidden_size"], fields["moe_intermediate_size"], fields["n_routed_experts"]
    width = (fields["num_experts_per_tok"] + fields["n_shared_experts"]) * i
    if dense:
        params, flops = 3 * h * width, 6 * tokens * h * width
    else:
        params = e * h + 3 * h * i * (fields["n_shared_experts"] + hit_experts)
        flops = 2 * tokens * e * h + 6 * tokens * h * width
    passes = 3 if backward else 1
    return passes * 4 * (params + 2 * tokens * h), passes * flops


def floors(layers: dict[str, Any], x: torch.Tensor, probes: dict[str, Any], names, *,
           backward: bool) -> dict[str, float]:
    """Seconds per variant that its work cannot beat on this machine (the experts ``x`` chooses count)."""
    with torch.no_grad():
        layers["ours"](x)
    hit = int((layers["ours"].last_stats.load > 0).sum())
    tokens = x.shape[-2]
    return {n: machine.floor_seconds(*moe_work(layers["fields"], tokens, hit, backward=backward,
                                               dense=n == BASELINE), probes) for n in names}


def with_backend(layer: DeepSeekMoE, backend: str):
    """``layer`` run with the backend named ``backend`` during the call (its own backend is restored after)."""
    def call(u: torch.Tensor) -> torch.Tensor:
        before, layer.backend = layer.backend, backend
        try:
            return layer(u)
        finally:
            layer.backend = before
    call.parameters = layer.parameters
    return call


def compile_seconds(layer: DeepSeekMoE, tokens: int, *, backward: bool) -> float:
    """Seconds of the first call of ``layer`` on the ``compiled`` backend at ``tokens`` tokens: mostly compiling."""
    x = torch.randn(1, tokens, layer.hidden_size, requires_grad=backward)
    call = with_backend(layer, "compiled")
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        y = call(x)
        if backward:
            y.sum().backward()
    return time.perf_counter() - start


def variants(layers: dict[str, Any], tokens: int, *, backward: bool, naive_max_tokens: int = 256,
             with_transformers: bool = True, x: torch.Tensor | None = None,
             paths: bool = False, compiled: bool = False) -> dict[str, Any]:
    """Zero-argument callables, one per variant, each running one forward (or forward+backward)."""
    x = torch.randn(1, tokens, layers["fields"]["hidden_size"]) if x is None else x
    modules = {BASELINE: layers["dense"], "ours": layers["ours"]}
    if paths:
        modules.update({f"ours, {name}": with_backend(layers["ours"], name) for name in ("loop", "grouped", "sorted")})
    if compiled:
        modules["ours compiled"] = with_backend(layers["ours"], "compiled")
    if with_transformers:
        modules.update({"transformers eager": layers["hf_eager"], "transformers grouped_mm": layers["hf_grouped"]})
    if tokens <= naive_max_tokens:
        modules["naive loop"] = lambda u: naive_moe(layers["ours"], u)

    def make(fn):
        if not backward:
            def run():
                with torch.no_grad():
                    fn(x)
            return run
        x_grad = x.clone().requires_grad_()
        params = list(fn.parameters()) if hasattr(fn, "parameters") else list(layers["ours"].parameters())

        def run():
            for p in params:
                p.grad = None
            x_grad.grad = None
            fn(x_grad).sum().backward()
        return run

    return {name: make(fn) for name, fn in modules.items()}


def check_equal(layers: dict[str, Any], tokens: int = 64) -> None:
    """The variants compute the same layer (so the comparison is fair)."""
    x = torch.randn(1, tokens, layers["fields"]["hidden_size"])
    with torch.no_grad():
        want = layers["ours"](x)
        for name in ("hf_eager", "hf_grouped"):
            torch.testing.assert_close(layers[name](x), want, atol=1e-4, rtol=1e-4, msg=name)
        torch.testing.assert_close(naive_moe(layers["ours"], x[:, :8]), want[:, :8], atol=1e-4, rtol=1e-4)


def run(layers: dict[str, Any], tokens: int, *, backward: bool, warmup: int = 1, repeats: int = 5,
        naive_max_tokens: int = 256, with_transformers: bool = True, probes: dict[str, Any] | None = None,
        paths: bool = False, compiled: bool = False) -> BenchResult:
    """Time every variant at ``tokens`` tokens; ratios are relative to the dense SwiGLU (and the floors, if
    ``probes`` are given)."""
    config = {**layers["fields"], "tokens": tokens, "dtype": "fp32",
              "pass": "forward+backward" if backward else "forward"}
    x = torch.randn(1, tokens, layers["fields"]["hidden_size"])
    calls = variants(layers, tokens, backward=backward, naive_max_tokens=naive_max_tokens,
                     with_transformers=with_transformers, x=x, paths=paths, compiled=compiled)
    limits = floors(layers, x, probes, calls, backward=backward) if probes else None
    return benchmark(calls, baseline=BASELINE, warmup=warmup, repeats=repeats, config=config, floors=limits)


def sweep(layers: dict[str, Any], token_counts: list[int], *, backward: bool, **kw: Any) -> dict[int, BenchResult]:
    """:func:`run` for each token count."""
    return {t: run(layers, t, backward=backward, **kw) for t in token_counts}


def floors_ms(results: dict[int, BenchResult]) -> dict[int, dict[str, float]]:
    """Floor milliseconds per token count and variant (saved beside the medians)."""
    return {tokens: {n: 1e3 * f for n, f in r.floors.items()} for tokens, r in results.items()}


def medians_ms(results: dict[int, BenchResult]) -> dict[int, dict[str, float]]:
    """Median milliseconds per token count and variant: what the table, the plot and ``--save`` use."""
    return {tokens: {n: 1e3 * r.median(n) for n in r.times} for tokens, r in results.items()}


def ratios_to_floor(medians: dict[int, dict[str, float]], floors: dict[int, dict[str, float]]
                    ) -> dict[int, dict[str, float]]:
    """Median over floor per token count and variant (1 would be the machine's best)."""
    return {t: {n: ms / floors[t][n] for n, ms in row.items() if floors.get(t, {}).get(n)}
            for t, row in medians.items()}


def sweep_table(medians: dict[int, dict[str, float]], digits: int = 1) -> str:
    """Median milliseconds (or any number) per variant (columns) and token count (rows); '-' where not measured."""
    names = list(dict.fromkeys(n for row in medians.values() for n in row))
    width = max(12, *(len(n) for n in names))
    lines = ["tokens  " + "  ".join(f"{n:>{width}s}" for n in names)]
    for tokens, row in medians.items():
        cells = [f"{row[n]:{width}.{digits}f}" if n in row else f"{'-':>{width}s}" for n in names]
        lines.append(f"{tokens:6d}  " + "  ".join(cells))
    return "\n".join(lines)


def plot_sweep(forward: dict[int, dict[str, float]], backward: dict[int, dict[str, float]] | None = None,
               forward_floor: dict[int, dict[str, float]] | None = None,
               backward_floor: dict[int, dict[str, float]] | None = None):
    """Time per token against the token count, one line per variant (log-log); returns the figure.

    Args:
        forward, backward: median milliseconds per token count and variant (:func:`medians_ms`, or
            the ``"sweep forward"`` / ``"sweep forward+backward"`` entries of :func:`load_saved`).
        forward_floor, backward_floor: floor milliseconds likewise (``"floor forward"``, ...); the
            MoE layer's floor is drawn as a thick grey line.
    """
    import matplotlib.pyplot as plt

    from helpers.teaching.plotting import axes

    panels = [("forward", forward, forward_floor)] + ([("forward+backward", backward, backward_floor)]
                                                       if backward else [])
    fig, axs = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.0), squeeze=False)
    for ax, (label, medians, floor) in zip(axs[0], panels):
        axes(f"MoE layer, {label}", "tokens in the batch", "time per token (µs, median)", ax=ax)
        names = list(dict.fromkeys(n for row in medians.values() for n in row))
        for name in names:
            pts = [(t, 1e3 * row[name] / t) for t, row in sorted(medians.items()) if name in row]
            ax.plot(*zip(*pts), marker="o", label=name, linestyle="--" if name == BASELINE else "-")
        if floor:
            pts = [(t, 1e3 * row["ours"] / t) for t, row in sorted(floor.items()) if "ours" in row]
            ax.plot(*zip(*pts), color="grey", linewidth=4, alpha=0.5, label="floor of the MoE layer")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def load_saved(path: str) -> dict[str, Any]:
    """Read a ``--save`` file back, with the token counts of the sweeps as ints."""
    with open(path) as f:
        saved = json.load(f)
    for key in [k for k in saved if k.startswith(("sweep ", "floor "))]:
        saved[key] = {int(t): row for t, row in saved[key].items()}
    return saved


def parse_overrides(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, int]:
    """``["n_routed_experts=8", ...]`` -> ``{"n_routed_experts": 8}``; unknown fields or non-integers are errors."""
    overrides = {}
    for item in items:
        field, _, value = item.partition("=")
        if field not in STANDARD or not value.strip().isdigit():
            parser.error(f"--set {item!r}: expected FIELD=INT with FIELD one of {', '.join(STANDARD)}")
        overrides[field] = int(value)
    return overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.bench moe", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=positive_int, default=4096, help="token count of the standard table")
    parser.add_argument("--sweep", type=positive_int, nargs="*", default=[1, 8, 32, 128, 512],
                        help="token counts of the sweep (none: skip it)")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--warmup", type=non_negative_int, default=1)
    parser.add_argument("--naive-max-tokens", type=non_negative_int, default=8)
    parser.add_argument("--paths", action="store_true", help="add the named backends to the forward sweep")
    parser.add_argument("--compiled", action="store_true",
                        help="add the compiled backend (torch.compile of the reference loop) to every table")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: the machine's)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=INT",
                        help=f"change a field of the standard layer, e.g. --set n_routed_experts=8; fields: {', '.join(STANDARD)}")
    parser.add_argument("--plot", type=output_path, default=None, help="save the sweep plot to this PNG")
    parser.add_argument("--save", type=output_path, default=None,
                        help="write every median (ms) and the environment as JSON")
    args = parser.parse_args(argv)
    overrides = parse_overrides(parser, args.set)
    try:  # the layer's own checks, before any timing
        DeepSeekMoE(**{**STANDARD, **overrides})
    except ValueError as exc:
        parser.error(f"--set: {exc}")
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = build(**overrides)
    check_equal(layers)
    passes = [False] if args.no_backward else [False, True]
    probes = machine.probe()
    print(machine.describe(probes), flush=True)
    kw = dict(warmup=args.warmup, repeats=args.repeats, naive_max_tokens=args.naive_max_tokens, probes=probes,
              compiled=args.compiled)
    saved: dict[str, Any] = {"environment": environment_line(), "layer": layers["fields"],
                             "repeats": args.repeats, "warmup": args.warmup, "machine": probes}
    if args.compiled:  # compile before timing, and say how long it took
        saved["compile seconds"] = {("forward+backward" if b else "forward"): compile_seconds(
            layers["ours"], args.tokens, backward=b) for b in passes}
        print("compile seconds of the compiled backend (first call): "
              + ", ".join(f"{k} {v:.1f}" for k, v in saved["compile seconds"].items()), flush=True)
    for backward in passes:
        label = "forward+backward" if backward else "forward"
        result = run(layers, args.tokens, backward=backward, **kw)
        print(result, end="\n\n", flush=True)
        saved[f"standard {label}"] = medians_ms({args.tokens: result})[args.tokens]
        saved[f"standard {label} range"] = {n: [1e3 * min(t), 1e3 * max(t)] for n, t in result.times.items()}
        saved[f"floor {label}"] = {args.tokens: floors_ms({args.tokens: result})[args.tokens]}
    for backward in passes:
        label = "forward+backward" if backward else "forward"
        if args.sweep:
            results = sweep(layers, [t for t in args.sweep if t != args.tokens], backward=backward,
                            paths=args.paths and not backward, **kw)
            medians = medians_ms(results)
            print(f"sweep, {label}, median ms:\n{sweep_table(medians)}\n"
                  f"x floor:\n{sweep_table(ratios_to_floor(medians, floors_ms(results)), digits=2)}\n", flush=True)
            saved[f"sweep {label}"] = {**medians, args.tokens: saved[f"standard {label}"]}
            saved[f"floor {label}"] = {**floors_ms(results), **saved[f"floor {label}"]}
    if args.plot and args.sweep:
        plot_sweep(saved["sweep forward"], saved.get("sweep forward+backward"), saved.get("floor forward"),
                   saved.get("floor forward+backward")).savefig(args.plot)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(saved, f, indent=1)
