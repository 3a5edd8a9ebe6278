"""Model configurations: tiny ones that run on a CPU in milliseconds, and the real ones from the papers.

Every config is a ``transformers`` config object, so field names are the ones engineers know
(``kv_lora_rank``, ``n_routed_experts``, ...). Nothing here downloads: the real models' sizes are
written out from their papers and published configs, and instantiated only on the meta device.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    DeepseekV32Config,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
)

from helpers.rules import closest_name, validate_deepseek_fields

# Small enough for a laptop, big enough that every code path is exercised:
# query compression on, groups with topk_group < n_group, shared experts, a dense first layer.
TINY_V3 = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
    max_position_embeddings=256, rope_interleave=True,
)


# DeepSeek-V3.2's lightning indexer on top of TINY_V3 (V3.2 always interleaves the main RoPE: no field for it).
TINY_V32_INDEXER = dict(index_topk=5, index_n_heads=4, index_head_dim=12)


def tiny_config(version: str = "v3", **overrides: Any) -> DeepseekV3Config | DeepseekV2Config | DeepseekV32Config:
    """A tiny DeepSeek config that is safe on a CPU: eager attention, eager experts, no hub.

    Args:
        version: ``"v3"`` (``DeepseekV3Config``, sigmoid routing), ``"v2"`` (``DeepseekV2Config``,
            softmax routing with ``topk_method``) or ``"v32"`` (``DeepseekV32Config``: V3 plus the
            sparse-attention indexer, :data:`TINY_V32_INDEXER`).
        **overrides: any config field, e.g. ``q_lora_rank=None`` or ``n_group=1``.

    ``num_key_value_heads`` always equals ``num_attention_heads`` (MLA has no KV-head grouping).
    A field the config class does not know (a typo: ``n_routed_expert``) is refused with the closest name;
    negative counts and rates are refused (:func:`validate_deepseek_fields`).
    """
    if version not in ("v2", "v3", "v32"):
        raise ValueError(f"version must be 'v2', 'v3' or 'v32', got {version!r}{closest_name(str(version), ('v2', 'v3', 'v32'))}")
    cls = {"v3": DeepseekV3Config, "v2": DeepseekV2Config, "v32": DeepseekV32Config}[version]
    known = config_fields(cls)
    for name in overrides:
        if name not in known:
            raise ValueError(f"{cls.__name__} has no field {name!r}{closest_name(name, known)}; a mistyped field "
                             "would be stored and silently ignored, so it is refused")
    fields = dict(TINY_V3)
    if version == "v2":
        fields.pop("rope_interleave")
        fields.update(topk_method="group_limited_greedy", routed_scaling_factor=1.0, norm_topk_prob=False)
    if version == "v32":
        fields.pop("rope_interleave")
        fields.update(TINY_V32_INDEXER)
    fields.update(overrides)
    fields["num_key_value_heads"] = fields["num_attention_heads"]
    validate_deepseek_fields(fields)
    return cls(**fields, attn_implementation="eager", experts_implementation="eager")


@functools.cache
def config_fields(cls: type) -> frozenset[str]:
    """Every field name ``cls`` (a ``transformers`` config class) knows: its arguments and its defaults."""
    names = set(cls().to_dict())
    for owner in (cls, PretrainedConfig):
        names |= set(inspect.signature(owner.__init__).parameters)
    names |= {"attn_implementation", "experts_implementation", "num_mtp_layers", "moe_backend", "attention_backend"}
    return frozenset(names - {"self", "kwargs"})


def deepseek_v3() -> DeepseekV3Config:
    """DeepSeek-V3 (arXiv 2412.19437, Sec. 4.2): 671B total, 37B activated; MTP module excluded."""
    return DeepseekV3Config(num_mtp_layers=0)  # the transformers defaults are the published V3 sizes


def deepseek_v2() -> DeepseekV2Config:
    """DeepSeek-V2 (arXiv 2405.04434, Sec. 3.1.1): 236B total, 21B activated.

    ``DeepseekV2Config()``'s defaults are *not* this model, so every size is written out.
    """
    return DeepseekV2Config(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        n_group=8, topk_group=3, topk_method="group_limited_greedy", routed_scaling_factor=16.0,
        norm_topk_prob=False, tie_word_embeddings=False,
    )


def deepseek_v2_lite() -> DeepseekV2Config:
    """DeepSeek-V2-Lite (arXiv 2405.04434, App. B): 15.7B total, 2.4B activated, no query compression."""
    return DeepseekV2Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        n_group=1, topk_group=1, topk_method="greedy", routed_scaling_factor=1.0,
        norm_topk_prob=False, tie_word_embeddings=False,
    )


def mixtral_8x7b() -> MixtralConfig:
    """Mixtral 8x7B (arXiv 2401.04088): 8 experts, top-2, GQA with 8 KV heads; 46.7B total, 12.9B active."""
    return MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
    )


def llama3_405b() -> LlamaConfig:
    """Llama-3.1-405B (arXiv 2407.21783, Table 3): a dense model of comparable scale, GQA with 8 KV heads."""
    return LlamaConfig(
        vocab_size=128256, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
        num_attention_heads=128, num_key_value_heads=8, tie_word_embeddings=False,
    )


PAPER_MODELS = {
    "DeepSeek-V3": deepseek_v3,
    "DeepSeek-V2": deepseek_v2,
    "DeepSeek-V2-Lite": deepseek_v2_lite,
    "Mixtral-8x7B": mixtral_8x7b,
    "Llama-3.1-405B (dense)": llama3_405b,
}
