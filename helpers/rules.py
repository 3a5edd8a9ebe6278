"""Build-time rules: every check on a configuration value lives here, and runs once, when a layer or model is built.

A layer's constructor (or ``from_config``) calls these on its arguments; the model calls :func:`check_config`
on its ``transformers`` config. Nothing here looks at activations: what a forward checks (ranks, widths,
dtype, device) is in :mod:`helpers.inputs`. Every rule raises ``ValueError`` (``TypeError`` for a flag that is
not a bool) whose message names the field, says what came, and gives the fix.

This module imports only the standard library at the top (no ``torch``, no ``transformers``), so any layer
can use it without slowing its import; :func:`check_config` loads ``transformers``' field lists lazily.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any


def closest_name(name: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` with the closest valid name, or ``""`` if none is close."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require_positive(**fields: int | None) -> None:
    """``ValueError`` naming the first field that is not a positive int (``None`` is skipped: an optional size)."""
    for name, value in fields.items():
        if value is not None and (not _is_int(value) or value <= 0):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def require_count(**fields: int | None) -> None:
    """``ValueError`` naming the first field that is not a non-negative int (a count where 0 turns a part off,
    or an index such as ``layer_idx``); ``None`` is skipped."""
    for name, value in fields.items():
        if value is not None and (not _is_int(value) or value < 0):
            raise ValueError(f"{name} must be a non-negative integer (0 turns it off or is the first), got {value!r}")


def require_number(name: str, value: Any, *, positive: bool = False) -> None:
    """``ValueError`` unless ``value`` is a finite real number, ``> 0`` if ``positive`` else ``>= 0``.

    NaN and infinities are refused: a NaN factor passes every comparison test silently, an infinite one
    turns every output into NaN or inf on the first call.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        want = "a finite positive number" if positive else "a finite number >= 0"
        raise ValueError(f"{name} must be {want}, got {value!r}")


def require_bool(**flags: Any) -> None:
    """``TypeError`` naming the first flag that is not ``True``/``False`` (``"yes"`` or ``1`` would be truthy)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}); a string such as "
                            f"'no' is truthy and would silently mean True")


def require_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """``ValueError`` unless ``value`` is one of ``choices`` (with the closest name when it looks like a typo)."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}{closest_name(str(value), choices)}")


def validate_routing(n_routed_experts: int, num_experts_per_tok: int, n_group: int = 1, topk_group: int = 1) -> None:
    """``ValueError`` naming the field if group-limited top-k routing is impossible (V2 §2.2.2, V3 §2.1.2)."""
    require_positive(n_routed_experts=n_routed_experts, num_experts_per_tok=num_experts_per_tok,
                     n_group=n_group, topk_group=topk_group)
    if n_routed_experts % n_group:
        raise ValueError(f"n_routed_experts ({n_routed_experts}) must be divisible by n_group ({n_group})")
    if topk_group > n_group:
        raise ValueError(f"topk_group ({topk_group}) must be at most n_group ({n_group})")
    reachable = topk_group * (n_routed_experts // n_group)
    if num_experts_per_tok > reachable:
        raise ValueError(f"num_experts_per_tok ({num_experts_per_tok}) exceeds the {reachable} experts "
                         f"reachable in topk_group={topk_group} groups of {n_routed_experts // n_group}; "
                         "lower num_experts_per_tok or raise topk_group")


def validate_deepseek_fields(fields: dict[str, Any]) -> None:
    """``ValueError`` naming the field if a DeepSeek config (as a dict of fields) cannot describe a working model.

    Sizes must be positive integers, counts that may be zero (shared experts, dense layers, MTP modules)
    non-negative integers, rates (``routed_scaling_factor``, ``rms_norm_eps``) finite positive numbers.
    """
    require_positive(**{k: fields.get(k) for k in (
        "hidden_size", "num_attention_heads", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim",
        "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
        "moe_intermediate_size", "num_hidden_layers", "n_group", "topk_group", "vocab_size",
        "intermediate_size", "max_position_embeddings", "index_topk", "index_n_heads", "index_head_dim")})
    require_count(**{k: fields.get(k) for k in ("n_shared_experts", "first_k_dense_replace", "num_mtp_layers")})
    for name, positive in (("routed_scaling_factor", True), ("rms_norm_eps", True), ("initializer_range", False),
                           ("attention_dropout", False)):
        if fields.get(name) is not None:
            require_number(name, fields[name], positive=positive)
    if fields.get("qk_rope_head_dim", 2) % 2:
        raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {fields['qk_rope_head_dim']}")
    validate_routing(fields.get("n_routed_experts", 1), fields.get("num_experts_per_tok", 1),
                     fields.get("n_group") or 1, fields.get("topk_group") or 1)


ROPE_TYPES = ("default", "yarn")
"""The ``rope_parameters['rope_type']`` values our layers compute (YaRN: DeepSeek-V2/V3's long-context RoPE)."""

YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate")
"""The YaRN fields of ``rope_parameters`` (``transformers``' names), besides ``rope_type`` and ``rope_theta``."""


def rope_type_of(rope: dict[str, Any]) -> str:
    """``rope['rope_type']`` (or the older key ``'type'``), ``'default'`` when neither is given."""
    return rope.get("rope_type", rope.get("type", "default"))


def check_rope_parameters(rope: dict[str, Any] | None) -> None:
    """``ValueError`` naming the field unless ``rope`` (a config's ``rope_parameters``) is RoPE we compute.

    ``rope_type`` must be ``'default'`` or ``'yarn'`` (then :func:`check_yarn_fields`); ``rope_theta`` a finite
    positive number; ``partial_rotary_factor``, if given, 1 (DeepSeek rotates the whole ``qk_rope_head_dim``).
    """
    rope = rope or {}
    rope_type = rope_type_of(rope)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_parameters['rope_type'] is {rope_type!r}: only {ROPE_TYPES} are implemented (YaRN "
                         "is DeepSeek-V2/V3's long-context RoPE); use rope_type='yarn' with factor and "
                         "original_max_position_embeddings, or rope_type='default'")
    if rope.get("rope_theta") is not None:
        require_number("rope_parameters['rope_theta']", rope["rope_theta"], positive=True)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"rope_parameters['partial_rotary_factor'] is {rope['partial_rotary_factor']!r}: DeepSeek "
                         "rotates all qk_rope_head_dim channels; remove it or set it to 1.0")
    if rope_type == "yarn":
        check_yarn_fields(rope)


