"""Checker of the sorted (grouped) dispatch of notebook 11.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from helpers import moe
from helpers.layers import SwiGLU
from helpers.moe.checks.common import (
    _generator,
    _random_routing,
    make_experts,
    stack_experts,
)
from helpers.teaching.checks import Case, Checker, Mistake

# ------------------------------------------------------------- notebook 11: sorted (grouped) dispatch

def _dispatch_reference(x: Tensor, weights: Tensor, indices: Tensor, experts: Sequence[SwiGLU]) -> Tensor:
    return moe.dispatch(x, weights, indices, *stack_experts(experts))


def _dispatch_cases() -> list[Case]:
    gen = _generator(11)
    cases = []
    for description, (t, h, e, k, i) in {
        "6 tokens, H=8, 4 experts, k=2": (6, 8, 4, 2, 16),
        "10 tokens, H=8, 8 experts, k=3": (10, 8, 8, 3, 8),
    }.items():
        weights, indices = _random_routing(t, e, k, gen)
        cases.append(Case(description, dict(x=torch.randn(t, h, generator=gen), weights=weights,
                                            indices=indices, experts=make_experts(e, h, i, seed=t))))
    x = torch.randn(5, 8, generator=gen)
    indices = torch.tensor([[0, 2], [2, 0], [0, 3], [3, 2], [2, 0]])  # expert 1 gets no tokens
    cases.append(Case("5 tokens, 4 experts, k=2, expert 1 unused",
                      dict(x=x, weights=0.5 + torch.rand(5, 2, generator=gen), indices=indices,
                           experts=make_experts(4, 8, 16, seed=5))))
    return cases


def _sorted_pairs(indices: Tensor, n_experts: int) -> tuple[Tensor, Tensor, list[int]]:
    flat = indices.reshape(-1)  # (T*k,)
    return flat.argsort(stable=True), flat, torch.bincount(flat, minlength=n_experts).tolist()


def _dispatch_assign(x, weights, indices, experts):
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token, slot = (indices == e).nonzero(as_tuple=True)
        if len(token):
            out[token] = expert(x[token]) * weights[token, slot, None]  # overwrites, loses earlier experts
    return out


def _dispatch_unweighted(x, weights, indices, experts):
    return _dispatch_reference(x, torch.ones_like(weights), indices, experts)


def _dispatch_weights_unsorted(x, weights, indices, experts):
    order, flat, counts = _sorted_pairs(indices, len(experts))
    rows = torch.cat([experts[e](block) for e, block in enumerate(x[order // indices.shape[1]].split(counts))
                      if len(block)])
    rows = rows * weights.reshape(-1)[:, None]  # the weights were not permuted with the rows
    return torch.zeros_like(x).index_add_(0, order // indices.shape[1], rows)


def _dispatch_back_to_wrong_tokens(x, weights, indices, experts):
    order, flat, counts = _sorted_pairs(indices, len(experts))
    top_k = indices.shape[1]
    rows = torch.cat([experts[e](block) for e, block in enumerate(x[order // top_k].split(counts)) if len(block)])
    rows = rows * weights.reshape(-1)[order, None]
    position = torch.arange(len(flat)) // top_k  # the sorted position, not the pair's own token
    return torch.zeros_like(x).index_add_(0, position, rows)


check_sorted_dispatch = Checker(
    name="sorted_dispatch",
    nudge="group the (token, expert) pairs by expert so each expert runs once on all of its tokens.",
    cases=_dispatch_cases,
    reference=_dispatch_reference,
    mistakes=[
        Mistake("assignment instead of accumulation", _dispatch_assign,
                "contributions are lost: a token routed to several experts keeps only the last one. "
                "Accumulate into the output (index_add_ or +=) instead of assigning with ="),
        Mistake("gating weights missing", _dispatch_unweighted,
                "the expert outputs are not multiplied by their gating weights g_{i,t}"),
        Mistake("weights not permuted", _dispatch_weights_unsorted,
                "each row got the gating weight of another (token, expert) pair: after sorting the "
                "pairs by expert, permute the weights with the same order as the rows"),
        Mistake("results added to the wrong tokens", _dispatch_back_to_wrong_tokens,
                "results were added to the wrong tokens: after sorting by expert, send each row back "
                "to the token of its (token, expert) pair (order // k), not to its sorted position"),
    ],
    hint="flatten indices, argsort them, run each expert once on its slice, weight, index_add_ back.",
)
