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


def test_position_mistakes_are_named_on_the_cached_cases():
    """Exercise 2 takes start_pos: positions restarting at zero, the offset applied twice and the mask off by one
    (either way) each get their own message, on the case where the mistake first shows."""
    audit = check_topk_sparse_attention.audit()
    for name, case in (("positions restart at zero", "decode"), ("offset applied twice", "chunk"),
                       ("mask off by one (sees the next token)", "prefill"), ("query cannot see itself", "prefill")):
        assert f"on the case '{case}:" in audit[name], (name, audit[name])
    assert "start position" not in audit["no causal mask before top-k"]


def test_exercise_3_crossovers_follow_from_the_per_token_counts():
    """The crossover the notebook asks to predict: dense 2 n_h (2 d_c + d_h^R) per token against the indexer's
    2 n_I (d_I + 1) plus dense on k tokens; at the crossover decode_cost's two totals are equal."""
    from transformers import DeepseekV32Config

    from helpers.dsa.bench import V2_LITE_WITH_INDEXER
    from helpers.dsa.cost import decode_cost, flop_crossover, layer_config, per_token_flops

    v32, bench = DeepseekV32Config(), layer_config(V2_LITE_WITH_INDEXER)
    assert per_token_flops(v32) == {"dense": 2 * 128 * 1088, "indexer": 2 * 64 * 129}
    assert per_token_flops(bench)["dense"] == 2 * 16 * 1088
    for config, want in ((v32, 278528 * 2048 / (278528 - 16512)), (bench, 34816 * 2048 / (34816 - 16512))):
        s = flop_crossover(config)
        assert s == pytest.approx(want)
        below, above = decode_cost(config, int(s)), decode_cost(config, int(s) + 1)
        assert below["dsa_flops"] >= below["dense_flops"] and above["dsa_flops"] < above["dense_flops"]
    assert flop_crossover(layer_config({**V2_LITE_WITH_INDEXER, "n_heads": 4})) is None  # indexer costs more
