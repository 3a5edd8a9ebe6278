"""Move an MLA layer between our names (DeepSeek's official ``inference/model.py``) and ``transformers``.

One explicit table maps the parameters; no weight is transposed or permuted:

=================  ===========================  ==================================================
ours               ``transformers``             paper (DeepSeek-V2, arXiv 2405.04434)
=================  ===========================  ==================================================
``wq``             ``q_proj``                   ``[W^{UQ}; W^{QR}]`` on ``h_t`` (no query compression)
``wq_a``           ``q_a_proj``                 ``W^{DQ}`` (eq. 12)
``q_norm``         ``q_a_layernorm``            RMSNorm on ``c^Q_t``
``wq_b``           ``q_b_proj``                 ``[W^{UQ}; W^{QR}]`` (eq. 13, 14)
``wkv_a``          ``kv_a_proj_with_mqa``       ``[W^{DKV}; W^{KR}]`` (eq. 9, 10)
``kv_norm``        ``kv_a_layernorm``           RMSNorm on ``c^{KV}_t``
``wkv_b``          ``kv_b_proj``                ``[W^{UK}; W^{UV}]`` per head (eq. 10, 11)
``wo``             ``o_proj``                   ``W^O`` (eq. 19)
=================  ===========================  ==================================================

RoPE: ``DeepseekV3Attention`` rotates pairs ``(x0, x1), ...`` when ``config.rope_interleave`` (and halves
otherwise); ``DeepseekV2Attention`` always rotates pairs, via complex numbers (``torch.view_as_complex`` on
``(..., d/2, 2)``), which is our ``rope_interleave=True``. Both use default RoPE here: YaRN-scaled configs
(``rope_type != "default"``, which also rescale the softmax) are rejected with a ``ValueError``, as are
attention biases (``attention_bias=True``) and ``num_key_value_heads != num_attention_heads``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

from helpers.mla.layer import MultiHeadLatentAttention

# ours -> transformers; the query side depends on whether queries are compressed.
NAMES_Q = {"wq": "q_proj"}
NAMES_Q_LORA = {"wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj"}
NAMES_KV = {"wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}


def _names(q_lora_rank: int | None) -> dict[str, str]:
    return {**(NAMES_Q if q_lora_rank is None else NAMES_Q_LORA), **NAMES_KV}


def _check_supported(config: DeepseekV2Config | DeepseekV3Config) -> None:
    """Raise ``ValueError`` naming the field for the ``transformers`` features our layer does not have."""
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope_parameters['rope_type'] is {rope_type!r}: only default RoPE is supported "
                         "(YaRN also rescales the softmax); use rope_type='default'")
    if config.attention_bias:
        raise ValueError("attention_bias=True is not supported: DeepSeek's MLA projections have no biases")
    if config.num_key_value_heads != config.num_attention_heads:
        raise ValueError(f"num_key_value_heads ({config.num_key_value_heads}) must equal num_attention_heads "
                         f"({config.num_attention_heads}): MLA has no key/value head groups")


def _rope_interleave(config: DeepseekV2Config | DeepseekV3Config) -> bool:
    """V2 always rotates interleaved pairs (complex numbers); V3 follows ``config.rope_interleave``."""
    return True if isinstance(config, DeepseekV2Config) else bool(config.rope_interleave)


def mla_from_hf(module: DeepseekV3Attention | DeepseekV2Attention) -> MultiHeadLatentAttention:
    """Our :class:`~helpers.mla.MultiHeadLatentAttention` with ``module``'s weights and RoPE settings.

    Args:
        module: a ``transformers`` ``DeepseekV3Attention`` or ``DeepseekV2Attention``.

    Returns:
        A new layer (naive computation by default) on ``module``'s device and dtype, weights copied.
    """
    if not isinstance(module, (DeepseekV3Attention, DeepseekV2Attention)):
        raise ValueError(f"module must be a DeepseekV3Attention or DeepseekV2Attention, got {type(module).__name__}: "
                         "pass one attention module, e.g. hf_model.model.layers[0].self_attn")
    config = module.config
    _check_supported(config)
    eps = module.kv_a_layernorm.variance_epsilon
    if module.q_a_layernorm is not None and module.q_a_layernorm.variance_epsilon != eps:
        raise ValueError(f"q_a_layernorm eps ({module.q_a_layernorm.variance_epsilon}) must equal kv_a_layernorm "
                         f"eps ({eps}): our layer has one rms_norm_eps")
    weight = module.kv_a_proj_with_mqa.weight
    layer = MultiHeadLatentAttention(
        hidden_size=config.hidden_size, n_heads=config.num_attention_heads, kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim, qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim, q_lora_rank=config.q_lora_rank,
        rope_theta=float(config.rope_parameters["rope_theta"]), rope_interleave=_rope_interleave(config),
        rms_norm_eps=eps,
    ).to(device=weight.device, dtype=weight.dtype)
    _copy(module, layer, {hf: ours for ours, hf in _names(config.q_lora_rank).items()})
    return layer


def mla_to_hf(layer: MultiHeadLatentAttention, config: DeepseekV2Config | DeepseekV3Config | None = None,
              layer_idx: int = 0) -> DeepseekV3Attention | DeepseekV2Attention:
    """A ``transformers`` attention module with ``layer``'s weights.

    Args:
        layer: our MLA layer.
        config: a ``DeepseekV3Config`` (gives ``DeepseekV3Attention``) or ``DeepseekV2Config`` (gives
            ``DeepseekV2Attention``; needs ``layer.rope_interleave``) whose attention fields match ``layer``;
            ``None`` builds a ``DeepseekV3Config`` from the layer (eager attention).
        layer_idx: the layer index the module uses in a ``transformers`` cache.

    The ``transformers`` norms always use eps 1e-6; the module's ``variance_epsilon`` is set to
    ``layer.rms_norm_eps`` so the two compute the same function.
    """
    if not isinstance(layer, MultiHeadLatentAttention):
        raise TypeError(f"layer must be our MultiHeadLatentAttention, got {type(layer).__name__}: to convert a "
                        "transformers module the other way, use mla_from_hf")
    config = _config_of(layer) if config is None else config
    if not isinstance(config, (DeepseekV2Config, DeepseekV3Config)):
        raise ValueError(f"config must be a DeepseekV3Config or DeepseekV2Config, got {type(config).__name__}")
    _check_supported(config)
    fields = dict(hidden_size=layer.hidden_size, num_attention_heads=layer.n_heads, kv_lora_rank=layer.kv_lora_rank,
                  q_lora_rank=layer.q_lora_rank, qk_nope_head_dim=layer.qk_nope_head_dim,
                  qk_rope_head_dim=layer.qk_rope_head_dim, v_head_dim=layer.v_head_dim)
    for name, value in fields.items():
        if getattr(config, name) != value:
            raise ValueError(f"config.{name} is {getattr(config, name)!r} but the layer has {value!r}")
    if float(config.rope_parameters["rope_theta"]) != layer.rope_theta:
        raise ValueError(f"config rope_theta {config.rope_parameters['rope_theta']} differs from the layer's "
                         f"{layer.rope_theta}")
    if _rope_interleave(config) != layer.rope_interleave:
        raise ValueError(f"config rope_interleave is {_rope_interleave(config)} but the layer has "
                         f"{layer.rope_interleave} (DeepseekV2Attention always interleaves)")
    cls = DeepseekV2Attention if isinstance(config, DeepseekV2Config) else DeepseekV3Attention
    weight = layer.wkv_a.weight
    module = cls(config, layer_idx).to(device=weight.device, dtype=weight.dtype)
    for norm in (module.q_a_layernorm, module.kv_a_layernorm):
        if norm is not None:
            norm.variance_epsilon = layer.rms_norm_eps
    _copy(layer, module, _names(layer.q_lora_rank))
    return module


def _config_of(layer: MultiHeadLatentAttention) -> DeepseekV3Config:
    """The smallest ``DeepseekV3Config`` describing ``layer``'s attention (eager, default RoPE)."""
    return DeepseekV3Config(
        hidden_size=layer.hidden_size, num_attention_heads=layer.n_heads, num_key_value_heads=layer.n_heads,
        q_lora_rank=layer.q_lora_rank, kv_lora_rank=layer.kv_lora_rank, qk_nope_head_dim=layer.qk_nope_head_dim,
        qk_rope_head_dim=layer.qk_rope_head_dim, v_head_dim=layer.v_head_dim, rope_interleave=layer.rope_interleave,
        rope_parameters={"rope_type": "default", "rope_theta": layer.rope_theta}, rms_norm_eps=layer.rms_norm_eps,
        num_hidden_layers=1, attn_implementation="eager",
    )


@torch.no_grad()
def _copy(src: nn.Module, dst: nn.Module, names: dict[str, str]) -> None:
    """Copy the weight of every ``src`` submodule ``a`` into ``dst`` submodule ``names[a]`` (shapes must agree)."""
    for a, b in names.items():
        w_src, w_dst = getattr(src, a).weight, getattr(dst, b).weight
        if w_src.shape != w_dst.shape:
            raise ValueError(f"{a} has shape {tuple(w_src.shape)} but {b} has {tuple(w_dst.shape)}")
        w_dst.copy_(w_src)
