"""DeepSeek-V4's RMS norms, computed in fp32 (V4 report §2.3.3, "Query and KV entry normalisation").

:class:`V4RMSNorm` differs from :class:`helpers.precision.RMSNorm` in one place: V4 keeps its norm weights in fp32
and multiplies by them *before* casting back (``transformers``' ``DeepseekV4RMSNorm``), so in bf16 the two round
differently. :func:`unweighted_rms_norm` is the per-head query norm (no weight).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from helpers.precision import compute_dtype


def unweighted_rms_norm(x: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last axis, the statistic in fp32, the result in ``x``'s dtype."""
    return x * torch.rsqrt(x.to(compute_dtype(x.dtype)).square().mean(-1, keepdim=True) + eps).to(x.dtype)


class V4RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, all in fp32, cast to ``x``'s dtype at the end."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., width) -> (..., width)`` in ``x``'s dtype."""
        h = x.to(compute_dtype(x.dtype))
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)  # (..., width), fp32
        return (self.weight.to(h.dtype) * h).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
