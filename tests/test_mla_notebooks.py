"""What notebooks 20-22 build step by step equals the finished pieces in helpers (and transformers).

Each notebook's ``# EXPORT`` cells are loaded with ``tests.nbload.load_notebook``; weights are copied
between the notebook's layer and the helpers layer, and outputs compared in fp32 (atol 1e-5).
"""

import pytest
import torch
from nbload import load_notebook

from helpers.mla import (
    KVCache,
    LatentCache,
    MultiHeadAttention,
    MultiHeadLatentAttention,
    apply_rope,
    rope_cos_sin,
)
from helpers.utils import seed_everything

ATOL = dict(atol=1e-5, rtol=1e-5)
SIZES = dict(hidden_size=64, n_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


@pytest.fixture(scope="module")
def nb20():
    return load_notebook("20_mla_mha_kv_cache.ipynb")


@pytest.fixture(scope="module")
def nb21():
    return load_notebook("21_mla_low_rank_kv_compression.ipynb")


@pytest.fixture(scope="module")
def nb22():
    return load_notebook("22_mla_decoupled_rope.ipynb")


def chunks(x):
    """Prefill 5 tokens, one decode step, then a chunk of the rest."""
    return [x[:, :5], x[:, 5:6], x[:, 6:]]


def test_nb20_causal_attention_matches_sdpa_with_offset(nb20):
    seed_everything(0)
    q, k, v = torch.randn(3, 2, 3, 6, 8).unbind(0)  # (B, n_h, T, d_h)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(nb20.causal_attention(q, k, v), want, **ATOL)
    torch.testing.assert_close(nb20.causal_attention(q[:, :, 3:], k, v, start_pos=3), want[:, :, 3:], **ATOL)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_nb20_attention_equals_helpers(nb20, n_kv_heads):
    seed_everything(0)
    ours = nb20.Attention(32, 4, 8, n_kv_heads=n_kv_heads)
    theirs = MultiHeadAttention(32, 4, 8, n_kv_heads=n_kv_heads)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **ATOL)
        our_cache, their_cache = nb20.Cache(), KVCache()
        for c in chunks(x):
            torch.testing.assert_close(ours(c, our_cache), theirs(c, their_cache), **ATOL)
    torch.testing.assert_close(our_cache.k, their_cache.k)
    assert our_cache.nbytes() == their_cache.nbytes() == 2 * 9 * 2 * n_kv_heads * 8 * 4
    assert nb20.cache_bytes_per_token(n_kv_heads, 8, 1, bytes_per_element=4) == their_cache.bytes_per_token()


def test_nb21_compress_expand_equals_helpers_cache(nb21):
    seed_everything(0)
    mla = MultiHeadLatentAttention(**SIZES, q_lora_rank=32)
    x = torch.randn(2, 7, 64)
    cache = LatentCache()
    with torch.no_grad():
        mla(x, cache)
        c_kv, k_nope, v = nb21.compress_expand(x, mla.wkv_a.weight[:16], mla.kv_norm, *mla.up_projections())
    torch.testing.assert_close(c_kv, cache.c_kv, **ATOL)
    w_uk, w_uv = mla.up_projections()
    assert k_nope.shape == (2, 7, 4, 16) and v.shape == (2, 7, 4, 16)
    torch.testing.assert_close(k_nope[:, :, 1], c_kv @ w_uk[1].T, **ATOL)
    torch.testing.assert_close(v[:, :, 3], c_kv @ w_uv[3].T, **ATOL)


@pytest.mark.parametrize("q_lora_rank", [None, 8])
def test_nb21_latent_cache_decode_is_exact_and_caches_only_the_latent(nb21, q_lora_rank):
    seed_everything(0)
    layer = nb21.LowRankKVAttention(64, 4, 16, 16, 16, q_lora_rank=q_lora_rank)
    x = torch.randn(2, 9, 64)
    cache = nb21.LatentOnlyCache()
    with torch.no_grad():
        got = torch.cat([layer(c, cache) for c in chunks(x)], dim=1)
        torch.testing.assert_close(got, layer(x), **ATOL)
        want_c = nb21.compress_expand(x, layer.wkv_a.weight, layer.kv_norm, *layer.up_projections())[0]
    torch.testing.assert_close(cache.c_kv, want_c, **ATOL)
    assert cache.nbytes() == 2 * 9 * 16 * 4


