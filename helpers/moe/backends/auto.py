"""The ``auto`` backend: the fast backend for the work's size (the default; notebook 11's optional part)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from helpers.moe.backends.grouped import grouped_supported
from helpers.moe.backends.registry import BACKENDS, register_backend


@dataclass(frozen=True)
class Auto:
    """Chooses ``loop``, ``grouped`` or ``sorted`` (and the threads) by the work's size, then runs it.

    The bounds come from ``python -m helpers.bench moe --paths``, which times every backend; pass others to
    try them (``Auto(pool_min_pairs_per_expert=8).choose(...)``), the registered one keeps these.
    """

    loop_max_pairs_per_expert: float = 0.25
    """The ``loop`` runs up to ``E / 4`` (token, expert) pairs (two tokens of top-6 of 64: measured faster than
    the grouped path at 1 and 2 tokens, even at 3 and 4, slower from 6 on)."""
    grouped_max_macs_per_expert: int = 2**24
    """``grouped`` runs while an expert's average product, rows x ``H`` x ``I`` multiply-adds, stays under
    ``2**24`` (about 700 tokens of top-6 of 64 at H=512, I=256); bigger products run faster as whole experts
    per core."""
    pool_min_pairs_per_expert: float = 2
    """The experts are shared over the thread pool from ``2 * E`` pairs on, where the grouped path does not run
    (raise it to split each expert's matmuls over the cores instead: that can win on an idle machine, and loses
    badly on a busy one)."""

    def choose(self, n_pairs: int, n_experts: int, n_workers: int | None = None, *, needs_grad: bool = False,
               grouped_ok: bool = True, macs_per_pair: int | None = None) -> tuple[str, int]:
        """Which backend computes ``n_pairs`` (token, expert) pairs, and on how many threads: ``(name, n_workers)``.

        - up to :attr:`loop_max_pairs_per_expert` pairs per expert, without autograd: ``loop``, in the calling
          thread. Each chosen expert holds a row or two, its matmuls are matrix-vector products bound by
          reading its weights, and a sort, a host sync of ``E + 1`` bounds or a hand-off to pool threads costs
          more than it saves. (With autograd, the loop's backward of each view ``w_gate_up[e]`` would
          zero-fill a gradient of the whole stacked weight once per expert used.)
        - while an expert's average product, ``n_pairs / E * macs_per_pair`` multiply-adds with
          ``macs_per_pair = H I``, stays under :attr:`grouped_max_macs_per_expert` (and ``F.grouped_mm`` takes
          the operands, ``grouped_ok``, see :func:`grouped_supported`): ``grouped``, the sorted order with every
          expert's product in one ``F.grouped_mm`` call (forward and backward);
        - beyond, from :attr:`pool_min_pairs_per_expert` pairs per expert: ``sorted`` with whole experts per
          thread (the thread pool) and its hand-written backward, which saves a synchronisation of all threads
          after every matmul; below that bound, each expert's matmuls split over the cores (``n_workers = 1``).

        An explicit ``n_workers`` means the thread pool: ``sorted`` in that many parts. No pairs at all: ``sorted``
        (its output still has a backward).
        """
        if n_workers is not None:
            return "sorted", n_workers
        if not n_pairs:
            return "sorted", 1
        if not needs_grad and n_pairs <= self.loop_max_pairs_per_expert * n_experts:
            return "loop", 1  # a few matrix-vector products: handing them to pool threads costs more than it saves
        small = macs_per_pair is not None and n_pairs * macs_per_pair <= self.grouped_max_macs_per_expert * n_experts
        if grouped_ok and small:
            return "grouped", torch.get_num_threads()
        if n_pairs >= self.pool_min_pairs_per_expert * n_experts:
            return "sorted", torch.get_num_threads()
        return "sorted", 1

    def __call__(self, u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor,
                 n_workers: int | None = None) -> Tensor:
        """The backend :meth:`choose` picks, run on these operands."""
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, weights, w_gate_up, w_down))
        name, n_workers = self.choose(indices.numel(), w_gate_up.shape[0], n_workers, needs_grad=needs_grad,
                                      grouped_ok=grouped_supported(u, w_down), macs_per_pair=w_down[0].numel())
        if name == "grouped":
            return BACKENDS[name](u, weights, indices, w_gate_up, w_down)
        return BACKENDS[name](u, weights, indices, w_gate_up, w_down, n_workers=n_workers)


register_backend("auto")(Auto())
