"""Checker of the whole DeepSeekMoE forward with shared experts (notebook 12).

The known mistakes are the layer with one step changed (``_forward_with``): the shared branch
(missing, scaled like a routed expert, run on the wrong input), the routed branch (bias, scale,
weights, accumulation) and the residual. When none matches, the message names the tokens whose
rows differ and the experts they were routed to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from helpers.moe.checks.common import _generator, describe_token_rows, make_experts
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
    for description, (t, h, e, k, i, n_group, topk_group, scale, n_shared) in {  # every size differs in a case
        "7 tokens, H=12, 20 experts of width 10 in 5 groups (top-2 groups), k=3, scale 2.5, one shared expert":
            (7, 12, 20, 3, 10, 5, 2, 2.5, 1),
        "9 tokens, H=6, 16 experts of width 5 in 4 groups (top-3 groups), k=7, scale 1.5, "
        "two shared experts (one SwiGLU of width 2I)":
            (9, 6, 16, 7, 5, 4, 3, 1.5, 2),
        "5 tokens, H=8, 6 experts of width 12, one group, k=2, scale 1.0, no shared expert":
            (5, 8, 6, 2, 12, 1, 1, 1.0, 0),
    }.items():
        cases.append(Case(description, dict(
            u=torch.randn(t, h, generator=gen), gate_weight=torch.randn(e, h, generator=gen) / h ** 0.5,
            bias=0.3 * torch.randn(e, generator=gen), experts=make_experts(e, h, i, seed=t),
            shared_expert=make_experts(1, h, n_shared * i, seed=100 + t)[0] if n_shared else None,
            top_k=k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=scale)))
    return cases


def _forward_with(u, gate_weight, bias, experts, shared_expert, top_k, n_group, topk_group, routed_scaling_factor,
                  *, shared="add", residual=False, scale_times=1, use_bias=True, combine="index_add",
                  weighted=True):
    """The layer with switches, each of which makes one known mistake."""
    weights, indices = _route_v3(u @ gate_weight.T, bias if use_bias else torch.zeros_like(bias), top_k, n_group,
                                 topk_group, routed_scaling_factor ** scale_times if shared != "scaled" else 1.0)
    if not weighted:
        weights = torch.ones_like(weights)
    dispatch = _dispatch_assign if combine == "assign" else _dispatch_reference
    y = dispatch(u, weights, indices, experts)  # (T, H)
    if shared_expert is not None:
        if shared == "add":
            y = y + shared_expert(u)
        elif shared == "scaled":  # routed and shared outputs both multiplied by the scale
            y = (y + shared_expert(u)) * routed_scaling_factor
        elif shared == "on_routed":
            y = y + shared_expert(y)
    return y + u if residual else y


def _forward_mistake(**switch: Any) -> Callable[..., Any]:
    return lambda **kwargs: _forward_with(**kwargs, **switch)


def _forward_diagnose(got: Any, want: Any, kwargs: dict[str, Any]) -> str | None:
    kw = {k: v for k, v in kwargs.items() if k not in ("u", "gate_weight", "experts", "shared_expert")}
    _, indices = _route_v3(kwargs["u"] @ kwargs["gate_weight"].T, **kw)
    return describe_token_rows(got, want, indices)


check_moe_forward = Checker(
    name="moe_forward",
    checker_name="moe_checks.check_moe_forward",
    nudge="two branches added together: the shared expert sees every token with no gating value; the "
          "routed experts see only the tokens that chose them, each weighted by its g.",
    cases=_moe_forward_cases,
    reference=_moe_forward,
    mistakes=[
        Mistake("shared experts dropped", _forward_mistake(shared="none"),
                "the shared experts' output is missing: every token also goes through shared_expert(u), "
                "with no gating value (DeepSeek-V3 eq. 12, the first sum)"),
        Mistake("shared expert scaled like a routed one", _forward_mistake(shared="scaled"),
                "the shared expert's output was multiplied by routed_scaling_factor (or by the routed "
                "weights' sum, which equals it): the scale multiplies only the routed gating values; "
                "add shared_expert(u) unweighted"),
        Mistake("shared expert on the routed output", _forward_mistake(shared="on_routed"),
                "the shared expert ran on the routed output; it runs on the layer's input: add "
                "shared_expert(u)"),
        Mistake("residual added", _forward_mistake(residual=True),
                "you added the residual u: the layer returns only the expert outputs (the Transformer "
                "block adds u), like transformers' DeepseekV3MoE"),
        Mistake("routed_scaling_factor forgotten", _forward_mistake(scale_times=0),
                "routed_scaling_factor forgotten: pass it to route_v3, which multiplies the routed gating "
                "weights by it (the shared expert is not scaled)"),
        Mistake("routed_scaling_factor applied twice", _forward_mistake(scale_times=2),
                "the routed outputs were scaled twice: route_v3 already multiplies the weights by "
                "routed_scaling_factor, so do not multiply the routed sum again"),
        Mistake("bias ignored", _forward_mistake(use_bias=False),
                "the bias did not change which experts were chosen: pass bias to route_v3, which chooses "
                "on s + b"),
        Mistake("gating weights missing", _forward_mistake(weighted=False),
                "the routed expert outputs are not multiplied by their gating weights g_{i,t}"),
        Mistake("assignment instead of accumulation", _forward_mistake(combine="assign"),
                "contributions are lost: a token routed to several experts keeps only the last one. "
                "Accumulate into the output (index_add_ or +=) instead of assigning with ="),
    ],
    diagnose=_forward_diagnose,
    hint="weights, indices = route_v3(u @ gate_weight.T, bias, top_k, n_group, topk_group, routed_scaling_factor)\n"
         "out = torch.zeros_like(u); for each expert i: token, slot = torch.where(indices == i)\n"
         "    out.index_add_(0, token, weights[token, slot, None] * expert(u[token]))  accumulate\n"
         "if shared_expert is not None: out = out + shared_expert(u)  every token, no gating value\n"
         "return out  (no residual: the block adds u)",
)
