"""Bad inputs to the layers (DeepSeekMoE, MLA, DSA, DeepSeekV3, the caches): each raises a named error before
any state changes; legitimate edge cases (T = 0, one token) work.

Every table row is (what the learner did, the call, the exception type, words the message must contain).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from helpers.configs import tiny_config
from helpers.dsa import SparseLatentAttention, SparseLatentCache
from helpers.mla import KVCache, LatentCache, MultiHeadLatentAttention
from helpers.model.model import DeepSeekV3
from helpers.moe import DeepSeekMoE

H = 16
MLA_SIZES = dict(hidden_size=32, n_heads=2, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
                 q_lora_rank=12)


def moe() -> DeepSeekMoE:
    torch.manual_seed(0)
    return DeepSeekMoE(H, 8, 6, 2, n_shared_experts=1, n_group=3, topk_group=2, gamma=0.01,
                       aux_loss_alpha=0.1, seq_aux_loss_alpha=0.1).train()


def mla() -> MultiHeadLatentAttention:
    torch.manual_seed(0)
    return MultiHeadLatentAttention(**MLA_SIZES)


def dsa() -> SparseLatentAttention:
    torch.manual_seed(0)
    return SparseLatentAttention(**MLA_SIZES, index_topk=4, index_n_heads=2, index_head_dim=4)


def filled(cache, layer, batch: int = 1, tokens: int = 3):
    layer(torch.randn(batch, tokens, layer.hidden_size, dtype=layer.wkv_a.weight.dtype), cache)
    return cache


def with_nan(shape, value=float("nan")):
    x = torch.randn(shape)
    x[0, 1] = value
    return x


MOE_BAD = [
    ("a list instead of a tensor", lambda m: m([[0.0] * H]), TypeError, ["u", "torch.Tensor", "as_tensor"]),
    ("one vector without a token axis", lambda m: m(torch.randn(H)), ValueError, ["u", "at least 2 dims", "(16,)"]),
    ("a 0-d tensor", lambda m: m(torch.tensor(1.0)), ValueError, ["u", "dims"]),
    ("hidden 128 into a layer of 16 (issue's example)", lambda m: m(torch.randn(4, 128)), ValueError,
     ["u", "hidden_size=16", "128", "(4, 128)"]),
    ("hidden 8 with a batch axis", lambda m: m(torch.randn(2, 3, 8)), ValueError, ["hidden_size=16", "8"]),
    ("token ids instead of activations", lambda m: m(torch.ones(2, H, dtype=torch.long)), TypeError,
     ["u", "floating-point", "torch.int64", "embedding"]),
    ("float64 into float32 weights", lambda m: m(torch.randn(2, H, dtype=torch.float64)), TypeError,
     ["u", "torch.float64", "torch.float32", ".to("]),
    ("bfloat16 into float32 weights", lambda m: m(torch.randn(2, H).bfloat16()), TypeError,
     ["torch.bfloat16", "torch.float32"]),
    ("complex activations", lambda m: m(torch.randn(2, H, dtype=torch.complex64)), TypeError, ["floating-point"]),
    ("a tensor on another device", lambda m: m(torch.randn(2, H, device="meta")), ValueError,
     ["u", "meta", "cpu", ".to("]),
    ("NaN in the input", lambda m: m(with_nan((3, H))), ValueError, ["u", "1 NaN", "load statistics"]),
    ("an infinity in the input", lambda m: m(with_nan((3, H), float("inf"))), ValueError, ["u", "1 infinite"]),
    ("a bool mask", lambda m: m(torch.ones(2, H, dtype=torch.bool)), TypeError, ["floating-point", "torch.bool"]),
]

MLA_BAD = [
    ("a list", lambda m: m([[[0.0] * 32]]), TypeError, ["x", "torch.Tensor"]),
    ("no batch axis", lambda m: m(torch.randn(4, 32)), ValueError, ["x", "3 dims", "(4, 32)", "unsqueeze(0)"]),
    ("4 dims", lambda m: m(torch.randn(1, 2, 4, 32)), ValueError, ["x", "3 dims", "reshape"]),
    ("wrong hidden size", lambda m: m(torch.randn(1, 4, 16)), ValueError, ["x", "hidden_size=32", "16"]),
    ("token ids", lambda m: m(torch.ones(1, 4, 32, dtype=torch.long)), TypeError, ["x", "floating-point"]),
    ("float64", lambda m: m(torch.randn(1, 4, 32, dtype=torch.float64)), TypeError, ["x", "float64", "float32"]),
    ("another device", lambda m: m(torch.randn(1, 4, 32, device="meta")), ValueError, ["x", "meta"]),
    ("a KVCache", lambda m: m(torch.randn(1, 4, 32), KVCache()), ValueError, ["cache", "LatentCache", "KVCache"]),
    ("DSA's cache", lambda m: m(torch.randn(1, 4, 32), SparseLatentCache()), ValueError,
     ["cache", "LatentCache", "SparseLatentCache"]),
    ("a dict as cache", lambda m: m(torch.randn(1, 4, 32), {}), ValueError, ["cache", "dict"]),
    ("cache of another batch", lambda m: m(torch.randn(2, 1, 32), filled(LatentCache(), m)), ValueError,
     ["cache", "batch of 1", "batch 2"]),
    ("cache of another layer", lambda m: m(torch.randn(1, 1, 32), filled(LatentCache(), MultiHeadLatentAttention(
        **{**MLA_SIZES, "kv_lora_rank": 6}))), ValueError, ["cache", "another layer", "(6, 4)", "(8, 4)"]),
    ("full cache", lambda m: m(torch.randn(1, 4, 32), LatentCache(max_length=3)), ValueError,
     ["cache is full", "max_length=3", "4 more"]),
    ("absorb as a string", lambda m: m(torch.randn(1, 4, 32), absorb="yes"), TypeError, ["absorb", "'yes'"]),
    ("cache in float64", lambda m: m(torch.randn(1, 1, 32), filled(LatentCache(), copy.deepcopy(m).double())),
     TypeError,
     ["cache", "float64", "float32"]),
]

DSA_BAD = [
    ("a list", lambda m: m([[[0.0] * 32]]), TypeError, ["x", "torch.Tensor"]),
    ("no batch axis", lambda m: m(torch.randn(4, 32)), ValueError, ["x", "3 dims", "unsqueeze(0)"]),
    ("wrong hidden size", lambda m: m(torch.randn(1, 4, 5)), ValueError, ["x", "hidden_size=32", "5"]),
    ("token ids", lambda m: m(torch.ones(1, 4, 32, dtype=torch.long)), TypeError, ["floating-point"]),
    ("float64", lambda m: m(torch.randn(1, 4, 32, dtype=torch.float64)), TypeError, ["float64", "float32"]),
    ("another device", lambda m: m(torch.randn(1, 4, 32, device="meta")), ValueError, ["x", "meta"]),
    ("MLA's cache", lambda m: m(torch.randn(1, 4, 32), LatentCache()), ValueError,
     ["SparseLatentCache", "LatentCache"]),
    ("a KVCache", lambda m: m(torch.randn(1, 4, 32), KVCache()), ValueError, ["SparseLatentCache", "KVCache"]),
    ("cache of another batch", lambda m: m(torch.randn(2, 1, 32), filled(SparseLatentCache(), m)), ValueError,
     ["batch of 1", "batch 2"]),
    ("full cache", lambda m: m(torch.randn(1, 4, 32), SparseLatentCache(max_length=2)), ValueError,
     ["cache is full", "max_length=2"]),
    ("cache whose indexer keys were left behind", lambda m: m(torch.randn(1, 1, 32), _inconsistent(m)), ValueError,
     ["inconsistent"]),
]


def _inconsistent(layer):
    cache = filled(SparseLatentCache(), layer)
    cache.indexer.length -= 1
    return cache


def caches_of(model, n=None, kind=LatentCache):
    return [kind() for _ in range(len(model.layers) if n is None else n)]


MODEL_BAD = [
    ("a list of ids", lambda m: m([[1, 2, 3]]), TypeError, ["input_ids", "torch.Tensor"]),
    ("float ids", lambda m: m(torch.ones(1, 3)), TypeError, ["input_ids", "LongTensor", "torch.float32", ".long()"]),
    ("int32 ids", lambda m: m(torch.ones(1, 3, dtype=torch.int32)), TypeError, ["LongTensor", "torch.int32"]),
    ("no batch axis", lambda m: m(torch.ones(3, dtype=torch.long)), ValueError, ["input_ids", "unsqueeze(0)"]),
    ("embeddings instead of ids", lambda m: m(torch.ones(1, 3, 64, dtype=torch.long)), ValueError,
     ["input_ids", "(1, 3, 64)"]),
    ("an id past the vocabulary", lambda m: m(torch.tensor([[1, 256]])), ValueError,
     ["input_ids", "vocab_size=256", "256", "tokenizer"]),
    ("a negative id", lambda m: m(torch.tensor([[-1, 2]])), ValueError, ["input_ids", "-1"]),
    ("too long", lambda m: m(torch.ones(1, 257, dtype=torch.long)), ValueError, ["max_position_embeddings", "257"]),
    ("one cache for a 2-block model", lambda m: m.hidden(torch.ones(1, 2, dtype=torch.long), caches_of(m, 1)),
     TypeError, ["caches", "list of 2", "one per decoder block"]),
    ("a cache instead of a list", lambda m: m.hidden(torch.ones(1, 2, dtype=torch.long), LatentCache()),
     TypeError, ["caches", "LatentCache"]),
    ("KV caches", lambda m: m.hidden(torch.ones(1, 2, dtype=torch.long), caches_of(m, kind=KVCache)), TypeError,
     ["caches[0]", "KVCache"]),
    ("caches of different lengths", lambda m: m.hidden(torch.ones(1, 1, dtype=torch.long), _uneven(m)),
     ValueError, ["caches", "different lengths"]),
]


def _uneven(model):
    caches = caches_of(model)
    model.layers[0].attn(torch.randn(1, 2, model.config.hidden_size), caches[0])
    return caches


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepSeekV3(tiny_config())


def _expect(call, layer, exc, words):
    with pytest.raises(exc) as info:
        call(layer)
    assert info.type is exc, f"{info.type.__name__}: {info.value}"
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


@pytest.mark.parametrize(("what", "call", "exc", "words"), MOE_BAD, ids=[r[0] for r in MOE_BAD])
def test_moe_bad_inputs(what, call, exc, words):
    _expect(call, moe(), exc, words)


@pytest.mark.parametrize(("what", "call", "exc", "words"), MLA_BAD, ids=[r[0] for r in MLA_BAD])
def test_mla_bad_inputs(what, call, exc, words):
    _expect(call, mla(), exc, words)


@pytest.mark.parametrize(("what", "call", "exc", "words"), DSA_BAD, ids=[r[0] for r in DSA_BAD])
def test_dsa_bad_inputs(what, call, exc, words):
    _expect(call, dsa(), exc, words)


@pytest.mark.parametrize(("what", "call", "exc", "words"), MODEL_BAD, ids=[r[0] for r in MODEL_BAD])
def test_model_bad_inputs(model, what, call, exc, words):
    _expect(call, model, exc, words)


def test_each_layer_has_at_least_ten_bad_inputs():
    for table in (MOE_BAD, MLA_BAD, DSA_BAD, MODEL_BAD):
        assert len(table) >= 10


def _moe_state(m: DeepSeekMoE):
    return (m.load_since_update.clone(), m.bias.clone(), m.last_stats, m.aux_loss)


@pytest.mark.parametrize("bad", [with_nan((5, H)), torch.randn(4, 128), torch.randn(5, H, dtype=torch.float64)],
                         ids=["NaN", "wrong width", "float64"])
def test_a_refused_moe_call_changes_no_statistic(bad):
    m = moe()
    m(torch.randn(2, 5, H))
    load, bias, stats, aux = _moe_state(m)
    with pytest.raises((ValueError, TypeError)):
        m(bad)
    assert torch.equal(m.load_since_update, load) and torch.equal(m.bias, bias)
    assert m.last_stats is stats and m.aux_loss is aux
    m.update_bias()  # the counted load is the good call's only
    assert torch.equal(m.bias, bias + 0.01 * torch.sign(load.mean() - load))


def test_nan_policy_refuses_before_counting_in_training_only():
    """NaN or inf in the router input is refused (ValueError) in training mode, before anything is counted: there it
    would corrupt the load that steers the bias. In eval mode (the decode path) nothing is scanned: NaN propagates to
    the output, as in PyTorch, and no statistic is kept across calls."""
    m = moe().train()
    with pytest.raises(ValueError, match="NaN"):
        m(with_nan((4, H)))
    assert m.last_stats is None and not m.load_since_update.any()
    m.eval()
    assert torch.isnan(m(with_nan((4, H)))).any()
    assert not m.load_since_update.any()


def test_the_nan_check_is_silent_on_inputs_that_need_gradients():
    """The entry check reads two values of the input; with autograd on they must not warn (detached first)."""
    m = moe()
    x = torch.randn(2, 5, H, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x).sum().backward()
    assert x.grad is not None
    with pytest.raises(ValueError, match="NaN"):
        m(with_nan((4, H)).requires_grad_())


@pytest.mark.parametrize("factory", [lambda: (mla(), LatentCache()), lambda: (dsa(), SparseLatentCache())],
                         ids=["MLA", "DSA"])
def test_a_refused_attention_call_leaves_the_cache_unchanged(factory):
    layer, cache = factory()
    filled(cache, layer, batch=1, tokens=3)
    before = [v.clone() for v in cache.views()]
    for bad in (torch.randn(2, 1, 32), torch.randn(1, 1, 16), torch.randn(1, 1, 32, dtype=torch.float64)):
        with pytest.raises((ValueError, TypeError)):
            layer(bad, cache)
        assert cache.length == 3 and all(torch.equal(a, b) for a, b in zip(cache.views(), before))
    if isinstance(cache, SparseLatentCache):
        assert cache.indexer.length == 3


def test_empty_and_one_token_inputs_work():
    m = moe()
    for shape in ((0, H), (2, 0, H), (1, H), (1, 1, H)):
        y = m(torch.randn(shape))
        assert y.shape == shape and torch.isfinite(m.aux_loss) and torch.isfinite(m.last_stats.max_vio)
    assert m.last_stats.load.sum() == 2  # one token, two experts
    for layer, cache in ((mla(), LatentCache()), (dsa(), SparseLatentCache())):
        assert layer(torch.randn(1, 0, 32), cache).shape == (1, 0, 32) and cache.length == 0
        assert layer(torch.randn(1, 1, 32), cache).shape == (1, 1, 32) and cache.length == 1
        assert layer(torch.randn(1, 0, 32), cache).shape == (1, 0, 32) and cache.length == 1
    torch.manual_seed(0)
    v3 = DeepSeekV3(tiny_config())
    assert v3(torch.zeros(1, 0, dtype=torch.long)).shape == (1, 0, 256)
    assert v3(torch.zeros(1, 1, dtype=torch.long)).shape == (1, 1, 256)


def test_a_failed_model_call_leaves_every_cache_unchanged(model):
    caches = caches_of(model)
    model.hidden(torch.ones(1, 3, dtype=torch.long), caches)
    with pytest.raises(ValueError, match="vocab_size"):
        model.hidden(torch.tensor([[5, 999]]), caches)
    assert [c.length for c in caches] == [3, 3]
