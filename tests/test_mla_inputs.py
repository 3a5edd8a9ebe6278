"""Bad inputs to MLA, DSA and their low-level pieces (issue 21): each refused at the edge with a named error.

Every row is (what the learner did, the call, the exception type, words the message must contain). Build-time
settings are checked once (helpers.rules); a forward checks only what is cheap (ranks, widths, dtype, device,
the cache's kind, batch, width and owner, ``absorb``'s type).
"""

from __future__ import annotations

import pytest
import torch

from helpers.configs import tiny_config
from helpers.dsa import LightningIndexer, SparseLatentAttention, SparseLatentCache, sparse_absorbed_attention
from helpers.hf import dsa_to_hf, mla_to_hf
from helpers.mla import (
    KVCache,
    LatentCache,
    MultiHeadAttention,
    MultiHeadLatentAttention,
    absorbed_attention,
    apply_rope,
    naive_attention,
    rope_cos_sin,
)

SIZES = dict(hidden_size=32, n_heads=2, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
             q_lora_rank=12)
INDEX = dict(index_topk=4, index_n_heads=2, index_head_dim=4)


def mla(**change):
    torch.manual_seed(0)
    return MultiHeadLatentAttention(**{**SIZES, **change})


def dsa(**change):
    torch.manual_seed(0)
    return SparseLatentAttention(**{**SIZES, **INDEX, **change})


def shared_cache(make, cache):
    """One cache filled by one layer, then passed to another of the same shape."""
    make()(torch.randn(1, 2, 32), cache)
    return make()(torch.randn(1, 1, 32), cache)


def latent_args(**change):
    b, t, s, h, dn, dr, dc, dv = 1, 2, 5, 2, 4, 4, 8, 3
    args = dict(q_nope=torch.randn(b, t, h, dn), q_rope=torch.randn(b, t, h, dr), c_kv=torch.randn(b, s, dc),
                k_rope=torch.randn(b, s, dr), w_uk=torch.randn(h, dn, dc), w_uv=torch.randn(h, dv, dc),
                softmax_scale=0.3, start_pos=s - t)
    return {**args, **change}


def sparse_args(**change):
    args = latent_args()
    del args["start_pos"]
    args.update(indices=torch.zeros(1, 2, 3, dtype=torch.long), valid=torch.ones(1, 2, 3, dtype=torch.bool))
    return {**args, **change}


def grouped_config():
    config = tiny_config()
    config.num_key_value_heads = config.num_attention_heads // 2
    return config


COS, SIN = rope_cos_sin(torch.arange(3), 8)

