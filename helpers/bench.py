"""Benchmarking: variants run interleaved after warm-ups; medians and ratios, with the config stated.

This machine (and a laptop) is noisy, so a benchmark never times one variant in a block and then
the next: every round runs each variant once, in a rotating order, and the table reports medians.
Speed is measured here and shown in notebooks; tests never assert it.

Command line: ``python -m helpers.bench moe``, ``mla``, ``dsa``, ``model`` or ``v4`` (DeepSeek-V4's decode against
``transformers``).
"""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class BenchResult:
    """Per-variant timings in seconds, plus what was measured."""

    times: dict[str, list[float]]
    baseline: str
    config: dict[str, Any] = field(default_factory=dict)
    floors: dict[str, float] = field(default_factory=dict)
    """Seconds each variant's work cannot beat on this machine (:func:`helpers.machine.floor_seconds`)."""

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, name: str) -> float:
        """Median time of ``name`` divided by the baseline's median (below 1 is faster)."""
        return self.median(name) / self.median(self.baseline)

    def floor_ratio(self, name: str) -> float | None:
        """Median time of ``name`` divided by its floor (1 is the machine's best), None without a floor."""
        return self.median(name) / self.floors[name] if self.floors.get(name) else None

    def rows(self) -> list[dict[str, Any]]:
        return [{"variant": n, "median_ms": 1e3 * self.median(n), "ratio": self.ratio(n),
                 "min_ms": 1e3 * min(t), "max_ms": 1e3 * max(t), "runs": len(t),
                 **({"floor_ms": 1e3 * self.floors[n], "x_floor": self.floor_ratio(n)} if self.floors.get(n) else {})}
                for n, t in self.times.items()]

    def table(self) -> str:
        """A plain-text table, headed by the config, the threads and the versions."""
        lines = [environment_line()]
        if self.config:
            lines.append("config: " + ", ".join(f"{k}={v}" for k, v in self.config.items()))
        width = max(len(n) for n in self.times)
        floors = "  floor ms  x floor" if self.floors else ""
        lines.append(f"{'variant':{width}s}  {'median ms':>10s}  {'x ' + self.baseline:>14s}  {'min..max ms':>17s}"
                     + floors)
        for r in self.rows():
            floor = f"  {r['floor_ms']:8.2f}  {r['x_floor']:7.2f}" if "floor_ms" in r else ("  " + " " * 17) * bool(floors)
            lines.append(f"{r['variant']:{width}s}  {r['median_ms']:10.2f}  {r['ratio']:14.2f}  "
                         f"{r['min_ms']:7.2f}..{r['max_ms']:<8.2f}" + floor.rstrip())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def environment_line() -> str:
    """Threads, versions and processor, and ``OMP_WAIT_POLICY`` if set: every benchmark table starts with this."""
    policy = os.environ.get("OMP_WAIT_POLICY")
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{platform.machine()} {platform.processor() or ''}".rstrip() + f", python {platform.python_version()}"
            + (f", OMP_WAIT_POLICY={policy}" if policy else ""))


def benchmark(variants: Mapping[str, Callable[[], Any]], *, baseline: str | None = None, warmup: int = 2,
              repeats: int = 10, config: Mapping[str, Any] | None = None,
              floors: Mapping[str, float] | None = None) -> BenchResult:
    """Time each zero-argument callable in ``variants``, interleaved, after ``warmup`` untimed rounds.

    Args:
        variants: name -> callable; each call is one timed run.
        baseline: the variant the ratios are relative to (default: the first).
        warmup: untimed rounds before timing (lets allocators and caches settle).
        repeats: timed rounds; round ``r`` starts at variant ``r mod n`` so no variant always runs first.
        config: what was measured (sizes, dtype, ...), printed with the table.
        floors: seconds each variant cannot beat on this machine (some or all variants); the table
            prints them and each variant's ratio to its floor.

    Returns:
        A :class:`BenchResult` with every timing; ``print`` it for the table.
    """
    if not variants:
        raise ValueError("variants must name at least one callable to time")
    names = list(variants)
    baseline = names[0] if baseline is None else baseline
    if baseline not in variants:
        raise ValueError(f"baseline must be one of the variants {names}, got {baseline!r}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return BenchResult(times=times, baseline=baseline, config=dict(config or {}), floors=dict(floors or {}))


SUITES = {"moe": "helpers.moe.bench", "mla": "helpers.mla.bench", "dsa": "helpers.dsa.bench", "model": "helpers.model.bench",
          "v4": "helpers.v4.bench"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUITES:
        from helpers.rules import closest_name

        got = f"; got {argv[0]!r}{closest_name(argv[0], SUITES)}" if argv else ""
        raise SystemExit(f"usage: python -m helpers.bench {{{','.join(SUITES)}}} [options]{got}")
    importlib.import_module(SUITES[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
