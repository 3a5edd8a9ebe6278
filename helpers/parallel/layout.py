"""Which rank holds which experts: the expert layout, plain or with replicas (no process groups here).

A layout lists, for every rank, the logical experts it hosts ("physical experts" or *slots*, in
DeepSeek's EPLB wording). The plain layout gives rank ``r`` the experts ``r * E/N ... (r+1) * E/N - 1``;
a replicated layout (:mod:`helpers.parallel.planner`) hosts a hot expert on several ranks and
splits its tokens between the copies. Every rank holds the same number of slots, so the weight
tensors have one shape everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ExpertLayout:
    """``slots[r]``: the logical expert ids rank ``r`` hosts, in its local order (slot ``j`` of rank ``r``
    is global slot ``r * slots_per_rank + j``).

    Raises ``ValueError`` naming ``slots`` when an expert is placed nowhere, an id is out of range,
    a rank hosts one expert twice, or the ranks hold different numbers of slots.
    """

    n_experts: int
    slots: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        slots = tuple(tuple(int(e) for e in rank) for rank in self.slots)
        object.__setattr__(self, "slots", slots)
        if not slots or len({len(rank) for rank in slots}) != 1 or not slots[0]:
            raise ValueError(f"slots must give every rank the same, non-zero number of experts, got sizes "
                             f"{[len(rank) for rank in slots]}")
        for r, rank in enumerate(slots):
            if any(not 0 <= e < self.n_experts for e in rank):
                raise ValueError(f"slots of rank {r} hold {rank}: expert ids must be in [0, {self.n_experts})")
            if len(set(rank)) != len(rank):
                raise ValueError(f"slots of rank {r} hold {rank}: a rank hosts each expert at most once")
        missing = sorted(set(range(self.n_experts)) - {e for rank in slots for e in rank})
        if missing:
            raise ValueError(f"slots place experts {missing} on no rank: every expert needs at least one copy")

    @classmethod
    def contiguous(cls, n_experts: int, n_ranks: int) -> ExpertLayout:
        """Rank ``r`` holds experts ``[r E/N, (r+1) E/N)``: expert parallelism without replicas."""
        if n_ranks <= 0 or n_experts % n_ranks:
            raise ValueError(f"n_routed_experts ({n_experts}) must be divisible by the world size ({n_ranks}): "
                             "every rank holds the same number of experts; choose a world size that divides it")
        per = n_experts // n_ranks
        return cls(n_experts, tuple(tuple(range(r * per, (r + 1) * per)) for r in range(n_ranks)))

    @property
    def n_ranks(self) -> int:
        return len(self.slots)

    @property
    def slots_per_rank(self) -> int:
        return len(self.slots[0])

    @property
    def n_slots(self) -> int:
        return self.n_ranks * self.slots_per_rank

    def slot_experts(self) -> Tensor:
        """(n_slots,) the logical expert of every global slot."""
        return torch.tensor([e for rank in self.slots for e in rank], dtype=torch.long)

    def replica_counts(self) -> Tensor:
        """(E,) how many copies of each expert exist."""
        return torch.bincount(self.slot_experts(), minlength=self.n_experts)

    def assign_slots(self, indices: Tensor) -> Tensor:
        """The global slot of every (token, expert) pair: (T, k) expert ids -> (T*k,) slot ids.

        An expert with ``c`` copies sends its ``j``-th pair (in pair order) to copy ``j mod c``, so every
        rank splits its own tokens of a hot expert evenly between the copies.
        """
        flat = indices.reshape(-1)  # (T*k,)
        slot_experts = self.slot_experts()
        counts = torch.bincount(slot_experts, minlength=self.n_experts)  # (E,) copies
        copies = slot_experts.argsort(stable=True)  # slot ids grouped by expert
        first = torch.cumsum(counts, 0) - counts  # (E,) where each expert's copies start in ``copies``
        if bool((counts == 1).all()):
            return copies[first[flat]]
        order = flat.argsort(stable=True)  # pairs grouped by expert
        sorted_experts = flat[order]
        pair_counts = torch.bincount(flat, minlength=self.n_experts)
        start = torch.cumsum(pair_counts, 0) - pair_counts
        j = torch.arange(len(flat)) - start[sorted_experts]  # position of the pair among its expert's pairs
        slot_sorted = copies[first[sorted_experts] + j % counts[sorted_experts]]
        return torch.empty_like(flat).index_copy_(0, order, slot_sorted)

    def owner(self) -> Tensor:
        """(n_slots,) the rank of every global slot."""
        return torch.arange(self.n_ranks).repeat_interleave(self.slots_per_rank)
