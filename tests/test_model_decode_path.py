"""The decode path checks once at the model's edge; the layers' own checks still guard direct calls."""
import pytest
import torch

from helpers.configs import tiny_config
from helpers.mla import LatentCache, MultiHeadLatentAttention, YaRN, rope_cos_sin
from helpers.mla.rope import rope_at
from helpers.model import DeepSeekV3


@pytest.mark.parametrize("yarn", [None, YaRN(factor=4.0, original_max_position_embeddings=32)])
def test_rope_at_is_rope_cos_sin_bit_for_bit(yarn):
    for start, t in ((0, 1), (5, 3), (255, 2), (1000, 7)):
        want = rope_cos_sin(torch.arange(start, start + t), 16, 10000.0, yarn)
        got = rope_at(start, t, 16, 10000.0, yarn)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_rope_table_made_under_inference_mode_serves_training():
    with torch.inference_mode():
        rope_at(0, 3, 10, 500.0)
    layer = MultiHeadLatentAttention(32, 2, 8, 8, 10, 8, rope_theta=500.0)
    layer(torch.randn(1, 3, 32)).sum().backward()  # no "inference tensors cannot be saved for backward"


def test_validate_false_gives_the_same_output_and_cache():
    torch.manual_seed(0)
    layer = MultiHeadLatentAttention(32, 2, 8, 8, 4, 8, q_lora_rank=16, absorb=True)
    x = torch.randn(2, 5, 32)
    a, b = LatentCache(), LatentCache()
    torch.testing.assert_close(layer(x, a), layer(x, b, validate=False), rtol=0, atol=0)
    assert torch.equal(a.c_kv, b.c_kv) and torch.equal(a.k_rope, b.k_rope)


def test_model_checks_the_batch_of_its_caches_once():
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config())
    caches = model.new_caches()
    model.hidden(torch.ones(2, 3, dtype=torch.long), caches)
    with pytest.raises(ValueError, match="batch of 2 sequences but input_ids has batch 1"):
        model.hidden(torch.ones(1, 1, dtype=torch.long), caches)
    assert [c.length for c in caches] == [3] * len(caches)
    with pytest.raises(TypeError, match="absorb"):
        model.hidden(torch.ones(2, 1, dtype=torch.long), caches, absorb="yes")
