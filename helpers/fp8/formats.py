"""FP8 formats and fine-grained scaling: the grids, block quantisation, and its inverse (DeepSeek-V3 §3.3.2).

An FP8 number has 8 bits: a sign, ``E`` exponent bits and ``M`` mantissa bits. ``e4m3fn`` (E4M3: 448 at most,
3 mantissa bits) and ``e5m2`` (E5M2: 57344 at most, 2 mantissa bits) are both stored by ``torch``; a CPU can
cast to them and back, and every product here is computed after casting back to fp32 (a simulation).

Fine-grained quantisation (V3 §3.3.2, Figure 7a): ``x`` is cut into blocks and every block gets its own scale
``s = amax(|block|) / 448``, so ``x / s`` fills the format's range and one outlier only coarsens its own block.
Activations use ``1 x 128`` tiles (one token, 128 channels), weights ``128 x 128`` blocks. DeepSeek-V3.1 and
later round ``s`` up to a power of two (a UE8M0 scale: exponent only), so scaling is an exact exponent shift.

==================  =======================================================================================
name                what it is
==================  =======================================================================================
:data:`FORMATS`     the three narrow formats compared: ``e4m3``, ``e5m2`` and ``bf16`` (largest value, bits)
:func:`grid`        every finite non-negative value of a format, in order (the picture of notebook 33)
:func:`quantize`    ``x (R, C) -> (q, scale)``: ``q`` in ``float8_e4m3fn``, one fp32 scale per block
:func:`dequantize`  ``q.float() * scale`` expanded over the blocks
:func:`fake_quantize`  quantise then dequantise, any shape, ragged last blocks allowed (the training GEMMs)
==================  =======================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

AMAX_FLOOR = 1e-12
"""The smallest block maximum a scale is computed from: an all-zero block gets ``1e-12 / 448``, positive and finite
(DeepGEMM clamps at ``1e-4``; we go lower so tiny gradients keep their digits)."""


@dataclass(frozen=True)
class Format:
    """A floating-point format: its ``torch`` dtype, exponent and explicit mantissa bits, largest finite value."""

    name: str
    dtype: torch.dtype
    exponent_bits: int
    mantissa_bits: int

    @property
    def max(self) -> float:
        """The largest finite value (448 for e4m3fn, 57344 for e5m2)."""
        return float(torch.finfo(self.dtype).max)

    @property
    def relative_step(self) -> float:
        """The spacing of neighbouring normal values relative to their size, ``2^-M``."""
        return 2.0 ** -self.mantissa_bits


FORMATS: dict[str, Format] = {
    "e4m3": Format("e4m3", torch.float8_e4m3fn, 4, 3),
    "e5m2": Format("e5m2", torch.float8_e5m2, 5, 2),
    "bf16": Format("bf16", torch.bfloat16, 8, 7),
}
E4M3_MAX = FORMATS["e4m3"].max


def grid(fmt: Format) -> Tensor:
    """Every finite non-negative value of ``fmt`` in increasing order (float64): all bit patterns, cast back."""
    codes = torch.arange(2 ** (8 * fmt.dtype.itemsize - 1))  # every bit pattern with the sign bit 0
    values = codes.to(torch.uint8 if fmt.dtype.itemsize == 1 else torch.int16).view(fmt.dtype).double()
    return values[torch.isfinite(values)].unique()  # sorted


def _check_blocks(shape: tuple[int, ...], block_shape: tuple[int, int]) -> None:
    if len(shape) != 2:
        raise ValueError(f"x must be 2-D (R, C), got shape {tuple(shape)}: reshape it, e.g. x.reshape(-1, x.shape[-1])")
    if len(block_shape) != 2 or any(not isinstance(b, int) or isinstance(b, bool) or b <= 0 for b in block_shape):
        raise ValueError(f"block_shape must be two positive integers (r, c), got {block_shape!r}")
    if shape[0] % block_shape[0] or shape[1] % block_shape[1]:
        raise ValueError(f"block_shape {tuple(block_shape)} does not divide the tensor's shape {tuple(shape)}: "
                         f"each side must be a multiple of the block's (pad the tensor, or pick blocks that divide it)")


def block_amax(x: Tensor, block_shape: tuple[int, int]) -> Tensor:
    """``max |x|`` over each ``(r, c)`` block of ``x (R, C)``: ``(R // r, C // c)``."""
    return blocks(x, block_shape).abs().amax(dim=(1, 3))  # (R/r, C/c)


def blocks(x: Tensor, block_shape: tuple[int, int]) -> Tensor:
    """``x (R, C)`` viewed as ``(R // r, r, C // c, c)``: block ``(i, j)`` is ``[i, :, j, :]`` (no copy)."""
    (rows, cols), (r, c) = x.shape, block_shape
    return x.reshape(rows // r, r, cols // c, c)


def quantize(x: Tensor, block_shape: tuple[int, int], *, ue8m0: bool = False,
             dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[Tensor, Tensor]:
    """Block-wise FP8 quantisation with one scale per block (V3 §3.3.2, "fine-grained quantization").

    ``s_b = amax_b / fp8_max`` (``amax`` floored at :data:`AMAX_FLOOR`, so an all-zero block gets a positive,
    finite scale), then ``q = clamp(x / s_b, -fp8_max, fp8_max)`` rounded to the nearest FP8 value. With
    ``ue8m0`` the scale is rounded *up* to a power of two (V3.1's UE8M0 scales): ``x / s`` still fits the range.

    Args:
        x: ``(R, C)`` floating tensor.
        block_shape: ``(r, c)`` dividing ``(R, C)``: ``(1, 128)`` for activations, ``(128, 128)`` for weights,
            ``x.shape`` for one scale per tensor.
        ue8m0: power-of-two scales.
        dtype: ``torch.float8_e4m3fn`` (V3 uses it for every tensor) or ``torch.float8_e5m2``.

    Returns:
        ``q (R, C)`` in ``dtype`` and ``scale (R // r, C // c)`` in float32, with ``x ~ q.float() * scale``
        (expanded over the blocks). Error bound: ``|x - q s| <= 2^-4 |x|`` for e4m3 where ``|x / s| >= 2^-6``
        (normal range); below that the absolute error is at most ``2^-10 s`` (half the subnormal step).

    Raises:
        ValueError: ``x`` is not 2-D, or ``block_shape`` does not divide its shape (the message names both).
    """
    block_shape = tuple(block_shape)
    _check_blocks(tuple(x.shape), block_shape)
    fp8_max = float(torch.finfo(dtype).max)
    x = x.float()
    scale = block_amax(x, block_shape).clamp(min=AMAX_FLOOR) / fp8_max  # (R/r, C/c)
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))  # round up: x / s <= fp8_max still
    q = (blocks(x, block_shape) / scale[:, None, :, None]).clamp_(-fp8_max, fp8_max).to(dtype)  # (R/r, r, C/c, c)
    return q.reshape(x.shape), scale


def dequantize(q: Tensor, scale: Tensor, block_shape: tuple[int, int]) -> Tensor:
    """``q.float() * scale`` over the blocks: ``q (R, C)`` FP8, ``scale (R // r, C // c)`` -> float32 ``(R, C)``."""
    block_shape = tuple(block_shape)
    _check_blocks(tuple(q.shape), block_shape)
    want = (q.shape[0] // block_shape[0], q.shape[1] // block_shape[1])
    if tuple(scale.shape) != want:
        raise ValueError(f"scale has shape {tuple(scale.shape)} but q {tuple(q.shape)} in blocks {block_shape} "
                         f"needs {want}: one scale per block")
    return (blocks(q.float(), block_shape) * scale.float()[:, None, :, None]).reshape(q.shape)


def fake_quantize(x: Tensor, block_shape: tuple[int, int], *, ue8m0: bool = False,
                  dtype: torch.dtype = torch.float8_e4m3fn) -> Tensor:
    """``dequantize(quantize(x))`` for a 2-D ``x`` of any size: the values an FP8 GEMM actually multiplies.

    A side that the block does not divide is padded with zeros to the next multiple (the last block is then
    ragged: zeros change no maximum), so a tiny model's 96-wide rows take 32-wide tiles as they come.
    Returns float32 of ``x``'s shape.
    """
    rows, cols = x.shape
    r, c = block_shape
    padded = F.pad(x, (0, -cols % c, 0, -rows % r)) if rows % r or cols % c else x  # (R', C'), multiples of b
    q, scale = quantize(padded, (r, c), ue8m0=ue8m0, dtype=dtype)
    return dequantize(q, scale, (r, c))[:rows, :cols]
