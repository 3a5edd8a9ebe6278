"""Checker of the auxiliary-loss-free bias update (notebook 13).
"""

from __future__ import annotations

import torch

from helpers import moe
from helpers.moe.checks.common import (
    _generator,
)
from helpers.teaching.checks import Case, Checker, Mistake

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
    nudge="overloaded experts should become less attractive, idle ones more.",
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
