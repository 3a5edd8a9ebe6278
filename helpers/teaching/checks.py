"""The exercise-checker framework.

A checker runs a learner's function on prepared cases and compares it with a reference. When the
answer is wrong it says *what* is wrong: first by matching the answer against a library of known
mistakes (each a small function that makes that mistake on purpose), then by describing a wrong
structure (count, type, shape), then by asking a diagnosis callback for a domain-specific hint,
and only then by describing where the numbers differ.

Usage in a track module (see ``helpers.moe.checks`` and ``helpers.mla.checks``)::

    check_router = Checker(
        name="route_topk",
        cases=lambda: [Case("4 tokens, 8 experts, k=2", dict(logits=..., k=2)), ...],
        reference=reference_route_topk,
        mistakes=[Mistake("no renormalisation", route_without_renorm,
                          "the kept weights do not sum to 1: renormalise after top-k")],
    )
    check_router(route_topk)   # prints a tick, or raises CheckFailure with the reason
    check_router.show_hint()   # the full hint, for a learner who asks for it

Hints come in two steps: the exercise cell carries a first nudge (``# HINT:`` lines), and the
checker holds the full hint, printed on request. ``Checker.audit()`` runs every known mistake
through the checker, so a test can prove that each one gets its own message.
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


class CheckFailure(AssertionError):
    """A learner's answer is wrong; the message says what is wrong and how to look for it.

    In Jupyter the failure shows as its message alone: ``_render_traceback_`` (IPython's hook for
    custom exception display) replaces the traceback through the checker's internals.
    """

    def _render_traceback_(self) -> list[str]:
        return ["\x1b[31m✗ " + str(self).replace("\n", "\n  ") + "\x1b[0m"]


@dataclass
class Case:
    """One prepared input: a short description a learner can read, and keyword arguments."""

    description: str
    kwargs: dict[str, Any]


@dataclass
class Mistake:
    """A known wrong way to do it: ``fn`` reproduces the mistake, ``message`` explains it."""

    name: str
    fn: Callable[..., Any]
    message: str


def _leaves(x: Any) -> list[Any]:
    if isinstance(x, (tuple, list)):
        return [leaf for item in x for leaf in _leaves(item)]
    if isinstance(x, dict):
        return [leaf for key in sorted(x) for leaf in _leaves(x[key])]
    return [x]


def _rows(mask: torch.Tensor) -> str:
    """The indices along the first axis where ``mask`` holds anywhere, as a short list."""
    rows = mask.reshape(mask.shape[0], -1).any(dim=1).nonzero().flatten().tolist() if mask.dim() else []
    shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
    return f"{len(rows)} of {mask.shape[0]} entries along the first axis ({shown})" if mask.dim() else "the value"


def _where_values_differ(g: torch.Tensor, w: torch.Tensor, atol: float, rtol: float) -> str:
    """Say what differs between two same-shape tensors: NaNs and infinities first, then where and by how much."""
    for bad, name in ((torch.isnan, "NaN"), (torch.isinf, "an infinity")):
        extra = bad(g) & ~bad(w)
        if extra.any():
            return (f"{name} where the expected output is finite, in {_rows(extra)}; NaN and infinities "
                    "come from a softmax over a row whose entries are all masked (-inf), a division by "
                    "zero, or an overflow; print the intermediate tensors of that case to find the first one")
    differ = ~torch.isclose(g, w, atol=atol, rtol=rtol, equal_nan=True)
    err = (g - w).abs().nan_to_num(nan=float("inf"))
    idx = tuple(int(j) for j in torch.unravel_index(err.argmax(), err.shape))
    return (f"values differ in {_rows(differ)}: {int(differ.sum())} of {differ.numel()} numbers; the largest "
            f"difference is {err.max().item():.4g} at index {idx} (got {g[idx].item():.4g}, expected "
            f"{w[idx].item():.4g})")


def describe_difference(got: Any, want: Any, *, atol: float = 1e-5, rtol: float = 1e-4) -> str | None:
    """Return ``None`` if ``got`` matches ``want`` (tensors, numbers, nested tuples), else what differs."""
    got_leaves, want_leaves = _leaves(got), _leaves(want)
    if len(got_leaves) != len(want_leaves):
        return f"returned {len(got_leaves)} value(s), expected {len(want_leaves)}"
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        where = f"output {i}: " if len(want_leaves) > 1 else ""
        if isinstance(w, torch.Tensor):
            if not isinstance(g, torch.Tensor):
                return f"{where}returned {type(g).__name__}, expected a torch.Tensor"
            if tuple(g.shape) != tuple(w.shape):
                return f"{where}shape {tuple(g.shape)}, expected {tuple(w.shape)}"
            if g.dtype.is_floating_point != w.dtype.is_floating_point:
                return f"{where}dtype {g.dtype}, expected {w.dtype}"
            g64, w64 = g.detach().double(), w.detach().double()
            if not torch.allclose(g64, w64, atol=atol, rtol=rtol, equal_nan=True):
                return where + _where_values_differ(g64, w64, atol, rtol)
        elif isinstance(w, float):
            if not isinstance(g, (int, float)) or abs(g - w) > atol + rtol * abs(w):
                return f"{where}got {g!r}, expected {w!r}"
        elif g != w:
            return f"{where}got {g!r}, expected {w!r}"
    return None


@dataclass
class Checker:
    """Checks a learner's function against ``reference`` on every case from ``cases()``.

    Args:
        name: the function's name as the notebook asks for it.
        cases: a callable returning the prepared cases (called fresh each time, so inputs are
            never shared with a learner's function that mutates them).
        reference: the correct implementation.
        mistakes: known mistakes, tried in order when the answer is wrong.
        diagnose: optional ``(got, want, kwargs) -> str | None`` for domain-specific hints; called with
            the normalized outputs, and only when their structure and shapes already match.
        normalize: optional map applied to both outputs before comparing (for example sorting
            routed experts so that index order does not matter).
        nudge: a first hint, shown when the function is still the exercise stub.
        hint: the full hint, printed by :meth:`show_hint` when a learner asks for it.
        checker_name: the name the notebooks import this checker by (default ``check_<name>``).
    """

    name: str
    cases: Callable[[], Sequence[Case]]
    reference: Callable[..., Any]
    mistakes: Sequence[Mistake] = field(default_factory=tuple)
    diagnose: Callable[[Any, Any, dict[str, Any]], str | None] | None = None
    normalize: Callable[[Any], Any] | None = None
    nudge: str = ""
    hint: str = ""
    atol: float = 1e-5
    rtol: float = 1e-4
    checker_name: str = ""

    def _norm(self, x: Any) -> Any:
        return self.normalize(x) if self.normalize is not None else x

    def _fail(self, case: Case, reason: str) -> CheckFailure:
        return CheckFailure(f"{self.name} is not right yet, on the case '{case.description}':\n  {reason}")

    def _stub_message(self) -> str:
        nudge = f"\n  First hint: {self.nudge}" if self.nudge else ""
        more = f"\n  Stuck? `{self.checker_name or 'check_' + self.name}.show_hint()` prints the full hint." if self.hint else ""
        return f"{self.name} is still the exercise stub: replace `raise NotImplementedError` with your code.{nudge}{more}"

    def _call_name(self) -> str:
        return self.checker_name or f"check_{self.name}"

    def _expected_call(self, kwargs: dict[str, Any]) -> str:
        """``name(a, b)``: the reference's parameters that the cases pass, in the reference's order."""
        try:
            order = list(inspect.signature(self.reference).parameters)
        except (TypeError, ValueError):
            order = []
        names = [n for n in order if n in kwargs] + [n for n in kwargs if n not in order]
        return f"{self.name}({', '.join(names)})"

    def _argument_problem(self, fn: Any, kwargs: dict[str, Any]) -> str | None:
        """What is wrong with the object passed to the checker itself, before any case runs (``None``: nothing)."""
        if not callable(fn):
            return (f"{self._call_name()} checks a function, but got a {type(fn).__name__} (the result of calling "
                    f"it?): pass the function, e.g. `{self._call_name()}({self.name})`")
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin or C function: let the cases speak
            return None
        try:
            signature.bind(**kwargs)
        except TypeError:
            got = getattr(fn, "__name__", type(fn).__name__)
            return (f"expected `{self._expected_call(kwargs)}`, but the function passed is `{got}{signature}`: "
                    "define it with these parameter names (the checker calls it with keywords)")
        return None

    def _learner_exception(self, fn: Callable[..., Any], exc: Exception) -> str:
        """``exc`` in the learner's terms: its type and message, and the line of their function that raised it."""
        where = ""
        code = getattr(fn, "__code__", None)
        if code is not None:
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == code.co_filename]
            if frames:
                last = frames[-1]
                line = f" (`{last.line.strip()}`)" if last.line else ""
                where = f" at line {last.lineno - code.co_firstlineno + 1} of {last.name}{line}"
        return f"it raised {type(exc).__name__}{where}: {exc}"

    def show_hint(self) -> None:
        """Print the full hint (the exercise cell has only a first nudge)."""
        print(f"Hint for {self.name}:\n{self.hint or self.nudge or 'no hint for this one: compare with the text above.'}")

    def explain(self, fn: Callable[..., Any]) -> str | None:
        """Return ``None`` if ``fn`` passes every case, else the message a learner would see.

        ``cases()`` is called afresh for every function run, so it must build the same inputs each
        time (seed its generator); a learner's function that modifies its inputs in place cannot
        then spoil the reference's inputs.
        """
        for i, case in enumerate(self.cases()):
            if i == 0:
                problem = self._argument_problem(fn, case.kwargs)
                if problem is not None:
                    return problem
            try:
                got = fn(**case.kwargs)
            except NotImplementedError:
                return self._stub_message()
            except Exception as exc:  # a learner's bug: report it in words, with the case and their line
                return str(self._fail(case, self._learner_exception(fn, exc)))
            got = self._norm(got)
            want = self._norm(self.reference(**self.cases()[i].kwargs))
            difference = describe_difference(got, want, atol=self.atol, rtol=self.rtol)
            if difference is None:
                continue
            for mistake in self.mistakes:
                wrong = self._norm(mistake.fn(**self.cases()[i].kwargs))
                if describe_difference(got, wrong, atol=self.atol, rtol=self.rtol) is None:
                    return str(self._fail(case, mistake.message))
            if self.diagnose is not None and "values differ" in difference:  # same shapes: ask for a hint
                specific = self.diagnose(got, want, self.cases()[i].kwargs)
                if specific:
                    return str(self._fail(case, specific))
            return str(self._fail(case, difference))
        return None

    def audit(self) -> dict[str, str | None]:
        """Each known mistake's name mapped to the message the checker gives it (``None``: it passed).

        Tests use it to prove that every mistake is caught and named by its own message, not by
        another mistake's that happens to give the same numbers on the prepared cases.
        """
        return {mistake.name: self.explain(mistake.fn) for mistake in self.mistakes}

    def __call__(self, fn: Callable[..., Any]) -> None:
        """Raise ``CheckFailure`` with the reason if ``fn`` is wrong; print a tick if not."""
        n_cases = len(self.cases())
        message = self.explain(fn)
        if message is not None:
            raise CheckFailure(message) from None
        print(f"✓ {self.name} passes all {n_cases} checks")
