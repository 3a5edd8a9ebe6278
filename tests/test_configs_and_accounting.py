import pytest
import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3ForCausalLM

from helpers.accounting import (
    count_parameters,
    kv_cache_bytes,
    kv_cache_elements,
    kv_cache_elements_of,
    meta_model,
)
from helpers.configs import deepseek_v2, deepseek_v2_lite, deepseek_v3, tiny_config


def test_tiny_config_is_cpu_safe():
    cfg = tiny_config()
    assert cfg._attn_implementation == "eager" and cfg._experts_implementation == "eager"
    assert cfg.num_key_value_heads == cfg.num_attention_heads
    assert tiny_config(num_attention_heads=8).num_key_value_heads == 8
    v2 = tiny_config("v2", topk_method="greedy", n_group=1, topk_group=1)
    assert type(v2).__name__ == "DeepseekV2Config" and v2.topk_method == "greedy"


def test_tiny_model_runs_forward_on_cpu():
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(tiny_config()).eval()
    logits = model(torch.randint(0, 256, (2, 7))).logits
    assert logits.shape == (2, 7, 256) and torch.isfinite(logits).all()


@pytest.mark.parametrize(("overrides", "field"), [
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"n_routed_experts": 6, "n_group": 4}, "n_routed_experts"),
    ({"topk_group": 5}, "topk_group"),
    ({"num_experts_per_tok": 5, "n_group": 4, "topk_group": 2}, "num_experts_per_tok"),
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"num_attention_heads": -2}, "num_attention_heads"),
    ({"q_lora_rank": 0}, "q_lora_rank"),
])
def test_impossible_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)
    with pytest.raises(ValueError, match="version"):
        tiny_config("v4")


def test_parameter_counts_match_the_papers():
    v3 = count_parameters(meta_model(deepseek_v3()), deepseek_v3())
    assert abs(v3.total / 1e9 - 671) < 1 and abs(v3.activated / 1e9 - 37) < 1
    v2 = count_parameters(meta_model(deepseek_v2()), deepseek_v2())
    assert abs(v2.total / 1e9 - 236) < 1 and abs(v2.activated / 1e9 - 21) < 1
    lite = count_parameters(meta_model(deepseek_v2_lite()), deepseek_v2_lite())
    assert abs(lite.total / 1e9 - 15.7) < 0.1


def test_count_parameters_on_a_real_tiny_model_counts_k_over_e_of_routed_experts():
    cfg = tiny_config()
    model = DeepseekV3ForCausalLM(cfg)
    counts = count_parameters(model, cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert routed > 0
    assert counts.activated == counts.total - routed + round(routed * cfg.num_experts_per_tok / cfg.n_routed_experts)


def test_kv_cache_formulas():
    assert kv_cache_elements("MHA", n_heads=128, head_dim=128) == 32_768
    assert kv_cache_elements("GQA", n_kv_heads=8, head_dim=128) == 2_048
    assert kv_cache_elements("MQA", head_dim=128) == 256
    assert kv_cache_elements("MLA", kv_lora_rank=512, qk_rope_head_dim=64) == 576
    assert kv_cache_elements_of(deepseek_v3()) == 576
    assert kv_cache_bytes(576, n_layers=61, dtype="bf16") == 70_272
    with pytest.raises(ValueError, match="kind"):
        kv_cache_elements("MLA2")
    with pytest.raises(ValueError, match="head_dim"):
        kv_cache_elements("MHA", n_heads=4)
    with pytest.raises(ValueError, match="dtype"):
        kv_cache_bytes(576, n_layers=61, dtype="int3")
