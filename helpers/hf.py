"""Conversions between our layers and models and ``transformers``' DeepSeek-V2/V3/V3.2/V4 ones (weights and settings).

:func:`model_from_hf`, :func:`model_to_hf`, :func:`export_pretrained` and :func:`load_pretrained` take either model
family: a ``DeepseekV3ForCausalLM``/``DeepseekV32ForCausalLM`` and our :class:`helpers.model.DeepSeekV3`
(:mod:`helpers.model.hf`), or a ``DeepseekV4ForCausalLM`` and our :class:`helpers.v4.model.DeepSeekV4`
(:mod:`helpers.v4.hf.model`).
"""

from __future__ import annotations

import json
import pathlib

import torch
from transformers import DeepseekV4ForCausalLM

from helpers.dsa.hf import dsa_from_hf, dsa_to_hf
from helpers.mla.hf import mla_from_hf, mla_to_hf
from helpers.model import hf as v3_hf
from helpers.moe.hf import moe_from_hf, moe_to_hf
from helpers.v4.hf import (
    attention_from_hf,
    attention_to_hf,
    head_from_hf,
    head_to_hf,
    hyper_from_hf,
    hyper_to_hf,
    v4_moe_from_hf,
    v4_moe_to_hf,
)
from helpers.v4.hf import model as v4_hf
from helpers.v4.model import DeepSeekV4

__all__ = ["mla_from_hf", "mla_to_hf", "moe_from_hf", "moe_to_hf", "dsa_from_hf", "dsa_to_hf",
           "attention_from_hf", "attention_to_hf", "hyper_from_hf", "hyper_to_hf", "head_from_hf", "head_to_hf",
           "v4_moe_from_hf", "v4_moe_to_hf", "model_from_hf", "model_to_hf", "export_pretrained", "load_pretrained"]


def model_from_hf(hf_model):
    """Our model with ``hf_model``'s weights: :class:`DeepSeekV4` for a ``DeepseekV4ForCausalLM``, else
    :class:`helpers.model.DeepSeekV3` (``DeepseekV3ForCausalLM`` or ``DeepseekV32ForCausalLM``)."""
    if isinstance(hf_model, DeepseekV4ForCausalLM):
        return v4_hf.v4_model_from_hf(hf_model)
    if isinstance(hf_model, tuple(v3_hf.HF_MODELS.values())):
        return v3_hf.model_from_hf(hf_model)
    raise ValueError(f"hf_model must be a DeepseekV3ForCausalLM, DeepseekV32ForCausalLM or DeepseekV4ForCausalLM, "
                     f"got {type(hf_model).__name__}")


def model_to_hf(model):
    """The ``transformers`` model equal to ours: ``DeepseekV4ForCausalLM`` for a :class:`DeepSeekV4`, else
    ``DeepseekV3ForCausalLM``/``DeepseekV32ForCausalLM`` (:func:`helpers.model.hf.model_to_hf`)."""
    return v4_hf.v4_model_to_hf(model) if isinstance(model, DeepSeekV4) else v3_hf.model_to_hf(model)


def export_pretrained(model, directory: str | pathlib.Path, tokenizer=None, metadata: dict | None = None):
    """A directory ``from_pretrained`` of the matching ``transformers`` class loads offline (see the two families'
    ``export`` functions: :func:`helpers.v4.hf.model.export_v4_pretrained`, :func:`helpers.model.hf.export_pretrained`)."""
    export = v4_hf.export_v4_pretrained if isinstance(model, DeepSeekV4) else v3_hf.export_pretrained
    return export(model, directory, tokenizer, metadata)


def load_pretrained(directory: str | pathlib.Path, dtype: torch.dtype = torch.float32):
    """Our model from an exported directory; its ``config.json``'s ``model_type`` picks the family."""
    config = pathlib.Path(directory) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "deepseek_v4":
        return v4_hf.load_v4_pretrained(directory, dtype)
    return v3_hf.load_pretrained(directory, dtype)
