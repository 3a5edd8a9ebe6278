"""The real-scale cost counts (helpers.v4.cost) on hand-computable tiny configs and meta-built parameter counts."""

import pytest
from transformers import DeepseekV3Config, DeepseekV4Config, DeepseekV32Config

from helpers.v4 import cost
from helpers.v4.checks import cost as cost_checks

TINY_V4 = dict(vocab_size=10, hidden_size=8, num_hidden_layers=3, num_attention_heads=2, head_dim=16,
               partial_rotary_factor=0.25, sliding_window=4, index_head_dim=8, index_n_heads=3, index_topk=2,
               compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
               layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"])


def test_v4_cache_and_flops_by_hand():
    c = DeepseekV4Config(**TINY_V4)
    assert c.qk_rope_head_dim == 4
    # bf16: an entry is 16 numbers x 2 bytes = 32 bytes; 19 tokens: window 4, CSA 19 // 4 = 4, HCA 19 // 8 = 2
    assert cost.layer_cache_bytes(c, "sliding_attention", 19, "bf16") == 4 * 32
    assert cost.layer_cache_bytes(c, "compressed_sparse_attention", 19, "bf16") == 4 * 32 + 4 * (32 + 8 * 2)
    assert cost.layer_cache_bytes(c, "heavily_compressed_attention", 19, "bf16") == 4 * 32 + 2 * 32
    # report storage: 12 nope dims in FP8 + 4 RoPE dims in BF16 = 20 bytes; indexer keys FP4 = 4 bytes
    assert cost.layer_cache_bytes(c, "compressed_sparse_attention", 19) == 4 * 20 + 4 * (20 + 4)
    assert cost.kv_cache_bytes(c, 19, "bf16") == 128 + 320 + 192
    # FLOPs: 4 n_h c = 128 per entry read; CSA reads window 4 + top-2, its indexer 2 * 3 * 8 + 2 * 3 = 54 per entry
    assert cost.layer_attention_flops(c, "sliding_attention", 19) == 4 * 128
    assert cost.layer_attention_flops(c, "compressed_sparse_attention", 19) == 4 * 54 + (4 + 2) * 128
    assert cost.layer_attention_flops(c, "heavily_compressed_attention", 19) == (4 + 2) * 128
    assert cost.layer_attention_flops(c, "sliding_attention", 3) == 3 * 128  # fewer tokens than the window


def test_v3_and_v32_by_hand():
    fields = dict(num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=6, qk_rope_head_dim=2)
    v3 = DeepseekV3Config(**fields)
    assert cost.kv_cache_bytes(v3, 10, "bf16") == 2 * 10 * 8 * 2
    assert cost.attention_flops(v3, 10) == 2 * 10 * (2 * 2 * 8 + 2 * 2 * 6)
    v32 = DeepseekV32Config(index_topk=3, index_n_heads=2, index_head_dim=128, **fields)
    assert cost.layer_cache_bytes(v32, "dsa", 10) == 10 * 8 * 2 + 10 * (128 + 4)
    assert cost.layer_attention_flops(v32, "dsa", 10) == 10 * (2 * 2 * 128 + 2 * 2) + 3 * (2 * 2 * 8 + 2 * 2 * 6)


def test_real_configs_match_the_releases():
    flash, pro = cost.deepseek_v4_flash(), cost.deepseek_v4_pro()
    kinds = [cost.layer_kinds(c) for c in (flash, pro)]
    assert [kinds[0].count(t) for t in ("sliding_attention", "compressed_sparse_attention",
                                        "heavily_compressed_attention")] == [2, 21, 20]
    assert [kinds[1].count(t) for t in ("compressed_sparse_attention", "heavily_compressed_attention")] == [30, 31]
    assert kinds[1][:3] == ["heavily_compressed_attention"] * 2 + ["compressed_sparse_attention"]
    assert cost.layer_kinds(cost.deepseek_v32()) == ["dsa"] * 61


@pytest.mark.parametrize(("name", "total", "activated"), [
    ("DeepSeek-V4-Flash", 284e9, 13e9), ("DeepSeek-V4-Pro", 1.6e12, 49e9), ("DeepSeek-V3", 671e9, 37e9)])
def test_meta_parameter_counts_near_the_published(name, total, activated):
    count = cost._cached_count(name)
    assert abs(count.total / total - 1) < 0.03 and abs(count.activated / activated - 1) < 0.07


def test_meta_parameter_count_of_a_tiny_v4_by_hand():
    c = DeepseekV4Config(**TINY_V4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=6)
    count = cost.parameter_count(c)
    experts = 3 * 4 * 3 * 6 * 8  # layers x experts x (gate, up, down) x I x H
    assert count.total - count.activated == experts // 2  # a token uses 2 of the 4 experts


def test_token_cost_rows_and_bad_names():
    row = cost.token_cost("DeepSeek-V4-Flash", 1 << 20)
    assert row["total_flops"] > row["attention_flops"] > 0 and row["kv_bytes_per_token"] > 0
    with pytest.raises(ValueError, match="name"):
        cost.token_cost("DeepSeek-V5", 10)
    with pytest.raises(ValueError, match="storage"):
        cost.kv_cache_bytes(cost.deepseek_v32(), 10, "fp4")


def test_checker_names_every_mistake():
    checker = cost_checks.check_v4_layer_cache
    audit = checker.audit()
    for mistake in checker.mistakes:
        assert mistake.message in audit[mistake.name], mistake.name
    assert checker.explain(checker.reference) is None
