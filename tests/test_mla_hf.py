"""Our MLA layer equals transformers' DeepseekV3Attention / DeepseekV2Attention (fp32, atol 1e-5).

transformers is driven as DeepseekV3Model drives it: a DynamicCache, the model's rotary embedding at
position ids continuing from the cache length, and create_causal_mask.
"""

import pytest
import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
    DeepseekV2Attention,
    DeepseekV2RotaryEmbedding,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
)

from helpers.configs import tiny_config
from helpers.mla import LatentCache, MultiHeadLatentAttention
from helpers.mla.hf import mla_from_hf, mla_to_hf
from helpers.utils import seed_everything

CONFIGS = {
    "v3 q-compressed interleaved": dict(version="v3"),
    "v3 no q-compression": dict(version="v3", q_lora_rank=None),
    "v3 halves rope, 2 heads": dict(version="v3", rope_interleave=False, num_attention_heads=2, kv_lora_rank=24),
    "v3 wide rope, v != nope": dict(version="v3", qk_rope_head_dim=12, v_head_dim=8, rope_theta=500.0),
    "v2 q-compressed": dict(version="v2"),
    "v2 no q-compression (V2-Lite)": dict(version="v2", q_lora_rank=None),
}
T, PREFILL = 7, 4


def hf_modules(config):
    """A transformers attention layer with non-trivial norm weights, and the model's rotary embedding."""
    v2 = config.model_type == "deepseek_v2"
    attn = (DeepseekV2Attention if v2 else DeepseekV3Attention)(config, layer_idx=0).eval()
    rotary = (DeepseekV2RotaryEmbedding if v2 else DeepseekV3RotaryEmbedding)(config)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "layernorm" in name else 0.3) + (1.0 if "layernorm" in name else 0.0))
    return attn, rotary


def hf_forward(attn, rotary, config, chunks):
    """Run chunks through ``attn`` one after another with a DynamicCache; concatenate the outputs."""
    cache, outs = DynamicCache(config=config), []
    for x in chunks:
        past = cache.get_seq_length()
        position_ids = torch.arange(past, past + x.shape[1])[None]  # (1, T)
        mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=None, past_key_values=cache,
                                  position_ids=position_ids)
        out, _ = attn(hidden_states=x, position_embeddings=rotary(x, position_ids), attention_mask=mask,
                      past_key_values=cache)
        outs.append(out)
    return torch.cat(outs, dim=1), cache


def config_for(case):
    fields = dict(CONFIGS[case])
    theta = fields.pop("rope_theta", None)
    config = tiny_config(**fields)
    if theta is not None:
        config.rope_parameters["rope_theta"] = theta
    return config


