"""Checker of the sorted (grouped) dispatch of notebook 11.

The known mistakes are the sorted dispatch with one step changed (``_dispatch_with``): which rows are
gathered, which weights go with them, which expert runs on which block, where the results are added
back and how (accumulated or assigned, onto zeros or onto ``x``). When none matches, the message
names the tokens whose rows differ and the experts they were routed to
(:func:`~helpers.moe.checks.common.describe_token_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from helpers import moe
from helpers.layers import SwiGLU
from helpers.moe.checks.common import (
    _generator,
    _random_routing,
    describe_token_rows,
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
    for description, (t, h, e, k, i, unused) in {  # T, H, E, k and I all differ within a case
        "7 tokens, H=10, 5 experts (expert 2 chosen by nobody), k=2, expert width 12": (7, 10, 5, 2, 12, [2]),
        "11 tokens, H=6, 8 experts, k=3, expert width 4": (11, 6, 8, 3, 4, []),
        "9 tokens, H=5, 6 experts (experts 0 and 3 chosen by nobody), k=4, expert width 7": (9, 5, 6, 4, 7, [0, 3]),
    }.items():
        weights, indices = _random_routing(t, e, k, gen, unused=unused)
        cases.append(Case(description, dict(x=torch.randn(t, h, generator=gen), weights=weights,
                                            indices=indices, experts=make_experts(e, h, i, seed=t))))
    return cases


def _dispatch_with(x, weights, indices, experts, *, gather="token", weights_by="order", scatter="token",
                   combine="index_add", start="zeros", weighted=True, weight_input=False,
                   drop_empty_first=False):
    """The sorted dispatch with switches, each of which makes one known mistake."""
    top_k = indices.shape[1]
    flat = indices.reshape(-1)  # (T*k,) expert of each pair
    order = flat.argsort(stable=True)  # (T*k,) pair ids sorted by expert
    token = order // top_k  # (T*k,) the token of each sorted pair
    pairs = torch.arange(len(flat))  # (T*k,)
    where = {"token": token, "position": pairs // top_k, "mod": order % top_k}
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    g = {"order": weights.reshape(-1)[order], "pairs": weights.reshape(-1),
         "token": weights.reshape(-1)[token]}[weights_by]  # (T*k,) a weight per sorted row
    blocks = x[where[gather]].split(counts)  # E blocks of (count_e, H)
    g_blocks = g.split(counts)
    if drop_empty_first:  # the empty blocks removed before pairing blocks with experts
        rows = [expert(b) for expert, b in zip(experts, [b for b in blocks if len(b)])]
        rows = torch.cat(rows)
    else:
        rows = torch.cat([experts[e](b * g_blocks[e][:, None] if weight_input else b)
                          for e, b in enumerate(blocks) if len(b)])  # (T*k, H)
    if weighted and not weight_input:
        rows = rows * g[:, None]
    out = torch.zeros_like(x) if start == "zeros" else x.clone()
    if combine == "assign":
        out[where[scatter]] = rows  # repeated tokens: the last row written wins
        return out
    return out.index_add_(0, where[scatter], rows)


def _dispatch_mistake(**switch: Any) -> Callable[..., Any]:
    return lambda x, weights, indices, experts: _dispatch_with(x, weights, indices, experts, **switch)


def _dispatch_assign(x, weights, indices, experts):
    """Notebook 10's loop with ``=`` instead of ``index_add_`` (used by the layer checker too)."""
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token, slot = (indices == e).nonzero(as_tuple=True)
        if len(token):
            out[token] = expert(x[token]) * weights[token, slot, None]  # overwrites, loses earlier experts
    return out


def _dispatch_diagnose(got: Any, want: Any, kwargs: dict[str, Any]) -> str | None:
    return describe_token_rows(got, want, kwargs["indices"])


check_sorted_dispatch = Checker(
    name="sorted_dispatch",
    checker_name="moe_checks.check_sorted_dispatch",
    nudge="group the (token, expert) pairs by expert, so that each expert runs once on all of its tokens; "
          "then every result row must find its way back to its own token.",
    cases=_dispatch_cases,
    reference=_dispatch_reference,
    mistakes=[
        Mistake("assignment instead of accumulation", _dispatch_mistake(combine="assign"),
                "contributions are lost: a token routed to several experts keeps only the last one. "
                "Accumulate into the output (index_add_ or +=) instead of assigning with ="),
        Mistake("started from x", _dispatch_mistake(start="x"),
                "the output includes x itself: it was accumulated onto x (x.index_add or x + ...), not onto "
                "torch.zeros_like(x). The routed sum has no residual; the Transformer block adds it"),
        Mistake("gating weights missing", _dispatch_mistake(weighted=False),
                "the expert outputs are not multiplied by their gating weights g_{i,t}"),
        Mistake("weights on the input", _dispatch_mistake(weight_input=True),
                "the gating weights multiplied the expert's input; they multiply its output, "
                "g * FFN(x), and an expert is not linear"),
        Mistake("weights not permuted", _dispatch_mistake(weights_by="pairs"),
                "each row got the gating weight of another (token, expert) pair: after sorting the pairs "
                "by expert, permute the weights with the same order, weights.reshape(-1)[order]"),
        Mistake("weights picked by token", _dispatch_mistake(weights_by="token"),
                "the weights were indexed with the token ids (weights.reshape(-1)[token]); they belong to "
                "the pairs: weights.reshape(-1)[order]"),
        Mistake("rows not permuted", _dispatch_mistake(gather="position"),
                "the experts ran on the tokens in their original pair order, not sorted by expert: gather "
                "the input rows with the sorted pairs' tokens, x[order // k]"),
        Mistake("results added to the wrong tokens", _dispatch_mistake(scatter="position"),
                "results were added to the wrong tokens: after sorting by expert, send each row back to the "
                "token of its (token, expert) pair (order // k), not to its sorted position"),
        Mistake("token = order % k", _dispatch_mistake(gather="mod", scatter="mod"),
                "the token of pair p is p // k (pairs are numbered token by token, k per token); p % k is "
                "its slot among the token's k experts"),
        Mistake("experts shifted after an unused expert", _dispatch_mistake(drop_empty_first=True),
                "the empty blocks were removed before pairing blocks with experts, so after an expert that "
                "nobody chose, every block ran through the next expert: keep the expert id of each block "
                "(enumerate all blocks, skip the empty ones inside the loop)"),
    ],
    diagnose=_dispatch_diagnose,
    hint="flat = indices.reshape(-1)  (T*k,) the expert of each pair; pair p belongs to token p // k\n"
         "order = flat.argsort(stable=True); token = order // k  the pairs sorted by expert, and their tokens\n"
         "counts = torch.bincount(flat, minlength=len(experts)).tolist()\n"
         "blocks = x[token].split(counts)  one block of rows per expert\n"
         "rows = torch.cat([experts[e](b) for e, b in enumerate(blocks) if len(b)])\n"
         "rows = rows * weights.reshape(-1)[order, None]  the weights permuted like the rows\n"
         "return torch.zeros_like(x).index_add_(0, token, rows)  accumulate each row into its token",
)
