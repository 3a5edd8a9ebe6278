"""The measurements of notebook 14, as worker functions :func:`~helpers.parallel.launch.launch` can run."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from helpers.parallel.check import build_reference
from helpers.parallel.layer import ExpertParallelMoE
from helpers.parallel.layout import ExpertLayout
from helpers.parallel.traffic import measure


def _tokens(config: dict, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(config["seed"] + 100 + rank)
    return torch.randn(config["tokens"], config["hidden_size"], generator=g)  # (T, H) this rank's tokens


def timeline_worker(rank: int, world: int, config: dict, rounds: int = 5) -> list[list[tuple[str, float, float]]]:
    """``rounds`` forwards after a warm-up, each started together (a barrier): every round's
    ``(phase, start, end)`` in ``time.perf_counter`` seconds (one clock for all processes of a machine)."""
    ep = ExpertParallelMoE.from_moe(build_reference(config), ExpertLayout.contiguous(config["n_routed_experts"], world),
                                    rank)
    x = _tokens(config, rank)
    timelines = []
    with torch.no_grad():
        for i in range(rounds + 1):
            dist.barrier()
            start = time.perf_counter()
            ep(x)
            if i:  # the first round warms up
                timelines.append([("wait at barrier", start, start), *ep.last_timeline])
    return timelines


def traffic_worker(rank: int, world: int, config: dict, ranks_per_node: int) -> dict[str, float]:
    """One forward on random tokens; what this rank sent and received (:func:`helpers.parallel.traffic.measure`)."""
    ep = ExpertParallelMoE.from_moe(build_reference(config), ExpertLayout.contiguous(config["n_routed_experts"], world),
                                    rank)
    with torch.no_grad():
        ep(_tokens(config, rank))
    return measure(ep, ranks_per_node)
