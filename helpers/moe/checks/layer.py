"""Checker of the whole DeepSeekMoE forward with shared experts (notebook 12).
"""

from __future__ import annotations

import torch

from helpers.moe.checks.common import _generator, make_experts
from helpers.moe.checks.dispatch import _dispatch_assign, _dispatch_reference
from helpers.moe.checks.router import _route_v3
from helpers.teaching.checks import Case, Checker, Mistake

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
    nudge="shared experts see every token; routed experts only their tokens, weighted by g.",
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
