"""Checkers of notebook 43 (V4's MoE): the sqrt-softplus router, the hash router, the clamped SwiGLU.

Each known mistake is the reference with one step changed: the score function (sqrt missing, V3's sigmoid), what
chooses and what weighs (the bias in the weights, no bias in the choice), renormalisation and scale; the hash table
indexed by position instead of token id, or top-k in place of the table; the clamps on the wrong side. Routers are
compared as expert sets (:func:`helpers.moe.checks.common.sort_routing`); the logits are continuous random numbers,
so no two experts tie for the k-th place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from helpers.moe.checks.common import describe_routing, sort_routing
from helpers.teaching.checks import Case, Checker, Mistake
from helpers.v4.moe import clamped_swiglu


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _score(logits: Tensor, kind: str) -> Tensor:
    if kind == "softplus":
        return F.softplus(logits)
    if kind == "sigmoid":
        return logits.sigmoid()
    return F.softplus(logits).sqrt()


def _weights(scores: Tensor, indices: Tensor, scale: float, *, bias: Tensor | None = None, renorm: bool = True,
             scaled: bool = True) -> Tensor:
    chosen = (scores if bias is None else scores + bias).gather(1, indices)  # (T, k)
    if renorm:
        chosen = chosen / (chosen.sum(dim=-1, keepdim=True) + 1e-20)
    return chosen * scale if scaled else chosen


def _v4_route_with(logits, bias, top_k, routed_scaling_factor, *, score="sqrtsoftplus", choose_bias=True,
                   weigh_bias=False, renorm=True, scaled=True):
    s = _score(logits, score)  # (T, E)
    indices = (s + bias if choose_bias else s).topk(top_k, dim=-1).indices  # (T, k)
    weights = _weights(s, indices, routed_scaling_factor, bias=bias if weigh_bias else None, renorm=renorm,
                       scaled=scaled)
    return weights, indices


def v4_route(logits: Tensor, bias: Tensor, top_k: int, routed_scaling_factor: float) -> tuple[Tensor, Tensor]:
    """V4's top-k router (report §2.1): ``s = sqrt(softplus(logits))``, Topk(s + b), ``s`` normalised, scaled."""
    return _v4_route_with(logits, bias, top_k, routed_scaling_factor)


def _route_cases() -> list[Case]:
    gen = _gen(43)
    return [  # T, E and k differ; the bias is large enough to change some choices
        Case("7 tokens, 12 experts, k=3, scale 1.5", dict(logits=2 * torch.randn(7, 12, generator=gen),
                                                          bias=0.5 * torch.randn(12, generator=gen), top_k=3,
                                                          routed_scaling_factor=1.5)),
        Case("5 tokens, 9 experts, k=4, scale 2.5", dict(logits=3 * torch.randn(5, 9, generator=gen),
                                                         bias=0.8 * torch.randn(9, generator=gen), top_k=4,
                                                         routed_scaling_factor=2.5)),
    ]


def _route_mistake(**switch):
    return lambda logits, bias, top_k, routed_scaling_factor: _v4_route_with(logits, bias, top_k,
                                                                            routed_scaling_factor, **switch)


check_v4_route = Checker(
    name="v4_route",
    checker_name="moe_checks.check_v4_route",
    nudge="scores from the logits, choose with the bias, weigh without it, renormalise, scale.",
    cases=_route_cases,
    reference=v4_route,
    mistakes=[
        Mistake("sqrt missing", _route_mistake(score="softplus"),
                "the scores are softplus(logits) without the square root: V4's affinity is sqrt(softplus(x)) "
                "(F.softplus(logits).sqrt())"),
        Mistake("sigmoid scores", _route_mistake(score="sigmoid"),
                "these are sigmoid scores (DeepSeek-V3's); V4 uses sqrt(softplus(logits))"),
        Mistake("bias in the weights", _route_mistake(weigh_bias=True),
                "the bias entered the gating values: it only chooses the experts (top-k of s + b); weigh them with "
                "the scores s themselves"),
        Mistake("no bias in the choice", _route_mistake(choose_bias=False),
                "the experts were chosen from s alone: choose them by top-k of s + bias"),
        Mistake("no renormalisation", _route_mistake(renorm=False),
                "the chosen scores were not divided by their sum before the scale"),
        Mistake("no scale", _route_mistake(scaled=False),
                "the gating values were not multiplied by routed_scaling_factor"),
    ],
    diagnose=lambda got, want, kw: describe_routing(got, want, expected_sum=kw["routed_scaling_factor"]),
    normalize=sort_routing,
    hint="s = F.softplus(logits).sqrt()                      # (T, E)\n"
         "indices = (s + bias).topk(top_k, dim=-1).indices   # (T, k): the bias only chooses\n"
         "w = s.gather(1, indices)\n"
         "return w / w.sum(dim=-1, keepdim=True) * routed_scaling_factor, indices",
)


def _hash_route_with(logits, input_ids, tid2eid, routed_scaling_factor, *, by_position=False, score="sqrtsoftplus",
                     topk=False, renorm=True):
    s = _score(logits, score)  # (T, E)
    if topk:
        indices = s.topk(tid2eid.shape[1], dim=-1).indices
    else:
        indices = tid2eid[torch.arange(len(input_ids)) if by_position else input_ids]  # (T, k)
    return _weights(s, indices, routed_scaling_factor, renorm=renorm), indices


