"""Notebook 25: what it builds equals helpers.dsa, and its checkers pass the solution, fail the stub and name
every known mistake with its own message."""

import pytest
import torch

from helpers.dsa import index_scores, select_topk, sparse_absorbed_attention
from helpers.dsa.checks import (
    check_lightning_scores,
    check_topk_sparse_attention,
    reference_lightning_scores,
    reference_topk_sparse_attention,
)
from tests.nbload import load_notebook

NOTEBOOK = "25_dsa_sparse_attention.ipynb"
CHECKERS = {"lightning_scores": check_lightning_scores, "topk_sparse_attention": check_topk_sparse_attention}


@pytest.fixture(scope="module")
def solution():
    return load_notebook(NOTEBOOK)


@pytest.fixture(scope="module")
def exercise():
    return load_notebook(NOTEBOOK, exercise=True)


@pytest.mark.parametrize("name", list(CHECKERS))
def test_checker_passes_the_solution_and_fails_the_stub(name, solution, exercise, capsys):
    CHECKERS[name](getattr(solution, name))
    assert "passes" in capsys.readouterr().out
    assert "still the exercise stub" in CHECKERS[name].explain(getattr(exercise, name))


@pytest.mark.parametrize("name", list(CHECKERS))
def test_every_mistake_gets_its_own_message(name):
    checker = CHECKERS[name]
    audit = checker.audit()
    assert len(checker.mistakes) >= 6
    for mistake in checker.mistakes:
        assert audit[mistake.name] is not None and mistake.message in audit[mistake.name], mistake.name


def test_references_equal_helpers():
    for case in check_lightning_scores.cases():
        q, k, w = case.kwargs["q"], case.kwargs["k"], case.kwargs["w"]
        want = index_scores(q, k, w * q.shape[-2] ** -0.5, q.shape[-1] ** -0.5)
        torch.testing.assert_close(reference_lightning_scores(**case.kwargs), want)
    for case in check_topk_sparse_attention.cases():
        kw = case.kwargs
        idx, valid = select_topk(kw["scores"], kw["start_pos"], kw["topk"])
        want = sparse_absorbed_attention(kw["q_nope"], kw["q_rope"], kw["c_kv"], kw["k_rope"], kw["w_uk"], kw["w_uv"],
                                         kw["softmax_scale"], idx, valid)
        torch.testing.assert_close(reference_topk_sparse_attention(**kw), want)
