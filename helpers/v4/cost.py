"""What DeepSeek-V3, V3.2, V4-Flash and V4-Pro cost per token at long context: parameters, KV cache, FLOPs.

The configurations (nothing downloads):

- DeepSeek-V3 and V3.2: ``transformers``' ``DeepseekV3Config()`` / ``DeepseekV32Config()`` defaults (the released
  sizes; :func:`helpers.configs.deepseek_v3`), MTP excluded;
- DeepSeek-V4-Flash: ``DeepseekV4Config()``'s defaults (the released V4-Flash sizes) with the released layer schedule
  ``compress_ratios = [0, 0, 4, 128, 4, ..., 128, 4]`` (43 layers: 2 sliding-window, 21 CSA, 20 HCA);
- DeepSeek-V4-Pro: the released ``config.json`` of ``deepseek-ai/DeepSeek-V4-Pro`` (hidden 7168, 61 layers, 128 heads,
  ``q_lora_rank`` 1536, 384 routed experts of width 3072, ``routed_scaling_factor`` 2.5, ``o_groups`` 16,
  ``index_topk`` 1024, ``compress_ratios = [128, 128, 4, 128, ..., 128, 4]``: 31 HCA, 30 CSA), as quoted by the
  MindSpore MindFormers ``DeepseekV4Config`` documentation and the miles DeepSeek-V4-Pro page
  (miles.radixark.com/docs/models/deepseek/deepseek-v4-pro).

Counting rules, per decoded token at position ``S`` (the context it attends to), per layer:

- **KV cache** (what stays in memory for a sequence of ``S`` tokens). V3 (MLA): the latent and the RoPE key,
  ``d_c + d_h^R = 576`` numbers per token. V3.2 (DSA): the same plus one indexer key of ``d_I = 128`` per token.
  V4: a sliding-window layer keeps the last ``n_win = 128`` KV entries of ``c = 512`` (one head, keys equal
  values); a CSA layer keeps those plus one compressed entry of ``c`` per ``m = 4`` tokens and one indexer key of
  ``d_I`` per compressed entry; an HCA layer the window plus one compressed entry per ``m' = 128`` tokens. Partial
  blocks waiting in the compressor (fewer than ``m`` or ``m'`` tokens) are not counted.
- **Bytes** (:data:`STORAGE`): ``"report"`` stores as the releases do: V3/V3.2 latents in BF16, V3.2's indexer
  keys in FP8 with one FP32 scale per 128; V4's entries with the 64 RoPE dims in BF16 and the other
  ``c - 64`` in FP8 (V4 report §3), V4's indexer keys in FP4 (half a byte). ``"bf16"`` stores everything in BF16.
- **Attention FLOPs** (a multiply-add is 2 FLOPs): scores and weighted sum over the entries a query reads.
  MLA absorbed: ``2 n_h (d_c + d_h^R) + 2 n_h d_c`` per cached token; V3.2 reads ``min(k, S)`` of them and its
  indexer scores all ``S``: ``2 n_I d_I + 2 n_I`` each; V4 (MQA, keys = values of width ``c``): ``4 n_h c`` per entry
  read, the window's ``min(S, n_win)`` plus CSA's ``min(k, S/m)`` chosen or HCA's ``S/m'`` entries; CSA's indexer
  ``2 n_I d_I + 2 n_I`` per compressed entry. Top-k selection and softmax are not counted.
- **Per-token FLOPs**: attention plus ``2 x`` the activated parameters that multiply (all activated parameters but
  the embedding table; this includes the compressors, indexers, mHC maps and the output head).

=======================  ================================================================================
name                     what
=======================  ================================================================================
:data:`MODELS`           name -> the four configs above (built on demand)
:func:`parameter_count`  total and activated parameters, from the ``transformers`` model built on meta
:func:`layer_kinds`      each layer's attention kind (``"mla"``, ``"dsa"``, or V4's ``layer_types``)
:func:`kv_cache_bytes`   bytes of one sequence's cache, all layers
:func:`attention_flops`  attention FLOPs of one decoded token, all layers
:func:`token_cost`       the table row: KV bytes per token, attention and total FLOPs per token
=======================  ================================================================================
"""

from __future__ import annotations

from functools import cache
from typing import Any

from helpers.accounting import ParamCount, count_parameters, meta_model
from helpers.configs import deepseek_v3
from helpers.rules import require_choice, require_positive

STORAGE: dict[str, dict[str, float]] = {
    "report": dict(latent=2, index=1, index_scale=4 / 128, v4_nope=1, v4_rope=2, v4_index=0.5),
    "bf16": dict(latent=2, index=2, index_scale=0, v4_nope=2, v4_rope=2, v4_index=2),
}
"""Bytes per cached element under each storage rule (see the module docstring)."""

V4_FLASH_COMPRESS_RATIOS = [0, 0] + [4, 128] * 20 + [4]
"""Released V4-Flash schedule (``config.json``'s ``compress_ratios`` without the trailing MTP entry)."""
V4_PRO_COMPRESS_RATIOS = [128, 128] + [4, 128] * 29 + [4]
"""Released V4-Pro schedule (``config.json``'s ``compress_ratios`` without the trailing MTP entry)."""


def deepseek_v32():
    """DeepSeek-V3.2 (``DeepseekV32Config()``: V3's sizes plus the indexer, 64 heads of 128, top-2048)."""
    from transformers import DeepseekV32Config

    return DeepseekV32Config()


def deepseek_v4_flash():
    """DeepSeek-V4-Flash (284B total, 13B activated): ``DeepseekV4Config()``'s sizes, the released layer schedule."""
    from transformers import DeepseekV4Config

    return DeepseekV4Config(compress_ratios=V4_FLASH_COMPRESS_RATIOS)


