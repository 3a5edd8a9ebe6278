"""Checkers check their argument before any case runs, and report a learner's exception in their terms (issue 12).

Run over every checker of every track, so a new checker gets the same guarantees.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from helpers.dsa import checks as dsa_checks
from helpers.mla import checks as mla_checks
from helpers.moe import checks as moe_checks
from helpers.teaching.checks import Checker, CheckFailure

CHECKERS = {f"{module.__name__}.{name}": obj for module in (moe_checks, mla_checks, dsa_checks)
            for name, obj in vars(module).items() if isinstance(obj, Checker)}


def _params(checker: Checker) -> list[str]:
    return list(checker.cases()[0].kwargs)


def _learner_function(checker: Checker, body: str):
    """A function named like the exercise, with the exercise's parameters, whose body is ``body``."""
    namespace: dict = {}
    exec(f"def {checker.name}({', '.join(_params(checker))}):\n    {body}\n", namespace)
    return namespace[checker.name]


def test_every_track_has_checkers():
    assert len(CHECKERS) >= 10


@pytest.mark.parametrize("key", sorted(CHECKERS))
def test_a_result_instead_of_the_function(key):
    checker = CHECKERS[key]
    result = checker.reference(**checker.cases()[0].kwargs)
    message = checker.explain(result)
    assert "pass the function, e.g. `" in message and f"({checker.name})`" in message


@pytest.mark.parametrize("key", sorted(CHECKERS))
def test_wrong_parameters_are_named_from_the_reference(key):
    checker = CHECKERS[key]
    message = checker.explain(lambda z: z)
    order = [n for n in inspect.signature(checker.reference).parameters if n in _params(checker)]
    order += [n for n in _params(checker) if n not in order]  # a reference taking **kwargs: the cases' order
    assert f"expected `{checker.name}({', '.join(order)})`" in message, message


@pytest.mark.parametrize("key", sorted(CHECKERS))
def test_an_exception_in_the_learner_code_is_reported_as_theirs(key):
    checker = CHECKERS[key]
    message = checker.explain(_learner_function(checker, "return 1 / 0"))
    assert f"it raised ZeroDivisionError at line 2 of {checker.name}: division by zero" in message
    with pytest.raises(CheckFailure):
        checker(_learner_function(checker, "return 1 / 0"))


check = moe_checks.check_route_topk
LOGITS = torch.randn(4, 8)

BAD = [
    ("the result of calling it", check.reference(logits=LOGITS, k=2), ["pass the function", "check_route_topk(route_topk)"]),
    ("a tensor", LOGITS, ["pass the function", "got a Tensor"]),
    ("None (a cell that defines nothing)", None, ["pass the function", "NoneType"]),
    ("a string", "route_topk", ["pass the function", "str"]),
    ("a class instance", object(), ["pass the function", "object"]),
    ("one parameter", lambda logits: logits, ["expected `route_topk(logits, k)`"]),
    ("renamed parameters", lambda x, top_k: x, ["expected `route_topk(logits, k)`", "(x, top_k)"]),
    ("three required parameters", lambda logits, k, bias: logits, ["expected `route_topk(logits, k)`"]),
    ("no parameters", lambda: None, ["expected `route_topk(logits, k)`", "()"]),
    ("an IndexError inside", lambda logits, k: logits[99], ["IndexError", "index 99"]),
    ("a shape error inside", lambda logits, k: logits @ logits, ["RuntimeError", "mat1 and mat2"]),
]


@pytest.mark.parametrize(("what", "fn", "words"), BAD, ids=[r[0] for r in BAD])
def test_route_topk_checker_bad_arguments(what, fn, words):
    message = check.explain(fn)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_keyword_and_default_parameters_are_accepted(capsys):
    def route_topk(logits, k, *, extra=None):
        return check.reference(logits=logits, k=k)

    check(route_topk)
    assert "✓" in capsys.readouterr().out
