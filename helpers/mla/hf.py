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
``(..., d/2, 2)``), which is our ``rope_interleave=True``. Default RoPE and YaRN (``rope_type="yarn"``: stretched
frequencies, cos and sin times ``attention_factor``, softmax scale times ``mscale**2``; :class:`helpers.mla.rope.YaRN`)
convert; another ``rope_type`` is rejected with a ``ValueError``, as are attention biases
(``attention_bias=True``) and ``num_key_value_heads != num_attention_heads``.

Settings are read from the config by :meth:`MultiHeadLatentAttention.from_config` (the one mapping) and written
back by :meth:`MultiHeadLatentAttention.config_fields` (its inverse); this module maps only the weights.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

from helpers.mla.layer import MultiHeadLatentAttention
from helpers.rules import require_count

# ours -> transformers; the query side depends on whether queries are compressed.
NAMES_Q = {"wq": "q_proj"}
NAMES_Q_LORA = {"wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj"}
NAMES_KV = {"wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}


def _names(q_lora_rank: int | None) -> dict[str, str]:
    return {**(NAMES_Q if q_lora_rank is None else NAMES_Q_LORA), **NAMES_KV}


def mla_from_hf(module: DeepseekV3Attention | DeepseekV2Attention) -> MultiHeadLatentAttention:
    """Our :class:`~helpers.mla.MultiHeadLatentAttention` with ``module``'s weights and RoPE settings.

    Args:
        module: a ``transformers`` ``DeepseekV3Attention`` or ``DeepseekV2Attention``.

    Returns:
        A new layer (:meth:`~MultiHeadLatentAttention.from_config` of ``module.config``, so its backend follows the
        config or the layer's default) on ``module``'s device and dtype, weights copied. The norms' eps is the
        module's own (``transformers`` builds 1e-6; :func:`mla_to_hf` may have set another).
    """
    if not isinstance(module, (DeepseekV3Attention, DeepseekV2Attention)):
        raise ValueError(f"module must be a DeepseekV3Attention or DeepseekV2Attention, got {type(module).__name__}: "
                         "pass one attention module, e.g. hf_model.model.layers[0].self_attn")
    layer = MultiHeadLatentAttention.from_config(module.config)
    set_norm_eps(layer, module)
    weight = module.kv_a_proj_with_mqa.weight
    _copy(module, layer.to(device=weight.device, dtype=weight.dtype),
          {hf: ours for ours, hf in _names(layer.q_lora_rank).items()})
    return layer


def set_norm_eps(layer: MultiHeadLatentAttention, module: nn.Module) -> None:
    """Give ``layer``'s ``q_norm``/``kv_norm`` the eps of ``module``'s ``q_a_layernorm``/``kv_a_layernorm``."""
    eps = module.kv_a_layernorm.variance_epsilon
    if module.q_a_layernorm is not None and module.q_a_layernorm.variance_epsilon != eps:
        raise ValueError(f"q_a_layernorm eps ({module.q_a_layernorm.variance_epsilon}) must equal kv_a_layernorm "
                         f"eps ({eps}): our layer has one rms_norm_eps")
    layer.rms_norm_eps = eps
    for norm in (getattr(layer, "q_norm", None), layer.kv_norm):
        if norm is not None:
            norm.eps = eps


def check_config_matches(layer: MultiHeadLatentAttention, config) -> None:
    """``ValueError`` naming the field where ``config`` describes another layer than ``layer`` (eps aside)."""
    want = type(layer).settings_from_config(config)
    for name, value in layer.settings().items():
        if name != "rms_norm_eps" and want[name] != value:
            raise ValueError(f"config gives {name}={want[name]!r} but the layer has {value!r}"
                             + (" (DeepseekV2 and V3.2 always interleave)" if name == "rope_interleave" else ""))


def mla_to_hf(layer: MultiHeadLatentAttention, config: DeepseekV2Config | DeepseekV3Config | None = None,
              layer_idx: int = 0) -> DeepseekV3Attention | DeepseekV2Attention:
    """A ``transformers`` attention module with ``layer``'s weights.

    Args:
        layer: our MLA layer.
        config: a ``DeepseekV3Config`` (gives ``DeepseekV3Attention``) or ``DeepseekV2Config`` (gives
            ``DeepseekV2Attention``; needs ``layer.rope_interleave``) whose attention fields match ``layer``;
            ``None`` builds a ``DeepseekV3Config`` from :meth:`~MultiHeadLatentAttention.config_fields` (eager).
        layer_idx: the layer index the module uses in a ``transformers`` cache (0 or more).

    The ``transformers`` norms always use eps 1e-6; the module's ``variance_epsilon`` is set to
    ``layer.rms_norm_eps`` so the two compute the same function.
    """
    if not isinstance(layer, MultiHeadLatentAttention):
        raise TypeError(f"layer must be our MultiHeadLatentAttention, got {type(layer).__name__}: to convert a "
                        "transformers module the other way, use mla_from_hf")
    require_count(layer_idx=layer_idx)
    if config is None:
        config = DeepseekV3Config(**layer.config_fields(), num_hidden_layers=1, attn_implementation="eager")
    if not isinstance(config, (DeepseekV2Config, DeepseekV3Config)):
        raise ValueError(f"config must be a DeepseekV3Config or DeepseekV2Config, got {type(config).__name__}")
    check_config_matches(layer, config)
    cls = DeepseekV2Attention if isinstance(config, DeepseekV2Config) else DeepseekV3Attention
    weight = layer.wkv_a.weight
    module = cls(config, layer_idx).to(device=weight.device, dtype=weight.dtype)
    for norm in (module.q_a_layernorm, module.kv_a_layernorm):
        if norm is not None:
            norm.variance_epsilon = layer.rms_norm_eps
    _copy(layer, module, _names(layer.q_lora_rank))
    return module


@torch.no_grad()
def _copy(src: nn.Module, dst: nn.Module, names: dict[str, str]) -> None:
    """Copy the weight of every ``src`` submodule ``a`` into ``dst`` submodule ``names[a]`` (shapes must agree)."""
    for a, b in names.items():
        w_src, w_dst = getattr(src, a).weight, getattr(dst, b).weight
        if w_src.shape != w_dst.shape:
            raise ValueError(f"{a} has shape {tuple(w_src.shape)} but {b} has {tuple(w_dst.shape)}")
        w_dst.copy_(w_src)
