"""V4's MoE (helpers.v4.moe): equal to transformers' DeepseekV4SparseMoeBlock (hash and top-k), bad input, checkers."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

from helpers.moe.routing import SCORING_FUNCS, affinity
from helpers.v4.checks import moe as moe_checks
from helpers.v4.hf.moe import v4_moe_from_hf, v4_moe_to_hf
from helpers.v4.moe import V4MoE, check_hash_table, clamped_swiglu, hash_table

VOCAB, E, K = 40, 8, 3


def _config(**overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=16, moe_intermediate_size=12, n_routed_experts=E,
                  num_experts_per_tok=K, num_hidden_layers=3, mlp_layer_types=["hash_moe", "moe", "moe"],
                  layer_types=["sliding_attention"] * 3, swiglu_limit=0.8, routed_scaling_factor=1.7,
                  experts_implementation="eager")
    return DeepseekV4Config(**{**fields, **overrides})


def _randomised_block(config, layer_idx, seed):
    """Every parameter and buffer random: _init_weights zeros tid2eid and e_score_correction_bias."""
    gen = torch.Generator().manual_seed(seed)
    block = DeepseekV4SparseMoeBlock(config, layer_idx)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / 2)
        if block.is_hash:
            block.gate.tid2eid.copy_(torch.randint(0, E, block.gate.tid2eid.shape, generator=gen))
        else:
            block.gate.e_score_correction_bias.copy_(0.3 * torch.randn(E, generator=gen))
    return block


def _no_ties(ours, x):
    """The k-th and (k+1)-th biased scores differ, so top-k is the same set in any implementation."""
    scores = affinity(F.linear(x.reshape(-1, 16), ours.gate_weight), "sqrtsoftplus") + ours.bias
    top = scores.topk(K + 1, dim=-1).values
    assert (top[:, K - 1] - top[:, K]).min() > 1e-5


@pytest.mark.parametrize("layer_idx", [0, 1])
def test_equals_transformers_and_round_trips(layer_idx):
    config = _config()
    theirs = _randomised_block(config, layer_idx, seed=layer_idx)
    ours = v4_moe_from_hf(theirs, config, layer_idx)
    assert ours.is_hash == (layer_idx == 0)
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(9))
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(8))
    if not ours.is_hash:
        _no_ties(ours, x)
    want = theirs(x, input_ids=ids)
    torch.testing.assert_close(ours(x, ids), want)
    torch.testing.assert_close(v4_moe_to_hf(ours, config, layer_idx)(x, input_ids=ids), want)
    with torch.no_grad():  # the clamp is active in these cases
        pre = F.linear(x.reshape(-1, 16), ours.w_gate_up[0])
    assert pre.abs().max() > config.swiglu_limit


def test_hash_layer_uses_token_ids_not_positions():
    ours = V4MoE.from_config(_config(), 0)
    u = torch.randn(5, 16)
    ids = torch.tensor([7, 3, 3, 39, 0])
    _, indices = ours.route(u, ids)
    assert torch.equal(indices, ours.tid2eid[ids])
    counts = torch.bincount(hash_table(VOCAB, E, K).flatten(), minlength=E)
    assert counts.max() - counts.min() <= 1  # the default table is balanced


def test_bad_input_names_the_field():
    ours = V4MoE.from_config(_config(), 0)
    with pytest.raises(ValueError, match="input_ids"):
        ours(torch.randn(1, 2, 16))
    with pytest.raises(ValueError, match="input_ids"):
        ours(torch.randn(1, 2, 16), torch.zeros(1, 3, dtype=torch.long))
    bad = hash_table(VOCAB, E, K)
    bad[5, 1] = E
    with pytest.raises(ValueError, match=r"tid2eid points outside the experts: token id 5 maps to expert 8"):
        ours.set_hash_table(bad)
    with pytest.raises(ValueError, match="tid2eid must have shape"):
        check_hash_table(bad[:, :2], VOCAB, E, K)
    theirs = _randomised_block(_config(), 0, seed=1)
    theirs.gate.tid2eid[0, 0] = -1
    with pytest.raises(ValueError, match="tid2eid"):
        v4_moe_from_hf(theirs, _config(), 0)
    with pytest.raises(ValueError, match="n_shared_experts"):
        V4MoE.from_config(_config(n_shared_experts=2), 1)
    with pytest.raises(ValueError, match="layer_idx"):
        V4MoE.from_config(_config(), 3)
    with pytest.raises(ValueError, match="scoring_func"):
        V4MoE(16, 8, 4, 2, scoring_func="softmax")
    with pytest.raises(ValueError, match="swiglu_limit"):
        V4MoE(16, 8, 4, 2, swiglu_limit=0)
    with pytest.raises(ValueError, match="hash layer"):
        V4MoE.from_config(_config(), 1).set_hash_table(bad)


def test_sqrtsoftplus_registered_and_clamp():
    x = torch.linspace(-5, 5, 11)
    torch.testing.assert_close(SCORING_FUNCS["sqrtsoftplus"](x), torch.log1p(torch.exp(x)).sqrt())
    gate, up = torch.tensor([-20.0, 20.0]), torch.tensor([-20.0, 20.0])
    torch.testing.assert_close(clamped_swiglu(gate, up, 2.0), torch.tensor([F.silu(torch.tensor(-20.0)) * -2, 2 * F.silu(torch.tensor(2.0))]))


@pytest.mark.parametrize("checker", [moe_checks.check_v4_route, moe_checks.check_hash_route,
                                     moe_checks.check_clamped_swiglu])
def test_checkers_name_every_mistake(checker):
    audit = checker.audit()
    for mistake in checker.mistakes:
        assert mistake.message in audit[mistake.name], mistake.name
    assert checker.explain(checker.reference) is None
