"""Checkers of the routers: the softmax top-k router (notebook 10) and V3 routing (notebook 12).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from helpers import moe
from helpers.moe.checks.common import (
    _generator,
    _weight_sums,
    sort_routing,
)
from helpers.teaching.checks import Case, Checker, Mistake

# ------------------------------------------------------------------ notebook 10: softmax top-k router

def _route_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return moe.route(logits, scoring_func="softmax", top_k=k, norm_topk_prob=True)


def _route_topk_cases() -> list[Case]:
    gen = _generator(10)
    return [
        Case("6 tokens, 8 experts, k=2", dict(logits=torch.randn(6, 8, generator=gen), k=2)),
        Case("5 tokens, 16 experts, k=4", dict(logits=2 * torch.randn(5, 16, generator=gen), k=4)),
        Case("9 tokens, 4 experts, k=3", dict(logits=torch.randn(9, 4, generator=gen), k=3)),
    ]


def _topk_softmax_over_tokens(logits, k):
    scores = logits.softmax(dim=0)
    weights, indices = scores.topk(k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), indices


def _topk_sigmoid(logits, k):
    weights, indices = logits.sigmoid().topk(k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), indices


def _topk_second_softmax(logits, k):
    weights, indices = logits.softmax(dim=-1).topk(k, dim=-1)
    return weights.softmax(dim=-1), indices


check_route_topk = Checker(
    name="route_topk",
    nudge="each token picks its k experts with the highest affinity; what must the kept weights sum to?",
    cases=_route_topk_cases,
    reference=_route_topk,
    mistakes=[
        Mistake("softmax over the wrong dimension", _topk_softmax_over_tokens,
                "softmax over the wrong dimension: each token's affinities must sum to 1 over the "
                "experts, logits.softmax(dim=-1), not over the tokens (dim=0)"),
        Mistake("sigmoid instead of softmax", _topk_sigmoid,
                "these are sigmoid affinities; this router uses a softmax over the experts "
                "(DeepSeekMoE eq. 5, DeepSeek-V2 eq. 22)"),
        Mistake("second softmax", _topk_second_softmax,
                "the kept weights went through a second softmax; renormalise by dividing them by "
                "their sum instead"),
    ],
    diagnose=lambda got, want, kw: _weight_sums(got, want, 1.0, "did you renormalise after top-k?"),
    normalize=sort_routing,
    hint="logits.softmax(dim=-1), then .topk(k, dim=-1), then divide the kept weights by their sum.",
)



# --------------------------------------------------------------------- notebook 12: V3 routing

def _route_v3(logits, bias, top_k, n_group, topk_group, routed_scaling_factor):
    return moe.route(logits, scoring_func="sigmoid", top_k=top_k, n_group=n_group, topk_group=topk_group,
                     norm_topk_prob=True, routed_scaling_factor=routed_scaling_factor, bias=bias)


def _route_v3_cases() -> list[Case]:
    gen = _generator(12)
    return [
        Case("8 tokens, 16 experts in 4 groups (top-2 groups), k=4, scale 2.5, random bias",
             dict(logits=2 * torch.randn(8, 16, generator=gen), bias=0.3 * torch.randn(16, generator=gen),
                  top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)),
        Case("6 tokens, 8 experts in 4 groups (top-2 groups), k=2, scale 2.5, bias favouring experts 6 and 7",
             dict(logits=torch.randn(6, 8, generator=gen), bias=torch.tensor([0.0] * 6 + [0.5, 0.5]),
                  top_k=2, n_group=4, topk_group=2, routed_scaling_factor=2.5)),
        Case("12 tokens, 32 experts in 8 groups (top-3 groups), k=6, scale 1.5, random bias",
             dict(logits=3 * torch.randn(12, 32, generator=gen), bias=0.5 * torch.randn(32, generator=gen),
                  top_k=6, n_group=8, topk_group=3, routed_scaling_factor=1.5)),
        Case("5 tokens, 8 experts, one group (plain top-k), k=3, scale 1.0, random bias",
             dict(logits=torch.randn(5, 8, generator=gen), bias=0.5 * torch.randn(8, generator=gen),
                  top_k=3, n_group=1, topk_group=1, routed_scaling_factor=1.0)),
    ]


def _v3_with(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, *, scoring_func="sigmoid",
             weights_from_biased=False, select_with_bias=True, group_score="top2_sum", group_with_bias=True,
             renormalise=True, scale=True, groups=True):
    """V3 routing with switches, each of which makes one known mistake."""
    s = moe.affinity(logits, scoring_func)  # (T, E)
    choice = s + bias if select_with_bias else s
    group_input = choice if group_with_bias else s
    if groups and n_group > 1:
        grouped = group_input.view(len(s), n_group, -1)  # (T, G, E/G)
        g_score = grouped.max(-1).values if group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(g_score, dtype=torch.bool).scatter_(1, g_score.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(s.shape[1] // n_group, dim=1), float("-inf"))
    indices = choice.topk(top_k, dim=-1).indices  # (T, k)
    weights = (s + bias if weights_from_biased else s).gather(1, indices)  # (T, k)
    if renormalise:
        weights = weights / weights.sum(-1, keepdim=True)
    return (weights * routed_scaling_factor if scale else weights), indices


def _v3_mistake(**switch) -> Callable[..., Any]:
    return lambda **kwargs: _v3_with(**kwargs, **switch)


_SCALE_MESSAGE = ("routed_scaling_factor forgotten: the weights sum to 1, expected routed_scaling_factor; "
                  "multiply after renormalising (scaling before renormalising cancels out)")

check_route_v3 = Checker(
    name="route_v3",
    nudge="the bias decides which experts are chosen, never how much they weigh.",
    cases=_route_v3_cases,
    reference=_route_v3,
    mistakes=[
        Mistake("bias in the gating weights", _v3_mistake(weights_from_biased=True),
                "the bias was added to the gating weights: use s + b only to choose the experts, "
                "then take g from the sigmoid scores s (DeepSeek-V3 eq. 16; arXiv 2408.15664 eq. 3)"),
        Mistake("bias ignored", _v3_mistake(select_with_bias=False, group_with_bias=False),
                "the bias did not change which experts were chosen: rank groups and experts by s + b"),
        Mistake("group scores without the bias", _v3_mistake(group_with_bias=False),
                "the groups were ranked by s, not by s + b: score each group on the biased scores too"),
        Mistake("softmax instead of sigmoid", _v3_mistake(scoring_func="softmax"),
                "these are softmax affinities; DeepSeek-V3 uses an element-wise sigmoid, s = sigmoid(u^T e_i) (eq. 15)"),
        Mistake("groups scored by their maximum", _v3_mistake(group_score="max"),
                "the groups were scored by their best expert (V2's max); V3 scores a group by the sum "
                "of its two highest s + b"),
        Mistake("no group limit", _v3_mistake(groups=False),
                "some tokens use experts outside their topk_group best groups: mask the other groups "
                "with -inf before the top-k"),
        Mistake("no renormalisation", _v3_mistake(renormalise=False),
                "the kept weights were scaled but not renormalised: divide them by their sum, then "
                "multiply by routed_scaling_factor (V3 eq. 13)"),
        Mistake("routed_scaling_factor forgotten", _v3_mistake(scale=False), _SCALE_MESSAGE),
    ],
    diagnose=lambda got, want, kw: _weight_sums(
        got, want, kw["routed_scaling_factor"], "renormalise after top-k, then multiply by routed_scaling_factor"),
    normalize=sort_routing,
    hint="s = logits.sigmoid(); choose with s + bias (groups by the sum of their top-2, then top-k); "
         "g = s at the chosen experts, renormalised, times routed_scaling_factor.",
)
