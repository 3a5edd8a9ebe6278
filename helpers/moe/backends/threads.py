"""Whole experts per CPU core: the thread pool that runs the sorted dispatch in parts.

An *analogy* of expert parallelism inside one process: instead of splitting every small expert
matmul across the cores, each core runs whole experts on its own (notebook 11, optional part). Real
expert parallelism spreads the experts over devices and moves tokens between them with all-to-all
collectives; this module only shares one process's experts among its threads.

Why the pool loses at a few tokens (measured with ``python -m helpers.bench moe --paths``): after an operation
that used every core, PyTorch's OpenMP worker threads do not sleep at once; they spin for a while, ready for the
next parallel operation. A pool thread that starts meanwhile shares a core with a spinning worker, and so does a
one-thread loop of matrix-vector products. ``OMP_WAIT_POLICY=PASSIVE`` makes the workers sleep instead, at the
price of waking them for every parallel operation; it is read once, when PyTorch loads its OpenMP runtime, so it
must be set before Python (or Jupyter) starts. ``make bench`` repeats the forward sweep under it
(``notebooks/results/bench_moe_passive.json``): there the fastest backend at some sizes is another one, so the
``auto`` backend, tuned for the default policy every learner has, is not always best; name a backend for a
layer (``layer.backend = "sorted"``, or ``moe_backend`` in the config) to choose yourself.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

R = TypeVar("R")

def split_experts(bounds: list[int], n_parts: int) -> list[range]:
    """Cut the experts into at most ``n_parts`` consecutive ranges holding about equal numbers of pairs."""
    def nearest_cut(target: float) -> int:  # the expert boundary closest to ``target`` pairs
        i = bisect.bisect_left(bounds, target)
        return i - 1 if i == len(bounds) or (i > 0 and target - bounds[i - 1] < bounds[i] - target) else i

    cuts = [0, *(nearest_cut(bounds[-1] * p / n_parts) for p in range(1, n_parts)), len(bounds) - 1]
    return [range(a, b) for a, b in zip(cuts, cuts[1:]) if bounds[b] > bounds[a]]


@functools.cache
def _thread_pool(n_workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(n_workers, thread_name_prefix="experts")


def expert_parallel(fn: Callable[..., R], parts: list[tuple]) -> list[R]:
    """``[fn(*part) for part in parts]``, one CPU thread per part, each part's matmuls single-threaded.

    An analogy of expert parallelism inside one process (real expert parallelism puts the experts on
    different devices and moves the tokens with all-to-all): instead of splitting every (small)
    expert matmul across the cores, which costs a synchronisation of all threads per matmul, each
    core runs whole experts on its own. The calling thread runs the first part itself while pool
    threads run the others. The intra-op thread count is 1 while the parts run (set in every thread
    that runs one) and the caller's is restored after; autograd is off in the parts (the callers handle
    gradients themselves).
    """
    def run(part: tuple) -> R:
        torch.set_num_threads(1)  # per thread: a pool thread keeps the count it started with otherwise
        with torch.no_grad():
            return fn(*part)

    if len(parts) <= 1:
        with torch.no_grad():
            return [fn(*part) for part in parts]
    threads = torch.get_num_threads()
    try:
        others = [_thread_pool(len(parts) - 1).submit(run, part) for part in parts[1:]]
        try:
            first = run(parts[0])
        finally:
            wait(others)
        return [first, *(future.result() for future in others)]
    finally:
        torch.set_num_threads(threads)