def hash_route(logits: Tensor, input_ids: Tensor, tid2eid: Tensor, routed_scaling_factor: float):
    """V4's hash router: experts ``tid2eid[input_ids]``, weights the router's ``s`` of those, normalised, scaled."""
    return _hash_route_with(logits, input_ids, tid2eid, routed_scaling_factor)


def _hash_cases() -> list[Case]:
    gen = _gen(44)

    def case(t: int, e: int, k: int, vocab: int, scale: float) -> dict:
        table = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(vocab)])  # (V, k) distinct per row
        return dict(logits=2 * torch.randn(t, e, generator=gen), input_ids=torch.randint(0, vocab, (t,), generator=gen),
                    tid2eid=table, routed_scaling_factor=scale)

    return [Case("6 tokens, 10 experts, k=2, vocab 40, scale 1.5", case(6, 10, 2, 40, 1.5)),
            Case("9 tokens, 8 experts, k=3, vocab 25, scale 2.5", case(9, 8, 3, 25, 2.5))]


def _hash_mistake(**switch):
    return lambda logits, input_ids, tid2eid, routed_scaling_factor: _hash_route_with(
        logits, input_ids, tid2eid, routed_scaling_factor, **switch)


check_hash_route = Checker(
    name="hash_route",
    checker_name="moe_checks.check_hash_route",
    nudge="the experts come from the table, one row per token id; the weights from the router's scores of those.",
    cases=_hash_cases,
    reference=hash_route,
    mistakes=[
        Mistake("indexed by position", _hash_mistake(by_position=True),
                "the table was indexed by the token's position (0, 1, 2, ...): its rows belong to token ids, "
                "tid2eid[input_ids]"),
        Mistake("top-k instead of the table", _hash_mistake(topk=True),
                "the experts were chosen by top-k of the scores: a hash layer looks them up, tid2eid[input_ids]"),
        Mistake("sqrt missing", _hash_mistake(score="softplus"),
                "the weights come from softplus(logits) without the square root: s = sqrt(softplus(logits))"),
        Mistake("no renormalisation", _hash_mistake(renorm=False),
                "the looked-up experts' scores were not divided by their sum before the scale"),
    ],
    diagnose=lambda got, want, kw: describe_routing(got, want, expected_sum=kw["routed_scaling_factor"]),
    normalize=sort_routing,
    hint="s = F.softplus(logits).sqrt()          # (T, E)\n"
         "indices = tid2eid[input_ids]           # (T, k): one row per token id\n"
         "w = s.gather(1, indices)\n"
         "return w / w.sum(dim=-1, keepdim=True) * routed_scaling_factor, indices",
)


def _swiglu_cases() -> list[Case]:
    gen = _gen(45)
    return [  # values well beyond the limit on both sides
        Case("4x6 pre-activations, limit 1.5", dict(gate=4 * torch.randn(4, 6, generator=gen),
                                                   up=4 * torch.randn(4, 6, generator=gen), limit=1.5)),
        Case("3x5 pre-activations, limit 0.7", dict(gate=3 * torch.randn(3, 5, generator=gen),
                                                   up=3 * torch.randn(3, 5, generator=gen), limit=0.7)),
    ]


def _swiglu_with(gate, up, limit, *, gate_clamp="max", up_clamp="both", after=False):
    def clamp(x, how):
        return {"max": x.clamp(max=limit), "both": x.clamp(-limit, limit), "none": x}[how]

    if after:
        return clamp(F.silu(gate), gate_clamp) * clamp(up, up_clamp)
    return F.silu(clamp(gate, gate_clamp)) * clamp(up, up_clamp)


def _swiglu_mistake(**switch):
    return lambda gate, up, limit: _swiglu_with(gate, up, limit, **switch)


check_clamped_swiglu = Checker(
    name="clamped_swiglu",
    checker_name="moe_checks.check_clamped_swiglu",
    nudge="clamp each pre-activation before the nonlinearity; the gate and the up projection are clamped differently.",
    cases=_swiglu_cases,
    reference=clamped_swiglu,
    mistakes=[
        Mistake("gate clamped on both sides", _swiglu_mistake(gate_clamp="both"),
                "the gate was clamped from below too: V4 clamps it only from above, gate.clamp(max=limit) (SiLU is "
                "already near 0 for very negative inputs)"),
        Mistake("clamps swapped", _swiglu_mistake(gate_clamp="both", up_clamp="max"),
                "the clamps are swapped: the gate is clamped from above only, the up projection on both sides"),
        Mistake("up clamped from above only", _swiglu_mistake(up_clamp="max"),
                "the up projection was clamped from above only: clamp it on both sides, up.clamp(-limit, limit)"),
        Mistake("no clamp", _swiglu_mistake(gate_clamp="none", up_clamp="none"),
                "nothing was clamped: this is the plain SwiGLU"),
        Mistake("clamp after SiLU", _swiglu_mistake(after=True),
                "the gate was clamped after SiLU: clamp the pre-activation, F.silu(gate.clamp(max=limit))"),
    ],
    hint="return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)",
)
