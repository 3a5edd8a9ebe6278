"""Conversions between :class:`helpers.v4.moe.V4MoE` and ``transformers``' ``DeepseekV4SparseMoeBlock``.

The weights map one to one (``transformers`` stores fused experts as we do)::

    ours                          transformers (model.model.layers[i].mlp)
    gate_weight   (E, H)          gate.weight
    bias          (E,)            gate.e_score_correction_bias     (top-k layers)
    tid2eid       (vocab, k)      gate.tid2eid                     (hash layers)
    w_gate_up     (E, 2I, H)      experts.gate_up_proj
    w_down        (E, H, I)       experts.down_proj
    shared_experts.w_gate/w_up/w_down   shared_experts.gate_proj/up_proj/down_proj

A ``DeepseekV4SparseMoeBlock`` does not keep its config, so both directions take the ``DeepseekV4Config`` and the
layer index (whether layer ``layer_idx`` is a hash layer is ``config.mlp_layer_types[layer_idx]``). Compare
numbers with ``config._experts_implementation == "eager"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from helpers.v4.moe import V4MoE, check_hash_table

_SHARED = (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))


def v4_moe_from_hf(module: nn.Module, config: Any, layer_idx: int) -> V4MoE:
    """Our :class:`V4MoE` equal to ``transformers``' MoE block of layer ``layer_idx`` (its dtype and device).

    Args:
        module: a ``DeepseekV4SparseMoeBlock`` (``model.model.layers[layer_idx].mlp``).
        config: the ``DeepseekV4Config`` it was built from. layer_idx: its layer.

    A hash table pointing outside the experts is refused (``ValueError`` naming ``tid2eid``).
    """
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

    if not isinstance(module, DeepseekV4SparseMoeBlock):
        raise TypeError(f"expected a DeepseekV4SparseMoeBlock (model.model.layers[i].mlp), got {type(module).__name__}")
    ours = V4MoE.from_config(config, layer_idx)
    if ours.is_hash != module.is_hash:
        raise ValueError(f"layer {layer_idx} is {'a hash' if ours.is_hash else 'a top-k'} layer in config."
                         "mlp_layer_types but the module is not: pass the config and index the module was built with")
    ours.to(device=module.experts.gate_up_proj.device, dtype=module.experts.gate_up_proj.dtype)
    with torch.no_grad():
        ours.gate_weight.copy_(module.gate.weight)
        ours.w_gate_up.copy_(module.experts.gate_up_proj)
        ours.w_down.copy_(module.experts.down_proj)
        if ours.is_hash:
            ours.set_hash_table(module.gate.tid2eid)
        else:
            ours.bias.copy_(module.gate.e_score_correction_bias)
        for mine, theirs in _SHARED:
            getattr(ours.shared_experts, mine).weight.copy_(getattr(module.shared_experts, theirs).weight)
    return ours


def v4_moe_to_hf(ours: V4MoE, config: Any, layer_idx: int) -> nn.Module:
    """A ``transformers`` ``DeepseekV4SparseMoeBlock`` equal to ``ours``.

    Args:
        ours: our layer.
        config: a ``DeepseekV4Config`` whose layer ``layer_idx`` builds the same layer (every MoE field must agree
            with ``ours``, and ``mlp_layer_types[layer_idx]`` with its routing).
        layer_idx: the layer.
    """
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

    if not isinstance(ours, V4MoE):
        raise TypeError(f"ours must be a V4MoE, got {type(ours).__name__}: the other way is v4_moe_from_hf")
    want = V4MoE.from_config(config, layer_idx)
    for name in ("hidden_size", "moe_intermediate_size", "n_routed_experts", "top_k", "routed_scaling_factor",
                 "swiglu_limit", "scoring_func", "is_hash"):
        if getattr(want, name) != getattr(ours, name):
            raise ValueError(f"config's layer {layer_idx} has {name}={getattr(want, name)!r} but the layer has "
                             f"{getattr(ours, name)!r}")
    module = DeepseekV4SparseMoeBlock(config, layer_idx).to(device=ours.w_gate_up.device, dtype=ours.w_gate_up.dtype)
    with torch.no_grad():
        module.gate.weight.copy_(ours.gate_weight)
        module.experts.gate_up_proj.copy_(ours.w_gate_up)
        module.experts.down_proj.copy_(ours.w_down)
        if ours.is_hash:
            check_hash_table(ours.tid2eid, config.vocab_size, ours.n_routed_experts, ours.top_k)
            module.gate.tid2eid.copy_(ours.tid2eid)
        else:
            module.gate.e_score_correction_bias.copy_(ours.bias)
        for mine, theirs in _SHARED:
            getattr(module.shared_experts, theirs).weight.copy_(getattr(ours.shared_experts, mine).weight)
    return module
