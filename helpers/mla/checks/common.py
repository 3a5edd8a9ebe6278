"""Shared tools of the MLA checkers: a checker that explains wrong shapes, seeded random tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from helpers.teaching.checks import Checker


@dataclass
class ShapeAwareChecker(Checker):
    """A :class:`~helpers.teaching.checks.Checker` that can also explain a wrong *shape* or structure.

    ``Checker`` asks ``diagnose`` only when shapes already match; some MLA mistakes show up precisely as a
    shape (expanded keys/values cached instead of the latent, a per-head ``k^R``). When the answer differs
    in structure or shape and no known mistake matched, ``diagnose_shape(got, want, kwargs)`` is asked on
    each case in turn for a specific message.
    """

    diagnose_shape: Callable[[Any, Any, dict[str, Any]], str | None] | None = None

    def explain(self, fn: Callable[..., Any]) -> str | None:
        message = super().explain(fn)
        if message is None or self.diagnose_shape is None or not any(
                generic in message for generic in ("shape (", "value(s), expected")):
            return message
        for case, fresh in zip(self.cases(), self.cases()):
            got = fn(**case.kwargs)  # it ran without raising in super().explain
            specific = self.diagnose_shape(got, self.reference(**fresh.kwargs), fresh.kwargs)
            if specific:
                return str(self._fail(case, specific))
        return message


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, g: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=g)
