"""The ``loop`` backend, for a few tokens (a decode step): a loop over the chosen experts in Python.

At one token each chosen expert multiplies its weights by one row: a matrix-vector product that reads
``3 H I`` weights for ``6 H I`` FLOPs, bound by memory, not arithmetic, and a few microseconds of
Python and dispatch per small op add up over the experts. What keeps it fast on a CPU (measured with
``python -m helpers.bench moe --paths``, notebook 11's optional part):

- no sort and no ``E + 1`` bounds: the ``T*k`` expert ids are read once into Python and grouped there;
- the experts that hold one row (all of them at one token, most of them up to a few tokens) stack their
  matrix-vector products, and the activation and the gating values run once over all of them: four
  small ops per expert fewer than one expert at a time;
- the calling thread does it all: sharing the experts over a thread pool was measured slower (in the
  saved benchmark, ``ours`` runs this loop in the calling thread at one token, ``ours, loop`` forces it
  onto the thread pool).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from helpers.moe.backends.registry import register_backend
from helpers.moe.backends.sorted_dispatch import sum_parts
from helpers.moe.backends.threads import expert_parallel


def _one_row_experts(u: Tensor, g: Tensor, top_k: int, w_gate_up: Tensor, w_down: Tensor,
                     singles: list[tuple[int, int]], y: Tensor) -> None:
    """Adds ``g FFN_e(u_t)`` to ``y`` for experts that hold one pair ``(e, pair)`` each.

    The matrix-vector products are stacked, and the activation and the gating values run once over all
    of them: four small ops per expert fewer than one at a time. (Writing the products into rows of a
    preallocated buffer with ``out=`` was measured slower than ``torch.stack``.)
    """
    n_inter = w_down.shape[-1]
    h = torch.stack([torch.mv(w_gate_up[e], u[pair // top_k]) for e, pair in singles])  # (n, 2I)
    a = F.silu(h[:, :n_inter]) * h[:, n_inter:]  # (n, I)
    o = torch.stack([torch.mv(w_down[e], a[j]) for j, (e, _) in enumerate(singles)])  # (n, H)
    pairs = torch.tensor([pair for _, pair in singles], device=u.device)  # (n,)
    g_rows = g.index_select(0, pairs)  # (n,)
    if y.shape[0] == 1:
        y[0] += g_rows @ o  # (H,)
    else:
        y.index_add_(0, pairs // top_k, o * g_rows[:, None])


def _run_part(u: Tensor, g: Tensor, top_k: int, w_gate_up: Tensor, w_down: Tensor,
              jobs: list[tuple[int, list[int]]], batch_singles: bool) -> Tensor:
    """The sum of some experts' outputs (T, H); a job is ``(e, pairs)``, an expert and its pairs.

    ``batch_singles``: one-row experts go through :func:`_one_row_experts` (without autograd; with it, every
    expert runs ``F.linear`` like the other paths, so their gradients match them as the tests require).
    """
    y = torch.zeros_like(u)  # (T, H)
    n_inter = w_down.shape[-1]
    singles = [(e, pairs[0]) for e, pairs in jobs if batch_singles and len(pairs) == 1]
    if singles:
        _one_row_experts(u, g, top_k, w_gate_up, w_down, singles, y)
    for e, pairs in jobs:
        if batch_singles and len(pairs) == 1:
            continue
        tok = torch.tensor([pair // top_k for pair in pairs], device=u.device)  # (n_e,)
        g_e = g.index_select(0, torch.tensor(pairs, device=u.device))  # (n_e,)
        gate, up = F.linear(u.index_select(0, tok), w_gate_up[e]).split(n_inter, dim=-1)  # (n_e, I) each
        y.index_add_(0, tok, F.linear(F.silu(gate) * up, w_down[e]) * g_e[:, None])
    return y


@register_backend("loop")
def loop_dispatch(u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor,
                  n_workers: int | None = None) -> Tensor:
    """V3 eq. 12's routed sum for a few tokens: a loop over the chosen experts, tuned (see the module).

    One host sync reads the ``T*k`` expert ids; the pairs are grouped by expert in Python; each chosen
    expert runs its SwiGLU on views of the stacked weights (``w_gate_up[e]``, ``w_down[e]``: no copy)
    over its rows. Every chosen expert's weights are read once, the least any path can read. Without
    autograd, ``n_workers > 1`` shares the experts out over that many threads as whole experts
    (:func:`expert_parallel`); with autograd everything runs in the calling thread and autograd
    differentiates it. ``n_workers`` defaults to the machine's threads (the ``auto`` backend passes 1).
    Arguments and result as in :func:`helpers.moe.backends.dispatch`.
    """
    n_experts, top_k = w_gate_up.shape[0], indices.shape[1]
    flat = indices.reshape(-1).tolist()  # T*k expert ids: the one host sync
    if flat and not 0 <= min(flat) <= max(flat) < n_experts:
        bad = max(flat) if max(flat) >= n_experts else min(flat)
        raise ValueError(f"indices must be expert ids in [0, {n_experts}), got {bad}; "
                         "route with the layer's n_routed_experts")
    pairs_of: dict[int, list[int]] = {}
    for pair, e in enumerate(flat):
        pairs_of.setdefault(e, []).append(pair)
    jobs = list(pairs_of.items())
    g = weights.reshape(-1).to(u.dtype)  # (T*k,) gating values by pair
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, weights, w_gate_up, w_down))
    n_workers = min(n_workers or torch.get_num_threads(), len(jobs))
    if needs_grad or n_workers <= 1:
        return _run_part(u, g, top_k, w_gate_up, w_down, jobs, batch_singles=not needs_grad)
    parts = [(jobs[w::n_workers],) for w in range(n_workers)]  # whole experts per thread
    return sum_parts(expert_parallel(lambda part: _run_part(u, g, top_k, w_gate_up, w_down, part, True), parts), u)
