"""The experts of V3 eq. 12 and the three ways to compute them, chosen by the work's size.

:func:`dispatch` is ``sum_i g_{i,t} FFN_i(u_t)`` over the chosen experts. It runs one of three paths
(:func:`choose_path`, notebook 11's optional part):

- ``loop`` (:mod:`helpers.moe.loop`): a few tokens, a loop over the chosen experts in the calling thread;
- ``grouped`` (:func:`grouped_dispatch`): the pairs sorted by expert, every expert in one ``F.grouped_mm``;
- ``sorted`` (:mod:`helpers.moe.sorted_dispatch`): the pairs sorted by expert, two matmuls per expert on
  whole experts per core, and a hand-written backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from helpers.moe.loop import loop_dispatch
from helpers.moe.sorted_dispatch import SortedDispatch, sort_by_expert, sorted_forward
from helpers.rules import require_positive

PATHS = ("auto", "loop", "grouped", "sorted")
FORCE_PATH: str | None = None
"""Set to ``"loop"``, ``"grouped"`` or ``"sorted"`` to make every :func:`dispatch` take that path (tests do)."""
LOOP_MAX_PAIRS_PER_EXPERT = 0.25
"""``auto`` runs :func:`loop_dispatch` up to ``E / 4`` (token, expert) pairs (two tokens of top-6 of 64: measured
faster than the grouped path at 1 and 2 tokens, even at 3 and 4, slower from 6 on)."""
GROUPED_MAX_MACS_PER_EXPERT = 2**24
"""``auto`` runs :func:`grouped_dispatch` while an expert's average product, rows x ``H`` x ``I`` multiply-adds,
stays under ``2**24`` (about 700 tokens of top-6 of 64 at H=512, I=256); bigger products run faster as whole
experts per core."""
POOL_MIN_PAIRS_PER_EXPERT = 2
"""``auto`` shares the experts over the thread pool from ``2 * E`` pairs on, where the grouped path does not run
(raise it to split each expert's matmuls over the cores instead: that can win on an idle machine, and loses
badly on a busy one)."""
GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""What ``F.grouped_mm`` accepts on a CPU (not float64)."""


def grouped_supported(u: Tensor, w_down: Tensor) -> bool:
    """Whether ``F.grouped_mm`` takes these operands: its dtypes, and rows of ``H`` and ``I`` values that are
    whole multiples of 16 bytes (its stride rule)."""
    size = u.element_size()
    return u.dtype in GROUPED_DTYPES and all(n * size % 16 == 0 for n in w_down.shape[-2:])


def choose_path(n_pairs: int, n_experts: int, path: str = "auto", n_workers: int | None = None, *,
                needs_grad: bool = False, grouped_ok: bool = True, macs_per_pair: int | None = None
                ) -> tuple[str, int]:
    """Which way :func:`dispatch` computes ``n_pairs`` (token, expert) pairs: ``(path, n_workers)``.

    ``FORCE_PATH`` wins, then an explicit ``path``. ``"auto"`` chooses by the work's size:

    - up to :data:`LOOP_MAX_PAIRS_PER_EXPERT` pairs per expert, without autograd: :func:`loop_dispatch`,
      in the calling thread. Each chosen expert holds a row or two, its matmuls are matrix-vector
      products bound by reading its weights, and a sort, a host sync of ``E + 1`` bounds or a hand-off
      to pool threads costs more than it saves. (With autograd, the loop's backward of each view
      ``w_gate_up[e]`` would zero-fill a gradient of the whole stacked weight once per expert used.)
    - while an expert's average product, ``n_pairs / E * macs_per_pair`` multiply-adds with
      ``macs_per_pair = H I``, stays under :data:`GROUPED_MAX_MACS_PER_EXPERT` (and ``F.grouped_mm``
      takes the operands, ``grouped_ok``, see :func:`grouped_supported`): :func:`grouped_dispatch`, the
      sorted order with every expert's product in one ``F.grouped_mm`` call (forward and backward);
    - beyond, from :data:`POOL_MIN_PAIRS_PER_EXPERT` pairs per expert: the sorted dispatch with whole
      experts per thread (the thread pool) and its hand-written backward, which saves a synchronisation
      of all threads after every matmul; below that bound, each expert's matmuls split over the cores
      (``n_workers = 1``).

    An explicit ``n_workers`` keeps the path asked for and runs it in that many parts. The constants
    come from ``python -m helpers.bench moe --paths``, which times every path.
    """
    path = FORCE_PATH or path
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}; use 'auto' to choose by the work's size")
    if n_workers is not None:
        return (path if path in ("loop", "grouped") else "sorted"), n_workers
    if path == "loop":
        return "loop", torch.get_num_threads()
    if path == "auto" and not needs_grad and n_pairs <= LOOP_MAX_PAIRS_PER_EXPERT * n_experts:
        return "loop", 1  # a few matrix-vector products: handing them to pool threads costs more than it saves
    small = macs_per_pair is not None and n_pairs * macs_per_pair <= GROUPED_MAX_MACS_PER_EXPERT * n_experts
    if path == "grouped" or (path == "auto" and grouped_ok and small):
        return "grouped", torch.get_num_threads()
    if path == "sorted" or n_pairs >= POOL_MIN_PAIRS_PER_EXPERT * n_experts:
        return "sorted", torch.get_num_threads()
    return "sorted", 1


