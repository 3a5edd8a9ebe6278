"""Exercise checkers for the DeepSeekMoE notebooks (10-13), built on :mod:`helpers.checks`.

Each checker runs a learner's function on small seeded cases, compares it with the finished
pieces in :mod:`helpers.moe`, and, when the answer is wrong, says *what* is wrong: it first tries a
library of known mistakes (each a small function below that makes that mistake on purpose), then a
diagnosis that looks at the numbers (for example "weights for token 3 sum to 0.61").

Routers are compared as expert *sets*: indices are sorted per token and the weights permuted alike,
so the order ``torch.topk`` returns does not matter.

=========================  ==========================================================  ==========
checker                    the learner writes                                          notebook
=========================  ==========================================================  ==========
``check_route_topk``       ``route_topk(logits [T,E], k) -> (weights, indices)``       10
``check_sorted_dispatch``  ``fn(x [T,H], weights [T,k], indices [T,k], experts)``      11
``check_route_v3``         ``route_v3(logits, bias, top_k, n_group, topk_group,        12
                           routed_scaling_factor) -> (weights, indices)``
``check_moe_forward``      ``moe_forward(u, gate_weight, bias, experts, shared_expert,  12
                           top_k, n_group, topk_group, routed_scaling_factor)``
``check_update_bias``      ``update_bias(bias [E], load [E], gamma) -> new bias``       13
=========================  ==========================================================  ==========
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from helpers import moe
from helpers.checks import Case, Checker, Mistake

__all__ = ["check_route_topk", "check_sorted_dispatch", "check_route_v3", "check_moe_forward",
           "check_update_bias", "sort_by_expert", "stack_experts", "make_experts"]


# ------------------------------------------------------------------------------------ shared tools

def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sort_by_expert(out: Any) -> Any:
    """Normalise a router's ``(weights [T,k], indices [T,k])``: indices sorted per token, weights alike.

    Anything that is not such a pair is returned unchanged, so the comparison can describe it.
    """
    if not (isinstance(out, (tuple, list)) and len(out) == 2
            and all(isinstance(t, Tensor) for t in out)):
        return out
    weights, indices = out
    if weights.shape != indices.shape or indices.dim() != 2 or indices.dtype.is_floating_point:
        return out
    indices, order = indices.sort(dim=-1)  # (T, k)
    return weights.gather(-1, order), indices


def make_experts(n_experts: int, hidden_size: int, intermediate_size: int, seed: int) -> list[moe.SwiGLU]:
    """``n_experts`` :class:`helpers.moe.SwiGLU` experts with seeded weights (the global RNG is untouched)."""
    gen = _generator(seed)
    with torch.random.fork_rng(devices=[]):
        experts = [moe.SwiGLU(hidden_size, intermediate_size) for _ in range(n_experts)]
    with torch.no_grad():
        for expert in experts:
            for p in expert.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return experts


def stack_experts(experts: Sequence[moe.SwiGLU]) -> tuple[Tensor, Tensor]:
    """Fuse a list of SwiGLU experts into ``w_gate_up`` (E, 2I, H) and ``w_down`` (E, H, I), like ``transformers``."""
    w_gate_up = torch.stack([torch.cat([e.w_gate.weight, e.w_up.weight], dim=0) for e in experts])  # (E, 2I, H)
    w_down = torch.stack([e.w_down.weight for e in experts])  # (E, H, I)
    return w_gate_up, w_down


def _random_routing(n_tokens: int, n_experts: int, top_k: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Distinct experts per token (top-k of random scores) and positive weights that do not sum to 1."""
    indices = torch.rand(n_tokens, n_experts, generator=gen).topk(top_k, dim=-1).indices  # (T, k)
    weights = 0.2 + torch.rand(n_tokens, top_k, generator=gen)  # (T, k)
    return weights, indices


def _weight_sums(got: Any, want: Any, expected_sum: float, what: str) -> str | None:
    """If the expert sets are right but a token's weights do not sum to ``expected_sum``, say so."""
    try:
        (g_w, g_i), (w_w, w_i) = got, want
        if g_w.shape != w_w.shape or g_i.shape != w_i.shape:
            return None
        sums = g_w.detach().double().sum(dim=-1)  # (T,)
        off = (sums - expected_sum).abs() > 1e-4
        if off.any():
            t = int(off.nonzero()[0, 0])
            return f"weights for token {t} sum to {sums[t].item():.2f}, expected {expected_sum:g}; {what}"
        if not torch.equal(g_i, w_i):
            t = int((g_i != w_i).any(dim=-1).nonzero()[0, 0])
            return (f"token {t} chose experts {g_i[t].tolist()}, expected {w_i[t].tolist()}: "
                    "pick the k experts with the highest scores over the expert dimension (dim=-1)")
    except (TypeError, ValueError, RuntimeError, AttributeError):
        return None
    return None


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
    normalize=sort_by_expert,
    hint="logits.softmax(dim=-1), then .topk(k, dim=-1), then divide the kept weights by their sum.",
)


# ------------------------------------------------------------- notebook 11: sorted (grouped) dispatch

def _dispatch_reference(x: Tensor, weights: Tensor, indices: Tensor, experts: Sequence[moe.SwiGLU]) -> Tensor:
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
    normalize=sort_by_expert,
    hint="s = logits.sigmoid(); choose with s + bias (groups by the sum of their top-2, then top-k); "
         "g = s at the chosen experts, renormalised, times routed_scaling_factor.",
)


# ------------------------------------------------------ notebook 12: the layer with shared experts

