"""Rotary position embeddings (RoPE) in both pair layouts, and YaRN, DeepSeek's long-context RoPE.

Shared by MLA's decoupled RoPE key and query, the MHA/GQA baselines and the sparse attention indexer.
``interleave=True`` rotates pairs ``(x0, x1), (x2, x3), ...`` (DeepSeek's checkpoints); ``interleave=False``
rotates ``(x_i, x_{i+d/2})`` (the half-split layout). :class:`YaRN` (DeepSeek-V3 §4.3) changes the
frequencies and the attention temperature so that a model trained on ``L`` positions reads ``s L``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from helpers.rules import (
    check_rope_parameters,
    check_yarn_fields,
    require_bool,
    require_number,
    require_positive,
    rope_type_of,
)


def rope_cos_sin(positions: Tensor, dim: int, base: float = 10000.0,
                 yarn: YaRN | None = None) -> tuple[Tensor, Tensor]:
    """Per-pair RoPE angles ``theta_{p,m} = p / base^{2m/dim}`` (RoFormer eq. 15) as cosines and sines.

    Args:
        positions: ``[T]`` absolute positions (integers).
        dim: the rotated width ``d_h^R``; must be even (RoPE rotates pairs).
        base: ``rope_theta``.
        yarn: YaRN settings (:class:`YaRN`): the frequencies become :meth:`YaRN.inv_freq` and cos, sin are
            multiplied by :attr:`YaRN.cos_sin_scale`; ``None`` is plain RoPE.

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
    if yarn is None:
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=positions.device) / dim))
        scale = 1.0
    else:
        inv_freq, scale = yarn.inv_freq(dim, base).to(positions.device), yarn.cos_sin_scale
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, dim/2)
    return angles.cos() * scale, angles.sin() * scale


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
    return rotate(x, cos, sin, interleave)


