"""What notebook 13 builds equals helpers.moe; its training step runs; the experiment's bookkeeping."""

import math

import pytest
import torch
from nbload import load_notebook

from helpers import moe
from helpers.moe import training


@pytest.fixture(scope="module")
def nb13():
    return load_notebook("13_moe_load_balancing.ipynb")


def test_nb13_balance_pieces_equal_helpers(nb13):
    torch.manual_seed(2)
    load = torch.randint(0, 40, (8,)).float()
    torch.testing.assert_close(nb13.max_vio(load), moe.max_violation(load))
    bias = torch.randn(8)
    torch.testing.assert_close(nb13.update_bias(bias, load, 0.01), moe.update_bias(bias, load, 0.01))
    scores = torch.rand(3, 10, 8)
    indices = torch.rand(3, 10, 8).topk(2, dim=-1).indices
    torch.testing.assert_close(nb13.sequence_balance_loss(scores, indices, 8, 0.3),
                               moe.sequence_wise_aux_loss(scores, indices, 8, 0.3))
    torch.testing.assert_close(nb13.expert_balance_loss(scores.view(-1, 8), indices.view(-1, 2), 8, 0.3),
                               moe.expert_level_aux_loss(scores.view(-1, 8), indices.view(-1, 2), 8, 0.3))


def test_nb13_expert_balance_loss_ignores_a_common_scale_of_the_scores(nb13):
    torch.manual_seed(3)
    scores, indices = torch.rand(20, 8), torch.rand(20, 8).topk(2, dim=-1).indices
    torch.testing.assert_close(nb13.expert_balance_loss(0.1 * scores, indices, 8, 1.0),
                               nb13.expert_balance_loss(scores, indices, 8, 1.0))


def test_nb13_training_step_runs_and_the_bias_moves(nb13):
    gamma = nb13.GAMMAS[-1]
    layer, history = nb13.train("bias", gamma, steps=3)
    assert len(history["loss"]) == 3 and all(math.isfinite(v) for v in history["loss"])
    assert (layer.bias.abs() <= 3 * gamma + 1e-6).all()  # at most 3 steps of +-gamma
    assert layer.bias[:2].max() < 0  # the bad start overloads experts 0 and 1: their bias drops


@pytest.mark.parametrize("method, field", [("batch aux", "aux_loss_alpha"), ("seq aux", "seq_aux_loss_alpha")])
def test_nb13_aux_methods_set_their_alpha_and_train_the_router(nb13, method, field):
    layer, history = nb13.train(method, 0.5, steps=2)
    assert getattr(layer, field) == 0.5 and layer.aux_loss.item() > 0
    assert layer.bias.abs().sum() == 0  # no bias updates without the bias method
    assert all(math.isfinite(v) for v in history["max_vio"])


def test_summarise_and_sentences_from_a_tiny_sweep():
    results = {("none", 0.0, 0): dict(loss=1.0, max_vio=2.0, max_vio_batch=2.5),
               ("none", 0.0, 1): dict(loss=1.2, max_vio=1.8, max_vio_batch=2.1),
               ("batch aux", 0.1, 0): dict(loss=2.0, max_vio=0.3, max_vio_batch=0.5),
               ("batch aux", 0.1, 1): dict(loss=2.2, max_vio=0.2, max_vio_batch=0.4),
               ("bias", 0.01, 0): dict(loss=1.1, max_vio=0.2, max_vio_batch=0.6),
               ("bias", 0.01, 1): dict(loss=1.1, max_vio=0.1, max_vio_batch=0.6)}
    rows = {(r["method"], r["value"]): r for r in training.summarise(results)}
    assert rows["none", 0.0]["loss"] == pytest.approx(1.1) and rows["none", 0.0]["loss_max"] == pytest.approx(1.2)
    assert rows["bias", 0.01]["max_vio_min"] == pytest.approx(0.1) and rows["bias", 0.01]["seeds"] == 2
    text = "\n".join(training.tradeoff_sentences(list(rows.values())))
    assert "worse than no balancing beyond the seed range" in text  # the aux loss: 2.0-2.2 against 1.0-1.2
    assert "bias, gamma 0.01: MaxVio 0.15, MSE 1.1000, within the seed range of no balancing" in text
    assert "1 of 1 auxiliary-loss settings are matched or beaten" in text


def test_run_all_returns_every_job_and_prints_the_finished_bar(capsys):
    out = training.run_all(lambda a, b: a * b, [(1, 2), (3, 4)], desc="jobs")
    assert out == {(1, 2): 2, (3, 4): 12}
    assert "2/2" in capsys.readouterr().out