BAD = [
    # one cache, two layers
    ("one LatentCache passed to two MLA layers", lambda: shared_cache(mla, LatentCache()), ValueError,
     ["LatentCache", "another", "own cache", "new_cache()"]),
    ("one SparseLatentCache passed to two DSA layers", lambda: shared_cache(dsa, SparseLatentCache()), ValueError,
     ["SparseLatentCache", "another", "own cache"]),
    ("one KVCache passed to two MHA layers", lambda: shared_cache(lambda: MultiHeadAttention(32, 2, 4), KVCache()),
     ValueError, ["KVCache", "another", "own cache"]),
    # flags
    ("absorb='yes' in a call", lambda: mla()(torch.randn(1, 2, 32), absorb="yes"), TypeError, ["absorb", "'yes'"]),
    ("absorb='yes' to DSA", lambda: dsa()(torch.randn(1, 2, 32), absorb="yes"), TypeError, ["absorb", "'yes'"]),
    ("absorb='yes' at build", lambda: mla(absorb="yes"), TypeError, ["absorb", "'yes'", "truthy"]),
    ("layer.absorb = 1", lambda: setattr(mla(), "absorb", 1), TypeError, ["absorb", "True or False"]),
    ("sparse='no' to DSA", lambda: dsa()(torch.randn(1, 2, 32), sparse="no"), TypeError, ["sparse", "'no'"]),
    ("rope_interleave='yes'", lambda: mla(rope_interleave="yes"), TypeError, ["rope_interleave"]),
    # backends
    ("a misspelt backend", lambda: mla(backend="absorbd"), ValueError, ["backend", "'absorbd'", "'absorbed'"]),
    ("the sparse backend on MLA", lambda: mla(backend="sparse"), ValueError,
     ["backend 'sparse'", "SparseLatentAttention"]),
    ("absorb and backend disagree", lambda: mla(absorb=True, backend="naive"), ValueError, ["absorb", "backend"]),
    ("a misspelt backend on DSA", lambda: dsa(backend="sprase"), ValueError, ["backend", "'sparse'"]),
    # numbers
    ("rope_theta = inf", lambda: mla(rope_theta=float("inf")), ValueError, ["rope_theta", "finite", "inf"]),
    ("rope_theta = nan", lambda: mla(rope_theta=float("nan")), ValueError, ["rope_theta", "finite", "nan"]),
    ("rms_norm_eps = nan", lambda: mla(rms_norm_eps=float("nan")), ValueError, ["rms_norm_eps", "finite"]),
    ("DSA rope_theta = -1", lambda: dsa(rope_theta=-1.0), ValueError, ["rope_theta", "positive"]),
    ("indexer rope_theta = inf", lambda: LightningIndexer(16, 8, 2, 8, 4, float("inf")), ValueError, ["rope_theta"]),
    ("MHA rope_theta = inf", lambda: MultiHeadAttention(32, 2, 4, rope_theta=float("inf")), ValueError,
     ["rope_theta", "finite"]),
    # conversions
    ("mla_to_hf with layer_idx=-1", lambda: mla_to_hf(mla(), layer_idx=-1), ValueError, ["layer_idx", "-1"]),
    ("dsa_to_hf with layer_idx=-1", lambda: dsa_to_hf(dsa(), layer_idx=-1), ValueError, ["layer_idx", "-1"]),
    ("from_config of a linear-RoPE config", lambda: MultiHeadLatentAttention.from_config(tiny_config(rope_parameters={
        "rope_type": "linear", "rope_theta": 1e4, "factor": 4.0})),
     ValueError, ["rope_type", "linear", "yarn"]),
    ("from_config with attention_bias", lambda: MultiHeadLatentAttention.from_config(tiny_config(attention_bias=True)),
     ValueError, ["attention_bias"]),
    ("from_config with kv-head groups", lambda: MultiHeadLatentAttention.from_config(grouped_config()), ValueError,
     ["num_key_value_heads"]),
    ("DSA from a V3 config", lambda: SparseLatentAttention.from_config(tiny_config()), AttributeError, ["index_topk"]),
    # RoPE pieces
    ("rope_cos_sin of a list", lambda: rope_cos_sin([0, 1, 2], 8), TypeError, ["positions", "1-D tensor"]),
    ("rope_cos_sin of 2-D positions", lambda: rope_cos_sin(torch.arange(6).view(2, 3), 8), TypeError,
     ["positions", "(2, 3)"]),
    ("rope_cos_sin with an odd dim", lambda: rope_cos_sin(torch.arange(3), 7), ValueError, ["dim", "even"]),
    ("rope_cos_sin with base 0", lambda: rope_cos_sin(torch.arange(3), 8, 0.0), ValueError, ["base", "positive"]),
    ("rope_cos_sin with base nan", lambda: rope_cos_sin(torch.arange(3), 8, float("nan")), ValueError, ["base"]),
    ("apply_rope on the wrong width", lambda: apply_rope(torch.randn(3, 6), COS, SIN), ValueError,
     ["last dimension", "twice"]),
    ("apply_rope heads without cos[:, None]", lambda: apply_rope(torch.randn(1, 3, 2, 8), COS, SIN), ValueError,
     ["broadcast", "cos[:, None]"]),
    ("apply_rope with interleave='yes'", lambda: apply_rope(torch.randn(3, 8), COS, SIN, "yes"), TypeError,
     ["interleave"]),
    ("apply_rope of a list", lambda: apply_rope([0.0] * 8, COS, SIN), TypeError, ["x", "torch.Tensor"]),
    # the attention functions
    ("naive_attention, c_kv without batch", lambda: naive_attention(**latent_args(c_kv=torch.randn(5, 8))),
     ValueError, ["c_kv", "(B, S, d_c)"]),
    ("absorbed_attention, w_uk of another latent width",
     lambda: absorbed_attention(**latent_args(w_uk=torch.randn(2, 4, 6))), ValueError, ["w_uk", "(2, 4, 8)"]),
    ("naive_attention, k_rope of another length", lambda: naive_attention(**latent_args(k_rope=torch.randn(1, 4, 4))),
     ValueError, ["k_rope", "(1, 5, 4)"]),
    ("absorbed_attention, negative start_pos", lambda: absorbed_attention(**latent_args(start_pos=-1)), ValueError,
     ["start_pos"]),
    ("sparse attention, float indices",
     lambda: sparse_absorbed_attention(**sparse_args(indices=torch.zeros(1, 2, 3))), ValueError,
     ["indices", "torch.int64"]),
    # the baseline
    ("MHA without a batch axis", lambda: MultiHeadAttention(32, 2, 4)(torch.randn(3, 32)), ValueError,
     ["x", "3 dims", "unsqueeze(0)"]),
    ("MHA in float64", lambda: MultiHeadAttention(32, 2, 4)(torch.randn(1, 3, 32).double()), TypeError,
     ["float64", "float32"]),
    ("MHA with a LatentCache", lambda: MultiHeadAttention(32, 2, 4)(torch.randn(1, 3, 32), LatentCache()),
     ValueError, ["KVCache", "LatentCache"]),
]


@pytest.mark.parametrize(("what", "call", "exc", "words"), BAD, ids=[row[0] for row in BAD])
def test_bad_input_is_refused_with_a_named_error(what, call, exc, words):
    with pytest.raises(exc) as info:
        call()
    assert info.type is exc, f"{info.type.__name__}: {info.value}"
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


def test_a_refused_shared_cache_is_left_unchanged():
    cache = LatentCache()
    mla()(torch.randn(1, 2, 32), cache)
    before = cache.c_kv.clone()
    with pytest.raises(ValueError, match="another"):
        mla()(torch.randn(1, 1, 32), cache)
    assert cache.length == 2 and torch.equal(cache.c_kv, before)


def test_truncate_and_nbytes_work_on_both_caches():
    for layer in (mla(), dsa()):
        cache = layer.new_cache()
        layer(torch.randn(1, 4, 32), cache)
        full = cache.nbytes()
        cache.truncate(1)
        assert cache.length == 1 and cache.nbytes() == full // 4
        if isinstance(cache, SparseLatentCache):
            assert cache.indexer.length == 1
        with pytest.raises(ValueError, match="length"):
            cache.truncate(3)
