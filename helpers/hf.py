"""Conversions between our layers and `transformers` DeepSeek-V2/V3/V3.2 modules (weights and settings)."""
from helpers.dsa.hf import dsa_from_hf, dsa_to_hf
from helpers.mla.hf import mla_from_hf, mla_to_hf
from helpers.model.hf import export_pretrained, load_pretrained, model_from_hf, model_to_hf
from helpers.moe.hf import moe_from_hf, moe_to_hf

__all__ = ["mla_from_hf", "mla_to_hf", "moe_from_hf", "moe_to_hf", "dsa_from_hf", "dsa_to_hf",
           "model_from_hf", "model_to_hf", "export_pretrained", "load_pretrained"]
