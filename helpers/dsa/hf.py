"""Move a DSA layer between our names and ``transformers``' ``DeepseekV32Attention`` (weights and settings).

The MLA part uses :mod:`helpers.mla.hf`'s table unchanged; the indexer keeps its names:

=======================  ==============================  ==============================================
ours                     ``transformers``                 what
=======================  ==============================  ==============================================
MLA (``wq_a`` ... ``wo``)  ``q_a_proj`` ... ``o_proj``     :data:`helpers.mla.hf.NAMES_Q_LORA`, ``NAMES_KV``
``indexer.wq_b``         ``indexer.wq_b``                ``c^Q -> q_{t,j}``
``indexer.wk``           ``indexer.wk``                  ``h -> k_s``
``indexer.k_norm``       ``indexer.k_norm``              LayerNorm: weight AND bias
``indexer.weights_proj`` ``indexer.weights_proj``        ``h -> w_{t,j}``
``index_topk``, ``index_n_heads``, ``index_head_dim``   config fields of the same names
=======================  ==============================  ==============================================

``DeepseekV32Attention`` always has query compression and always rotates the main RoPE in interleaved pairs
(its config has no ``rope_interleave``); YaRN configs stretch the indexer's RoPE as the main attention's
(``transformers`` hands both the same cos and sin); attention biases are rejected as in :mod:`helpers.mla.hf`. Settings come from :meth:`SparseLatentAttention.from_config` and go back through
:meth:`SparseLatentAttention.config_fields`; this module maps only the weights.
"""

from __future__ import annotations

import torch
from transformers import DeepseekV32Config
from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Attention

from helpers.dsa.layer import SparseLatentAttention
from helpers.mla.hf import NAMES_KV, NAMES_Q_LORA, _copy, check_config_matches, set_norm_eps
from helpers.rules import require_count

NAMES = {**NAMES_Q_LORA, **NAMES_KV}
INDEXER = ("wq_b", "wk", "k_norm", "weights_proj")


@torch.no_grad()
def _copy_indexer(src, dst) -> None:
    for name in INDEXER:
        for p_src, p_dst in zip(getattr(src, name).parameters(), getattr(dst, name).parameters()):
            if p_src.shape != p_dst.shape:
                raise ValueError(f"indexer.{name} has shape {tuple(p_src.shape)} but the target has {tuple(p_dst.shape)}")
            p_dst.copy_(p_src)


def dsa_from_hf(module: DeepseekV32Attention) -> SparseLatentAttention:
    """Our :class:`~helpers.dsa.SparseLatentAttention` with ``module``'s weights and settings (same device, dtype).

    The layer is :meth:`~SparseLatentAttention.from_config` of ``module.config``; the norms keep the module's eps.
    """
    if not isinstance(module, DeepseekV32Attention):
        raise ValueError(f"module must be a DeepseekV32Attention, got {type(module).__name__}: pass one attention "
                         "module, e.g. hf_model.model.layers[0].self_attn")
    if module.indexer.k_norm.eps != 1e-6:
        raise ValueError(f"indexer.k_norm eps is {module.indexer.k_norm.eps}; ours is 1e-6 as in transformers")
    layer = SparseLatentAttention.from_config(module.config)
    set_norm_eps(layer, module)
    weight = module.kv_a_proj_with_mqa.weight
    _copy(module, layer.to(device=weight.device, dtype=weight.dtype), {hf: ours for ours, hf in NAMES.items()})
    _copy_indexer(module.indexer, layer.indexer)
    return layer


def dsa_to_hf(layer: SparseLatentAttention, config: DeepseekV32Config | None = None,
              layer_idx: int = 0) -> DeepseekV32Attention:
    """A ``DeepseekV32Attention`` with ``layer``'s weights.

    Args:
        layer: our DSA layer (``rope_interleave`` must be True: V3.2 always interleaves the main RoPE).
        config: a ``DeepseekV32Config`` whose attention and indexer fields match ``layer``; ``None`` builds one
            from :meth:`~SparseLatentAttention.config_fields` (one layer, eager attention).
        layer_idx: the layer index the module uses in a ``transformers`` cache (0 or more).
    """
    if not isinstance(layer, SparseLatentAttention):
        raise ValueError(f"layer must be a SparseLatentAttention, got {type(layer).__name__}")
    require_count(layer_idx=layer_idx)
    if config is None:
        config = DeepseekV32Config(**layer.config_fields(), num_hidden_layers=1, attn_implementation="eager")
    if not isinstance(config, DeepseekV32Config):
        raise ValueError(f"config must be a DeepseekV32Config, got {type(config).__name__}")
    check_config_matches(layer, config)
    weight = layer.wkv_a.weight
    module = DeepseekV32Attention(config, layer_idx).to(device=weight.device, dtype=weight.dtype)
    for norm in (module.q_a_layernorm, module.kv_a_layernorm):
        norm.variance_epsilon = layer.rms_norm_eps
    _copy(layer, module, NAMES)
    _copy_indexer(layer.indexer, module.indexer)
    return module


def hf_attention_forward(module: DeepseekV32Attention, chunks: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
    """Run ``chunks`` (each ``(B, T_i, H)``) through ``module`` one after another, as ``DeepseekV32Model`` does
    (a ``DynamicCache`` holding latents and indexer keys, the model's rotary embedding, a causal mask created
    without the is-causal shortcut). Returns the concatenated outputs and the indexer's top-k per chunk
    (``(B, T_i, k)`` int64; rows with fewer than ``k`` visible tokens are padded with masked future positions)."""
    from transformers import DynamicCache
    from transformers.masking_utils import create_causal_mask
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32RotaryEmbedding

    config = module.config
    rotary, cache, outs, picks = DeepseekV32RotaryEmbedding(config), DynamicCache(config=config), [], []
    hook = module.indexer.register_forward_hook(lambda m, args, out: picks.append(out.long()))
    try:
        for x in chunks:
            past = cache.get_seq_length()
            position_ids = torch.arange(past, past + x.shape[1])[None]  # (1, T)
            mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=None, past_key_values=cache,
                                      position_ids=position_ids, allow_is_causal_skip=False)
            out, _ = module(hidden_states=x, position_embeddings=rotary(x, position_ids), attention_mask=mask,
                            past_key_values=cache, position_ids=position_ids)
            outs.append(out)
    finally:
        hook.remove()
    return torch.cat(outs, dim=1), picks
