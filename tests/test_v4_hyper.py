"""mHC (helpers.v4.hyper): equal to transformers' DeepseekV4HyperConnection / HyperHead, Sinkhorn, the checkers."""

import pytest
import torch
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4DecoderLayer,
    DeepseekV4HyperConnection,
    DeepseekV4HyperHead,
)

from helpers.v4.checks import hyper as hyper_checks
from helpers.v4.hf.hyper import head_from_hf, head_to_hf, hyper_from_hf, hyper_to_hf
from helpers.v4.hyper import HyperConnection, HyperHead, expand_streams, sinkhorn, stack_gain

CONFIG = dict(hidden_size=24, hc_mult=3, hc_sinkhorn_iters=7, hc_eps=1e-6, rms_norm_eps=1e-5)


def _randomised(module, seed=0):
    """Every parameter random (transformers' _init_weights zeros ``base`` and sets ``scale`` to 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return module


def test_sinkhorn_is_doubly_stochastic_and_converges():
    logits = torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(1))
    m = sinkhorn(logits, 20, 1e-6)
    torch.testing.assert_close(m.sum(-2), torch.ones(5, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.sum(-1), torch.ones(5, 4), atol=1e-3, rtol=0)
    row_error = [(sinkhorn(logits, t, 1e-6).sum(-1) - 1).abs().max().item() for t in (1, 3, 10)]
    assert row_error[0] > row_error[1] > row_error[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hyper_connection_equals_transformers(dtype):
    config = DeepseekV4Config(**CONFIG)
    theirs = _randomised(DeepseekV4HyperConnection(config)).to(dtype)
    ours = hyper_from_hf(theirs)
    streams = torch.randn(2, 5, 3, 24).to(dtype)
    post, comb, collapsed = theirs(streams)
    pre, post_ours, comb_ours = ours.maps(streams)
    torch.testing.assert_close(post_ours, post, atol=0, rtol=0)
    torch.testing.assert_close(comb_ours, comb, atol=0, rtol=0)
    torch.testing.assert_close(ours.collapse(streams, pre), collapsed, atol=0, rtol=0)
    assert pre.dtype == torch.float32 and ours.collapse(streams, pre).dtype == dtype
    back = hyper_to_hf(ours)
    for a, b in zip(back.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


def test_forward_equals_transformers_decoder_update():
    """``forward(streams, sublayer)`` is DeepseekV4DecoderLayer's update: post * F(collapse) + comb^T @ streams."""
    config = DeepseekV4Config(**CONFIG)
    theirs = _randomised(DeepseekV4HyperConnection(config), seed=3)
    ours = hyper_from_hf(theirs)
    sub = torch.nn.Linear(24, 24)
    streams = torch.randn(2, 4, 3, 24)
    post, comb, collapsed = theirs(streams)
    want = post.unsqueeze(-1) * sub(collapsed).unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), streams)
    torch.testing.assert_close(ours(streams, sub), want)
    assert not torch.allclose(comb, comb.transpose(-1, -2), atol=1e-3)  # the transpose matters


def test_decoder_layer_wiring():
    """transformers' decoder layer uses attn_hc/ffn_hc exactly as our forward does (checked on its MLP half)."""
    config = DeepseekV4Config(vocab_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
                              q_lora_rank=8, o_lora_rank=8, o_groups=2, index_head_dim=8, index_n_heads=2,
                              n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                              mlp_layer_types=["moe"], layer_types=["sliding_attention"], **CONFIG)
    layer = _randomised(DeepseekV4DecoderLayer(config, 0), seed=4)
    ours = hyper_from_hf(layer.ffn_hc)
    streams = torch.randn(1, 3, 3, 24)
    post, comb, collapsed = layer.ffn_hc(streams)
    want = post.unsqueeze(-1) * layer.mlp(layer.post_attention_layernorm(collapsed)).unsqueeze(-2) + torch.matmul(
        comb.transpose(-1, -2), streams)
    got = ours(streams, lambda x: layer.mlp(layer.post_attention_layernorm(x)))
    torch.testing.assert_close(got, want)


def test_head_equals_transformers_and_round_trips():
    config = DeepseekV4Config(**CONFIG)
    theirs = _randomised(DeepseekV4HyperHead(config), seed=2)
    ours = head_from_hf(theirs)
    streams = torch.randn(3, 2, 3, 24)
    torch.testing.assert_close(ours(streams), theirs(streams), atol=0, rtol=0)
    back = head_to_hf(ours, config)
    torch.testing.assert_close(back(streams), theirs(streams), atol=0, rtol=0)


def test_from_config_and_expand():
    config = DeepseekV4Config(**CONFIG)
    hc, head = HyperConnection.from_config(config), HyperHead.from_config(config)
    assert hc.fn.shape == (15, 72) and hc.base.shape == (15,) and hc.scale.shape == (3,)
    assert head.hc_fn.shape == (3, 72) and (hc.sinkhorn_iters, hc.eps, hc.norm_eps) == (7, 1e-6, 1e-5)
    x = torch.randn(2, 4, 24)
    s = expand_streams(x, 3)
    assert s.shape == (2, 4, 3, 24) and all(torch.equal(s[:, :, j], x) for j in range(3))
    s[:, :, 0] += 1
    assert torch.equal(s[:, :, 1], x)  # copies, not views


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="hc_mult"):
        HyperConnection(8, 0, 20, 1e-6, 1e-6)
    with pytest.raises(ValueError, match="hc_sinkhorn_iters"):
        HyperConnection(8, 4, 0, 1e-6, 1e-6)
    with pytest.raises(ValueError, match="hc_eps"):
        HyperHead(8, 4, -1.0, 1e-6)
    with pytest.raises(ValueError, match="hc_mult"):
        hyper_to_hf(HyperConnection(8, 2, 3, 1e-6, 1e-6), DeepseekV4Config(hidden_size=8, hc_mult=4))


def test_stack_gain_constrained_stays_bounded():
    free = stack_gain(60, 4, constrained=False)
    mhc = stack_gain(60, 4, constrained=True)
    torch.testing.assert_close(mhc, torch.ones(60, dtype=torch.float64), atol=1e-3, rtol=0)
    assert free[-1] > 50 * free[0]


@pytest.mark.parametrize("checker", [hyper_checks.check_sinkhorn, hyper_checks.check_hc_update])
def test_checkers_name_every_mistake(checker):
    audit = checker.audit()
    for mistake in checker.mistakes:
        assert mistake.message in audit[mistake.name], mistake.name
    assert checker.explain(checker.reference) is None
