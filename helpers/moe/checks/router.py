"""Checkers of the routers: the softmax top-k router (notebook 10) and V3 routing (notebook 12).

Each known mistake is the reference with one switch flipped (``_topk_with``, ``_v3_with``), so the
list is systematic: every single step of the router (score function and its axis, which scores
choose, how groups are formed and scored, which scores weigh, renormalisation, scale, the order of
the returned pair) has a wrong setting with its own message. Routers are compared as expert *sets*
(:func:`~helpers.moe.checks.common.sort_routing`); when no known mistake matches, the message names
the tokens whose sets or weights differ (:func:`~helpers.moe.checks.common.describe_routing`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from helpers import moe
from helpers.moe.checks.common import _generator, describe_routing, sort_routing
from helpers.teaching.checks import Case, Checker, Mistake

# ------------------------------------------------------------------ notebook 10: softmax top-k router


def _route_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return moe.route(logits, scoring_func="softmax", top_k=k, norm_topk_prob=True)


def _route_topk_cases() -> list[Case]:
    gen = _generator(10)
    return [  # T, E and k all differ, so an axis mix-up cannot go unnoticed
        Case("6 tokens, 8 experts, k=2", dict(logits=torch.randn(6, 8, generator=gen), k=2)),
        Case("5 tokens, 16 experts, k=4", dict(logits=2 * torch.randn(5, 16, generator=gen), k=4)),
        Case("9 tokens, 4 experts, k=3", dict(logits=torch.randn(9, 4, generator=gen), k=3)),
    ]


def _topk_with(logits: Tensor, k: int, *, score: str = "softmax", score_dim: int = -1, largest: bool = True,
               renorm: str = "sum", renorm_dim: int = -1, swap: bool = False) -> tuple[Tensor, Tensor]:
    """The softmax top-k router with switches, each of which makes one known mistake."""
    if score == "softmax":
        s = logits.softmax(dim=score_dim)  # (T, E)
    elif score == "sigmoid":
        s = logits.sigmoid()
    else:  # "logits": no score function at all
        s = logits
    top, indices = s.topk(k, dim=-1, largest=largest)  # (T, k) each
    if renorm == "sum":
        top = top / top.sum(dim=renorm_dim, keepdim=True)
    elif renorm == "softmax":
        top = top.softmax(dim=-1)
    return (indices, top) if swap else (top, indices)


def _topk_mistake(**switch: Any) -> Callable[..., Any]:
    return lambda logits, k: _topk_with(logits, k, **switch)


check_route_topk = Checker(
    name="route_topk",
    checker_name="moe_checks.check_route_topk",
    nudge="three steps per token: turn its logits into affinities over the experts, keep the k largest, "
          "and make the kept weights sum to 1.",
    cases=_route_topk_cases,
    reference=_route_topk,
    mistakes=[
        Mistake("softmax over the tokens", _topk_mistake(score_dim=0),
                "softmax over the wrong dimension: each token's affinities must sum to 1 over the "
                "experts, logits.softmax(dim=-1), not over the tokens (dim=0)"),
        Mistake("sigmoid instead of softmax", _topk_mistake(score="sigmoid"),
                "these are sigmoid affinities (DeepSeek-V3's score); this router uses a softmax over the "
                "experts (DeepSeekMoE eq. 5): logits.softmax(dim=-1)"),
        Mistake("no score function", _topk_mistake(score="logits"),
                "the weights are the raw logits divided by their sum: take the softmax over the experts "
                "first (s = logits.softmax(dim=-1)), then the top-k of s"),
        Mistake("no renormalisation", _topk_mistake(renorm="none"),
                "the kept weights were not renormalised: they are the top-k softmax values, which sum to "
                "less than 1 (DeepSeekMoE's and DeepSeek-V2's routers stop there; this one, like "
                "Mixtral's and V3 eq. 13, divides them by their sum)"),
        Mistake("renormalised over the tokens", _topk_mistake(renorm_dim=0),
                "the kept weights were divided by a sum over the tokens (dim=0): divide each token's k "
                "weights by their own sum, top.sum(dim=-1, keepdim=True)"),
        Mistake("second softmax", _topk_mistake(renorm="softmax"),
                "the kept weights went through a second softmax; renormalise by dividing them by their "
                "sum instead"),
        Mistake("the k smallest", _topk_mistake(largest=False),
                "each token chose its k *lowest* affinities: topk keeps the largest by default "
                "(largest=True); do not sort ascending or negate the scores"),
        Mistake("outputs swapped", _topk_mistake(swap=True),
                "the right experts and weights, returned in the wrong order: return (weights, indices)"),
    ],
    diagnose=lambda got, want, kw: describe_routing(got, want, expected_sum=1.0),
    normalize=sort_routing,
    hint="s = logits.softmax(dim=-1)  (T, E): each token's affinities over the experts (DeepSeekMoE eq. 5)\n"
         "top, indices = s.topk(k, dim=-1)  (T, k) each\n"
         "weights = top / top.sum(dim=-1, keepdim=True)  renormalise, so every token's weights sum to 1\n"
         "return weights, indices",
)


# --------------------------------------------------------------------- notebook 12: V3 routing


def _route_v3(logits, bias, top_k, n_group, topk_group, routed_scaling_factor):
    return moe.route(logits, scoring_func="sigmoid", top_k=top_k, n_group=n_group, topk_group=topk_group,
                     norm_topk_prob=True, routed_scaling_factor=routed_scaling_factor, bias=bias)


def _route_v3_cases() -> list[Case]:
    gen = _generator(12)
    return [  # T, E, n_group, E/n_group, topk_group and k all differ within a case
        Case("7 tokens, 24 experts in 6 groups of 4 (top-2 groups), k=5, scale 2.5, random bias",
             dict(logits=2 * torch.randn(7, 24, generator=gen), bias=0.3 * torch.randn(24, generator=gen),
                  top_k=5, n_group=6, topk_group=2, routed_scaling_factor=2.5)),
        Case("5 tokens, 12 experts in 4 groups of 3 (top-2 groups), k=6, scale 1.5, bias favouring experts "
             "10 and 11",
             dict(logits=torch.randn(5, 12, generator=gen), bias=torch.tensor([0.0] * 10 + [0.6, 0.6]),
                  top_k=6, n_group=4, topk_group=2, routed_scaling_factor=1.5)),
        Case("11 tokens, 32 experts in 8 groups of 4 (top-3 groups), k=6, scale 2.5, random bias",
             dict(logits=3 * torch.randn(11, 32, generator=gen), bias=0.5 * torch.randn(32, generator=gen),
                  top_k=6, n_group=8, topk_group=3, routed_scaling_factor=2.5)),
        Case("9 tokens, 10 experts, one group (plain top-k), k=3, scale 2.0, random bias",
             dict(logits=torch.randn(9, 10, generator=gen), bias=0.5 * torch.randn(10, generator=gen),
                  top_k=3, n_group=1, topk_group=1, routed_scaling_factor=2.0)),
    ]


def _v3_with(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, *, scoring_func="sigmoid",
             weights_from="s", select_with_bias=True, group_with_bias=True, group_score="top2_sum",
             group_layout="consecutive", groups_kept="topk_group", groups=True, renormalise=True, scale=True,
             swap=False):
    """V3 routing with switches, each of which makes one known mistake."""
    s = moe.affinity(logits, scoring_func)  # (T, E)
    choice = s + bias if select_with_bias else s  # (T, E) the scores the experts are chosen on
    group_input = s + bias if group_with_bias else s
    n_tokens, n_experts = s.shape
    if groups and n_group > 1:
        size = n_experts // n_group
        if group_layout == "consecutive":
            grouped = group_input.view(n_tokens, n_group, size)  # (T, G, E/G): experts g*size .. g*size+size-1
        else:  # "strided": group g holds experts g, g + G, g + 2G, ...
            grouped = group_input.view(n_tokens, size, n_group).transpose(1, 2)  # (T, G, E/G)
        if group_score == "max":
            g_score = grouped.max(-1).values  # (T, G)
        elif group_score == "sum":
            g_score = grouped.sum(-1)
        else:
            g_score = grouped.topk(2, dim=-1).values.sum(-1)
        n_kept = topk_group if groups_kept == "topk_group" else min(top_k, n_group)
        keep = torch.zeros_like(g_score, dtype=torch.bool).scatter_(1, g_score.topk(n_kept, dim=-1).indices, True)
        mask = keep.repeat_interleave(size, dim=1) if group_layout == "consecutive" else keep.repeat(1, size)
        choice = choice.masked_fill(~mask, float("-inf"))
    indices = choice.topk(top_k, dim=-1).indices  # (T, k)
    source = {"s": s, "s+b": s + bias, "logits": logits}[weights_from]
    weights = source.gather(1, indices)  # (T, k)
    if renormalise:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights * routed_scaling_factor if scale else weights
    return (indices, weights) if swap else (weights, indices)


def _v3_mistake(**switch) -> Callable[..., Any]:
    return lambda **kwargs: _v3_with(**kwargs, **switch)


_SCALE_MESSAGE = ("routed_scaling_factor is missing: every token's weights sum to 1, expected "
                  "routed_scaling_factor. Either it was forgotten, or it was applied before renormalising "
                  "(the division cancels it): divide by the sum first, then multiply")

check_route_v3 = Checker(
    name="route_v3",
    checker_name="moe_checks.check_route_v3",
    nudge="two different scores: s + b decides which groups and which experts are chosen; s alone "
          "decides how much each chosen expert weighs.",
    cases=_route_v3_cases,
    reference=_route_v3,
    mistakes=[
        Mistake("softmax instead of sigmoid", _v3_mistake(scoring_func="softmax"),
                "these are softmax affinities (V2's score); DeepSeek-V3 uses an element-wise sigmoid, "
                "s = logits.sigmoid() (V3 eq. 15)"),
        Mistake("bias in the gating weights", _v3_mistake(weights_from="s+b"),
                "the bias was added to the gating weights: use s + b only to choose the experts, then take "
                "the weights from the sigmoid scores s (V3 eq. 16 and eq. 13; arXiv 2408.15664 eq. 3)"),
        Mistake("weights from the logits", _v3_mistake(weights_from="logits"),
                "the gating weights were taken from the logits: gather them from the sigmoid scores "
                "s = logits.sigmoid() at the chosen experts"),
        Mistake("bias ignored", _v3_mistake(select_with_bias=False, group_with_bias=False),
                "the bias did not change which experts were chosen: rank the groups and the experts by "
                "s + b (V3 eq. 16)"),
        Mistake("group scores without the bias", _v3_mistake(group_with_bias=False),
                "the groups were ranked by s, not by s + b: score each group on the biased scores too "
                "(as DeepSeek-V3's released code does)"),
        Mistake("experts chosen without the bias", _v3_mistake(select_with_bias=False),
                "the bias chose the groups but not the experts inside them: take the top-k of s + b "
                "(masked outside the kept groups), not of s"),
        Mistake("groups scored by their maximum", _v3_mistake(group_score="max"),
                "the groups were scored by their best expert (V2's rule); V3 scores a group by the sum of "
                "its two highest s + b: .topk(2, dim=-1).values.sum(-1)"),
        Mistake("groups scored by their sum", _v3_mistake(group_score="sum"),
                "the groups were scored by the sum of all their experts; V3 sums only the two highest "
                "s + b of each group: .topk(2, dim=-1).values.sum(-1)"),
        Mistake("groups not consecutive", _v3_mistake(group_layout="strided"),
                "the groups were formed from every n_group-th expert; a group is a run of consecutive "
                "experts (the experts of one node): view the (T, E) scores as (T, n_group, E // n_group)"),
        Mistake("top_k groups kept", _v3_mistake(groups_kept="top_k"),
                "each token kept top_k groups instead of topk_group: keep the topk_group best groups, then "
                "choose top_k experts inside them"),
        Mistake("no group limit", _v3_mistake(groups=False),
                "some tokens use experts outside their topk_group best groups: mask the other groups with "
                "-inf before the top-k"),
        Mistake("no renormalisation", _v3_mistake(renormalise=False),
                "the kept weights were scaled but not renormalised (that is V2's router): divide them by "
                "their sum (V3 eq. 13), then multiply by routed_scaling_factor"),
        Mistake("routed_scaling_factor forgotten or applied before renormalising", _v3_mistake(scale=False),
                _SCALE_MESSAGE),
        Mistake("outputs swapped", _v3_mistake(swap=True),
                "the right experts and weights, returned in the wrong order: return (weights, indices)"),
    ],
    diagnose=lambda got, want, kw: describe_routing(got, want, expected_sum=kw["routed_scaling_factor"]),
    normalize=sort_routing,
    hint="s = logits.sigmoid()  (T, E)  (V3 eq. 15)\n"
         "allowed = keep_top_groups(s + bias, n_group, topk_group, group_top2_sum)  groups chosen on s + b\n"
         "indices = allowed.topk(top_k, dim=-1).indices  experts chosen on s + b, inside the kept groups\n"
         "weights = s.gather(1, indices)  the weights come from s: the bias never enters them\n"
         "weights = weights / weights.sum(dim=-1, keepdim=True) * routed_scaling_factor  (eq. 13, then the "
         "scale of the released configs)\n"
         "return weights, indices",
)
