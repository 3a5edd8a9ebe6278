"""Conversions to and from transformers refuse the wrong object with the fix (issue 12)."""

from __future__ import annotations

import pytest
import torch

from helpers.configs import tiny_config
from helpers.dsa.hf import dsa_from_hf, dsa_to_hf
from helpers.mla.hf import mla_from_hf, mla_to_hf
from helpers.model.hf import model_from_hf, model_to_hf
from helpers.moe import DeepSeekMoE
from helpers.moe.hf import moe_from_hf, moe_to_hf

LINEAR = torch.nn.Linear(2, 2)

BAD = [
    ("moe_from_hf: a Linear", lambda: moe_from_hf(LINEAR), TypeError, ["DeepseekV3MoE", "Linear", "layers[1].mlp"]),
    ("moe_to_hf: a Linear", lambda: moe_to_hf(LINEAR), TypeError, ["DeepSeekMoE", "Linear", "moe_from_hf"]),
    ("moe_to_hf: a transformers config that disagrees", lambda: moe_to_hf(
        DeepSeekMoE(64, 32, 8, 2, scoring_func="softmax"), tiny_config()), ValueError, []),
    ("mla_from_hf: a Linear", lambda: mla_from_hf(LINEAR), ValueError, ["DeepseekV3Attention", "self_attn"]),
    ("mla_to_hf: a Linear", lambda: mla_to_hf(LINEAR), TypeError, ["MultiHeadLatentAttention", "mla_from_hf"]),
    ("dsa_from_hf: a Linear", lambda: dsa_from_hf(LINEAR), ValueError, ["DeepseekV32Attention", "self_attn"]),
    ("dsa_to_hf: a Linear", lambda: dsa_to_hf(LINEAR), ValueError, ["SparseLatentAttention"]),
    ("model_from_hf: a Linear", lambda: model_from_hf(LINEAR), ValueError, ["DeepseekV3ForCausalLM"]),
    ("model_to_hf: a Linear", lambda: model_to_hf(LINEAR), TypeError, ["DeepSeekV3", "model_from_hf"]),
]


@pytest.mark.parametrize(("what", "call", "exc", "words"), BAD, ids=[r[0] for r in BAD])
def test_conversions_refuse_the_wrong_object(what, call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"
