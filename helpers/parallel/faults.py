"""Workers that fail on purpose, to show (and test) that a broken run stops with a message, not a hang."""

from __future__ import annotations

import os

import torch.distributed as dist

from helpers.parallel.check import build_reference
from helpers.parallel.layer import ExpertParallelMoE
from helpers.parallel.layout import ExpertLayout


def mismatched_config_worker(rank: int, world: int, config: dict, field: str, other: int) -> None:
    """Every rank builds its layer, but the last rank with ``config[field] = other``: the handshake refuses."""
    config = {**config, field: other} if rank == world - 1 else config
    moe = build_reference(config)
    ExpertParallelMoE.from_moe(moe, ExpertLayout.contiguous(config["n_routed_experts"], world), rank)


def dying_worker(rank: int, world: int, exit_code: int = 3) -> None:
    """After a first collective, the last rank exits; the others wait for it in the next one (which would
    block until the process group's timeout if nobody watched)."""
    dist.barrier()
    if rank == world - 1:
        os._exit(exit_code)
    dist.barrier()


def ready_worker(rank: int, world: int) -> int:
    """Does nothing but join the group: starts the process machinery (to time a failure without the start-up)."""
    return rank
