"""Which ``DeepseekV3Config`` fields our model implements, and a ``ValueError`` naming any other one.

The model is driven by a ``transformers`` ``DeepseekV3Config`` (the same field names engineers know).
It implements DeepSeek-V3's architecture with default RoPE; a config asking for something else
(YaRN scaling, attention or MLP biases, tied embeddings, another activation, key/value head groups)
is refused here, before any weight is built, with the field and the fix in the message.
"""

from __future__ import annotations

from typing import Any

from helpers.utils import require_positive, validate_routing


def check_config(config: Any) -> None:
    """Raise ``ValueError`` naming the field if our model cannot compute what ``config`` describes.

    Args:
        config: a ``transformers`` ``DeepseekV3Config``.
    """
    if getattr(config, "model_type", None) != "deepseek_v3":
        raise ValueError(f"config must be a DeepseekV3Config (model_type 'deepseek_v3'), got "
                         f"{getattr(config, 'model_type', type(config).__name__)!r}")
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope_parameters['rope_type'] is {rope_type!r}: only default RoPE is implemented "
                         "(YaRN also rescales the softmax); use rope_parameters={'rope_type': 'default', ...}")
    refused = {
        "attention_bias": (False, "DeepSeek's MLA projections have no biases"),
        "mlp_bias": (False, "the SwiGLU experts have no biases"),
        "tie_word_embeddings": (False, "DeepSeek-V3 has an untied output head"),
        "hidden_act": ("silu", "the FFNs are SwiGLU"),
        "pretraining_tp": (1, "tensor-parallel pretraining splits are not modelled"),
    }
    for field, (want, why) in refused.items():
        value = getattr(config, field, want)
        if value is not None and value != want:
            raise ValueError(f"{field}={value!r} is not supported ({why}); set {field}={want!r}")
    if config.num_key_value_heads != config.num_attention_heads:
        raise ValueError(f"num_key_value_heads ({config.num_key_value_heads}) must equal num_attention_heads "
                         f"({config.num_attention_heads}): MLA has no key/value head groups")
    require_positive(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                     intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                     max_position_embeddings=config.max_position_embeddings)
    if not isinstance(config.first_k_dense_replace, int) or config.first_k_dense_replace < 0:
        raise ValueError(f"first_k_dense_replace must be a non-negative integer, got {config.first_k_dense_replace!r}")
    if not isinstance(config.num_mtp_layers, int) or config.num_mtp_layers < 0:
        raise ValueError(f"num_mtp_layers must be a non-negative integer, got {config.num_mtp_layers!r}")
    validate_routing(config.n_routed_experts, config.num_experts_per_tok, config.n_group or 1, config.topk_group or 1)
    from helpers.configs import config_fields, validate_deepseek_fields  # late: keeps this module light
    from helpers.inputs import closest_name

    known, fields = config_fields(type(config)), config.to_dict()
    for name in fields:  # an unknown field close to a known one is a typo that transformers stores and ignores
        if name not in known and closest_name(name, known):
            raise ValueError(f"config has an unknown field {name!r}{closest_name(name, known)}: it would be ignored; "
                             "rename it")
    validate_deepseek_fields(fields)