def grouped_dispatch(u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    """:func:`dispatch` with the experts' products fused: sort once, then one ``F.grouped_mm`` per projection.

    The pairs sorted by expert (:func:`sort_by_expert`) form one ``(T*k, H)`` matrix of token rows whose
    consecutive slices belong to one expert each (``offs`` holds the slice ends); ``F.grouped_mm`` multiplies
    each slice by its expert's weight in one call, ``h = x W_gate_up^T`` then ``o = a W_down^T``; the
    ``g``-weighted rows are added back to their tokens with ``index_add_`` (V3 eq. 12). Same numbers as the
    loop over experts; autograd works through it (``F.grouped_mm`` has a backward).
    """
    if not grouped_supported(u, w_down):
        raise ValueError(f"the grouped path needs u in one of {GROUPED_DTYPES} with H and I multiples of 16 bytes, "
                         f"got {u.dtype}, H={w_down.shape[-2]}, I={w_down.shape[-1]}; use path='sorted' or 'loop'")
    order, token, bounds = sort_by_expert(indices, w_gate_up.shape[0])
    g = weights.reshape(-1)[order].to(u.dtype)  # (T*k,) gating values of the sorted pairs
    offs = torch.tensor(bounds[1:], dtype=torch.int32, device=u.device)  # (E,) slice ends
    h = F.grouped_mm(u.index_select(0, token), w_gate_up.transpose(1, 2), offs=offs)  # (T*k, 2I)
    gate, up = h.split(w_down.shape[-1], dim=-1)  # (T*k, I) each
    o = F.grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offs)  # (T*k, H)
    return torch.zeros_like(u).index_add(0, token, o * g[:, None])  # (T, H)


def dispatch(u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor,
             n_workers: int | None = None, path: str = "auto") -> Tensor:
    """``sum_i g_{i,t} FFN_i(u_t)`` over the chosen experts, computed expert by expert (V3 eq. 12).

    The efficient way (notebook 11): sort the ``T*k`` (token, expert) pairs by expert once, run each
    expert as two matrix multiplications on all of its tokens at once, weight the rows by ``g`` and
    add them back to their tokens with ``index_add_``; one host-device sync (the slice bounds). The
    work is :class:`SortedDispatch` (a hand-written backward that keeps memory traffic per expert),
    with the experts shared out over ``n_workers`` CPU threads (:func:`expert_parallel`, an analogy of
    expert parallelism inside one process).

    Args:
        u: (T, H) tokens.
        weights: (T, k) gating values ``g``.
        indices: (T, k) chosen experts.
        w_gate_up: (E, 2I, H) fused gate and up projections (gate rows first), like ``transformers``.
        w_down: (E, H, I) down projections.
        n_workers: threads to share the experts over (sorted path); default: :func:`choose_path`'s.
        path: ``"auto"`` (choose by the work's size, :func:`choose_path`), ``"loop"`` (:func:`loop_dispatch`),
            ``"grouped"`` (:func:`grouped_dispatch`) or ``"sorted"`` (the sorted dispatch above, thread pool of
            the machine's threads); all give the same numbers.

    Returns:
        (T, H), in ``u``'s dtype.
    """
    if n_workers is not None:
        require_positive(n_workers=n_workers)
    if weights.shape != indices.shape or indices.shape[0] != u.shape[0]:
        raise ValueError(f"weights {tuple(weights.shape)} and indices {tuple(indices.shape)} must both be (T, k) "
                         f"with T = {u.shape[0]}, the rows of u")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, weights, w_gate_up, w_down))
    path, n_workers = choose_path(indices.numel(), w_gate_up.shape[0], path, n_workers, needs_grad=needs_grad,
                                  grouped_ok=grouped_supported(u, w_down), macs_per_pair=w_down[0].numel())
    if path == "loop" and indices.numel():  # no pairs: the sorted path, whose output still has a backward
        return loop_dispatch(u, weights, indices, w_gate_up, w_down, n_workers)
    if path == "grouped" and indices.numel():
        return grouped_dispatch(u, weights, indices, w_gate_up, w_down)
    if needs_grad:
        return SortedDispatch.apply(u, weights, indices, w_gate_up, w_down, n_workers)
    return sorted_forward(u, weights, indices, w_gate_up, w_down, n_workers, keep_h=False)[0]


def run_experts(rows: Tensor, expert_ids: Tensor, w_gate_up: Tensor, w_down: Tensor,
                n_workers: int | None = None) -> Tensor:
    """``FFN_e(row)`` for rows that already carry their expert: the receiving side of expert parallelism.

    Each row is one (token, expert) pair that arrived from some rank; no gating value is applied (the
    sender weights the results when they come back). It is :func:`dispatch` with ``k = 1`` and every
    gating value 1, so the same sorted dispatch and hand-written backward run on the received rows.

    Args:
        rows: (n, H) received token rows.
        expert_ids: (n,) the (local) expert of each row, in ``[0, w_gate_up.shape[0])``.
        w_gate_up: (E_local, 2I, H); w_down: (E_local, H, I): the experts this process holds.
        n_workers: threads, as in :func:`dispatch`.

    Returns:
        (n, H), row ``j`` is ``FFN_{expert_ids[j]}(rows[j])``.
    """
    if expert_ids.shape != rows.shape[:1]:
        raise ValueError(f"expert_ids {tuple(expert_ids.shape)} must be ({rows.shape[0]},), one expert per row")
    ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)  # (n, 1) gating values
    return dispatch(rows, ones, expert_ids[:, None], w_gate_up, w_down, n_workers)
