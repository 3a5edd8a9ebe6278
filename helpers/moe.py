"""DeepSeekMoE, the finished layer: routing (V2 and V3), shared experts, sorted dispatch, balancing.

The layer computes, for every token ``u_t`` (DeepSeek-V3, arXiv 2412.19437, eq. 12-16)::

    h'_t    = u_t + sum_{i<=N_s} FFN^(s)_i(u_t) + sum_{i<=N_r} g_{i,t} FFN^(r)_i(u_t)     (12)
    g_{i,t} = g'_{i,t} / sum_j g'_{j,t}                                                  (13)
    g'_{i,t} = s_{i,t} if s_{i,t} + b_i in Topk({s_{j,t} + b_j}, K_r) else 0             (14, 16)
    s_{i,t} = Sigmoid(u_t^T e_i)                                                         (15)

(we return the FFN part without the residual ``u_t``, like ``transformers``). DeepSeek-V2
(arXiv 2405.04434, eq. 20-22) uses ``s_{i,t} = Softmax_i(u_t^T e_i)`` instead, no renormalisation,
and no bias; both scale the routed gating values by ``routed_scaling_factor``. Group-limited
routing (V2 §2.2.2, V3 §2.1.2) first keeps the ``topk_group`` best of ``n_group`` groups of experts.

Balancing: the auxiliary-loss-free bias ``b_i`` (arXiv 2408.15664 eq. 3-4, V3 §2.1.2) only changes
which experts are chosen and is nudged by ``gamma`` after each step; the auxiliary losses are V2's
expert-level loss (V2 eq. 23-25) and V3's sequence-wise loss (V3 eq. 17-20).

Everything is pure functions plus one module, :class:`DeepSeekMoE`. Names follow the glossary
(``notebooks/GLOSSARY.md``); weights are stored like ``transformers``' fused experts so conversion is
a copy (``helpers.hf.moe_from_hf`` / ``moe_to_hf``).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers.utils import require_positive

R = TypeVar("R")
SCORING_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")


class SwiGLU(nn.Module):
    """One dense FFN, or one expert: ``FFN(u) = W_down(SiLU(W_gate u) * W_up u)`` (DeepSeekMoE eq. 3).

    Args:
        hidden_size: ``H``, the width of ``u``.
        intermediate_size: ``I``, the width of the hidden SwiGLU layer.
    """

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        require_positive(hidden_size=hidden_size, intermediate_size=intermediate_size)
        self.w_gate = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w_up = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w_down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, u: Tensor) -> Tensor:
        """``u`` (..., H) -> (..., H)."""
        return self.w_down(F.silu(self.w_gate(u)) * self.w_up(u))


# ----------------------------------------------------------------------------------------- routing

def validate_routing(n_routed_experts: int, num_experts_per_tok: int, n_group: int = 1, topk_group: int = 1) -> None:
    """Raise ``ValueError`` naming the field if group-limited top-k routing is impossible.

    The one home of these rules: ``helpers.configs.validate_deepseek_fields`` calls it too. It lives
    here so that importing this module does not import ``transformers`` (about 15 s on a slow machine).
    """
    require_positive(n_routed_experts=n_routed_experts, num_experts_per_tok=num_experts_per_tok,
                     n_group=n_group, topk_group=topk_group)
    if n_routed_experts % n_group:
        raise ValueError(f"n_routed_experts ({n_routed_experts}) must be divisible by n_group ({n_group})")
    if topk_group > n_group:
        raise ValueError(f"topk_group ({topk_group}) must be at most n_group ({n_group})")
    reachable = topk_group * (n_routed_experts // n_group)
    if num_experts_per_tok > reachable:
        raise ValueError(f"num_experts_per_tok ({num_experts_per_tok}) exceeds the {reachable} experts "
                         f"reachable in topk_group={topk_group} groups of {n_routed_experts // n_group}; "
                         "lower num_experts_per_tok or raise topk_group")


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype routing is computed in: at least float32, like ``transformers`` (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def affinity(logits: Tensor, scoring_func: str) -> Tensor:
    """Token-to-expert affinities ``s_{i,t}`` from router logits ``u_t^T e_i``.

    ``"softmax"`` over the experts (DeepSeek-V2 eq. 22, DeepSeekMoE eq. 5) or an element-wise
    ``"sigmoid"`` (DeepSeek-V3 eq. 15). Computed in at least float32, like ``transformers``.

    Args:
        logits: (T, E) router logits.
        scoring_func: ``"softmax"`` or ``"sigmoid"``.

    Returns:
        s: (T, E) affinities.
    """
    logits = logits.to(router_dtype(logits.dtype))
    if scoring_func == "softmax":
        return logits.softmax(dim=-1)
    if scoring_func == "sigmoid":
        return logits.sigmoid()
    raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {scoring_func!r}")


def select_experts(scores_for_choice: Tensor, top_k: int, n_group: int = 1, topk_group: int = 1,
                   group_score: str = "top2_sum") -> Tensor:
    """Pick ``top_k`` experts per token, only from the ``topk_group`` best of ``n_group`` groups.

    Group-limited routing (DeepSeek-V2 §2.2.2 "device-limited routing", DeepSeek-V3 §2.1.2 "node-
    limited routing"): the experts are split into ``n_group`` equal consecutive groups; each group is
    scored, the ``topk_group`` best groups are kept, and the usual top-k (V3 eq. 16) runs over the
    experts in those groups only. V3 scores a group by the sum of its two highest scores
    (``"top2_sum"``, the sum of the top one if a group has a single expert), V2 by its highest
    (``"max"``). With ``n_group == 1`` this is plain top-k.

    Args:
        scores_for_choice: (T, E) affinities used for the choice (V3: ``s + b``).
        top_k: ``K_r``, experts per token.
        n_group: number of groups ``E`` is split into.
        topk_group: groups each token may use.
        group_score: ``"top2_sum"`` (V3) or ``"max"`` (V2).

    Returns:
        indices: (T, top_k) expert ids, in no particular order (compare sets, not order).
    """
    n_tokens, n_experts = scores_for_choice.shape
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {group_score!r}")
    validate_routing(n_experts, top_k, n_group, topk_group)
    if n_group > 1:
        grouped = scores_for_choice.view(n_tokens, n_group, n_experts // n_group)  # (T, G, E/G)
        if group_score == "max":
            group_scores = grouped.max(dim=-1).values  # (T, G)
        else:
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)  # (T, G)
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices  # (T, topk_group)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)  # (T, G)
        expert_mask = group_mask.repeat_interleave(n_experts // n_group, dim=1)  # (T, E)
        scores_for_choice = scores_for_choice.masked_fill(~expert_mask, float("-inf"))
    return scores_for_choice.topk(top_k, dim=-1, sorted=False).indices  # (T, k)


def gating_weights(scores: Tensor, indices: Tensor, norm_topk_prob: bool, routed_scaling_factor: float) -> Tensor:
    """Gating values ``g_{i,t}`` of the chosen experts (V3 eq. 13-14, V2 eq. 21).

    The values come from the affinities ``s`` themselves, never from the biased ``s + b``: the bias
    only decides *which* experts run (arXiv 2408.15664 eq. 3). With ``norm_topk_prob`` they are divided
    by their sum (V3 eq. 13); then all are multiplied by ``routed_scaling_factor``.

    Args:
        scores: (T, E) affinities ``s``.
        indices: (T, k) chosen experts.
        norm_topk_prob: renormalise the k values to sum to 1.
        routed_scaling_factor: scale applied last.

    Returns:
        weights: (T, k), aligned with ``indices``.
    """
    weights = scores.gather(1, indices)  # (T, k)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor


def default_group_score(scoring_func: str) -> str:
    """V3 (sigmoid) scores a group by its top-2 sum, V2 (softmax) by its maximum."""
    return "top2_sum" if scoring_func == "sigmoid" else "max"


def route(logits: Tensor, *, scoring_func: str, top_k: int, n_group: int = 1, topk_group: int = 1,
          norm_topk_prob: bool, routed_scaling_factor: float = 1.0, bias: Tensor | None = None,
          group_score: str | None = None) -> tuple[Tensor, Tensor]:
    """The whole router: affinities, (group-limited) top-k on ``s + b``, gating values (V3 eq. 13-16).

    Args:
        logits: (T, E) router logits ``u_t^T e_i``.
        scoring_func: ``"sigmoid"`` (V3) or ``"softmax"`` (V2).
        top_k, n_group, topk_group: see :func:`select_experts`.
        norm_topk_prob, routed_scaling_factor: see :func:`gating_weights`.
        bias: (E,) load-balancing bias ``b``; affects only the choice.
        group_score: how a group is scored; default ``"top2_sum"`` for sigmoid, ``"max"`` for softmax.

    Returns:
        (weights (T, k), indices (T, k)).
    """
    scores = affinity(logits, scoring_func)  # (T, E)
    scores_for_choice = scores if bias is None else scores + bias.to(scores.dtype)
    indices = select_experts(scores_for_choice.detach(), top_k, n_group, topk_group,
                             group_score or default_group_score(scoring_func))  # (T, k)
    return gating_weights(scores, indices, norm_topk_prob, routed_scaling_factor), indices


# ---------------------------------------------------------------------------------------- dispatch

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


def split_experts(bounds: list[int], n_parts: int) -> list[range]:
    """Cut the experts into at most ``n_parts`` consecutive ranges holding about equal numbers of pairs."""
    def nearest_cut(target: float) -> int:  # the expert boundary closest to ``target`` pairs
        i = bisect.bisect_left(bounds, target)
        return i - 1 if i == len(bounds) or (i > 0 and target - bounds[i - 1] < bounds[i] - target) else i

    cuts = [0, *(nearest_cut(bounds[-1] * p / n_parts) for p in range(1, n_parts)), len(bounds) - 1]
    return [range(a, b) for a, b in zip(cuts, cuts[1:]) if bounds[b] > bounds[a]]


@functools.cache
def _thread_pool(n_workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(n_workers, thread_name_prefix="experts")


def expert_parallel(fn: Callable[..., R], parts: list[tuple]) -> list[R]:
    """``[fn(*part) for part in parts]``, one CPU thread per part, each part's matmuls single-threaded.

    Expert parallelism on one machine: instead of splitting every (small) expert matmul across the
    cores, which costs a synchronisation of all threads per matmul, each core runs whole experts on
    its own. The intra-op thread count is set to 1 while the parts run (a process-wide setting) and
    restored after; autograd is off in the workers (the callers handle gradients themselves).
    """
    def run(part: tuple) -> R:
        with torch.no_grad():
            return fn(*part)

    if len(parts) <= 1:
        return [run(part) for part in parts]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return list(_thread_pool(len(parts)).map(run, parts))
    finally:
        torch.set_num_threads(threads)


def _routed_forward(u: Tensor, g: Tensor, token: Tensor, bounds: list[int], w_gate_up: Tensor, w_down: Tensor,
                    experts: range, y: Tensor, hs: list[Tensor] | None) -> None:
    """The forward of :class:`SortedDispatch` for some experts: adds their ``g FFN(u)`` to ``y`` (T, H).

    Appends each expert's ``h`` to ``hs`` when given (for the backward), empty experts included.
    """
    n_inter = w_down.shape[-1]
    for e in experts:
        start, end = bounds[e], bounds[e + 1]
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

    Six matrix products per expert in all (two forward, four backward), the same count as a dense
    SwiGLU under autograd. Both passes run the experts in ``n_workers`` parts with
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


def dispatch(u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor,
             n_workers: int | None = None) -> Tensor:
    """``sum_i g_{i,t} FFN_i(u_t)`` over the chosen experts, computed expert by expert (V3 eq. 12).

    The efficient way (notebook 11): sort the ``T*k`` (token, expert) pairs by expert once, run each
    expert as two matrix multiplications on all of its tokens at once, weight the rows by ``g`` and
    add them back to their tokens with ``index_add_``; one host-device sync (the slice bounds). The
    work is :class:`SortedDispatch` (a hand-written backward that keeps memory traffic per expert),
    with the experts shared out over ``n_workers`` CPU threads (:func:`expert_parallel`).

    Args:
        u: (T, H) tokens.
        weights: (T, k) gating values ``g``.
        indices: (T, k) chosen experts.
        w_gate_up: (E, 2I, H) fused gate and up projections (gate rows first), like ``transformers``.
        w_down: (E, H, I) down projections.
        n_workers: threads to share the experts over; default ``torch.get_num_threads()``.

    Returns:
        (T, H), in ``u``'s dtype.
    """
    n_workers = torch.get_num_threads() if n_workers is None else n_workers
    require_positive(n_workers=n_workers)
    if weights.shape != indices.shape or indices.shape[0] != u.shape[0]:
        raise ValueError(f"weights {tuple(weights.shape)} and indices {tuple(indices.shape)} must both be (T, k) "
                         f"with T = {u.shape[0]}, the rows of u")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, weights, w_gate_up, w_down)):
        return SortedDispatch.apply(u, weights, indices, w_gate_up, w_down, n_workers)
    return _sorted_forward(u, weights, indices, w_gate_up, w_down, n_workers, keep_h=False)[0]


# ------------------------------------------------------------------------------ balance statistics

def expert_load(indices: Tensor, n_experts: int) -> Tensor:
    """Tokens routed to each expert, ``load_i = sum_t 1(i in chosen(t))``, as a float (E,) tensor."""
    return torch.bincount(indices.reshape(-1), minlength=n_experts).float()


def max_violation(load: Tensor) -> Tensor:
    """MaxVio = (max_i load_i - mean load) / mean load (arXiv 2408.15664 eq. 4); 0 is perfect balance."""
    mean = load.float().mean()
    return (load.max() - mean) / mean


@torch.no_grad()
def update_bias(bias: Tensor, load: Tensor, gamma: float) -> Tensor:
    """Auxiliary-loss-free update ``b_i <- b_i + gamma * sign(mean load - load_i)`` (2408.15664 eq. 3-4).

    Overloaded experts get a lower bias, idle ones a higher bias (V3 §2.1.2). Returns a new tensor.
    """
    return bias + gamma * torch.sign(load.float().mean() - load.float()).to(bias.dtype)


def expert_level_aux_loss(scores: Tensor, indices: Tensor, n_experts: int, alpha: float) -> Tensor:
    """DeepSeek-V2's expert-level balance loss (V2 eq. 23-25; DeepSeekMoE eq. 12-14).

    ``L = alpha * sum_i f_i P_i``, ``f_i = N_r / (K_r T) * sum_t 1(t chose i)``,
    ``P_i = 1/T * sum_t s_{i,t}``. Gradients flow through ``P`` only. Equals ``alpha`` at perfect balance
    with uniform affinities.

    Args:
        scores: (..., E) softmax affinities of all tokens (leading dims are flattened).
        indices: (..., k) chosen experts.
        n_experts: ``N_r``.
        alpha: ``alpha_1``.

    Returns:
        A scalar tensor.
    """
    scores = scores.reshape(-1, n_experts)  # (T, E)
    n_tokens, top_k = scores.shape[0], indices.shape[-1]
    f = expert_load(indices, n_experts).to(scores.dtype) * n_experts / (top_k * n_tokens)  # (E,)
    p = scores.mean(dim=0)  # (E,)
    return alpha * (f * p).sum()


def sequence_wise_aux_loss(scores: Tensor, indices: Tensor, n_experts: int, alpha: float) -> Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (V3 eq. 17-20), averaged over sequences.

    Per sequence of ``T`` tokens: ``s'_{i,t} = s_{i,t} / sum_j s_{j,t}`` (eq. 19),
    ``f_i = N_r / (K_r T) * sum_t 1(t chose i)`` (eq. 18), ``P_i = 1/T * sum_t s'_{i,t}`` (eq. 20),
    ``L_Bal = alpha * sum_i f_i P_i`` (eq. 17).

    Args:
        scores: (B, T, E) affinities (sigmoid in V3; normalised per token here), or (T, E) for one sequence.
        indices: (B, T, k) or (T, k) chosen experts.
        n_experts: ``N_r``.
        alpha: the balance factor.

    Returns:
        A scalar tensor: the mean of ``L_Bal`` over the ``B`` sequences.
    """
    if scores.dim() == 2:
        scores, indices = scores.unsqueeze(0), indices.unsqueeze(0)
    _, n_tokens, _ = scores.shape
    top_k = indices.shape[-1]
    chosen = F.one_hot(indices, n_experts).sum(dim=-2).to(scores.dtype)  # (B, T, E) 0/1
    f = chosen.sum(dim=1) * n_experts / (top_k * n_tokens)  # (B, E)
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
    return alpha * (f * p).sum(dim=-1).mean()


# ------------------------------------------------------------------------------------------ module

@dataclass
class RoutingStats:
    """What the last forward routed: per-expert load (E,), MaxVio, gating values and experts (T, k)."""

    load: Tensor
    max_vio: Tensor
    weights: Tensor
    indices: Tensor


class DeepSeekMoE(nn.Module):
    """The DeepSeekMoE layer of DeepSeek-V2 and V3: shared + routed fine-grained experts (V3 eq. 12-16).

    Args:
        hidden_size: ``H``.
        moe_intermediate_size: ``I``, the width of one expert.
        n_routed_experts: ``N_r``.
        num_experts_per_tok: ``K_r``.
        n_shared_experts: ``N_s``; the shared experts are one SwiGLU of width ``N_s * I`` (0: none).
        scoring_func: ``"sigmoid"`` (V3) or ``"softmax"`` (V2).
        n_group, topk_group: group-limited routing (``n_group=1``: plain top-k).
        norm_topk_prob: renormalise the chosen gating values (V3: True, V2: False).
        routed_scaling_factor: scale on the routed gating values.
        gamma: bias update speed ``gamma`` for :meth:`update_bias` (0: the bias never moves).
        aux_loss_alpha: ``alpha_1`` of V2's expert-level loss (0: off).
        seq_aux_loss_alpha: ``alpha`` of V3's sequence-wise loss (0: off).
        group_score: ``"top2_sum"`` or ``"max"``; default follows ``scoring_func`` (V3 / V2).

    Parameters: ``gate_weight`` (E, H) (the centroids ``e_i``), buffer ``bias`` (E,) (``b_i``, no
    gradient), ``w_gate_up`` (E, 2I, H), ``w_down`` (E, H, I), ``shared_experts`` (a :class:`SwiGLU` or None).

    ``forward`` returns only the output; after it, ``self.last_stats`` (a :class:`RoutingStats`) and
    ``self.aux_loss`` (a scalar tensor, 0 when both alphas are 0) hold the statistics and the loss.
    """

    def __init__(self, hidden_size: int, moe_intermediate_size: int, n_routed_experts: int,
                 num_experts_per_tok: int, n_shared_experts: int = 0, scoring_func: str = "sigmoid",
                 n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, gamma: float = 0.0, aux_loss_alpha: float = 0.0,
                 seq_aux_loss_alpha: float = 0.0, group_score: str | None = None) -> None:
        super().__init__()
        require_positive(hidden_size=hidden_size, moe_intermediate_size=moe_intermediate_size)
        validate_routing(n_routed_experts, num_experts_per_tok, n_group, topk_group)
        if not isinstance(n_shared_experts, int) or isinstance(n_shared_experts, bool) or n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be a non-negative integer, got {n_shared_experts!r}")
        if scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {scoring_func!r}")
        group_score = group_score or default_group_score(scoring_func)
        if group_score not in GROUP_SCORES:
            raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {group_score!r}")
        if not routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor must be positive, got {routed_scaling_factor!r}")
        for name, value in (("gamma", gamma), ("aux_loss_alpha", aux_loss_alpha),
                            ("seq_aux_loss_alpha", seq_aux_loss_alpha)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        self.hidden_size, self.moe_intermediate_size = hidden_size, moe_intermediate_size
        self.n_routed_experts, self.top_k, self.n_shared_experts = n_routed_experts, num_experts_per_tok, n_shared_experts
        self.scoring_func, self.group_score = scoring_func, group_score
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, float(routed_scaling_factor)
        self.gamma, self.aux_loss_alpha, self.seq_aux_loss_alpha = gamma, aux_loss_alpha, seq_aux_loss_alpha

        self.gate_weight = nn.Parameter(torch.empty(n_routed_experts, hidden_size))  # (E, H)
        self.register_buffer("bias", torch.zeros(n_routed_experts))  # (E,)
        self.w_gate_up = nn.Parameter(torch.empty(n_routed_experts, 2 * moe_intermediate_size, hidden_size))
        self.w_down = nn.Parameter(torch.empty(n_routed_experts, hidden_size, moe_intermediate_size))
        self.shared_experts = (SwiGLU(hidden_size, moe_intermediate_size * n_shared_experts)
                               if n_shared_experts else None)
        self.register_buffer("load_since_update", torch.zeros(n_routed_experts), persistent=False)
        self.last_stats: RoutingStats | None = None
        self.aux_loss = torch.zeros(())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like ``nn.Linear`` (uniform in +-1/sqrt(fan_in)), so each expert is a default SwiGLU."""
        for weight, fan_in in ((self.gate_weight, self.hidden_size), (self.w_gate_up, self.hidden_size),
                               (self.w_down, self.moe_intermediate_size)):
            nn.init.uniform_(weight, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        self.bias.zero_()

    def extra_repr(self) -> str:
        return (f"H={self.hidden_size}, I={self.moe_intermediate_size}, N_r={self.n_routed_experts}, "
                f"K_r={self.top_k}, N_s={self.n_shared_experts}, scoring_func={self.scoring_func!r}, "
                f"n_group={self.n_group}, topk_group={self.topk_group}, norm_topk_prob={self.norm_topk_prob}, "
                f"routed_scaling_factor={self.routed_scaling_factor}")

    def forward(self, u: Tensor) -> Tensor:
        """``u`` (B, T, H) (any leading dims) -> the FFN output (B, T, H), without the residual.

        Side effects: ``self.last_stats``, ``self.aux_loss``, and (in training mode) the load counted
        towards the next :meth:`update_bias`.
        """
        shape = u.shape
        x = u.reshape(-1, self.hidden_size)  # (T, H) with T = all tokens
        dtype = router_dtype(x.dtype)
        logits = F.linear(x.to(dtype), self.gate_weight.to(dtype))  # (T, E)
        scores = affinity(logits, self.scoring_func)  # (T, E)
        indices = select_experts((scores + self.bias.to(dtype)).detach(), self.top_k, self.n_group,
                                 self.topk_group, self.group_score)  # (T, k)
        weights = gating_weights(scores, indices, self.norm_topk_prob, self.routed_scaling_factor)  # (T, k)
        y = dispatch(x, weights, indices, self.w_gate_up, self.w_down)  # (T, H)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)

        load = expert_load(indices, self.n_routed_experts)  # (E,)
        if self.training:
            self.load_since_update += load
        self.last_stats = RoutingStats(load=load, max_vio=max_violation(load), weights=weights.detach(),
                                       indices=indices)
        self.aux_loss = self._aux_loss(scores, indices, shape)
        return y.reshape(shape)

    def _aux_loss(self, scores: Tensor, indices: Tensor, shape: torch.Size) -> Tensor:
        loss = scores.new_zeros(())
        if self.aux_loss_alpha:
            loss = loss + expert_level_aux_loss(scores, indices, self.n_routed_experts, self.aux_loss_alpha)
        if self.seq_aux_loss_alpha:
            n_seq = math.prod(shape[:-2]) if len(shape) > 2 else 1
            loss = loss + sequence_wise_aux_loss(scores.view(n_seq, -1, self.n_routed_experts),
                                                 indices.view(n_seq, -1, self.top_k),
                                                 self.n_routed_experts, self.seq_aux_loss_alpha)
        return loss

    @torch.no_grad()
    def update_bias(self) -> None:
        """Move ``bias`` by ``gamma`` against the load counted since the last update (2408.15664 eq. 3-4).

        The load of every training-mode forward since the previous call is summed, so gradient
        accumulation over several micro-batches gives one update per optimiser step; the count
        then restarts. Call it after ``optimizer.step()``.
        """
        if not self.load_since_update.any():
            raise RuntimeError("no training-mode forward since the last update_bias; "
                               "run the layer in train() mode before updating the bias")
        self.bias.copy_(update_bias(self.bias, self.load_since_update, self.gamma))
        self.load_since_update.zero_()