def deepseek_v4_pro():
    """DeepSeek-V4-Pro (1.6T total, 49B activated): the released ``config.json`` (see the module docstring)."""
    from transformers import DeepseekV4Config

    return DeepseekV4Config(hidden_size=7168, moe_intermediate_size=3072, num_hidden_layers=61,
                            num_attention_heads=128, q_lora_rank=1536, n_routed_experts=384, routed_scaling_factor=2.5,
                            o_groups=16, index_topk=1024, compress_ratios=V4_PRO_COMPRESS_RATIOS)


MODELS = {"DeepSeek-V3": deepseek_v3, "DeepSeek-V3.2": deepseek_v32, "DeepSeek-V4-Flash": deepseek_v4_flash,
          "DeepSeek-V4-Pro": deepseek_v4_pro}


def parameter_count(config: Any) -> ParamCount:
    """Total and activated parameters of the ``transformers`` model ``config`` describes, built on the meta device.

    Activated: everything but the routed experts, plus ``k / E`` of those (:func:`helpers.accounting.count_parameters`).
    """
    return count_parameters(meta_model(config), config)


@cache
def _cached_count(name: str) -> ParamCount:
    return parameter_count(MODELS[name]())


def layer_kinds(config: Any) -> list[str]:
    """Each layer's attention: ``"mla"`` (V3), ``"dsa"`` (V3.2), or V4's ``layer_types`` entry."""
    if config.model_type == "deepseek_v4":
        return list(config.layer_types)
    if config.model_type == "deepseek_v32":
        return ["dsa"] * config.num_hidden_layers
    if config.model_type == "deepseek_v3":
        return ["mla"] * config.num_hidden_layers
    raise ValueError(f"config must be a DeepSeek-V3, V3.2 or V4 config, got model_type={config.model_type!r}")


def _v4_entry_bytes(config: Any, b: dict[str, float]) -> float:
    rope = config.qk_rope_head_dim
    return (config.head_dim - rope) * b["v4_nope"] + rope * b["v4_rope"]


def layer_cache_bytes(config: Any, kind: str, context: int, storage: str = "report") -> float:
    """Bytes one layer of kind ``kind`` caches for a sequence of ``context`` tokens (module docstring's rules)."""
    require_positive(context=context)
    require_choice("storage", storage, STORAGE)
    b, s = STORAGE[storage], context
    if kind in ("mla", "dsa"):
        latent = s * (config.kv_lora_rank + config.qk_rope_head_dim) * b["latent"]
        if kind == "mla":
            return latent
        d_i = config.index_head_dim
        return latent + s * (d_i * b["index"] + d_i * b["index_scale"])
    entry = _v4_entry_bytes(config, b)
    window = min(s, config.sliding_window) * entry
    if kind == "sliding_attention":
        return window
    m = config.compress_rates[kind]
    compressed = s // m
    if kind == "heavily_compressed_attention":
        return window + compressed * entry
    return window + compressed * (entry + config.index_head_dim * b["v4_index"])


def kv_cache_bytes(config: Any, context: int, storage: str = "report") -> float:
    """Bytes of one sequence's KV cache of ``context`` tokens, all layers (MTP excluded)."""
    return sum(layer_cache_bytes(config, kind, context, storage) for kind in layer_kinds(config))


def layer_attention_flops(config: Any, kind: str, context: int) -> float:
    """Attention FLOPs of one layer for the token at position ``context`` (module docstring's rules)."""
    require_positive(context=context)
    s, n_h = context, config.num_attention_heads
    if kind in ("mla", "dsa"):
        d_c, d_r = config.kv_lora_rank, config.qk_rope_head_dim
        per_entry = 2 * n_h * (d_c + d_r) + 2 * n_h * d_c
        if kind == "mla":
            return s * per_entry
        indexer = s * (2 * config.index_n_heads * config.index_head_dim + 2 * config.index_n_heads)
        return indexer + min(config.index_topk, s) * per_entry
    per_entry = 4 * n_h * config.head_dim  # scores and weighted sum, keys = values of width c
    window = min(s, config.sliding_window)
    if kind == "sliding_attention":
        return window * per_entry
    compressed = s // config.compress_rates[kind]
    if kind == "heavily_compressed_attention":
        return (window + compressed) * per_entry
    indexer = compressed * (2 * config.index_n_heads * config.index_head_dim + 2 * config.index_n_heads)
    return indexer + (window + min(config.index_topk, compressed)) * per_entry


def attention_flops(config: Any, context: int) -> float:
    """Attention FLOPs of one decoded token at position ``context``, all layers."""
    return sum(layer_attention_flops(config, kind, context) for kind in layer_kinds(config))


def token_cost(name: str, context: int, storage: str = "report") -> dict[str, float]:
    """One model's row at one context: KV bytes per token (the sequence's cache over ``context``), attention
    FLOPs and total FLOPs (attention + ``2 x`` the activated parameters but the embedding) of one decoded token.

    Args:
        name: a key of :data:`MODELS`. context: ``S``. storage: a key of :data:`STORAGE`.
    """
    require_choice("name", name, MODELS)
    config = MODELS[name]()
    params = _cached_count(name)
    dense = 2 * (params.activated - config.vocab_size * config.hidden_size)
    attn = attention_flops(config, context)
    return dict(kv_bytes_per_token=kv_cache_bytes(config, context, storage) / context, attention_flops=attn,
                total_flops=attn + dense, total_params=params.total, activated_params=params.activated)
