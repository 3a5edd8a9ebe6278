"""This machine's own limits, measured: the fp32 matrix-multiply rate and the memory read bandwidth.

A benchmark that says "x ms" says little until it is set against what the machine can do at best.
The *floor* of a piece of work is the time it cannot beat: the bytes it must read at the measured
bandwidth, or its FLOPs at the measured matrix-multiply rate, whichever is longer (the roofline
model: work is bound by memory or by arithmetic). :func:`probe` measures both in the run that uses
them (``python -m helpers.bench moe`` and ``mla`` save the probes beside their timings).
"""

from __future__ import annotations

import time
from typing import Any

import torch


def _best_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """The fastest of ``repeats`` timed calls: a limit is what the machine can do at best (noise only slows)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_rate(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one large fp32 matrix multiplication ``(n, n) @ (n, n)`` (``2 n^3`` FLOPs), best of ``repeats``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    return 2 * n**3 / _best_seconds(lambda: torch.mm(a, b, out=out), repeats)


def read_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of reading one large fp32 tensor once (``x.sum()`` over ``n_bytes``, far above the caches), best of
    ``repeats``."""
    x = torch.rand(n_bytes // 4)
    return n_bytes / _best_seconds(x.sum, repeats)


def matvec_bandwidth(rows: int = 512, cols: int = 512, n_bytes: int = 64 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of matrix-vector products over many small matrices, each read once (best of ``repeats``).

    ``torch.mv`` in turn over ``n_bytes`` of distinct ``(rows, cols)`` fp32 matrices (default: 64 of 1 MiB, an
    expert's ``W_gate_up`` in the MoE benchmark, far above the caches): what the BLAS kernels make of the
    bandwidth when a decode step reads its experts one small matrix at a time. Not a floor: a measure of
    how far the kernels stay from :func:`read_bandwidth`.
    """
    weights = torch.rand(max(1, n_bytes // (4 * rows * cols)), rows, cols)
    x = torch.rand(cols)
    return weights.numel() * 4 / _best_seconds(lambda: [torch.mv(w, x) for w in weights], repeats)


def skinny_gemm_rate(m: int = 16384, k: int = 576, n: int = 16, repeats: int = 5) -> float:
    """FLOP/s of one tall-skinny product ``(m, k) @ (k, n)`` (``2 m k n`` FLOPs), best of ``repeats``.

    The default is the scores of the absorbed MLA decode at 16k tokens of context and batch 1: 16k cached
    latent+RoPE keys of width 576 against the 16 heads' queries. Not a floor: how far the BLAS kernel for
    that shape stays from :func:`gemm_rate`.
    """
    a, b = torch.randn(m, k), torch.randn(n, k)
    return 2 * m * k * n / _best_seconds(lambda: torch.mm(a, b.T), repeats)


def probe(gemm_size: int = 2048, read_bytes: int = 256 * 2**20, repeats: int = 5) -> dict[str, Any]:
    """Both limits with what was measured: ``{"gemm_flops_per_s", "read_bytes_per_s", "gemm_size", ...}``.

    Beside the limits, what two small-work kernels achieve (``matvec_bytes_per_s``, :func:`matvec_bandwidth`;
    ``skinny_gemm_flops_per_s``, :func:`skinny_gemm_rate`), to say where a gap to a floor comes from.
    """
    return {"gemm_flops_per_s": gemm_rate(gemm_size, repeats), "read_bytes_per_s": read_bandwidth(read_bytes, repeats),
            "matvec_bytes_per_s": matvec_bandwidth(repeats=repeats),
            "skinny_gemm_flops_per_s": skinny_gemm_rate(repeats=repeats),
            "gemm_size": gemm_size, "read_bytes": read_bytes, "repeats": repeats, "threads": torch.get_num_threads()}


def floor_seconds(bytes_read: float, flops: float, probes: dict[str, Any]) -> float:
    """The roofline floor: ``max(bytes_read / bandwidth, flops / GEMM rate)`` in seconds."""
    if bytes_read < 0 or flops < 0:
        raise ValueError(f"bytes_read and flops must be >= 0, got {bytes_read} and {flops}")
    return max(bytes_read / probes["read_bytes_per_s"], flops / probes["gemm_flops_per_s"])


def describe(probes: dict[str, Any]) -> str:
    """One line: the measured GEMM rate (GFLOP/s), read bandwidth (GB/s) and the two kernel rates."""
    return (f"machine: fp32 GEMM {probes['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s ({probes['gemm_size']}^3), "
            f"read bandwidth {probes['read_bytes_per_s'] / 1e9:.1f} GB/s (sum of {probes['read_bytes'] // 2**20} MiB), "
            f"{probes['threads']} threads; kernels: matrix-vector products over 1 MiB matrices "
            f"{probes['matvec_bytes_per_s'] / 1e9:.1f} GB/s, "
            f"(16384 x 576) @ (576 x 16) {probes['skinny_gemm_flops_per_s'] / 1e9:.0f} GFLOP/s")
