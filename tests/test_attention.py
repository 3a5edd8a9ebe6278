"""The baselines: MHA, GQA and MQA with a KV cache (helpers/attention.py)."""

import pytest
import torch

from helpers.mla import KVCache, MultiHeadAttention, causal_mask
from helpers.utils import seed_everything


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("rope_theta", [None, 10000.0], ids=["no-rope", "rope"])
def test_cached_decode_equals_full_recomputation(n_kv_heads, rope_theta):
    seed_everything(0)
    attn = MultiHeadAttention(32, 4, 8, n_kv_heads, rope_theta=rope_theta)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        full = attn(x)
        cache = KVCache()
        steps = [attn(x[:, :4], cache)] + [attn(x[:, t:t + 1], cache) for t in range(4, 7)] + [attn(x[:, 7:], cache)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 9 and cache.k.shape == cache.v.shape == (2, n_kv_heads or 4, 9, 8)


def test_attention_is_causal_and_matches_a_direct_computation():
    seed_everything(1)
    attn = MultiHeadAttention(16, 4, 4, n_kv_heads=2)
    x = torch.randn(1, 6, 16)
    y = attn(x)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(1, 2, 16)
    torch.testing.assert_close(attn(x2)[:, :4], y[:, :4])  # later tokens do not change earlier outputs
    # Direct GQA: repeat each key/value head for its 2 query heads, then plain masked softmax attention.
    q = attn.wq(x).view(1, 6, 4, 4).transpose(1, 2)
    k = attn.wk(x).view(1, 6, 2, 4).transpose(1, 2).repeat_interleave(2, dim=1)
    v = attn.wv(x).view(1, 6, 2, 4).transpose(1, 2).repeat_interleave(2, dim=1)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(y, attn.wo(o.transpose(1, 2).reshape(1, 6, 16)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.bfloat16, 2)])
@pytest.mark.parametrize("n_kv_heads", [8, 2, 1])
def test_kv_cache_bytes_per_token(dtype, size, n_kv_heads):
    cache = KVCache()
    for t in (5, 1, 30):  # grows past the initial capacity
        cache.append(torch.zeros(3, n_kv_heads, t, 16, dtype=dtype), torch.zeros(3, n_kv_heads, t, 16, dtype=dtype))
    assert cache.length == 36
    assert cache.bytes_per_token() == 2 * n_kv_heads * 16 * size  # 2 n_g d_h elements per token (V2 Table 1)
    assert cache.nbytes() == 3 * 36 * 2 * n_kv_heads * 16 * size
    assert cache.reserved_bytes() >= cache.nbytes()


def test_kv_cache_keeps_what_was_appended():
    cache = KVCache()
    ks = [torch.randn(1, 2, t, 4) for t in (3, 1, 20, 1)]
    for k in ks:
        cache.append(k, -k)
    torch.testing.assert_close(cache.k, torch.cat(ks, dim=2), rtol=0, atol=0)
    torch.testing.assert_close(cache.v, -torch.cat(ks, dim=2), rtol=0, atol=0)


def test_kv_cache_errors():
    with pytest.raises(ValueError, match="empty"):
        KVCache().bytes_per_token()
    cache = KVCache(max_length=4)
    cache.append(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="max_length"):
        cache.append(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))
    with pytest.raises(ValueError, match="shape"):
        cache.append(torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4))
    with pytest.raises(ValueError, match="n_kv_heads"):
        cache.append(torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))


@pytest.mark.parametrize("kwargs,field", [
    (dict(hidden_size=0, n_heads=4, head_dim=8), "hidden_size"),
    (dict(hidden_size=32, n_heads=-1, head_dim=8), "n_heads"),
    (dict(hidden_size=32, n_heads=4, head_dim=0), "head_dim"),
    (dict(hidden_size=32, n_heads=4, head_dim=8, n_kv_heads=3), "n_kv_heads"),
    (dict(hidden_size=32, n_heads=4, head_dim=8, n_kv_heads=0), "n_kv_heads"),
    (dict(hidden_size=32, n_heads=4, head_dim=7, rope_theta=10000.0), "head_dim"),
])
def test_impossible_configs_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MultiHeadAttention(**kwargs)


def test_causal_mask_offsets():
    mask = causal_mask(2, 5, start_pos=3)
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
