"""What notebook 13 builds equals helpers.moe; its training step runs."""

import math

import pytest
import torch
from nbload import load_notebook

from helpers import moe


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



def test_nb13_training_step_runs_and_the_bias_moves(nb13):
    layer, history = nb13.train("bias", steps=3)
    assert len(history["loss"]) == 3 and all(math.isfinite(v) for v in history["loss"])
    assert (layer.bias.abs() <= 3 * nb13.GAMMA + 1e-6).all()  # at most 3 steps of +-gamma
    assert layer.bias[:2].max() < 0  # the bad start overloads experts 0 and 1: their bias drops
