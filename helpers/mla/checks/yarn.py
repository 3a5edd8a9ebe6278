"""Checkers of notebook 26's exercises: YaRN's frequencies and DeepSeek's softmax-scale correction.

- :data:`check_yarn_inv_freq` -- ``yarn_inv_freq(dim, base, factor, original_max_position_embeddings, beta_fast,
  beta_slow) -> theta' [dim/2]``: the stretched RoPE frequencies (YaRN §3.2; DeepSeek-V3 §4.3);
- :data:`check_yarn_softmax_scale` -- ``yarn_softmax_scale(qk_nope_head_dim, qk_rope_head_dim, factor,
  mscale_all_dim) -> float``: ``1 / sqrt(d_h + d_h^R)`` times ``mscale^2`` (DeepSeek's YaRN temperature).

The references are :class:`helpers.mla.rope.YaRN`'s own methods; each known mistake is the reference with one
switch flipped (:func:`_inv_freq_with`, :func:`_scale_with`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from helpers.mla.rope import YaRN
from helpers.teaching.checks import Case, Checker, Mistake

# ---------------------------------------------------------------------------------------------------
# yarn_inv_freq: theta'_m = (1 - gamma_m) theta_m / s + gamma_m theta_m, gamma from the ramp over pair indices.
# ---------------------------------------------------------------------------------------------------


def reference_yarn_inv_freq(dim: int, base: float, factor: float, original_max_position_embeddings: int,
                            beta_fast: float, beta_slow: float) -> Tensor:
    """``[dim/2]`` YaRN frequencies, as :meth:`helpers.mla.rope.YaRN.inv_freq` (and ``transformers``) give them."""
    yarn = YaRN(factor=factor, original_max_position_embeddings=original_max_position_embeddings,
                beta_fast=beta_fast, beta_slow=beta_slow)
    return yarn.inv_freq(dim, base)


def _inv_freq_cases() -> list[Case]:
    # Each case has pairs below the ramp, on it and above it, and fractional ends (so rounding shows).
    return [
        Case("DeepSeek-V3: d=64, base 10^4, s=40, L=4096, beta 32/1 (ramp over pairs 10..23)",
             dict(dim=64, base=10000.0, factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                  beta_slow=1.0)),
        Case("d=32, base 500, s=8, L=256, beta 16/2 (ramp over pairs 2..8)",
             dict(dim=32, base=500.0, factor=8.0, original_max_position_embeddings=256, beta_fast=16.0,
                  beta_slow=2.0)),
        Case("d=24, base 10^4, s=4, L=2048, beta 32/1",
             dict(dim=24, base=10000.0, factor=4.0, original_max_position_embeddings=2048, beta_fast=32.0,
                  beta_slow=1.0)),
    ]


def _inv_freq_with(dim, base, factor, original_max_position_embeddings, beta_fast, beta_slow, *, swap=False,
                   clamp=True, keep_slow=False, rounding=True, ramp=True, stretch="divide", context="original"):
    """The reference with switches; the defaults are right and each known mistake flips one."""
    fast, slow = (beta_slow, beta_fast) if swap else (beta_fast, beta_slow)
    length = original_max_position_embeddings * (factor if context == "stretched" else 1)

    def index(turns):  # the pair index m whose wavelength fits `turns` times into the context
        return dim * math.log(length / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = index(fast), index(slow)
    if rounding:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    r = (torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)  # (dim/2,)
    r = r.clamp(0, 1) if clamp else r
    gamma = 1 - r if ramp else torch.zeros(dim // 2)  # 1 keeps theta_m, 0 stretches it
    if keep_slow:
        gamma = 1 - gamma
    theta = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)  # (dim/2,)
    stretched = theta / factor if stretch == "divide" else theta * factor
    return stretched * (1 - gamma) + theta * gamma


def _f(**switch) -> Callable[..., Tensor]:
    return lambda **kwargs: _inv_freq_with(**kwargs, **switch)


check_yarn_inv_freq = Checker(
    name="yarn_inv_freq",
    nudge="find the two pair indices where a pair turns beta_fast and beta_slow times over the ORIGINAL context; "
          "between them gamma falls linearly from 1 (keep theta) to 0 (theta / s).",
    cases=_inv_freq_cases,
    reference=reference_yarn_inv_freq,
    mistakes=[
        Mistake("betas swapped", _f(swap=True),
                "beta_fast and beta_slow are swapped: the ramp starts (gamma = 1, theta kept) at the pair that "
                "turns beta_fast = 32 times over L, a FAST pair with a small index, and ends (gamma = 0) at the "
                "pair turning beta_slow = 1 time; yours runs from the slow end to the fast one."),
        Mistake("ramp not clamped", _f(clamp=False),
                "the ramp is not clamped to [0, 1]: outside the correction range (m < m_low or m > m_high) gamma "
                "must stay at 1 or 0, otherwise the fastest pairs turn faster than before and the slowest get "
                "negative frequencies. Use .clamp(0, 1) on (m - m_low) / (m_high - m_low)."),
        Mistake("wrong end interpolated", _f(keep_slow=True),
                "the wrong end of the spectrum is interpolated: the fast pairs (small m, short wavelengths, many "
                "turns within L) must be KEPT, the slow pairs (large m, wavelengths longer than L) divided by s. "
                "Yours divides the fast ones and keeps the slow ones: gamma is reversed."),
        Mistake("ends not rounded", _f(rounding=False),
                "the ramp's ends are not rounded: DeepSeek (and transformers, truncate=True) take "
                "m_low = floor(m(beta_fast)) and m_high = ceil(m(beta_slow)) before the ramp."),
        Mistake("Position Interpolation everywhere", _f(ramp=False),
                "every frequency is divided by s (Position Interpolation): YaRN divides only the slow pairs and "
                "keeps the fast ones, blending the pairs between m_low and m_high."),
        Mistake("frequency multiplied by s", _f(stretch="multiply"),
                "the interpolated frequencies are multiplied by s: stretching the context s times means turning "
                "s times SLOWER, theta / s (positions p become p / s)."),
        Mistake("range over the stretched context", _f(context="stretched"),
                "the correction range is computed over the stretched context s L: the turns r = L / lambda_m "
                "count what the model saw in training, over the ORIGINAL original_max_position_embeddings."),
    ],
    hint="theta_m = base ** (-2m/dim) for m = 0 .. dim/2 - 1;\n"
         "m(r) = dim * ln(L / (2 pi r)) / (2 ln base) with L = original_max_position_embeddings;\n"
         "m_low = max(floor(m(beta_fast)), 0), m_high = min(ceil(m(beta_slow)), dim - 1);\n"
         "gamma_m = 1 - clamp((m - m_low) / (m_high - m_low), 0, 1);\n"
         "theta'_m = (1 - gamma_m) * theta_m / factor + gamma_m * theta_m.",
)


# ---------------------------------------------------------------------------------------------------
# yarn_softmax_scale: 1 / sqrt(d_h + d_h^R) * mscale^2, mscale = 0.1 * mscale_all_dim * ln(s) + 1.
# ---------------------------------------------------------------------------------------------------


def reference_yarn_softmax_scale(qk_nope_head_dim: int, qk_rope_head_dim: int, factor: float,
                                 mscale_all_dim: float) -> float:
    """The softmax scale of DeepSeek's MLA with YaRN, as :meth:`helpers.mla.rope.YaRN.scale_softmax` gives it."""
    yarn = YaRN(factor=factor, original_max_position_embeddings=4096, mscale_all_dim=mscale_all_dim)
    return yarn.scale_softmax((qk_nope_head_dim + qk_rope_head_dim) ** -0.5)


