"""Shared tools of the MLA checkers: a checker that explains wrong shapes and raised errors, seeded random
tensors, and a description of where two attention outputs differ (which heads, which query positions, NaNs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    each case in turn for a specific message. When the function raised on a case, the other cases are
    tried: a mistake that runs there (because the dimensions it confuses happen to be equal) is named.
    """

    diagnose_shape: Callable[[Any, Any, dict[str, Any]], str | None] | None = None

    def explain(self, fn: Callable[..., Any]) -> str | None:
        message = explain_raise(self, fn, super().explain(fn))
        if message is not None and self.diagnose is not None and "where the expected output is finite" in message:
            message = self._describe_non_finite(fn, message)
        if message is None or self.diagnose_shape is None or not any(
                generic in message for generic in ("shape (", "value(s), expected")):
            return message
        for case, fresh in zip(self.cases(), self.cases()):
            got = fn(**case.kwargs)  # it ran without raising in super().explain
            specific = self.diagnose_shape(got, self.reference(**fresh.kwargs), fresh.kwargs)
            if specific:
                return str(self._fail(case, specific))
        return message

    def _describe_non_finite(self, fn: Callable[..., Any], message: str) -> str:
        """NaN or infinities in the output: let ``diagnose`` say where (``Checker`` asks it only for finite
        differences)."""
        for case, fresh in zip(self.cases(), self.cases()):
            if f"'{case.description}'" not in message:
                continue
            got, want = self._norm(fn(**case.kwargs)), self._norm(self.reference(**fresh.kwargs))
            specific = self.diagnose(got, want, fresh.kwargs)
            if specific:
                return str(self._fail(case, specific))
        return message

    def audit(self) -> dict[str, str | None]:
        """As :meth:`Checker.audit`, with each mistake raising on the cases where it cannot run (a mistake
        function returns ``None`` there, where a learner's code would raise)."""
        return {mistake.name: self.explain(_raising(mistake.fn)) for mistake in self.mistakes}


def _raising(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, raising where it returns ``None`` (a mistake that cannot run on those shapes, as a learner's
    code would fail there)."""
    def run(**kwargs: Any) -> Any:
        out = fn(**kwargs)
        if out is None:
            raise RuntimeError("the shapes do not fit this computation")
        return out

    return run


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, g: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=g)


def _first_match(checker: Checker, fn: Callable[..., Any], skip: int) -> str | None:
    """On the cases after ``skip``, the message of the first known mistake ``fn``'s output equals, if any."""
    from helpers.teaching.checks import describe_difference

    for i, (case, fresh) in enumerate(zip(checker.cases(), checker.cases())):
        if i == skip:
            continue
        try:
            got = checker._norm(fn(**case.kwargs))
        except Exception:  # noqa: BLE001 - a learner's function may fail on this case too
            continue
        for mistake in checker.mistakes:
            wrong = mistake.fn(**fresh.kwargs)
            if wrong is not None and describe_difference(got, checker._norm(wrong), atol=checker.atol,
                                                         rtol=checker.rtol) is None:
                return f"on the case '{case.description}' it runs, and matches a known mistake: {mistake.message}"
    return None


def explain_raise(checker: Checker, fn: Callable[..., Any], message: str | None) -> str | None:
    """If ``fn`` raised on a case, look for a case where it runs and equals a known mistake; say both.

    Some mistakes (a transposed weight, say) raise when the dimensions they confuse differ and run silently
    when they happen to be equal; this names them from the case where they run.
    """
    if message is None or "it raised" not in message:
        return message
    failed = next((i for i, case in enumerate(checker.cases()) if f"'{case.description}'" in message), -1)
    found = _first_match(checker, fn, failed)
    return message if found is None else f"{message}\n  And {found}"


def where_attention_differs(got: Tensor, want: Tensor, *, head_axis: int, token_axis: int,
                            positions: Sequence[int] | None = None, what: str = "output") -> str:
    """Say which heads and which query tokens differ between two attention outputs, and where NaNs appear.

    Describes only what the numbers show; it names no cause.
    """
    got, want = got.detach().double(), want.detach().double()
    bad = ~torch.isclose(got, want, atol=1e-5, rtol=1e-4, equal_nan=True)
    nan = torch.isnan(got) & ~torch.isnan(want)

    def along(mask: Tensor, axis: int) -> list[int]:
        other = [d for d in range(mask.dim()) if d != axis]
        return mask.permute(axis, *other).reshape(mask.shape[axis], -1).any(dim=1).nonzero().flatten().tolist()

    heads, tokens = along(bad, head_axis), along(bad, token_axis)
    n_heads, n_tokens = got.shape[head_axis], got.shape[token_axis]
    pos = list(positions) if positions is not None else list(range(n_tokens))
    parts = [f"the {what} differs for head(s) {heads} of {n_heads} and query token(s) at position(s) "
             f"{[pos[t] for t in tokens]} of {pos}"]
    if nan.any():
        nan_tokens = [pos[t] for t in along(nan, token_axis)]
        parts.append(f"NaN for the query token(s) at position(s) {nan_tokens}: a softmax over a row whose "
                     "entries are all masked (-inf) gives NaN, so check which keys those queries may see")
    err = (got - want).abs().nan_to_num(nan=float("inf"))
    parts.append(f"largest difference {err.max().item():.3g}")
    return "; ".join(parts) + "."
