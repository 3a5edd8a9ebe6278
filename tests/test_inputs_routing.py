"""Bad routing tables, scores and loads given to the routing and balancing functions (issue 12)."""

from __future__ import annotations

import pytest
import torch

from helpers.moe import (
    affinity,
    expert_level_aux_loss,
    expert_load,
    gating_weights,
    max_violation,
    route,
    select_experts,
    sequence_wise_aux_loss,
    update_bias,
)

S = torch.rand(5, 6)  # (T, E) scores
IDX = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 2], [1, 3]])  # (T, k)

BAD = [
    ("route: logits with a batch axis", lambda: route(torch.randn(2, 5, 6), scoring_func="sigmoid", top_k=2,
                                                      norm_topk_prob=True), ValueError, ["logits", "[tokens, experts]", "reshape"]),
    ("route: integer logits", lambda: route(torch.ones(5, 6, dtype=torch.long), scoring_func="sigmoid", top_k=2,
                                            norm_topk_prob=True), TypeError, ["logits", "floating-point"]),
    ("route: bias of the wrong length", lambda: route(S, scoring_func="sigmoid", top_k=2, norm_topk_prob=True,
                                                     bias=torch.zeros(5)), ValueError, ["bias", "[6]", "(5,)"]),
    ("route: bias as a list", lambda: route(S, scoring_func="sigmoid", top_k=2, norm_topk_prob=True, bias=[0.0] * 6),
     TypeError, ["bias", "torch.Tensor"]),
    ("route: top_k above the experts", lambda: route(S, scoring_func="sigmoid", top_k=7, norm_topk_prob=True),
     ValueError, ["num_experts_per_tok", "7"]),
    ("affinity: a list", lambda: affinity([[0.0]], "sigmoid"), TypeError, ["logits", "torch.Tensor"]),
    ("affinity: unknown scoring", lambda: affinity(S, "relu"), ValueError, ["scoring_func", "relu"]),
    ("select_experts: 1-D scores", lambda: select_experts(torch.rand(6), 2), ValueError,
     ["scores_for_choice", "[tokens, experts]"]),
    ("select_experts: experts not divisible by groups", lambda: select_experts(S, 2, n_group=4, topk_group=2),
     ValueError, ["n_group", "divisible"]),
    ("gating_weights: float indices", lambda: gating_weights(S, IDX.float(), True, 1.0), TypeError,
     ["indices", "integer", ".indices"]),
    ("gating_weights: an id past the experts", lambda: gating_weights(S, IDX + 1, True, 1.0), ValueError,
     ["indices", "[0, 6)", "6"]),
    ("gating_weights: a negative id", lambda: gating_weights(S, IDX - 1, True, 1.0), ValueError, ["indices", "-1"]),
    ("gating_weights: indices of other tokens", lambda: gating_weights(S, IDX[:3], True, 1.0), ValueError,
     ["indices", "3 tokens", "5"]),
    ("gating_weights: negative scale", lambda: gating_weights(S, IDX, True, -2.5), ValueError,
     ["routed_scaling_factor", "-2.5"]),
    ("expert_load: an id past the experts", lambda: expert_load(IDX, 5), ValueError, ["indices", "[0, 5)", "5"]),
    ("expert_load: weights instead of ids", lambda: expert_load(torch.rand(5, 2), 6), TypeError,
     ["indices", "integer"]),
    ("expert_load: zero experts", lambda: expert_load(IDX, 0), ValueError, ["n_experts", "positive"]),
    ("expert_load: negative id", lambda: expert_load(torch.tensor([[-1, 0]]), 6), ValueError, ["-1"]),
    ("max_violation: a 2-D load", lambda: max_violation(torch.ones(2, 6)), ValueError, ["load", "(2, 6)"]),
    ("max_violation: a list", lambda: max_violation([1, 2]), TypeError, ["load", "torch.Tensor"]),
    ("update_bias: load of another length", lambda: update_bias(torch.zeros(6), torch.ones(5), 0.01), ValueError,
     ["bias", "load", "(6,)", "(5,)"]),
    ("update_bias: negative gamma", lambda: update_bias(torch.zeros(6), torch.ones(6), -0.1), ValueError,
     ["gamma", "-0.1"]),
    ("expert_level_aux_loss: scores of another expert count",
     lambda: expert_level_aux_loss(torch.rand(5, 4), IDX, 6, 0.1), ValueError, ["scores", "n_experts=6"]),
    ("expert_level_aux_loss: indices of other tokens", lambda: expert_level_aux_loss(S, IDX[:4], 6, 0.1), ValueError,
     ["indices", "same tokens"]),
    ("sequence_wise_aux_loss: flat indices for batched scores",
     lambda: sequence_wise_aux_loss(S.view(1, 5, 6), IDX, 6, 0.1), ValueError, ["indices", "same tokens"]),
    ("sequence_wise_aux_loss: integer scores",
     lambda: sequence_wise_aux_loss(torch.ones(5, 6, dtype=torch.long), IDX, 6, 0.1), TypeError, ["scores"]),
]


@pytest.mark.parametrize(("what", "call", "exc", "words"), BAD, ids=[r[0] for r in BAD])
def test_routing_and_balancing_bad_inputs(what, call, exc, words):
    with pytest.raises(exc) as info:
        call()
    assert info.type is exc, f"{info.type.__name__}: {info.value}"
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


def test_empty_routing_tables_work():
    empty = torch.zeros(0, 6)
    weights, indices = route(empty, scoring_func="sigmoid", top_k=2, norm_topk_prob=True)
    assert weights.shape == indices.shape == (0, 2)
    load = expert_load(indices, 6)
    assert load.shape == (6,) and max_violation(load) == 0
    assert expert_level_aux_loss(empty, indices, 6, 0.1) == 0
    assert sequence_wise_aux_loss(empty.view(1, 0, 6), indices.view(1, 0, 2), 6, 0.1) == 0