def rotate(x: Tensor, cos: Tensor, sin: Tensor, interleave: bool = True) -> Tensor:
    """:func:`apply_rope` without its checks: the rotation itself, for callers whose layer checked its input once
    (the MLA layer's math, the decode loop). Same arguments, same result."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (..., dim/2) each
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)  # (..., dim)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (..., dim)


def rope_at(start: int, t: int, dim: int, base: float = 10000.0, yarn: YaRN | None = None,
            device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """``cos, sin`` ``[t, dim // 2]`` of positions ``start .. start + t - 1``: rows of a table computed once.

    The same numbers as ``rope_cos_sin(torch.arange(start, start + t), dim, base, yarn)`` (each entry is
    ``cos(p * theta_m)`` computed elementwise, whichever rows are asked for), without recomputing the
    frequencies and the cosines at every decode step. The table covers the next power of two of positions
    (at least 256) and is kept for each ``(dim, base, yarn, device)``; callers must not write into the result.
    """
    cos, sin = _angle_table(dim, base, yarn, torch.device("cpu") if device is None else device,
                            max(256, 1 << (start + t - 1).bit_length()))
    return cos[start: start + t], sin[start: start + t]  # (t, dim/2) each


@functools.lru_cache(maxsize=32)
def _angle_table(dim: int, base: float, yarn: YaRN | None, device: torch.device, length: int
                 ) -> tuple[Tensor, Tensor]:
    """``rope_cos_sin`` of positions ``0..length-1`` (an ordinary tensor even when first asked for under
    ``torch.inference_mode``, so training may use it later)."""
    with torch.inference_mode(False), torch.no_grad():
        return rope_cos_sin(torch.arange(length, device=device), dim, base, yarn)


@dataclass(frozen=True)
class YaRN:
    """YaRN ("Yet another RoPE extensioN", arXiv 2309.00071): RoPE stretched from ``L`` to ``s L`` positions.

    DeepSeek-V2 (§3.1.4) and V3 (§4.3, "Long Context Extension") extend their 4K pre-training context to 128K
    with YaRN on the decoupled RoPE key and query only, ``s = 40``, ``alpha = 1``, ``beta = 32``,
    ``sqrt(t) = 0.1 ln s + 1``. Two changes to plain RoPE, both as ``transformers`` computes them
    (``modeling_rope_utils._compute_yarn_parameters``, ``DeepseekV3Attention``'s ``yarn_apply_mscale``):

    1. **Frequencies** (YaRN §3.2, "NTK-by-parts"): pair ``m`` of ``d = d_h^R`` channels turns at
       ``theta_m = base^{-2m/d}``, with wavelength ``lambda_m = 2 pi / theta_m``. Over the original context it
       makes ``r_m = L / lambda_m`` turns. Pairs that turn many times (``r > beta``, the fast, high-frequency
       end) already saw every angle in training and are kept (*extrapolated*); pairs that turn less than
       ``alpha`` times (the slow end) would meet angles never seen, so their frequency is divided by ``s``
       (*interpolated*, as Position Interpolation does); in between a linear ramp blends the two:

           theta'_m = (1 - gamma_m) theta_m / s + gamma_m theta_m.

       As in YaRN's reference code (and DeepSeek's ``inference/model.py``, and ``transformers``), the ramp is
       linear in the pair index ``m``, between the (fractional) indices where ``r = beta`` and ``r = alpha``:
       ``m(r) = d ln(L / (2 pi r)) / (2 ln base)`` (:meth:`correction_range`).
    2. **Attention temperature** (YaRN §3.4): logits are divided by ``t`` with ``sqrt(1/t) = 0.1 ln s + 1``
       (:func:`yarn_get_mscale`). Plain YaRN multiplies cos and sin by ``sqrt(1/t)`` (so ``q . k`` grows by
       ``1/t``); in MLA only the RoPE part of ``q . k`` passes through cos and sin, so DeepSeek scales the
       whole softmax instead: ``softmax_scale *= mscale(s, mscale_all_dim)^2`` and cos, sin are multiplied by
       ``mscale(s, mscale) / mscale(s, mscale_all_dim)`` (``attention_factor``; 1 in V3, where both are 1).

    Fields keep ``transformers``' names (``rope_parameters`` of a ``rope_type="yarn"`` config):

    Args:
        factor: ``s``, the stretch, at least 1 (``s = 1`` is plain RoPE).
        original_max_position_embeddings: ``L``, the pre-training context.
        beta_fast: ``beta`` (32): pairs turning more than this often over ``L`` are kept.
        beta_slow: ``alpha`` (1): pairs turning less than this often over ``L`` are divided by ``s``.
        mscale: numerator of ``attention_factor`` (``None``: YaRN's own ``0.1 ln s + 1`` on cos, sin).
        mscale_all_dim: the softmax scale's ``mscale`` (``None`` or 0: the softmax scale is unchanged).
        attention_factor: multiplies cos and sin; ``None`` derives it from ``mscale``, ``mscale_all_dim``.
        truncate: round the ramp's ends outwards to whole pair indices (``floor``/``ceil``), as DeepSeek does.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        check_yarn_fields(self.rope_parameters())

    @classmethod
    def from_rope_parameters(cls, rope: dict[str, Any] | None) -> YaRN | None:
        """The YaRN settings of a config's ``rope_parameters`` (``None`` for default RoPE).

        ``ValueError`` naming the field for another ``rope_type``, a missing or bad YaRN field, or an unknown key
        (:func:`helpers.rules.check_rope_parameters`). ``beta_fast``/``beta_slow`` of ``None`` take YaRN's 32/1.
        """
        check_rope_parameters(rope)
        rope = rope or {}
        if rope_type_of(rope) == "default":
            return None
        given = {k: v for k, v in rope.items() if k in YARN_FIELDS and v is not None}
        return cls(**given)

    def rope_parameters(self) -> dict[str, Any]:
        """The ``transformers`` ``rope_parameters`` entries (``rope_type="yarn"``, all fields but ``rope_theta``)."""
        return {"rope_type": "yarn", **{f.name: getattr(self, f.name) for f in fields(self)}}

    def correction_range(self, dim: int, base: float) -> tuple[float, float]:
        """The ramp's ends ``(m_low, m_high)``: pair indices where ``r = beta`` (fast) and ``r = alpha`` (slow).

        ``m(r) = d ln(L / (2 pi r)) / (2 ln base)`` inverts ``r_m = L / lambda_m``; with ``truncate`` the ends are
        rounded outwards (``floor``, ``ceil``); both are then clipped to ``[0, d - 1]`` (``transformers`` and
        DeepSeek clip to ``d - 1``, not to the last pair index ``d/2 - 1``; kept for equality).
        """
        def index(turns: float) -> float:
            return dim * math.log(self.original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(base))

        low, high = index(self.beta_fast), index(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, dim - 1)

    def keep_weight(self, dim: int, base: float) -> Tensor:
        """``gamma_m`` for each of the ``dim / 2`` pairs: 1 keeps ``theta_m`` (extrapolation), 0 divides it by ``s``.

        ``gamma_m = 1 - clamp((m - m_low) / (m_high - m_low), 0, 1)`` (YaRN §3.2's ramp, over the pair index).
        """
        low, high = self.correction_range(dim, base)
        if low == high:
            high += 0.001  # a one-index ramp: avoid 0/0, as transformers does
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # (dim/2,)
        return 1 - ramp

    def inv_freq(self, dim: int, base: float) -> Tensor:
        """``theta'_m = (1 - gamma_m) theta_m / s + gamma_m theta_m``, ``[dim / 2]`` float32 (YaRN §3.2)."""
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)  # 1 / theta_m
        gamma = self.keep_weight(dim, base)  # (dim/2,)
        return 1.0 / (self.factor * pos_freqs) * (1 - gamma) + 1.0 / pos_freqs * gamma

    @property
    def cos_sin_scale(self) -> float:
        """What cos and sin are multiplied by (``transformers``' ``attention_factor``).

        ``mscale(s, mscale) / mscale(s, mscale_all_dim)`` when both are set (1.0 in V3), else YaRN's own
        ``sqrt(1/t) = mscale(s) = 0.1 ln s + 1``; a given ``attention_factor`` wins.
        """
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return float(yarn_get_mscale(self.factor, self.mscale) / yarn_get_mscale(self.factor, self.mscale_all_dim))
        return yarn_get_mscale(self.factor)

    def scale_softmax(self, softmax_scale: float) -> float:
        """``softmax_scale * mscale(s, mscale_all_dim)^2`` (DeepSeek's correction; unchanged without ``mscale_all_dim``).

        Squared because ``q`` and ``k`` would each carry one ``mscale`` in YaRN's form: the logits carry two.
        """
        if not self.mscale_all_dim:
            return softmax_scale
        mscale = yarn_get_mscale(self.factor, self.mscale_all_dim)
        return softmax_scale * mscale * mscale


def require_yarn(yarn: Any) -> None:
    """``TypeError`` unless ``yarn`` is a :class:`YaRN` or ``None`` (its fields were checked when it was built)."""
    if yarn is not None and not isinstance(yarn, YaRN):
        raise TypeError(f"yarn must be a helpers.mla.rope.YaRN or None, got {type(yarn).__name__}: build it with "
                        "YaRN(factor=..., original_max_position_embeddings=...) or YaRN.from_rope_parameters(...)")


YARN_FIELDS = tuple(f.name for f in fields(YaRN))
"""The ``rope_parameters`` keys a YaRN config may hold besides ``rope_type`` and ``rope_theta``."""


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """``sqrt(1/t) = 0.1 * mscale * ln(s) + 1`` for ``s > 1``, else 1 (YaRN §3.4 with ``mscale = 1``; DeepSeek-V2
    §3.1.4 uses ``0.0707 ln s + 1``, ``mscale = 0.707``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