@pytest.mark.parametrize("interleave", [True, False])
def test_nb22_rope_equals_helpers(nb22, interleave):
    seed_everything(0)
    positions = torch.arange(3, 10)
    cos, sin = nb22.rope_angles(positions, 12, 500.0)
    want_cos, want_sin = rope_cos_sin(positions, 12, 500.0)
    torch.testing.assert_close(cos, want_cos)
    torch.testing.assert_close(sin, want_sin)
    x = torch.randn(2, 7, 3, 12)  # (B, T, n_h, d) -> cos needs a head axis
    torch.testing.assert_close(nb22.rope(x, cos[:, None], sin[:, None], interleave),
                               apply_rope(x, want_cos[:, None], want_sin[:, None], interleave))


@pytest.mark.parametrize("q_lora_rank,interleave", [(32, True), (None, True), (32, False)])
def test_nb22_mla_equals_helpers(nb22, q_lora_rank, interleave):
    seed_everything(0)
    ours = nb22.MLA(**SIZES, q_lora_rank=q_lora_rank, rope_interleave=interleave)
    theirs = MultiHeadLatentAttention(**SIZES, q_lora_rank=q_lora_rank, rope_interleave=interleave)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **ATOL)
        torch.testing.assert_close(ours(x), theirs(x, absorb=True), **ATOL)
        c1, c2 = LatentCache(), LatentCache()
        for c in chunks(x):
            torch.testing.assert_close(ours(c, c1), theirs(c, c2), **ATOL)
    torch.testing.assert_close(c1.c_kv, c2.c_kv, **ATOL)
    torch.testing.assert_close(c1.k_rope, c2.k_rope, **ATOL)


def test_nb22_mla_equals_transformers(nb22):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    from helpers.configs import tiny_config
    from helpers.mla.hf import mla_to_hf

    seed_everything(0)
    x = torch.randn(2, 6, 64)
    causal = torch.full((6, 6), float("-inf")).triu(1)[None, None]  # (1, 1, T, T)
    for overrides in (dict(), dict(q_lora_rank=None, rope_interleave=False)):
        config = tiny_config(**overrides)
        ours = nb22.MLA(**SIZES, q_lora_rank=config.q_lora_rank, rope_interleave=config.rope_interleave)
        reference = MultiHeadLatentAttention(**SIZES, q_lora_rank=config.q_lora_rank,
                                             rope_interleave=config.rope_interleave)
        reference.load_state_dict(ours.state_dict())
        hf = mla_to_hf(reference, config).eval()
        with torch.no_grad():
            want, _ = hf(x, position_embeddings=DeepseekV3RotaryEmbedding(config)(x, torch.arange(6)[None]),
                         attention_mask=causal)
            torch.testing.assert_close(ours(x), want, **ATOL)


@pytest.mark.parametrize("n_kv_heads", [6, 3, 2, 1])
def test_nb20_grouped_causal_attention_equals_copied_heads(nb20, n_kv_heads):
    seed_everything(0)
    q = torch.randn(2, 6, 4, 8)  # (B, n_h, T, d_h): 4 new tokens
    k, v = torch.randn(2, 2, n_kv_heads, 7, 8).unbind(0)  # (B, n_kv, S, d_h): 3 cached + 4 new
    group = 6 // n_kv_heads
    full_q = torch.cat([torch.randn(2, 6, 3, 8), q], dim=2)  # queries of all 7 tokens
    want = torch.nn.functional.scaled_dot_product_attention(
        full_q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), is_causal=True)[:, :, 3:]
    torch.testing.assert_close(nb20.causal_attention(q, k, v, start_pos=3), want, **ATOL)


def test_nb22_rope_matrix_is_the_rotation_and_composes(nb22):
    seed_everything(0)
    x = torch.randn(12)
    for p in (0, 3, 250):
        cos, sin = rope_cos_sin(torch.tensor([p]), 12)
        torch.testing.assert_close(nb22.rope_matrix(p, 12) @ x, apply_rope(x[None], cos, sin)[0], **ATOL)
    torch.testing.assert_close(nb22.rope_matrix(9, 12).T @ nb22.rope_matrix(5, 12), nb22.rope_matrix(-4, 12), **ATOL)
