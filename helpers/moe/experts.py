"""The routed experts computed expert by expert: sort the pairs, two matmuls per expert, add back.

``dispatch`` is ``sum_i g_{i,t} FFN_i(u_t)`` over the chosen experts (V3 eq. 12); ``sort_by_expert``
orders the ``T*k`` (token, expert) pairs by expert; ``SortedDispatch`` is the autograd Function with
the hand-written backward. The experts can be shared out over CPU threads (:mod:`helpers.moe.threads`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from helpers.moe.threads import expert_parallel, split_experts
from helpers.utils import require_positive


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


def _sorted_forward(u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor, n_workers: int,
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
    :func:`expert_parallel`. :func:`dispatch` calls it; the indices get no gradient.
    """

    @staticmethod
    def forward(ctx, u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor,
                n_workers: int) -> Tensor:
        y, (order, token, g, bounds, parts) = _sorted_forward(u, weights, indices, w_gate_up, w_down, n_workers,
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


def sum_parts(parts: list[Tensor], like: Tensor) -> Tensor:
    """The sum of the parts' partial results, in place into the first (zeros like ``like`` if none)."""
    if not parts:
        return torch.zeros_like(like)
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


PATHS = ("auto", "loop", "grouped", "sorted")
FORCE_PATH: str | None = None
"""Set to ``"loop"``, ``"grouped"`` or ``"sorted"`` to make every :func:`dispatch` take that path (tests do)."""
LOOP_MAX_PAIRS_PER_EXPERT = 0.125
"""``auto`` runs :func:`loop_dispatch` up to ``E / 8`` (token, expert) pairs (one token of top-6 of 64)."""
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

    - up to :data:`LOOP_MAX_PAIRS_PER_EXPERT` pairs per expert, without autograd: :func:`loop_dispatch`
      in the calling thread. Each chosen expert holds one row, its matmuls are matrix-vector products
      bound by reading its weights, and a sort, a host sync of ``E + 1`` bounds or a hand-off to pool
      threads cost more than they save. (With autograd, the loop's backward of each view ``w_gate_up[e]``
      would zero-fill a gradient of the whole stacked weight once per expert used.)
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
        return "loop", 1  # a few one-row products: handing them to pool threads costs more than they take
    small = macs_per_pair is not None and n_pairs * macs_per_pair <= GROUPED_MAX_MACS_PER_EXPERT * n_experts
    if path == "grouped" or (path == "auto" and grouped_ok and small):
        return "grouped", torch.get_num_threads()
    if path == "sorted" or n_pairs >= POOL_MIN_PAIRS_PER_EXPERT * n_experts:
        return "sorted", torch.get_num_threads()
    return "sorted", 1


def _run_loop(u: Tensor, top_k: int, n_inter: int, w_gate_up: Tensor, w_down: Tensor,
              groups: list[tuple[int, list[int]]]) -> list[Tensor]:
    """The chosen experts' outputs ``FFN_e(u[tokens])`` (n_e, H), one per ``(e, pairs)`` group."""
    outs = []
    for e, pairs in groups:
        tokens = [pair // top_k for pair in pairs]
        x = (u[tokens[0]:tokens[0] + 1] if len(tokens) == 1
             else u.index_select(0, torch.tensor(tokens, device=u.device)))  # (n_e, H)
        gate, up = F.linear(x, w_gate_up[e]).split(n_inter, dim=-1)  # (n_e, I) each
        outs.append(F.linear(F.silu(gate) * up, w_down[e]))  # (n_e, H)
    return outs


def loop_dispatch(u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor,
                  n_workers: int | None = None) -> Tensor:
    """:func:`dispatch` for a few tokens: a Python loop over the chosen experts, plain autograd (V3 eq. 12).

    No sort and no thread pool: one host sync reads the ``T*k`` expert ids, the pairs are grouped by
    expert in Python, and each chosen expert runs ``F.linear`` on views of the stacked weights
    (``w_gate_up[e]``, ``w_down[e]``: no copy) over its rows; one ``index_add`` adds the ``g``-weighted
    outputs back to their tokens. Every expert's weights are read once, the least any path can read.
    Without autograd, the chosen experts are shared out over ``n_workers`` threads (default: the
    machine's) as whole experts (:func:`expert_parallel`), so no thread waits at a barrier after
    every one-row product. Arguments and result as in :func:`dispatch`; gradients come from autograd.
    """
    n_experts, n_inter, top_k = w_gate_up.shape[0], w_down.shape[-1], indices.shape[1]
    flat = indices.reshape(-1).tolist()  # T*k expert ids: the one host sync
    if flat and not 0 <= min(flat) <= max(flat) < n_experts:
        bad = max(flat) if max(flat) >= n_experts else min(flat)
        raise ValueError(f"indices must be expert ids in [0, {n_experts}), got {bad}; "
                         "route with the layer's n_routed_experts")
    pairs_of: dict[int, list[int]] = {}
    for pair, e in enumerate(flat):
        pairs_of.setdefault(e, []).append(pair)
    groups = list(pairs_of.items())
    if not groups:
        return torch.zeros_like(u)
    order = [pair for _, pairs in groups for pair in pairs]
    n_workers = min(torch.get_num_threads() if n_workers is None else n_workers, len(groups))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, weights, w_gate_up, w_down))
    if needs_grad or n_workers <= 1:
        outs = _run_loop(u, top_k, n_inter, w_gate_up, w_down, groups)
    else:
        parts = [(groups[w::n_workers],) for w in range(n_workers)]  # whole experts per thread
        order = [pair for (part,) in parts for _, pairs in part for pair in pairs]
        outs = [o for part_outs in expert_parallel(
            lambda part: _run_loop(u, top_k, n_inter, w_gate_up, w_down, part), parts) for o in part_outs]
    pair_ids = torch.tensor(order, device=u.device)  # (T*k,) pairs in the order of ``outs``
    g = weights.reshape(-1).index_select(0, pair_ids).to(u.dtype)  # (T*k,)
    o = torch.cat(outs) * g[:, None]  # (T*k, H)
    if u.shape[0] == 1:
        return o.sum(0, keepdim=True)  # (1, H)
    return torch.zeros_like(u).index_add(0, torch.div(pair_ids, top_k, rounding_mode="floor"), o)  # (T, H)


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
    return _sorted_forward(u, weights, indices, w_gate_up, w_down, n_workers, keep_h=False)[0]


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
