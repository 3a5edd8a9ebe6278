"""Move a V4 attention layer between our names and ``transformers``' ``DeepseekV4Attention``; drive the latter.

Our tree is ``transformers``' except for the indexer, which sits beside the compressor instead of inside it,
and holds its own compressor as a :class:`~helpers.v4.compressor.Compressor`:

=======================================  ==============================================  =========================
ours                                     ``transformers`` (``DeepseekV4Attention``)       paper (V4 report §2.3)
=======================================  ==============================================  =========================
``q_a_proj``, ``q_a_norm``, ``q_b_proj``  same                                            ``W^DQ``, ``W^UQ``
``kv_proj``, ``kv_norm``                  same                                            ``W^KV`` (K = V)
``o_a_proj``, ``o_b_proj``, ``sinks``     same                                            grouped ``W^O``, sinks
``compressor.*``                          ``compressor.*`` (``kv_proj``, ``gate_proj``,    ``W^KV``, ``W^Z``, ``B``
                                          ``position_bias``, ``kv_norm``)
``indexer.compressor.*``                  ``compressor.indexer.*``                        ``K^IComp``
``indexer.q_b_proj``                      ``compressor.indexer.q_b_proj``                 ``W^IUQ``
``indexer.weights_proj``                  ``compressor.indexer.scorer.weights_proj``      ``W^w``
=======================================  ==============================================  =========================

The RoPE tables (``rotary_emb`` buffers) are not copied: both sides compute them from the config.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DeepseekV4Config
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4Attention,
    DeepseekV4RotaryEmbedding,
)

from helpers.v4.attention import V4Attention

PREFIXES = (  # ours -> transformers, the first matching prefix wins
    ("indexer.compressor.", "compressor.indexer."),
    ("indexer.weights_proj.", "compressor.indexer.scorer.weights_proj."),
    ("indexer.", "compressor.indexer."),
)


def hf_name(ours: str) -> str:
    """The ``transformers`` name of our parameter ``ours`` (see the table above)."""
    for mine, theirs in PREFIXES:
        if ours.startswith(mine):
            return theirs + ours[len(mine):]
    return ours


def _pairs(ours: V4Attention, hf_attn: DeepseekV4Attention) -> list[tuple[Tensor, Tensor, str]]:
    """``(our tensor, their tensor, name)`` for every parameter; ``ValueError`` if the two trees differ."""
    theirs = dict(hf_attn.named_parameters())
    mine = {hf_name(name): (name, p) for name, p in ours.named_parameters()}
    if set(mine) != set(theirs):
        raise ValueError(f"the layers do not match: only ours has {sorted(set(mine) - set(theirs))}, only "
                         f"transformers has {sorted(set(theirs) - set(mine))} (same config and layer_idx?)")
    pairs = []
    for name, (our_name, p) in mine.items():
        if p.shape != theirs[name].shape:
            raise ValueError(f"{our_name} has shape {tuple(p.shape)} but {name} has {tuple(theirs[name].shape)}")
        pairs.append((p, theirs[name], name))
    return pairs


@torch.no_grad()
def attention_from_hf(hf_attn: DeepseekV4Attention, config: DeepseekV4Config | None = None,
                      layer_idx: int | None = None) -> V4Attention:
    """Our :class:`V4Attention` with ``hf_attn``'s weights (same device and dtype).

    ``config``, ``layer_idx``: default to ``hf_attn.config`` and ``hf_attn.layer_idx``.
    """
    if not isinstance(hf_attn, DeepseekV4Attention):
        raise ValueError(f"hf_attn must be a DeepseekV4Attention, got {type(hf_attn).__name__}: pass one attention "
                         "module, e.g. hf_model.model.layers[0].self_attn")
    config = hf_attn.config if config is None else config
    layer_idx = hf_attn.layer_idx if layer_idx is None else layer_idx
    weight = hf_attn.kv_proj.weight
    ours = V4Attention.from_config(config, layer_idx).to(device=weight.device, dtype=weight.dtype)
    for mine, theirs, _ in _pairs(ours, hf_attn):
        mine.copy_(theirs)
    return ours


@torch.no_grad()
def attention_to_hf(ours: V4Attention, hf_attn: DeepseekV4Attention) -> DeepseekV4Attention:
    """Copy our weights into ``hf_attn`` (built from the same config and layer index); return it."""
    for mine, theirs, _ in _pairs(ours, hf_attn):
        theirs.copy_(mine)
    return hf_attn


def hf_attention_forward(hf_attn: DeepseekV4Attention, x: Tensor, cache=None) -> Tensor:
    """``hf_attn`` on ``x (B, T, d_model)`` as ``DeepseekV4Model.forward`` calls it (positions after the cache's,
    RoPE tables for both bases, the sliding-window causal mask built before the cache is updated).

    ``cache``: a ``transformers`` ``DynamicCache(config=...)`` (``None``: one full pass). Drive every layer of
    the config in the same steps, or build the config with this layer alone: the mask reads the cache's first
    layer.
    """
    config = hf_attn.config
    past = 0 if cache is None else cache.get_seq_length()
    position_ids = torch.arange(past, past + x.shape[1], device=x.device)[None]  # (1, T)
    mask = create_sliding_window_causal_mask(config=config, inputs_embeds=x, attention_mask=None,
                                             past_key_values=cache, position_ids=position_ids)
    rotary = DeepseekV4RotaryEmbedding(config).to(x.device)
    tables = {label: rotary(x, position_ids=position_ids, layer_type=label) for label in ("main", "compress")}
    return hf_attn(x, position_embeddings=tables, position_ids=position_ids, attention_mask=mask,
                   past_key_values=cache)[0]
