"""Conversions between our layers and `transformers` DeepSeek-V2/V3 modules (weights and settings)."""
from helpers.mla.hf import mla_from_hf, mla_to_hf
from helpers.moe.hf import moe_from_hf, moe_to_hf

__all__ = ["mla_from_hf", "mla_to_hf", "moe_from_hf", "moe_to_hf"]
