"""DeepSeek-V4's RMS norms, computed in fp32 (V4 report §2.3.3, "Query and KV entry normalisation").

:class:`V4RMSNorm` differs from :class:`helpers.precision.RMSNorm` in one place: V4 keeps its norm weights in fp32
and multiplies by them *before* casting back (``transformers``' ``DeepseekV4RMSNorm``), so in bf16 the two round
differently. :func:`unweighted_rms_norm` is the per-head query norm (no weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers.precision import compute_dtype


def unweighted_rms_norm(x: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last axis, the statistic in fp32, the result in ``x``'s dtype.

    In fp32 this is one fused kernel (``F.rms_norm``, the same numbers); in a lower precision the statistic is
    taken in fp32 and the multiplication done in ``x``'s dtype, as ``transformers``' ``UnweightedRMSNorm`` does."""
    if x.dtype == compute_dtype(x.dtype):
        return F.rms_norm(x, (x.shape[-1],), None, eps)
    return x * torch.rsqrt(x.to(compute_dtype(x.dtype)).square().mean(-1, keepdim=True) + eps).to(x.dtype)


class V4RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, all in fp32, cast to ``x``'s dtype at the end."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., width) -> (..., width)`` in ``x``'s dtype (one fused ``F.rms_norm`` on the fp32 copy)."""
        dtype = compute_dtype(x.dtype)
        return F.rms_norm(x.to(dtype), (x.shape[-1],), self.weight.to(dtype), self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
