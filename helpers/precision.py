"""The dtype policy, in one place: what runs in fp32 whatever the model's dtype, and why.

A model in bf16 keeps its weights, activations and caches in bf16. Three computations are upcast, as in
``transformers`` (``DeepseekV3RMSNorm``, ``DeepseekV3TopkRouter``, ``eager_attention_forward``) and in DeepSeek's
``inference/model.py``:

==================  ====================================================================================
computation         why fp32
==================  ====================================================================================
the router          ``s = sigmoid(u^T e)`` and its top-k: bf16 keeps 8 bits of mantissa, so nearby scores tie
                    and a token's experts would depend on rounding (:func:`compute_dtype`)
the norms           ``mean(x^2)`` sums ``H`` squares: in bf16 the sum loses the small ones (:class:`RMSNorm`)
attention softmax   ``exp`` of scores that differ by less than bf16's spacing would be equal (:func:`softmax`)
==================  ====================================================================================

Each returns to the input's dtype afterwards, so the next matrix product runs in the model's dtype.
float64 stays float64 (the gradient checks run in it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the router, the norms and the softmax compute in: at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def softmax(scores: Tensor, dim: int = -1) -> Tensor:
    """``softmax(scores)`` computed in at least fp32, returned in ``scores``' dtype (as ``transformers``' eager
    attention: ``softmax(..., dtype=torch.float32).to(query.dtype)``)."""
    return torch.softmax(scores, dim=dim, dtype=compute_dtype(scores.dtype)).to(scores.dtype)


class RMSNorm(nn.RMSNorm):
    """``weight * (x / sqrt(mean(x^2) + eps))`` with the normalisation in fp32 (``DeepseekV3RMSNorm``'s order).

    Same parameter (``weight``) and same numbers as ``nn.RMSNorm`` in fp32; in bf16 the mean of squares and the
    reciprocal square root run in fp32, the result is cast back to the input's dtype, then scaled by ``weight``.
    """

    def __init__(self, width: int, eps: float) -> None:
        super().__init__(width, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., width) -> (..., width)`` in ``x``'s dtype."""
        normed = F.rms_norm(x.to(compute_dtype(x.dtype)), self.normalized_shape, eps=self.eps)  # (..., width)
        return self.weight * normed.to(x.dtype)