@pytest.mark.parametrize("case", list(CONFIGS))
def test_prefill_and_cached_decode_equal_transformers(case):
    seed_everything(0)
    config = config_for(case)
    attn, rotary = hf_modules(config)
    ours = mla_from_hf(attn)
    x = torch.randn(2, T, config.hidden_size)
    chunks = [x[:, :PREFILL]] + [x[:, t:t + 1] for t in range(PREFILL, T)]
    with torch.no_grad():
        want_full, _ = hf_forward(attn, rotary, config, [x])
        want_decode, hf_cache = hf_forward(attn, rotary, config, chunks)
        for backend in ("naive", "absorbed"):  # every registered dense backend: one row each
            ours.backend = backend
            torch.testing.assert_close(ours(x), want_full, atol=1e-5, rtol=1e-5)
            cache = ours.new_cache()
            got = torch.cat([ours(c, cache) for c in chunks], dim=1)
            torch.testing.assert_close(got, want_decode, atol=1e-5, rtol=1e-5)
    # Same cache contents: the latent exactly, k^R up to transformers' de-interleaving permutation.
    hf_c, hf_k = hf_cache.layers[0].keys, hf_cache.layers[0].values  # (B, 1, S, d_c), (B, 1, S, d_r)
    torch.testing.assert_close(cache.c_kv, hf_c[:, 0], atol=1e-5, rtol=1e-5)
    k_rope = cache.k_rope
    if config.model_type == "deepseek_v3" and config.rope_interleave:
        k_rope = torch.cat([k_rope[..., 0::2], k_rope[..., 1::2]], dim=-1)
    torch.testing.assert_close(k_rope, hf_k[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["v3 q-compressed interleaved", "v3 no q-compression", "v2 no q-compression (V2-Lite)"])
def test_round_trip_to_transformers(case):
    seed_everything(1)
    config = config_for(case)
    ours = MultiHeadLatentAttention(config.hidden_size, config.num_attention_heads, config.kv_lora_rank,
                                    config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim,
                                    q_lora_rank=config.q_lora_rank, rms_norm_eps=1e-5,
                                    rope_interleave=getattr(config, "rope_interleave", True))
    hf = mla_to_hf(ours, config if config.model_type == "deepseek_v2" else None)
    assert type(hf).__name__ == ("DeepseekV2Attention" if config.model_type == "deepseek_v2" else "DeepseekV3Attention")
    x = torch.randn(1, 5, config.hidden_size)
    with torch.no_grad():
        want, _ = hf_forward(hf, (DeepseekV2RotaryEmbedding if config.model_type == "deepseek_v2"
                                  else DeepseekV3RotaryEmbedding)(hf.config), hf.config, [x])
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)
    back = mla_from_hf(hf)
    for (name, a), (name_b, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert name == name_b
        assert torch.equal(a, b), name
    assert back.rms_norm_eps == 1e-5


def test_unsupported_transformers_features_are_rejected():
    config = tiny_config(attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias"):
        mla_from_hf(DeepseekV3Attention(config, 0))
    config = tiny_config()
    config.rope_parameters = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}  # YaRN: tests/test_yarn.py
    with pytest.raises(ValueError, match="rope_type"):
        mla_from_hf(DeepseekV3Attention(config, 0))
    ours = MultiHeadLatentAttention(64, 4, 16, 16, 8, 16, rope_interleave=False)
    with pytest.raises(ValueError, match="rope_interleave"):
        mla_to_hf(ours, tiny_config("v2", q_lora_rank=None))
    with pytest.raises(ValueError, match="kv_lora_rank"):
        mla_to_hf(MultiHeadLatentAttention(64, 4, 12, 16, 8, 16, q_lora_rank=32), tiny_config())
    with pytest.raises(ValueError, match="DeepseekV3Attention"):
        mla_from_hf(torch.nn.Linear(2, 2))


def test_helpers_hf_reexports_the_converters():
    hf = pytest.importorskip("helpers.hf", reason="helpers.hf is written by the MoE track")
    assert hf.mla_from_hf is mla_from_hf and hf.mla_to_hf is mla_to_hf


def mean_relative_error(got, want):
    return ((got.float() - want.float()).abs().mean() / want.float().abs().mean()).item()


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bf16_equals_transformers(case):
    """bf16 weights and activations, fp32 norms and softmax (helpers.precision), as transformers' eager path.

    Tolerance: the mean |ours - theirs| / mean |theirs| below 0.0045 (naive) and 0.0055 (absorbed), and no element
    off by more than 0.1, i.e. 1-2 bf16 spacings at the outputs' largest values (~9; spacing 0.0625 there).
    bf16 keeps 8 bits, so single elements differ by a spacing whenever two products are summed in another
    order; the mean is what an fp32 upcast moves. Measured on these seeds: 0.0013-0.0035 (naive) and
    0.0032-0.0048 (absorbed, which rounds other intermediates); with the upcasts in q_norm/kv_norm and the
    softmax removed (plain nn.RMSNorm and torch.softmax in bf16) 0.0055-0.0068 and 0.0059-0.0070: both fail.
    """
    seed_everything(0)
    config = config_for(case)
    attn, rotary = hf_modules(config)
    attn = attn.bfloat16()
    ours = mla_from_hf(attn)
    assert ours.wkv_a.weight.dtype == torch.bfloat16
    x = torch.randn(2, T, config.hidden_size).bfloat16()
    with torch.no_grad():
        want, _ = hf_forward(attn, rotary, config, [x])
        for absorb, mean_tol in ((False, 0.0045), (True, 0.0055)):
            cache = ours.new_cache()
            got = torch.cat([ours(x[:, :PREFILL], cache, absorb=absorb), ours(x[:, PREFILL:], cache, absorb=absorb)], 1)
            assert got.dtype == torch.bfloat16 and cache.c_kv.dtype == cache.k_rope.dtype == torch.bfloat16
            assert mean_relative_error(got, want) < mean_tol, (absorb, mean_relative_error(got, want))
            torch.testing.assert_close(got.float(), want.float(), atol=0.1, rtol=0)


def test_from_config_is_the_one_mapping():
    config = tiny_config(rope_interleave=False)
    layer = MultiHeadLatentAttention.from_config(config, backend="absorbed")
    assert layer.backend == "absorbed" and layer.absorb and layer.rms_norm_eps == 1e-6
    assert (layer.kv_lora_rank, layer.n_heads, layer.rope_interleave) == (config.kv_lora_rank,
                                                                          config.num_attention_heads, False)
    config.attention_backend = "naive"
    assert MultiHeadLatentAttention.from_config(config).backend == "naive"
    assert MultiHeadLatentAttention.from_config(tiny_config("v2")).rope_interleave  # V2 always interleaves
    assert isinstance(layer.new_cache(), LatentCache)
