"""Checker of the auxiliary-loss-free bias update (notebook 13).

The known mistakes are the one-step deviations from ``b_i + gamma * sign(mean load - load_i)``
(arXiv 2408.15664 Algorithm 1, DeepSeek-V3 §2.1.2): the direction, the step (its size instead of
its sign, a relative size), gamma, what the load is compared with (max, min, sum), which experts
move (only the busiest; the one at the mean), how the bias is changed (multiplied; only the update
returned; changed in place and nothing returned). Each is one switch of :func:`_bias_with`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from helpers import moe
from helpers.moe.checks.common import _generator
from helpers.teaching.checks import Case, Checker, Mistake


def _update_bias_cases() -> list[Case]:
    gen = _generator(14)
    return [
        Case("8 experts, random bias, gamma=0.01",
             dict(bias=0.1 * torch.randn(8, generator=gen), load=torch.tensor([40.0, 2, 10, 0, 18, 6, 3, 1]),
                  gamma=0.01)),
        Case("6 experts, random bias, gamma=0.05, expert 2 exactly at the mean load",
             dict(bias=0.1 * torch.randn(6, generator=gen), load=torch.tensor([5.0, 1, 4, 9, 0, 5]), gamma=0.05)),
        Case("16 experts, zero bias (the start of training), gamma=0.1",
             dict(bias=torch.zeros(16), load=torch.randint(0, 50, (16,), generator=gen).float(), gamma=0.1)),
    ]


def _bias_with(bias: Tensor, load: Tensor, gamma: float, *, direction: float = 1.0, step: str = "sign",
               target: str = "mean", use_gamma: bool = True, only_busiest: bool = False, tie_moves: bool = False,
               combine: str = "add") -> Tensor | None:
    """The bias update with switches, each of which makes one known mistake."""
    load = load.float()
    mean = load.mean()
    ref = {"mean": mean, "max": load.max(), "min": load.min(), "sum": load.sum()}[target]
    error = ref - load  # (E,) positive for experts below the reference
    if step == "sign":
        move = torch.sign(error)
    elif step == "size":
        move = error
    else:  # "relative"
        move = error / mean
    if tie_moves:
        move = torch.where(load > mean, -1.0, 1.0)
    if only_busiest:
        move = torch.zeros_like(load).index_fill_(0, load.argmax(), -1.0)
    update = direction * (gamma if use_gamma else 1.0) * move.to(bias.dtype)  # (E,)
    if combine == "update":
        return update
    if combine == "multiply":
        return bias * (1 + update)
    if combine == "in place, no return":
        bias += update
        return None
    return bias + update


def _bias_mistake(**switch: Any) -> Callable[..., Any]:
    return lambda **kwargs: _bias_with(**kwargs, **switch)


def _describe_moves(got: Any, want: Any, kwargs: dict[str, Any]) -> str | None:
    """Say which experts moved by how much, against what the rule asks; no guess at the cause."""
    if not isinstance(got, Tensor):
        return None
    bias, load = kwargs["bias"], kwargs["load"].float()
    moved, expected = (got - bias).detach(), want - bias  # (E,) each
    wrong = (~torch.isclose(moved, expected, atol=1e-6)).nonzero().flatten().tolist()
    if not wrong:
        return None
    shown = "; ".join(f"expert {i} (load {load[i].item():g}) moved by {moved[i].item():+.4g}, expected "
                      f"{expected[i].item():+.4g}" for i in wrong[:4])
    more = f" (and {len(wrong) - 4} more)" if len(wrong) > 4 else ""
    return (f"{len(wrong)} of {len(load)} biases moved by the wrong amount (mean load "
            f"{load.mean().item():.4g}, gamma {kwargs['gamma']:g}): {shown}{more}")


check_update_bias = Checker(
    name="update_bias",
    nudge="overloaded experts should become less attractive, idle ones more.",
    cases=_update_bias_cases,
    reference=moe.update_bias,
    mistakes=[
        Mistake("wrong direction", _bias_mistake(direction=-1.0),
                "the bias moves the wrong way: an overloaded expert (load above the mean) must get a "
                "lower bias, b_i += gamma * sign(mean load - load_i)"),
        Mistake("size instead of sign", _bias_mistake(step="size"),
                "the step grows with the load error; the update uses only its sign, so every bias "
                "moves by exactly gamma (or 0 at the mean): torch.sign(...) (2408.15664 §4.3 tried the "
                "error itself and kept the sign)"),
        Mistake("relative error instead of sign", _bias_mistake(step="relative"),
                "the step is the relative load error (mean - load) / mean; the update uses only its sign: "
                "every bias moves by exactly gamma, whatever the size of the error"),
        Mistake("update only", _bias_mistake(combine="update"),
                "you returned the update, not the new bias: add it to bias"),
        Mistake("gamma forgotten", _bias_mistake(use_gamma=False),
                "gamma is missing: each bias moves by gamma times the sign, not by 1"),
        Mistake("compared with the maximum", _bias_mistake(target="max"),
                "the loads were compared with the largest load, so every expert but the busiest gets a "
                "higher bias; compare with the mean load"),
        Mistake("compared with the minimum", _bias_mistake(target="min"),
                "the loads were compared with the smallest load, so every expert but the idlest gets a "
                "lower bias; compare with the mean load"),
        Mistake("compared with the sum", _bias_mistake(target="sum"),
                "the loads were compared with the total load (load.sum()), so every bias rises; compare "
                "with the mean load (load.mean())"),
        Mistake("only the busiest expert", _bias_mistake(only_busiest=True),
                "only the most loaded expert moved; every expert moves each step: down if above the mean "
                "load, up if below"),
        Mistake("expert at the mean moved", _bias_mistake(tie_moves=True),
                "an expert exactly at the mean load moved; sign(0) = 0 leaves it where it is: use "
                "torch.sign(mean - load) rather than a two-way comparison"),
        Mistake("bias multiplied", _bias_mistake(combine="multiply"),
                "the bias was multiplied by (1 +- gamma); the update is additive: b_i + gamma * sign(...) "
                "(a zero bias would never move)"),
        Mistake("updated in place, nothing returned", _bias_mistake(combine="in place, no return"),
                "the function returned None: updating bias in place is fine, but return it (or return "
                "a new tensor)"),
    ],
    diagnose=_describe_moves,
    hint="Compare each expert's load with the mean load: above it the bias falls by gamma, below it the "
         "bias rises by gamma, at it the bias stays. In one line: bias + gamma * torch.sign(load.mean() - load).",
)
