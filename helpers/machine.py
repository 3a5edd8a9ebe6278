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


def probe(gemm_size: int = 2048, read_bytes: int = 256 * 2**20, repeats: int = 5) -> dict[str, Any]:
    """Both limits with what was measured: ``{"gemm_flops_per_s", "read_bytes_per_s", "gemm_size", ...}``."""
    return {"gemm_flops_per_s": gemm_rate(gemm_size, repeats), "read_bytes_per_s": read_bandwidth(read_bytes, repeats),
            "gemm_size": gemm_size, "read_bytes": read_bytes, "repeats": repeats, "threads": torch.get_num_threads()}


def floor_seconds(bytes_read: float, flops: float, probes: dict[str, Any]) -> float:
    """The roofline floor: ``max(bytes_read / bandwidth, flops / GEMM rate)`` in seconds."""
    if bytes_read < 0 or flops < 0:
        raise ValueError(f"bytes_read and flops must be >= 0, got {bytes_read} and {flops}")
    return max(bytes_read / probes["read_bytes_per_s"], flops / probes["gemm_flops_per_s"])


def describe(probes: dict[str, Any]) -> str:
    """One line: the measured GEMM rate (GFLOP/s) and read bandwidth (GB/s)."""
    return (f"machine: fp32 GEMM {probes['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s ({probes['gemm_size']}^3), "
            f"read bandwidth {probes['read_bytes_per_s'] / 1e9:.1f} GB/s (sum of {probes['read_bytes'] // 2**20} MiB), "
            f"{probes['threads']} threads")
