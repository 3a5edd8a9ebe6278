"""DeepSeek-V4's partial RoPE: interleaved pairs on the *trailing* slice of each head (V4 report §2.3.3).

Each query, key and compressed entry is laid out ``[nope | rope]``: the last ``d_R`` channels (``qk_rope_head_dim``
``= head_dim * partial_rotary_factor``) are rotated in interleaved pairs ``(x0, x1), (x2, x3), ...``, the rest are
left alone. The angles are :func:`helpers.mla.rope.rope_cos_sin`'s; two bases are in use: ``rope_theta`` for the
sliding-window-only layers ("main") and ``compress_rope_theta`` for the layers with a compressor ("compress").

Because V4 shares keys and values (``K = V``), the values carry the rotation of their key position; the
attention output's RoPE slice is rotated back by the *query* position (:func:`rotate_trailing` with ``-sin``), so
each value's contribution depends only on the distance to the query (see :mod:`helpers.v4.attention`).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from helpers.mla.rope import apply_rope, rope_at, rope_cos_sin

__all__ = ["rope_cos_sin", "rotate_trailing", "rope_phase", "rotate_trailing_by"]


def rotate_trailing(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the last ``2 * cos.shape[-1]`` channels of ``x`` in interleaved pairs; keep the leading ones.

    The rotation is computed in fp32 and returned in ``x``'s dtype, as ``transformers``' V4
    ``apply_rotary_pos_emb`` does. Pass ``-sin`` to rotate back (the inverse rotation of the output).

    Args:
        x: ``(..., T, d)``, or ``(B, T, heads, d)`` with ``cos[:, None]``, ``sin[:, None]``.
        cos, sin: ``(T, d_R / 2)`` from :func:`rope_cos_sin` (broadcast right-aligned, see
            :func:`helpers.mla.rope.apply_rope`).

    Returns:
        ``x`` with its trailing ``d_R`` channels rotated, same shape and dtype.
    """
    rope_dim = 2 * cos.shape[-1]
    nope, rope = x[..., : x.shape[-1] - rope_dim], x[..., x.shape[-1] - rope_dim:]
    rotated = apply_rope(rope.float(), cos.float(), sin.float(), interleave=True).to(x.dtype)  # (..., d_R)
    return torch.cat([nope, rotated], dim=-1)  # (..., d)


@functools.lru_cache(maxsize=64)
def _phase_table(dim: int, base: float, device: torch.device, length: int) -> Tensor:
    """``cos + i sin`` of positions ``0..length-1``, ``(length, dim / 2)`` complex64: the complex form of
    :func:`helpers.mla.rope.rope_at`'s table (the same angles, computed once there)."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.complex(*rope_at(0, length, dim, base, device=device))


def rope_phase(position: int, dim: int, base: float, device: torch.device) -> Tensor:
    """The unit complex numbers ``e^{i p theta_m}`` of one position, ``(dim / 2,)``: a row of a table computed once
    per power of two of positions (the decode step's RoPE without recomputing the angles). Do not write into it."""
    return _phase_table(dim, base, device, max(256, 1 << position.bit_length()))[position]


def rotate_trailing_by(x: Tensor, phase: Tensor) -> Tensor:
    """:func:`rotate_trailing` by ``phase`` (:func:`rope_phase`; its ``.conj()`` rotates back), in complex form:
    each interleaved pair ``(x_{2m}, x_{2m+1})`` is the complex number ``x_{2m} + i x_{2m+1}`` times
    ``e^{i p theta_m}``, the same rotation in fewer kernels. No checks: the decode step's inner loop.

    Args:
        x: ``(..., d)`` with ``d >= 2 * phase.shape[-1]``; phase: ``(d_R / 2,)``, broadcast over the leading axes.
    """
    rope_dim = 2 * phase.shape[-1]
    pairs = torch.view_as_complex(x[..., x.shape[-1] - rope_dim:].float().unflatten(-1, (-1, 2)))  # (..., d_R / 2)
    rotated = torch.view_as_real(pairs * phase).flatten(-2).to(x.dtype)  # (..., d_R)
    return torch.cat([x[..., : x.shape[-1] - rope_dim], rotated], dim=-1)  # (..., d)
