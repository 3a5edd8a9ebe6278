"""Mistyped, unknown, negative config fields are refused with the field named (issue 12)."""

from __future__ import annotations

import pytest

from helpers.configs import tiny_config
from helpers.model.model import DeepSeekV3
from helpers.rules import check_config

BAD = [
    ("mistyped expert count", dict(n_routed_expert=4), ["n_routed_expert", "did you mean 'n_routed_experts'"]),
    ("mistyped top-k", dict(num_expert_per_tok=2), ["did you mean 'num_experts_per_tok'"]),
    ("mistyped latent width", dict(kv_lora_rnk=16), ["did you mean 'kv_lora_rank'"]),
    ("a field of another model", dict(num_local_experts=8), ["num_local_experts", "no field"]),
    ("negative routed scale", dict(routed_scaling_factor=-1.0), ["routed_scaling_factor", "-1.0"]),
    ("zero norm epsilon", dict(rms_norm_eps=0.0), ["rms_norm_eps", "positive"]),
    ("negative init std", dict(initializer_range=-0.02), ["initializer_range", "-0.02"]),
    ("negative shared experts", dict(n_shared_experts=-1), ["n_shared_experts", "non-negative"]),
    ("negative dense layers", dict(first_k_dense_replace=-1), ["first_k_dense_replace"]),
    ("negative MTP modules", dict(num_mtp_layers=-1), ["num_mtp_layers"]),
    ("zero vocabulary", dict(vocab_size=0), ["vocab_size", "positive integer"]),
    ("negative hidden size", dict(hidden_size=-64), ["hidden_size", "-64"]),
    ("float hidden size", dict(hidden_size=64.0), ["hidden_size", "64.0"]),
    ("odd RoPE width", dict(qk_rope_head_dim=7), ["qk_rope_head_dim", "even"]),
    ("top-k beyond the reachable experts", dict(num_experts_per_tok=5), ["num_experts_per_tok", "topk_group"]),
    ("a NaN rate", dict(routed_scaling_factor=float("nan")), ["routed_scaling_factor"]),
]


@pytest.mark.parametrize(("what", "fields", "words"), BAD, ids=[r[0] for r in BAD])
def test_tiny_config_refuses(what, fields, words):
    with pytest.raises(ValueError) as info:
        tiny_config(**fields)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


def test_unknown_version_suggests_the_closest():
    with pytest.raises(ValueError, match="'v4'"):
        tiny_config("v4")


@pytest.mark.parametrize(("field", "value", "words"), [
    ("n_routed_expert", 4, ["n_routed_expert", "did you mean 'n_routed_experts'"]),
    ("routed_scaling_factor", -2.5, ["routed_scaling_factor", "-2.5"]),
    ("n_shared_experts", -1, ["n_shared_experts"]),
])
def test_model_refuses_a_config_edited_by_hand(field, value, words):
    config = tiny_config()
    setattr(config, field, value)
    with pytest.raises(ValueError) as info:
        check_config(config)
    for word in words:
        assert word in str(info.value)
    with pytest.raises(ValueError):
        DeepSeekV3(config)


def test_valid_configs_still_build():
    for version, fields in (("v3", {}), ("v2", dict(topk_method="greedy", n_group=1, topk_group=1)),
                            ("v32", dict(index_topk=7)), ("v3", dict(num_mtp_layers=1, q_lora_rank=None))):
        tiny_config(version, **fields)
    check_config(tiny_config(num_mtp_layers=1))