def _scale_cases() -> list[Case]:
    return [
        Case("DeepSeek-V3: d_h=128, d_h^R=64, s=40, mscale_all_dim=1.0",
             dict(qk_nope_head_dim=128, qk_rope_head_dim=64, factor=40.0, mscale_all_dim=1.0)),
        Case("DeepSeek-V2: d_h=128, d_h^R=64, s=40, mscale_all_dim=0.707",
             dict(qk_nope_head_dim=128, qk_rope_head_dim=64, factor=40.0, mscale_all_dim=0.707)),
        Case("tiny: d_h=16, d_h^R=8, s=4, mscale_all_dim=0.5",
             dict(qk_nope_head_dim=16, qk_rope_head_dim=8, factor=4.0, mscale_all_dim=0.5)),
    ]


def _scale_with(qk_nope_head_dim, qk_rope_head_dim, factor, mscale_all_dim, *, power=2, width="both",
                weight="mscale_all_dim", log=math.log, direction="multiply") -> float:
    """The reference with switches; the defaults are right and each known mistake flips one."""
    d = {"both": qk_nope_head_dim + qk_rope_head_dim, "nope": qk_nope_head_dim, "rope": qk_rope_head_dim}[width]
    mscale = 0.1 * (mscale_all_dim if weight == "mscale_all_dim" else 1.0) * log(factor) + 1.0
    return d ** -0.5 * mscale ** power if direction == "multiply" else d ** -0.5 / mscale ** power


def _s(**switch) -> Callable[..., float]:
    return lambda **kwargs: _scale_with(**kwargs, **switch)


check_yarn_softmax_scale = Checker(
    name="yarn_softmax_scale",
    nudge="the plain MLA scale 1/sqrt(d_h + d_h^R), times the YaRN correction: how many times does mscale enter "
          "a score q . k?",
    cases=_scale_cases,
    reference=reference_yarn_softmax_scale,
    mistakes=[
        Mistake("mscale applied once", _s(power=1),
                "mscale is applied once: YaRN scales the query AND the key by mscale = sqrt(1/t), so the score "
                "q . k, and hence the softmax scale, carries mscale ** 2."),
        Mistake("mscale divides", _s(direction="divide"),
                "the scale is divided by mscale ** 2: YaRN sharpens the softmax at long context (1/t > 1), so "
                "the scale is MULTIPLIED by mscale ** 2."),
        Mistake("mscale_all_dim ignored", _s(weight="none"),
                "mscale_all_dim is ignored (0.1 ln s + 1 is YaRN's own value for mscale_all_dim = 1): DeepSeek "
                "uses mscale = 0.1 * mscale_all_dim * ln(s) + 1 (0.707 in V2)."),
        Mistake("log10", _s(log=math.log10),
                "log base 10: mscale = 0.1 * mscale_all_dim * ln(s) + 1 uses the natural logarithm (math.log)."),
        Mistake("content width only", _s(width="nope"),
                "the base scale uses d_h alone: a score sums the content part (d_h channels) and the RoPE part "
                "(d_h^R channels), so it is 1 / sqrt(d_h + d_h^R)."),
        Mistake("RoPE width only", _s(width="rope"),
                "the base scale uses d_h^R alone: a score sums the content part (d_h channels) and the RoPE part "
                "(d_h^R channels), so it is 1 / sqrt(d_h + d_h^R)."),
    ],
    hint="mscale = 0.1 * mscale_all_dim * math.log(factor) + 1  (factor > 1);\n"
         "scale = (qk_nope_head_dim + qk_rope_head_dim) ** -0.5 * mscale ** 2.",
)
