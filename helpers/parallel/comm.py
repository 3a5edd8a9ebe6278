"""The process-group side of expert parallelism: the all-to-all dispatcher and the config handshake.

Everything that calls ``torch.distributed`` lives here, so the layer (:mod:`helpers.parallel.layer`)
reads as ``route -> dispatch -> experts -> combine`` without a process group in sight (torchtitan's
seams). The same calls run on gloo (CPU) and NCCL (GPU).

The round trip of one forward, on every rank at once::

    1. counts   all_to_all_single of a (N, S) int matrix: rows this rank sends to each rank's slots
    2. dispatch all_to_all_single of the token rows, uneven splits (sorted by destination slot)
    3. experts  each rank runs its experts on the rows it received (helpers.moe.run_experts)
    4. combine  the reverse all_to_all_single brings each result back to the rank of its token

The backward of a dispatch is a combine and vice versa (:class:`AllToAll`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from helpers.parallel.layout import ExpertLayout


def _all_to_all(x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits and its backward: the same exchange in reverse.

    Forward: rows ``x[sum(send[:r]) : sum(send[:r+1])]`` go to rank ``r``; the output holds what each
    rank sent here, ``recv[r]`` rows from rank ``r``, in rank order. Backward: the gradient of each
    received row goes back to the rank it came from (splits swapped).
    """

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.group), None, None, None


@dataclass
class Dispatched:
    """What a dispatch remembers for its combine: pair order, tokens, splits (rows per rank)."""

    order: Tensor  # (T*k,) pair ids sorted by destination slot
    token: Tensor  # (T*k,) the token of each sorted pair
    send: list[int]  # rows sent to each rank
    recv: list[int]  # rows received from each rank
    recv_counts: Tensor  # (N, S) rows received from each rank for each local slot


class AllToAllDispatcher:
    """Moves (token, expert) pairs to the ranks holding the experts and the results back.

    Args:
        layout: the :class:`ExpertLayout` every rank agrees on.
        rank: this process's rank in ``group``.
        group: the process group (``None``: the default group). With one rank no collective is called.
    """

    def __init__(self, layout: ExpertLayout, rank: int, group=None) -> None:
        self.layout, self.rank, self.group = layout, rank, group
        if layout.n_ranks > 1:
            world = dist.get_world_size(group)
            if world != layout.n_ranks:
                raise ValueError(f"layout has {layout.n_ranks} ranks but the process group has {world}; "
                                 "build the layout for the world size")

    def agree(self, fields: dict) -> None:
        """Raise ``ValueError`` naming the first field whose value differs between ranks."""
        if self.layout.n_ranks == 1:
            return
        everyone = [None] * self.layout.n_ranks
        dist.all_gather_object(everyone, fields, group=self.group)
        for name in fields:
            values = [f.get(name) for f in everyone]
            if any(v != values[0] for v in values):
                shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
                raise ValueError(f"{name} differs across ranks ({shown}); build every rank's layer from the "
                                 "same config and layout")

    def sum_over_ranks(self, t: Tensor) -> Tensor:
        """The sum of ``t`` over the ranks (a copy; ``t`` itself with one rank)."""
        if self.layout.n_ranks == 1:
            return t
        total = t.clone()
        dist.all_reduce(total, group=self.group)
        return total

    def _move(self, x: Tensor, send: list[int], recv: list[int]) -> Tensor:
        if self.layout.n_ranks == 1:
            return x
        if torch.is_grad_enabled() and not x.requires_grad:
            # every rank must run the same collectives in the backward, even if its rows need no gradient
            x = x.detach().requires_grad_()
        return AllToAll.apply(x, send, recv, self.group)

    def dispatch(self, x: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, Dispatched]:
        """Send each (token, expert) pair's row to the rank holding (a copy of) its expert.

        Args:
            x: (T, H) this rank's tokens.
            indices: (T, k) their chosen (logical) experts.

        Returns:
            rows (n_recv, H) received, grouped by source rank then local slot; their local slots
            (n_recv,); and the :class:`Dispatched` state for :meth:`combine`.
        """
        n, s = self.layout.n_ranks, self.layout.slots_per_rank
        slot = self.layout.assign_slots(indices)  # (T*k,) global slot of every pair
        order = slot.argsort(stable=True)  # by destination rank, then its local slot
        token = order // indices.shape[1]  # (T*k,)
        send_counts = torch.bincount(slot, minlength=n * s).view(n, s)  # (N, S)
        if n == 1:
            recv_counts = send_counts
        else:  # 1. counts: rank r learns how many rows each rank sends to each of its slots
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        rows = self._move(x.index_select(0, token), send, recv)  # 2. dispatch, (n_recv, H)
        local = torch.arange(s).repeat(n).repeat_interleave(recv_counts.reshape(-1))  # (n_recv,)
        return rows, local, Dispatched(order, token, send, recv, recv_counts)

    def combine(self, out: Tensor, state: Dispatched) -> Tensor:
        """4. combine: the expert results (n_recv, H) back to their ranks -> (T*k, H) in sorted pair order."""
        return self._move(out, state.recv, state.send)
