"""The ``sorted`` backend: sort the pairs by expert, two matmuls per expert, add back; its hand-written backward.

``sort_by_expert`` orders the ``T*k`` (token, expert) pairs by expert; :class:`SortedDispatch` is the
autograd Function of V3 eq. 12's routed sum with the backward written out. The experts can be shared out
over CPU threads as whole experts (:mod:`helpers.moe.backends.threads`). The ``auto`` backend chooses this
path for large batches (notebook 11).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from helpers.moe.backends.registry import register_backend
from helpers.moe.backends.threads import expert_parallel, split_experts


def sort_by_expert(indices: Tensor, n_experts: int) -> tuple[Tensor, Tensor, list[int]]:
    """Sort the ``T*k`` (token, expert) pairs by expert: the pair order, their tokens, and slice bounds.

    Args:
        indices: (T, k) chosen experts.
        n_experts: ``E``.

    Returns:
        order (T*k,): pair ids (into ``indices.reshape(-1)``) sorted by expert;
        token (T*k,): the token of each sorted pair;
        bounds: ``E + 1`` ints, expert ``e``'s pairs are ``order[bounds[e]:bounds[e + 1]]``
        (the one host-device sync of the dispatch).
    """
    flat = indices.reshape(-1)  # (T*k,)
    order = flat.argsort(stable=True)  # (T*k,)
    token = order // indices.shape[1]  # (T*k,)
    counts = torch.bincount(flat, minlength=n_experts)  # (E,), longer if an id is >= E
    if len(counts) > n_experts:
        raise ValueError(f"indices must be expert ids in [0, {n_experts}), got {len(counts) - 1}; "
                         "route with the layer's n_routed_experts")
    bounds = [0, *torch.cumsum(counts, 0).tolist()]
    return order, token, bounds


def _routed_forward(u: Tensor, g: Tensor, token: Tensor, bounds: list[int], w_gate_up: Tensor, w_down: Tensor,
                    experts: range, y: Tensor, hs: list[Tensor] | None) -> None:
    """The forward of :class:`SortedDispatch` for some experts: adds their ``g FFN(u)`` to ``y`` (T, H).

    Appends each expert's ``h`` to ``hs`` when given (for the backward), empty experts included.
    """
    n_inter = w_down.shape[-1]
    for e in experts:
        start, end = bounds[e], bounds[e + 1]
        if start == end:  # no rows: nothing to add (a few small ops each, which add up over many experts)
            if hs is not None:
                hs.append(u.new_empty(0, 2 * n_inter))
            continue
        tok = token[start:end]  # (n_e,)
        h = u.index_select(0, tok) @ w_gate_up[e].T  # (n_e, 2I)
        gate, up = h.split(n_inter, dim=-1)  # (n_e, I) each
        o = F.silu(gate).mul_(up) @ w_down[e].T  # (n_e, H)
        y.index_add_(0, tok, o.mul_(g[start:end, None]))
        if hs is not None:
            hs.append(h)


def _routed_backward(grad_y: Tensor, u: Tensor, g: Tensor, token: Tensor, bounds: list[int], w_gate_up: Tensor,
                     w_down: Tensor, experts: range, hs: list[Tensor], grad_u: Tensor | None,
                     grads: dict[str, Tensor]) -> None:
    """The backward of :class:`SortedDispatch` for some experts: adds to ``grad_u``, writes their slices of ``grads``."""
    n_inter = w_down.shape[-1]
    for e, h in zip(experts, hs):
        start, end = bounds[e], bounds[e + 1]
        if start == end:  # no rows: its gradients stay zero
            continue
        tok, g_e = token[start:end], g[start:end, None]  # (n_e,), (n_e, 1)
        gate, up = h.split(n_inter, dim=-1)  # (n_e, I) each
        s = torch.sigmoid(gate)
        silu = gate * s  # (n_e, I)
        a = silu * up  # (n_e, I)
        go = grad_y.index_select(0, tok)  # (n_e, H)
        da = go @ w_down[e]  # (n_e, I), before the gating value
        if "g" in grads:
            grads["g"][start:end] = (da * a).sum(-1)
        if "w_down" in grads:
            torch.mm((go * g_e).T, a, out=grads["w_down"][e])
        da.mul_(g_e)
        dh = torch.cat([da * up * s * (1 + gate * (1 - s)), da * silu], dim=-1)  # (n_e, 2I)
        if "w_gate_up" in grads:
            torch.mm(dh.T, u.index_select(0, tok), out=grads["w_gate_up"][e])
        if grad_u is not None:
            grad_u.index_add_(0, tok, dh @ w_gate_up[e])


def sorted_forward(u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor, n_workers: int,
                    keep_h: bool) -> tuple[Tensor, tuple]:
    """Sort the pairs, run the experts in ``n_workers`` parts, sum the parts: ``y`` (T, H) and what the backward needs."""
    order, token, bounds = sort_by_expert(indices, w_gate_up.shape[0])
    g = weights.reshape(-1)[order].to(u.dtype)  # (T*k,) gating values of the sorted pairs
    parts = [(experts, torch.zeros_like(u), [] if keep_h else None) for experts in split_experts(bounds, n_workers)]
    expert_parallel(lambda experts, y, hs: _routed_forward(u, g, token, bounds, w_gate_up, w_down, experts, y, hs),
                    parts)
    return sum_parts([y for _, y, _ in parts], u), (order, token, g, bounds, parts)


class SortedDispatch(torch.autograd.Function):
    """The routed experts of V3 eq. 12, ``y_t = sum_i g_{i,t} FFN_i(u_t)``, with a hand-written backward.

    Forward, expert by expert over the pairs sorted by expert: gather the expert's tokens
    ``x = u[tok]`` (n_e, H), ``h = x W_gate_up^T`` (n_e, 2I), ``a = SiLU(gate) * up`` (n_e, I),
    ``o = a W_down^T`` (n_e, H), and add ``g * o`` to the tokens' rows with ``index_add_``. Every
    buffer is one expert's slice (small, reused by the allocator), never a ``T*k``-row copy, and only
    ``h`` is kept for the backward.

    Backward, expert by expert, with ``go = dL/dy[tok]`` (n_e, H)::

        da_raw = go W_down                  dL/dg   = sum_j da_raw * a       (the gating gradient)
        da     = g * da_raw                 dW_down = (g * go)^T a
        dgate  = da * up * SiLU'(gate)      dup     = da * SiLU(gate)        SiLU'(z) = s(z)(1 + z(1 - s(z)))
        dh     = [dgate, dup]               dW_gate_up = dh^T x,   dL/du[tok] += dh W_gate_up

    Six matrix products per expert in all (two forward, four backward). Counting products is not
    counting FLOPs, but here each backward product has the size of a forward one, so the backward
    does twice the forward's ``6 n_e H I`` FLOPs, as autograd would (notebook 11 counts them with
    ``FlopCounterMode``). Both passes run the experts in ``n_workers`` parts with
    :func:`expert_parallel`. :func:`sorted_dispatch` calls it; the indices get no gradient.
    """

    @staticmethod
    def forward(ctx, u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor,
                n_workers: int) -> Tensor:
        y, (order, token, g, bounds, parts) = sorted_forward(u, weights, indices, w_gate_up, w_down, n_workers,
                                                              keep_h=True)
        ctx.save_for_backward(u, w_gate_up, w_down, order, token, g, *(h for *_, hs in parts for h in hs))
        ctx.bounds, ctx.ranges = bounds, [experts for experts, *_ in parts]
        ctx.weights_shape, ctx.weights_dtype = weights.shape, weights.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        u, w_gate_up, w_down, order, token, g, *hs = ctx.saved_tensors
        need_u, need_weights, _, need_gate_up, need_down, _ = ctx.needs_input_grad
        grads = {name: torch.zeros_like(t) for name, t, need in
                 (("g", g, need_weights), ("w_gate_up", w_gate_up, need_gate_up), ("w_down", w_down, need_down))
                 if need}
        grad_y = grad_y.contiguous()
        next_h = iter(hs)
        parts = [(experts, [next(next_h) for _ in experts], torch.zeros_like(u) if need_u else None)
                 for experts in ctx.ranges]
        expert_parallel(lambda experts, part_hs, grad_u: _routed_backward(
            grad_y, u, g, token, ctx.bounds, w_gate_up, w_down, experts, part_hs, grad_u, grads), parts)
        grad_weights = None
        if need_weights:
            grad_weights = torch.empty_like(g).index_copy_(0, order, grads["g"])
            grad_weights = grad_weights.reshape(ctx.weights_shape).to(ctx.weights_dtype)
        grad_u = sum_parts([grad_u for *_, grad_u in parts], u) if need_u else None
        return grad_u, grad_weights, None, grads.get("w_gate_up"), grads.get("w_down"), None


@register_backend("sorted")
def sorted_dispatch(u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor,
                    n_workers: int | None = None) -> Tensor:
    """V3 eq. 12's routed sum, expert by expert over the pairs sorted by expert, on ``n_workers`` threads.

    Sort the ``T*k`` (token, expert) pairs by expert once, run each expert as two matrix multiplications
    on all of its tokens at once, weight the rows by ``g`` and add them back to their tokens with
    ``index_add_``; one host-device sync (the slice bounds). With autograd, :class:`SortedDispatch` (its
    hand-written backward keeps memory traffic per expert); without, only its forward. The experts are
    shared out over ``n_workers`` CPU threads (default: the machine's) as whole experts
    (:func:`expert_parallel`, an analogy of expert parallelism inside one process).
    """
    n_workers = n_workers or torch.get_num_threads()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, weights, w_gate_up, w_down)):
        return SortedDispatch.apply(u, weights, indices, w_gate_up, w_down, n_workers)
    return sorted_forward(u, weights, indices, w_gate_up, w_down, n_workers, keep_h=False)[0]


def sum_parts(parts: list[Tensor], like: Tensor) -> Tensor:
    """The sum of the parts' partial results, in place into the first (zeros like ``like`` if none)."""
    if not parts:
        return torch.zeros_like(like)
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total
