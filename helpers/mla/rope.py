"""Rotary position embeddings (RoPE) in both pair layouts: cos/sin tables and the rotation.

Shared by MLA's decoupled RoPE key and query, the MHA/GQA baselines and (later) the sparse
attention indexer. ``interleave=True`` rotates pairs ``(x0, x1), (x2, x3), ...`` (DeepSeek's
checkpoints); ``interleave=False`` rotates ``(x_i, x_{i+d/2})`` (the half-split layout).
"""

from __future__ import annotations

import torch
from torch import Tensor

from helpers.rules import require_bool, require_number, require_positive


def rope_cos_sin(positions: Tensor, dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Per-pair RoPE angles ``theta_{p,m} = p / base^{2m/dim}`` (RoFormer eq. 15) as cosines and sines.

    Args:
        positions: ``[T]`` absolute positions (integers).
        dim: the rotated width ``d_h^R``; must be even (RoPE rotates pairs).
        base: ``rope_theta``.

    Returns:
        ``cos, sin``, each ``[T, dim // 2]`` float32: one angle per pair, computed as ``transformers`` does.
    """
    if not isinstance(positions, Tensor) or positions.dim() != 1 or positions.dtype.is_complex or positions.dtype == torch.bool:
        got = f"shape {tuple(positions.shape)} {positions.dtype}" if isinstance(positions, Tensor) else type(positions).__name__
        raise TypeError(f"positions must be a 1-D tensor of token positions, e.g. torch.arange(start, start + T), "
                        f"got {got}")
    require_positive(dim=dim)
    if dim % 2:
        raise ValueError(f"dim must be even (RoPE rotates pairs of channels), got {dim}")
    require_number("base (rope_theta)", base, positive=True)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=positions.device) / dim))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleave: bool = True) -> Tensor:
    """Rotate each pair of channels of ``x`` by its angle (RoPE; V2 paper eq. 11 and 13 use it on ``q^R``, ``k^R``).

    Broadcasting: ``cos``/``sin`` (``[T, dim/2]`` from :func:`rope_cos_sin`) are broadcast right-aligned
    against the pair axis of ``x``, so the token axis must be the second-to-last dimension of ``x``
    (``x [..., T, dim]``). For ``x (B, T, heads, dim)`` pass ``cos[:, None]`` and ``sin[:, None]``
    (``[T, 1, dim/2]``).

    Args:
        x: ``[..., dim]`` with ``dim == 2 * cos.shape[-1]``.
        interleave: ``True``: pairs are ``(x0, x1), (x2, x3), ...`` (DeepSeek's official layout, ``transformers``
            ``rope_interleave=True``, and DeepSeek-V2's complex-number RoPE); the output keeps that pair
            layout. ``False``: pairs are ``(x_i, x_{i + dim/2})`` (``rotate_half``, as in Llama).

    Returns:
        The rotated tensor, same shape and dtype as ``x``.
    """
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__} (cos, sin come from rope_cos_sin)")
    require_bool(interleave=interleave)
    dim = x.shape[-1]
    if dim != 2 * cos.shape[-1] or cos.shape != sin.shape:
        raise ValueError(f"x's last dimension ({dim}) must be twice that of cos and sin "
                         f"({tuple(cos.shape)}, {tuple(sin.shape)})")
    pairs = (*x.shape[:-1], dim // 2)  # the shape each rotated half of x has
    if cos.dim() > len(pairs) or any(c not in (1, p) for c, p in zip(reversed(cos.shape), reversed(pairs))):
        raise ValueError(f"cos and sin {tuple(cos.shape)} do not broadcast over x {tuple(x.shape)} with the token "
                         "axis second to last: for x (B, T, heads, dim) pass cos[:, None] and sin[:, None]")
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (..., dim/2) each
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)  # (..., dim)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (..., dim)
