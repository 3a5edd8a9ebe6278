"""Conversions between :class:`helpers.moe.DeepSeekMoE` and ``transformers``' DeepSeek-V3/V2 MoE modules.

The weights map one to one (``transformers`` v5 stores fused experts exactly as we do)::

    ours                          transformers
    gate_weight   (E, H)          gate.weight
    bias          (E,)            gate.e_score_correction_bias   (V3 only; V2 has no bias)
    w_gate_up     (E, 2I, H)      experts.gate_up_proj
    w_down        (E, H, I)       experts.down_proj
    shared_experts.w_gate/w_up/w_down   shared_experts.gate_proj/up_proj/down_proj

Routing settings are mapped once, by :func:`helpers.moe.layer.moe_settings` (behind
:meth:`DeepSeekMoE.from_config`): V3 is sigmoid scoring, groups scored by their top-2 sum, ``norm_topk_prob`` as
configured. V2 is softmax scoring; ``topk_method="greedy"`` ignores the groups and
``"group_limited_greedy"`` scores a group by its maximum; V2's router never renormalises (it ignores
``norm_topk_prob``), so the converted layer has ``norm_topk_prob=False``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from helpers.moe.layer import DeepSeekMoE, moe_settings


def _hf_kind(module: nn.Module) -> str:
    """``"v3"`` for V3's and V3.2's MoE block (the same router and experts), ``"v2"`` for V2's."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32MoE

    if isinstance(module, (DeepseekV3MoE, DeepseekV32MoE)):
        return "v3"
    if isinstance(module, DeepseekV2Moe):
        return "v2"
    raise TypeError(f"expected a transformers DeepseekV3MoE, DeepseekV32MoE or DeepseekV2Moe, got "
                    f"{type(module).__name__}: pass one MoE block, e.g. hf_model.model.layers[1].mlp (layer 0 is "
                    "dense in DeepSeek's configs)")


def moe_from_hf(module: nn.Module) -> DeepSeekMoE:
    """Our :class:`DeepSeekMoE` with the weights, bias and routing settings of a ``transformers`` module.

    The settings come from the module's config through :meth:`DeepSeekMoE.from_config` (the one mapping).

    Args:
        module: a ``DeepseekV3MoE`` or ``DeepseekV2Moe`` (e.g. ``model.model.layers[1].mlp``).

    Returns:
        A new layer in the module's dtype and device that computes the same function.
    """
    kind = _hf_kind(module)
    layer = DeepSeekMoE.from_config(module.config)
    layer.to(device=module.experts.gate_up_proj.device, dtype=module.experts.gate_up_proj.dtype)
    with torch.no_grad():
        layer.gate_weight.copy_(module.gate.weight)
        layer.w_gate_up.copy_(module.experts.gate_up_proj)
        layer.w_down.copy_(module.experts.down_proj)
        if kind == "v3":
            layer.bias.copy_(module.gate.e_score_correction_bias)
        if layer.shared_experts is not None:
            for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                getattr(layer.shared_experts, ours).weight.copy_(getattr(module.shared_experts, theirs).weight)
    return layer


def hf_config_for(layer: DeepSeekMoE):
    """A tiny ``transformers`` config (eager experts) whose MoE block has ``layer``'s sizes and routing."""
    from helpers.configs import tiny_config

    fields: dict[str, Any] = {k: v for k, v in layer.settings.items() if k not in ("scoring_func", "group_score")}
    if layer.scoring_func == "sigmoid":
        return tiny_config("v3", **fields)
    topk_method = "greedy" if layer.n_group == 1 else "group_limited_greedy"
    return tiny_config("v2", topk_method=topk_method, **fields)


def _check_representable(layer: DeepSeekMoE, kind: str) -> None:
    """``transformers`` cannot express every setting we allow; say which one blocks the conversion."""
    if kind == "v3" and layer.group_score != "top2_sum":
        raise ValueError(f"group_score must be 'top2_sum' for DeepseekV3MoE, got {layer.group_score!r}")
    if kind == "v2":
        if layer.group_score != "max":
            raise ValueError(f"group_score must be 'max' for DeepseekV2Moe, got {layer.group_score!r}")
        if layer.norm_topk_prob:
            raise ValueError("norm_topk_prob must be False: DeepseekV2Moe never renormalises the top-k weights")
        if layer.bias.any():
            raise ValueError("bias must be zero: DeepseekV2Moe has no e_score_correction_bias")


def moe_to_hf(layer: DeepSeekMoE, config=None) -> nn.Module:
    """A ``transformers`` ``DeepseekV3MoE`` (``DeepseekV32MoE`` for a V3.2 config; sigmoid layers) or ``DeepseekV2Moe``
    (softmax) equal to ``layer``.

    Args:
        layer: our layer.
        config: a ``DeepseekV3Config``/``DeepseekV2Config`` to build from (its MoE fields must agree
            with ``layer``); default: :func:`hf_config_for` (tiny config, eager experts).

    Returns:
        The ``transformers`` module, in ``layer``'s dtype and device, with the same weights.
    """
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32MoE

    if not isinstance(layer, DeepSeekMoE):
        raise TypeError(f"layer must be our DeepSeekMoE, got {type(layer).__name__}: to convert a transformers "
                        "module the other way, use moe_from_hf")
    config = hf_config_for(layer) if config is None else config
    kind = "v2" if config.model_type == "deepseek_v2" else "v3"
    if (kind == "v3") != (layer.scoring_func == "sigmoid"):
        raise ValueError(f"scoring_func {layer.scoring_func!r} does not match a {config.model_type} config "
                         "(DeepSeek-V3 uses sigmoid, DeepSeek-V2 softmax)")
    _check_representable(layer, kind)
    if layer.n_group != 1 and getattr(config, "topk_method", "group_limited_greedy") == "greedy":
        raise ValueError("topk_method must be 'group_limited_greedy' for a layer with n_group > 1")
    for name, value in moe_settings(config).items():  # the config's layer, as from_config would build it
        if value != layer.settings[name]:
            raise ValueError(f"config gives {name}={value!r} but the layer has {layer.settings[name]!r}")
    module = {"deepseek_v3": DeepseekV3MoE, "deepseek_v32": DeepseekV32MoE}.get(config.model_type, DeepseekV2Moe)(config)
    module.to(device=layer.w_gate_up.device, dtype=layer.w_gate_up.dtype)
    with torch.no_grad():
        module.gate.weight.copy_(layer.gate_weight)
        module.experts.gate_up_proj.copy_(layer.w_gate_up)
        module.experts.down_proj.copy_(layer.w_down)
        if kind == "v3":
            module.gate.e_score_correction_bias.copy_(layer.bias)
        if layer.shared_experts is not None:
            for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                getattr(module.shared_experts, theirs).weight.copy_(getattr(layer.shared_experts, ours).weight)
    return module
