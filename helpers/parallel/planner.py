"""Load balancing by replication: copy the hottest experts and pack the copies onto ranks and nodes.

The idea of DeepSeek's EPLB (V3 §3.4.1 "redundant experts", and the open-source EPLB), in its two policies:

- **hierarchical** (``n_group > 1``, the number of nodes divides ``n_group``): (1) pack the routing groups
  onto the nodes, heaviest group first onto the least loaded node with room, so the nodes carry equal loads;
  (2) inside each node, give its share of the ``n_redundant`` extra slots, one at a time, to the expert with
  the largest load per copy; (3) pack that node's copies onto its ranks. Every copy of an expert stays on the
  node of its group, so group-limited routing with groups = nodes (V3 §2.1.2, at most ``topk_group`` nodes per
  token) keeps its bound. This is what V3 describes for prefilling: experts rearranged "among GPUs within a
  node ... without increasing the cross-node all-to-all communication overhead".
- **global** (``n_group == 1``): replicate over all experts, pack the copies onto all ranks, then the ranks
  onto nodes. The copies of a hot expert may land on different nodes: fine without a node limit, but with
  one a token may then be sent to a node outside its chosen groups (notebook 14 shows it).

Packing: heaviest copy first, onto the least loaded rank that still has a free slot and no copy of that
expert. A copy carries ``load / copies`` (the layer splits an expert's pairs evenly between its copies,
:meth:`ExpertLayout.assign_slots`). The result is an :class:`ExpertLayout` the distributed layer runs as it is.
A sketch of the idea, not EPLB itself (EPLB also plans per layer from a moving average of loads).
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


def expert_nodes(layout: ExpertLayout, ranks_per_node: int) -> list[list[int]]:
    """For every expert, the sorted nodes its copies live on (rank ``r`` is on node ``r // ranks_per_node``)."""
    nodes: list[set[int]] = [set() for _ in range(layout.n_experts)]
    for r, rank in enumerate(layout.slots):
        for e in rank:
            nodes[e].add(r // ranks_per_node)
    return [sorted(n) for n in nodes]


def _replicate(load: Tensor, experts: list[int], n_extra: int, max_copies: int) -> dict[int, int]:
    """Copies per expert of ``experts``: one each, plus ``n_extra`` given one at a time to the largest load per copy."""
    copies = {e: 1 for e in experts}
    for _ in range(n_extra):
        candidates = [e for e in experts if copies[e] < max_copies]
        hottest = max(candidates, key=lambda e: (load[e].item() / copies[e], -e))
        copies[hottest] += 1
    return copies


def _pack(load: Tensor, copies: dict[int, int], n_ranks: int, per_rank: int) -> list[list[int]]:
    """Heaviest copy first, onto the least loaded of ``n_ranks`` ranks with a free slot and no copy of it."""
    items = sorted(((load[e].item() / c, e) for e, c in copies.items() for _ in range(c)),
                   key=lambda item: (-item[0], item[1]))
    bins: list[list[int]] = [[] for _ in range(n_ranks)]
    totals = [0.0] * n_ranks
    for weight, e in items:
        free = [r for r in range(n_ranks) if len(bins[r]) < per_rank and e not in bins[r]]
        r = min(free, key=lambda r: (totals[r], r))
        bins[r].append(e)
        totals[r] += weight
    return bins


def _validate(n_experts: int, n_ranks: int, n_redundant: int, ranks_per_node: int, n_group: int) -> None:
    if n_redundant < 0 or (n_experts + n_redundant) % n_ranks:
        raise ValueError(f"n_redundant ({n_redundant}) + n_routed_experts ({n_experts}) must be a multiple of "
                         f"n_ranks ({n_ranks}): every rank holds the same number of slots")
    if ranks_per_node <= 0 or n_ranks % ranks_per_node:
        raise ValueError(f"n_ranks ({n_ranks}) must be divisible by ranks_per_node ({ranks_per_node})")
    n_nodes = n_ranks // ranks_per_node
    if n_group <= 0 or n_experts % n_group:
        raise ValueError(f"n_group ({n_group}) must divide n_routed_experts ({n_experts}), as the router's groups do")
    if n_group > 1 and n_group % n_nodes:
        raise ValueError(f"n_group ({n_group}) must be a multiple of the number of nodes ({n_nodes}) for the "
                         "hierarchical plan (whole groups per node); use n_group=1 for the global plan")
    copies_max = ranks_per_node if n_group > 1 else n_ranks  # two copies of an expert never share a rank
    if n_redundant > n_experts * (copies_max - 1):
        raise ValueError(f"n_redundant ({n_redundant}) is more than the {n_experts * (copies_max - 1)} extra copies "
                         f"that fit with at most {copies_max} copies per expert (one per rank"
                         f"{' of its node' if n_group > 1 else ''}); use fewer redundant experts")


def plan_replication(load: Tensor, n_ranks: int, n_redundant: int = 0, ranks_per_node: int = 1,
                     n_group: int = 1) -> ExpertLayout:
    """An :class:`ExpertLayout` with ``n_redundant`` extra copies that evens out the per-rank load.

    Args:
        load: (E,) observed tokens per expert.
        n_ranks: ranks to place the ``E + n_redundant`` slots on (must divide that number).
        n_redundant: extra copies (two copies of one expert never share a rank).
        ranks_per_node: ranks per node (rank ``r`` is on node ``r // ranks_per_node``; 1: no nodes).
        n_group: the router's groups (consecutive experts, :func:`helpers.moe.select_experts`). ``> 1``: the
            hierarchical plan, whole groups per node and every copy on its group's node; ``1``: the global plan.

    Raises:
        ValueError naming ``n_redundant``, ``n_ranks``, ``ranks_per_node`` or ``n_group`` if the slots cannot be
        shared out evenly.
    """
    load = torch.as_tensor(load, dtype=torch.float64)
    n_experts = len(load)
    _validate(n_experts, n_ranks, n_redundant, ranks_per_node, n_group)
    per_rank = (n_experts + n_redundant) // n_ranks
    n_nodes = n_ranks // ranks_per_node
    if n_group > 1:  # hierarchical: 1. groups onto nodes, 2. replicate inside a node, 3. copies onto its ranks
        size = n_experts // n_group
        groups = sorted(range(n_group), key=lambda g: (-load[g * size:(g + 1) * size].sum().item(), g))
        node_groups: list[list[int]] = [[] for _ in range(n_nodes)]
        node_totals = [0.0] * n_nodes
        for g in groups:
            n = min((n for n in range(n_nodes) if len(node_groups[n]) < n_group // n_nodes),
                    key=lambda n: (node_totals[n], n))
            node_groups[n].append(g)
            node_totals[n] += load[g * size:(g + 1) * size].sum().item()
        slots = []
        for groups_here in node_groups:
            experts = [e for g in sorted(groups_here) for e in range(g * size, (g + 1) * size)]
            copies = _replicate(load, experts, n_redundant // n_nodes, ranks_per_node)
            slots += _pack(load, copies, ranks_per_node, per_rank)
        return ExpertLayout(n_experts, tuple(tuple(sorted(rank)) for rank in slots))
    copies = _replicate(load, list(range(n_experts)), n_redundant, n_ranks)  # global: 1. replicate
    bins = _pack(load, copies, n_ranks, per_rank)  # 2. copies onto ranks
    totals = [sum(load[e].item() / copies[e] for e in rank) for rank in bins]
    nodes: list[list[int]] = [[] for _ in range(n_nodes)]
    node_totals = [0.0] * n_nodes
    for r in sorted(range(n_ranks), key=lambda r: (-totals[r], r)):  # 3. ranks onto nodes
        n = min((n for n in range(n_nodes) if len(nodes[n]) < ranks_per_node), key=lambda n: (node_totals[n], n))
        nodes[n].append(r)
        node_totals[n] += totals[r]
    return ExpertLayout(n_experts, tuple(tuple(sorted(bins[r])) for node in nodes for r in node))
