"""Counting what a model costs: parameters (total and activated per token) and KV-cache bytes.

Parameters are counted from a real ``transformers`` model built on the meta device (shapes, no
memory), so the numbers are exactly those of the published architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from helpers.rules import require_positive

BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


@dataclass(frozen=True)
class ParamCount:
    """Total parameters, and those a single token passes through (routed experts count k/E)."""

    total: int
    activated: int


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The causal-LM ``transformers`` model for ``config`` on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def routed_fraction(config: PretrainedConfig) -> float:
    """Fraction of the routed experts one token activates: ``num_experts_per_tok / n_routed_experts``."""
    n_experts = getattr(config, "n_routed_experts", None) or getattr(config, "num_local_experts", None)
    if not n_experts:
        return 1.0
    return config.num_experts_per_tok / n_experts


def count_parameters(model: nn.Module, config: PretrainedConfig | None = None) -> ParamCount:
    """Count ``model``'s parameters; with ``config``, also those activated per token.

    Routed-expert weights are the parameters under a ``.experts.`` module (the fused
    ``experts.gate_up_proj (E, 2I, H)`` and ``experts.down_proj (E, H, I)`` in ``transformers``); a token
    uses ``k / E`` of them. Shared experts, attention, norms, embeddings and the output head are
    all activated. Tied weights are counted once.
    """
    fraction = 1.0 if config is None else routed_fraction(config)
    total, activated, seen = 0, 0.0, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        key = (p.data_ptr() if p.device.type != "meta" else id(p))
        if key in seen:
            continue
        seen.add(key)
        total += p.numel()
        activated += p.numel() * (fraction if ".experts." in f".{name}" and "shared" not in name else 1.0)
    return ParamCount(total=total, activated=round(activated))


def kv_cache_elements(kind: str, *, n_heads: int = 0, head_dim: int = 0, n_kv_heads: int = 0,
                      kv_lora_rank: int = 0, qk_rope_head_dim: int = 0) -> int:
    """Elements cached per token per layer (DeepSeek-V2 paper, Table 1).

    ``head_dim`` is Table 1's ``d_h``: for a "same-size" MHA or GQA variant of a DeepSeek model, its
    ``qk_nope_head_dim`` (128 for V2/V3). Multiply by layers, tokens and bytes per element with
    :func:`kv_cache_bytes` (notebook 24's exercise writes the whole computation from a config).

    - ``"MHA"``: keys and values for every head, ``2 n_h d_h``;
    - ``"GQA"``: for ``n_kv_heads`` groups, ``2 n_g d_h``;
    - ``"MQA"``: one shared head, ``2 d_h``;
    - ``"MLA"``: the latent and the shared RoPE key, ``d_c + d_h^R``.
    """
    if kind == "MHA":
        require_positive(n_heads=n_heads, head_dim=head_dim)
        return 2 * n_heads * head_dim
    if kind == "GQA":
        require_positive(n_kv_heads=n_kv_heads, head_dim=head_dim)
        return 2 * n_kv_heads * head_dim
    if kind == "MQA":
        require_positive(head_dim=head_dim)
        return 2 * head_dim
    if kind == "MLA":
        require_positive(kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim)
        return kv_lora_rank + qk_rope_head_dim
    raise ValueError(f"kind must be one of 'MHA', 'GQA', 'MQA', 'MLA', got {kind!r}")


def kv_cache_elements_of(config: PretrainedConfig) -> int:
    """Per-token, per-layer cache elements of the attention ``config`` describes (MLA, GQA or MHA)."""
    if getattr(config, "kv_lora_rank", None):
        return kv_cache_elements("MLA", kv_lora_rank=config.kv_lora_rank, qk_rope_head_dim=config.qk_rope_head_dim)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_kv = config.num_key_value_heads
    if n_kv == config.num_attention_heads:
        return kv_cache_elements("MHA", n_heads=n_kv, head_dim=head_dim)
    return kv_cache_elements("GQA", n_kv_heads=n_kv, head_dim=head_dim)


def kv_cache_bytes(elements_per_token_layer: int, *, n_layers: int, tokens: int = 1, dtype: str = "bf16") -> int:
    """Total cache bytes for ``tokens`` tokens over ``n_layers`` layers at ``dtype`` (a key of :data:`BYTES_PER_ELEMENT`).

    Example: DeepSeek-V3's MLA cache of one 128K-token sequence in bf16,
    ``kv_cache_bytes(576, n_layers=61, tokens=131072, dtype="bf16")`` = 9,210,691,584 bytes (8.58 GiB).
    """
    if dtype not in BYTES_PER_ELEMENT:
        raise ValueError(f"dtype must be one of {sorted(BYTES_PER_ELEMENT)}, got {dtype!r}")
    require_positive(elements_per_token_layer=elements_per_token_layer, n_layers=n_layers, tokens=tokens)
    return elements_per_token_layer * n_layers * tokens * BYTES_PER_ELEMENT[dtype]