def _moe_forward(u, gate_weight, bias, experts, shared_expert, top_k, n_group, topk_group, routed_scaling_factor):
    weights, indices = _route_v3(u @ gate_weight.T, bias, top_k, n_group, topk_group, routed_scaling_factor)
    y = _dispatch_reference(u, weights, indices, experts)  # (T, H)
    return y if shared_expert is None else y + shared_expert(u)


def _moe_forward_cases() -> list[Case]:
    gen = _generator(13)
    cases = []
    for description, (t, h, e, k, i, n_group, topk_group, scale, n_shared) in {
        "7 tokens, H=16, 8 experts in 4 groups (top-2), k=2, scale 2.5, one shared expert":
            (7, 16, 8, 2, 8, 4, 2, 2.5, 1),
        "9 tokens, H=8, 16 experts in 4 groups (top-2), k=4, scale 1.5, two shared experts (width 2I)":
            (9, 8, 16, 4, 4, 4, 2, 1.5, 2),
        "5 tokens, H=8, 4 experts, one group, k=2, scale 1.0, no shared expert":
            (5, 8, 4, 2, 8, 1, 1, 1.0, 0),
    }.items():
        cases.append(Case(description, dict(
            u=torch.randn(t, h, generator=gen), gate_weight=torch.randn(e, h, generator=gen) / h ** 0.5,
            bias=0.2 * torch.randn(e, generator=gen), experts=make_experts(e, h, i, seed=t),
            shared_expert=make_experts(1, h, n_shared * i, seed=100 + t)[0] if n_shared else None,
            top_k=k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=scale)))
    return cases


def _forward_no_shared(**kw):
    return _moe_forward(**{**kw, "shared_expert": None})


def _forward_with_residual(**kw):
    return _moe_forward(**kw) + kw["u"]


def _forward_unscaled(**kw):
    return _moe_forward(**{**kw, "routed_scaling_factor": 1.0})


def _forward_without_bias(**kw):
    return _moe_forward(**{**kw, "bias": torch.zeros_like(kw["bias"])})


def _forward_assign(u, gate_weight, bias, experts, shared_expert, top_k, n_group, topk_group, routed_scaling_factor):
    weights, indices = _route_v3(u @ gate_weight.T, bias, top_k, n_group, topk_group, routed_scaling_factor)
    y = _dispatch_assign(u, weights, indices, experts)
    return y if shared_expert is None else y + shared_expert(u)


check_moe_forward = Checker(
    name="moe_forward",
    cases=_moe_forward_cases,
    reference=_moe_forward,
    mistakes=[
        Mistake("shared experts dropped", _forward_no_shared,
                "the shared experts' output is missing: every token also goes through shared_expert(u), "
                "with no gating weight (DeepSeek-V3 eq. 12, the first sum)"),
        Mistake("residual added", _forward_with_residual,
                "you added the residual u: the layer returns only the expert outputs (the Transformer "
                "block adds u), like transformers' DeepseekV3MoE"),
        Mistake("routed_scaling_factor forgotten", _forward_unscaled,
                "routed_scaling_factor forgotten: multiply the routed gating weights by it (the shared "
                "expert is not scaled)"),
        Mistake("bias ignored", _forward_without_bias,
                "the bias did not change which experts were chosen: route with s + b (pass bias to your router)"),
        Mistake("assignment instead of accumulation", _forward_assign,
                "contributions are lost: a token routed to several experts keeps only the last one. "
                "Accumulate into the output (index_add_ or +=) instead of assigning with ="),
    ],
    hint="logits = u @ gate_weight.T; route with route_v3; sum g * expert(u) over the chosen experts; "
         "add shared_expert(u) if there is one.",
)


# ---------------------------------------------------- notebook 13: auxiliary-loss-free bias update

def _update_bias_cases() -> list[Case]:
    gen = _generator(14)
    return [
        Case("8 experts, zero bias, gamma=0.001",
             dict(bias=torch.zeros(8), load=torch.tensor([40.0, 2, 10, 0, 18, 6, 3, 1]), gamma=0.001)),
        Case("6 experts, random bias, gamma=0.01, expert 2 exactly at the mean load",
             dict(bias=0.1 * torch.randn(6, generator=gen), load=torch.tensor([5.0, 1, 4, 9, 0, 5]), gamma=0.01)),
        Case("16 experts, random bias, gamma=0.1",
             dict(bias=torch.randn(16, generator=gen),
                  load=torch.randint(0, 50, (16,), generator=gen).float(), gamma=0.1)),
    ]


check_update_bias = Checker(
    name="update_bias",
    cases=_update_bias_cases,
    reference=moe.update_bias,
    mistakes=[
        Mistake("wrong direction", lambda bias, load, gamma: bias + gamma * torch.sign(load - load.mean()),
                "the bias moves the wrong way: an overloaded expert (load above the mean) must get a "
                "lower bias, b_i += gamma * sign(mean load - load_i)"),
        Mistake("size instead of sign", lambda bias, load, gamma: bias + gamma * (load.mean() - load),
                "the step grows with the load error; the update uses only its sign, so every bias "
                "moves by exactly gamma (or 0 at the mean): torch.sign(...)"),
        Mistake("update only", lambda bias, load, gamma: gamma * torch.sign(load.mean() - load),
                "you returned the update, not the new bias: add it to bias"),
        Mistake("gamma forgotten", lambda bias, load, gamma: bias + torch.sign(load.mean() - load),
                "gamma is missing: each bias moves by gamma times the sign"),
    ],
    hint="bias + gamma * torch.sign(load.mean() - load)",
)
