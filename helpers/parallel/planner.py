"""Load balancing by replication: copy the hottest experts, pack the copies onto ranks, ranks onto nodes.

The idea behind DeepSeek's EPLB (V3 §3.4 "redundant experts", and the open-source EPLB): from the
loads observed over a while, (1) give the ``n_redundant`` extra slots, one at a time, to the expert
with the largest load per copy; (2) pack the copies, heaviest first, each onto the least loaded rank
that still has a free slot and no copy of that expert; (3) pack the ranks, heaviest first, onto
the least loaded node with room. A copy carries ``load / copies`` (the layer splits an expert's
pairs evenly between its copies, :meth:`ExpertLayout.assign_slots`). The result is an
:class:`ExpertLayout` the distributed layer runs as it is.

This is a sketch of the idea, not EPLB itself: EPLB packs whole expert groups onto nodes first, so
node-limited routing keeps its meaning, and plans per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from helpers.parallel.layout import ExpertLayout


def rank_loads(layout: ExpertLayout, load: Tensor) -> Tensor:
    """(N,) expected tokens per rank when each expert's ``load`` is split evenly between its copies."""
    load = torch.as_tensor(load, dtype=torch.float64)
    per_copy = load / layout.replica_counts()  # (E,)
    return per_copy[layout.slot_experts()].view(layout.n_ranks, layout.slots_per_rank).sum(1)


def imbalance(loads: Tensor) -> float:
    """max / mean of per-rank loads (1.0: perfectly even)."""
    loads = torch.as_tensor(loads, dtype=torch.float64)
    return (loads.max() / loads.mean()).item()


def plan_replication(load: Tensor, n_ranks: int, n_redundant: int = 0, ranks_per_node: int = 1) -> ExpertLayout:
    """An :class:`ExpertLayout` with ``n_redundant`` extra copies that evens out the per-rank load.

    Args:
        load: (E,) observed tokens per expert.
        n_ranks: ranks to place the ``E + n_redundant`` slots on (must divide that number).
        n_redundant: extra copies (each copy of one expert goes to a different rank).
        ranks_per_node: ranks per node for step 3 (1: no node packing).

    Raises:
        ValueError naming ``n_redundant`` or ``n_ranks`` if the slots cannot be shared out evenly.
    """
    load = torch.as_tensor(load, dtype=torch.float64)
    n_experts = len(load)
    if n_redundant < 0 or (n_experts + n_redundant) % n_ranks:
        raise ValueError(f"n_redundant ({n_redundant}) + n_routed_experts ({n_experts}) must be a multiple of "
                         f"n_ranks ({n_ranks}): every rank holds the same number of slots")
    if n_ranks % ranks_per_node:
        raise ValueError(f"n_ranks ({n_ranks}) must be divisible by ranks_per_node ({ranks_per_node})")
    per_rank = (n_experts + n_redundant) // n_ranks
    copies = torch.ones(n_experts, dtype=torch.long)
    for _ in range(n_redundant):  # 1. replicate the expert with the most load per copy
        per_copy = (load / copies).masked_fill(copies >= n_ranks, -1.0)
        copies[int(per_copy.argmax())] += 1
    items = sorted(((load[e].item() / copies[e].item(), e) for e in range(n_experts) for _ in range(copies[e])),
                   key=lambda item: (-item[0], item[1]))
    bins: list[list[int]] = [[] for _ in range(n_ranks)]
    totals = [0.0] * n_ranks
    for weight, e in items:  # 2. heaviest copy first, onto the least loaded rank with room
        free = [r for r in range(n_ranks) if len(bins[r]) < per_rank and e not in bins[r]]
        r = min(free, key=lambda r: (totals[r], r))
        bins[r].append(e)
        totals[r] += weight
    n_nodes = n_ranks // ranks_per_node
    nodes: list[list[int]] = [[] for _ in range(n_nodes)]
    node_totals = [0.0] * n_nodes
    for r in sorted(range(n_ranks), key=lambda r: (-totals[r], r)):  # 3. ranks onto nodes
        n = min((n for n in range(n_nodes) if len(nodes[n]) < ranks_per_node), key=lambda n: (node_totals[n], n))
        nodes[n].append(r)
        node_totals[n] += totals[r]
    return ExpertLayout(n_experts, tuple(tuple(sorted(bins[r])) for node in nodes for r in node))