def check_yarn_fields(rope: dict[str, Any]) -> None:
    """``ValueError`` naming the field if YaRN ``rope_parameters`` cannot describe a context extension.

    Required: ``factor`` (``s``, finite, at least 1) and ``original_max_position_embeddings`` (``L``, a positive
    integer). Optional (``None`` = YaRN's default): ``beta_fast`` > ``beta_slow`` > 0 (the ramp's ends, in turns
    over ``L``), ``mscale``/``mscale_all_dim`` >= 0, ``attention_factor`` > 0; ``truncate``, if given, a bool. An unknown
    key (``beta_fats``) is refused with the closest name: ``transformers`` would store and ignore it.
    """
    known = ("rope_type", "type", "rope_theta", "partial_rotary_factor", *YARN_KEYS)
    for key in rope:
        if key not in known:
            raise ValueError(f"rope_parameters has an unknown YaRN key {key!r}{closest_name(key, known)}: it would be "
                             f"ignored; the YaRN keys are {YARN_KEYS}")
    for key, example in (("factor", "40 in DeepSeek-V3"), ("original_max_position_embeddings", "4096 in DeepSeek-V3")):
        if rope.get(key) is None:
            raise ValueError(f"rope_parameters['{key}'] is missing: YaRN needs it ({example})")
    require_number("rope_parameters['factor']", rope["factor"], positive=True)
    if rope["factor"] < 1:
        raise ValueError(f"rope_parameters['factor'] is {rope['factor']!r}: YaRN stretches the context by factor, "
                         "which must be at least 1 (1 is plain RoPE; 40 in DeepSeek-V3)")
    require_positive(**{"rope_parameters['original_max_position_embeddings']": rope["original_max_position_embeddings"]})
    beta = {}
    for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        if rope.get(key) is not None:
            require_number(f"rope_parameters['{key}']", rope[key], positive=True)
        beta[key] = default if rope.get(key) is None else rope[key]
    if beta["beta_fast"] <= beta["beta_slow"]:
        raise ValueError(f"rope_parameters['beta_fast'] ({beta['beta_fast']}) must be greater than beta_slow "
                         f"({beta['beta_slow']}): pairs turning more than beta_fast times over the original context "
                         "are kept, fewer than beta_slow times are interpolated (32 and 1; swapped?)")
    for key, positive in (("mscale", False), ("mscale_all_dim", False), ("attention_factor", True)):
        if rope.get(key) is not None:
            require_number(f"rope_parameters['{key}']", rope[key], positive=positive)
    if "truncate" in rope:  # transformers reads a stored None as False, the dataclass default as True: refuse it
        require_bool(**{"rope_parameters['truncate']": rope["truncate"]})


MODEL_TYPES = ("deepseek_v3", "deepseek_v32")
"""The ``transformers`` configs our assembled model is built from (V3; V3.2 = V3 + the lightning indexer)."""


def check_config(config: Any) -> None:
    """``ValueError`` naming the field if our model cannot compute what ``config`` describes.

    Args:
        config: a ``transformers`` ``DeepseekV3Config`` or ``DeepseekV32Config`` (its ``model_type`` picks the
            attention: MLA, or MLA with the lightning indexer).

    A config asking for something we do not implement (a RoPE type other than default or YaRN, attention or
    MLP biases, tied embeddings, another activation, key/value head groups) is refused before any weight is
    built.
    """
    model_type = getattr(config, "model_type", type(config).__name__)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config must be a DeepseekV3Config or DeepseekV32Config (model_type in {MODEL_TYPES}), "
                         f"got {model_type!r}")
    check_rope_parameters(config.rope_parameters)
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
    from helpers.configs import config_fields  # late: it imports transformers

    known, fields = config_fields(type(config)), config.to_dict()
    for name in fields:  # an unknown field close to a known one is a typo that transformers stores and ignores
        if name not in known and closest_name(name, known):
            raise ValueError(f"config has an unknown field {name!r}{closest_name(name, known)}: it would be ignored; "
                             "rename it")
    validate_deepseek_fields(fields)
