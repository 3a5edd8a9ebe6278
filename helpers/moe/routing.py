"""The DeepSeekMoE router: affinities, group-limited top-k, gating values (V2 and V3).

``route`` is the whole router (V3 eq. 13-16, V2 eq. 21-22, plus the released code's
``routed_scaling_factor``); its pieces are ``affinity`` (softmax or
sigmoid scores), ``select_experts`` (group-limited top-k on ``s + b``) and ``gating_weights``
(optional renormalisation, then ``routed_scaling_factor``). ``validate_routing`` is the one home of
the rules that make a routing configuration possible.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from helpers.inputs import check_expert_ids, check_scores, require_tensor
from helpers.precision import compute_dtype
from helpers.rules import require_choice, require_number, validate_routing

SCORING_FUNCS: dict[str, Callable[[Tensor], Tensor]] = {
    "softmax": lambda logits: logits.softmax(dim=-1),  # DeepSeek-V2 eq. 22, DeepSeekMoE eq. 5: over the experts
    "sigmoid": torch.sigmoid,  # DeepSeek-V3 eq. 15: each expert on its own
    "sqrtsoftplus": lambda logits: F.softplus(logits).sqrt(),  # DeepSeek-V4 §2.1: sqrt(softplus), each on its own
}
"""The registry of scoring functions ``s_{i,t} = f(u_t^T e_i)``, chosen by name with ``scoring_func``: a new one is
one entry here (``CONTRIBUTING.md``), as V4's ``"sqrtsoftplus"`` (``helpers.v4.moe``) was."""
GROUP_SCORES = ("top2_sum", "max")


def affinity(logits: Tensor, scoring_func: str) -> Tensor:
    """Token-to-expert affinities ``s_{i,t}`` from router logits ``u_t^T e_i``.

    A function of :data:`SCORING_FUNCS`: ``"softmax"`` over the experts (DeepSeek-V2 eq. 22, DeepSeekMoE eq. 5), an
    element-wise ``"sigmoid"`` (DeepSeek-V3 eq. 15) or ``"sqrtsoftplus"`` (DeepSeek-V4 §2.1). Computed in at least float32 (:func:`helpers.precision.compute_dtype`),
    like ``transformers``.

    Args:
        logits: (T, E) router logits.
        scoring_func: ``"softmax"``, ``"sigmoid"`` or ``"sqrtsoftplus"``.

    Returns:
        s: (T, E) affinities.
    """
    require_tensor("logits", logits, "[tokens, experts]")
    if logits.dim() == 0 or not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating-point router logits [tokens, experts], got {logits.dtype} "
                        f"{tuple(logits.shape)}: compute them as u @ gate_weight.T")
    require_choice("scoring_func", scoring_func, SCORING_FUNCS)
    return SCORING_FUNCS[scoring_func](logits.to(compute_dtype(logits.dtype)))


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
    check_scores("scores_for_choice", scores_for_choice)
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
    by their sum (V3 eq. 13; DeepSeekMoE and V2 keep them as they are, ``norm_topk_prob=False`` in the
    released V2 and V2-Lite configs); then all are multiplied by ``routed_scaling_factor``. That scale
    is in no paper's equations: it comes from the released configs and code (2.5 in V3's config, 16.0
    in V2's, 1.0 in V2-Lite's; :mod:`helpers.configs`).

    Args:
        scores: (T, E) affinities ``s``.
        indices: (T, k) chosen experts (checked: ids in range, one host sync).
        norm_topk_prob: renormalise the k values to sum to 1.
        routed_scaling_factor: scale applied last.

    Returns:
        weights: (T, k), aligned with ``indices``.
    """
    check_scores("scores", scores)
    check_expert_ids("indices", indices, scores.shape[1], tokens=scores.shape[0])
    require_number("routed_scaling_factor", routed_scaling_factor, positive=True)
    return _gating_weights(scores, indices, norm_topk_prob, routed_scaling_factor)


def _gating_weights(scores: Tensor, indices: Tensor, norm_topk_prob: bool, routed_scaling_factor: float) -> Tensor:
    """:func:`gating_weights` unchecked: the layer's own call, whose ``indices`` its router chose from ``scores``."""
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
    check_scores("logits", logits)
    if bias is not None:
        require_tensor("bias", bias, f"[experts={logits.shape[1]}]")
        if tuple(bias.shape) != (logits.shape[1],):
            raise ValueError(f"bias must be one value per expert [{logits.shape[1]}], got shape {tuple(bias.shape)}: "
                             "pass the layer's bias (E,)")
    scores = affinity(logits, scoring_func)  # (T, E)
    scores_for_choice = scores if bias is None else scores + bias.to(scores.dtype)
    indices = select_experts(scores_for_choice.detach(), top_k, n_group, topk_group,
                             group_score or default_group_score(scoring_func))  # (T, k)
    return gating_weights(scores, indices, norm_topk_prob, routed_scaling_factor), indices
