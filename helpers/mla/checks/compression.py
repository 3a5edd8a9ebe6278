"""Checker of the low-rank KV compression of notebook 21 (V2 paper eq. 9-11).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from helpers.mla import LatentCache, MultiHeadLatentAttention
from helpers.mla.checks.common import ShapeAwareChecker, _gen, _randn
from helpers.teaching.checks import Case, Mistake

# ---------------------------------------------------------------------------------------------------
# compress_expand (notebook 21): the latent c_KV, and keys and values expanded from it.
# ---------------------------------------------------------------------------------------------------

def _compress_expand_case(description: str, seed: int, b: int, t: int, hidden: int, n_heads: int,
                          d_nope: int, d_v: int, d_c: int) -> Case:
    g = _gen(seed)
    kv_norm = nn.RMSNorm(d_c, eps=1e-6)
    with torch.no_grad():
        kv_norm.weight.copy_(0.5 + torch.rand(d_c, generator=g))  # not all ones, so a missing norm shows
    return Case(description, dict(
        h=_randn(b, t, hidden, g=g),
        w_dkv=_randn(d_c, hidden, g=g) / hidden**0.5,
        kv_norm=kv_norm,
        w_uk=_randn(n_heads, d_nope, d_c, g=g) / d_c**0.5,
        w_uv=_randn(n_heads, d_v, d_c, g=g) / d_c**0.5,
    ))


def _compress_expand_cases() -> list[Case]:
    return [
        _compress_expand_case("B=2, T=5, H=24, n_h=3, d_h=6, d_v=9, d_c=8 (every size different)",
                              0, 2, 5, 24, 3, 6, 9, 8),
        _compress_expand_case("B=1, T=3, H=20, n_h=2, d_h=d_v=d_c=7 (equal widths: a transposed or swapped "
                              "up-projection runs without an error here)", 1, 1, 3, 20, 2, 7, 7, 7),
    ]


def reference_compress_expand(h: Tensor, w_dkv: Tensor, kv_norm: nn.RMSNorm, w_uk: Tensor,
                              w_uv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What :class:`helpers.mla.MultiHeadLatentAttention` caches and expands, given these weights.

    The latent is read from a :class:`helpers.mla.LatentCache` after a forward pass of the helpers layer
    (with the RoPE rows of ``wkv_a`` zero); keys and values are the layer's ``up_projections()`` applied
    to it, exactly as :func:`helpers.mla.naive_attention` expands them.
    """
    n_heads, d_nope, d_c = w_uk.shape
    layer = MultiHeadLatentAttention(h.shape[-1], n_heads, d_c, d_nope, 2, w_uv.shape[1],
                                     rms_norm_eps=kv_norm.eps)
    with torch.no_grad():
        layer.wkv_a.weight.copy_(torch.cat([w_dkv, torch.zeros(2, h.shape[-1])]))
        layer.kv_norm.weight.copy_(kv_norm.weight)
        layer.wkv_b.weight.copy_(torch.cat([w_uk, w_uv], dim=1).reshape(-1, d_c))
        cache = LatentCache()
        layer(h, cache)
        w_uk_, w_uv_ = layer.up_projections()
        c_kv = cache.c_kv.clone()  # (B, T, d_c)
        k_nope = torch.einsum("btc,hdc->bthd", c_kv, w_uk_)  # (B, T, n_h, d_h)
        v = torch.einsum("btc,hdc->bthd", c_kv, w_uv_)  # (B, T, n_h, d_v)
    return c_kv, k_nope, v


def _compress_with(h, w_dkv, kv_norm, w_uk, w_uv, *, norm="kv_norm", cached="normed", expand_from="normed",
                   swap=False, uk_transposed=False, uv_transposed=False, heads_last=False, heads_first=False):
    """compress_expand with switches; the defaults are right, each other value is one mistake (or ``None``
    when the mistake cannot run on these shapes)."""
    n_heads, d_nope, d_c = w_uk.shape
    if (uk_transposed and d_nope != d_c) or (uv_transposed and w_uv.shape[1] != d_c) or (
            swap and heads_last):
        return None
    raw = h @ w_dkv.T  # (B, T, d_c)
    if norm == "kv_norm":
        normed = kv_norm(raw)
    elif norm == "none":
        normed = raw
    elif norm == "no_weight":  # an RMSNorm written by hand, without its learned weight
        normed = raw * torch.rsqrt(raw.pow(2).mean(-1, keepdim=True) + kv_norm.eps)
    else:  # "layer": a LayerNorm (mean subtracted) with the same weight
        normed = torch.nn.functional.layer_norm(raw, (d_c,), kv_norm.weight, None, kv_norm.eps)
    source = normed if expand_from == "normed" else raw
    uk, uv = (w_uv, w_uk) if swap else (w_uk, w_uv)
    uk = uk.transpose(1, 2) if uk_transposed else uk
    uv = uv.transpose(1, 2) if uv_transposed else uv
    if heads_last:  # all heads in one matmul, then viewed as (..., d_h, n_h) instead of (..., n_h, d_h)
        b, t = h.shape[:2]
        k = (source @ uk.reshape(-1, d_c).T).view(b, t, uk.shape[1], n_heads).transpose(2, 3)
        v = (source @ uv.reshape(-1, d_c).T).view(b, t, uv.shape[1], n_heads).transpose(2, 3)
    else:
        k = torch.einsum("btc,hdc->bthd", source, uk)  # (B, T, n_h, d_h)
        v = torch.einsum("btc,hdc->bthd", source, uv)  # (B, T, n_h, d_v)
    if heads_first:
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, n_h, T, d)
    if cached == "expanded":
        return torch.cat([k.flatten(2), v.flatten(2)], dim=-1), k, v
    return (normed if cached == "normed" else raw), k, v


def _mistake(**switch: Any):
    return lambda h, w_dkv, kv_norm, w_uk, w_uv: _compress_with(h, w_dkv, kv_norm, w_uk, w_uv, **switch)


_EXPANDED_MESSAGE = (
    "the first value you return is what goes into the cache, and yours is the expanded keys/values "
    "({got}). MLA caches only the latent c_kv [B, T, d_c] = {want} -- {d_c} numbers per token instead of "
    "{expanded} -- and expands it with W^UK, W^UV when it attends. Return c_kv first.")


def _diagnose_compress_expand(got: Any, want: Any, kwargs: dict[str, Any]) -> str | None:
    if not isinstance(got, (tuple, list)) or len(got) != 3:
        return None
    cached, c_kv = got[0], want[0]
    n_heads, d_nope, d_c = kwargs["w_uk"].shape
    expanded = n_heads * (d_nope + kwargs["w_uv"].shape[1])
    if isinstance(cached, (tuple, list)):
        shapes = ", ".join(str(tuple(x.shape)) for x in cached if isinstance(x, Tensor))
        return _EXPANDED_MESSAGE.format(got=f"a tuple of {shapes}", want=tuple(c_kv.shape), d_c=d_c, expanded=expanded)
    if isinstance(cached, Tensor) and tuple(cached.shape) != tuple(c_kv.shape) and cached.numel() > c_kv.numel():
        return _EXPANDED_MESSAGE.format(got=f"shape {tuple(cached.shape)}", want=tuple(c_kv.shape), d_c=d_c,
                                        expanded=expanded)
    return None


check_compress_expand = ShapeAwareChecker(
    name="compress_expand",
    nudge="one shared down-projection to the latent, its norm, then one up-projection per head for keys and "
          "one for values. Which of these is what gets cached?",
    cases=_compress_expand_cases,
    reference=reference_compress_expand,
    mistakes=[
        Mistake("expanded K/V cached", _mistake(cached="expanded"), _EXPANDED_MESSAGE.format(
            got="keys and values concatenated", want="(B, T, d_c)", d_c="d_c", expanded="n_h (d_h + d_v)")),
        Mistake("no kv_norm", _mistake(norm="none"),
                "c_kv is missing its RMSNorm: apply kv_norm to W^DKV h before caching and expanding "
                "(kv_norm in DeepSeek's code, kv_a_layernorm in transformers)."),
        Mistake("cached before kv_norm", _mistake(cached="raw"),
                "keys and values are right but the cached c_kv is the latent *before* kv_norm: cache the "
                "normalised latent, the same one you expand."),
        Mistake("expanded before kv_norm", _mistake(expand_from="raw"),
                "the cached c_kv is right, but keys and values were expanded from the latent *before* kv_norm: "
                "expand the normalised latent, the one you cache."),
        Mistake("RMSNorm without its weight", _mistake(norm="no_weight"),
                "the latent is divided by its root mean square but not multiplied by kv_norm's learned weight: "
                "call the kv_norm module you are given (it holds the weight)."),
        Mistake("LayerNorm instead of RMSNorm", _mistake(norm="layer"),
                "the latent was normalised with its mean subtracted (a LayerNorm); kv_norm is an RMSNorm: "
                "x / sqrt(mean(x^2) + eps) * weight, no mean subtracted. Call kv_norm itself."),
        Mistake("W^UK and W^UV swapped", _mistake(swap=True),
                "keys and values are swapped: keys come from w_uk (k_nope = W^UK c_kv), values from w_uv."),
        Mistake("W^UK transposed", _mistake(uk_transposed=True),
                "W^UK is used transposed: w_uk is (n_h, d_h, d_c), it maps a latent (d_c) to a key (d_h) per "
                "head, k_nope[:, :, i] = c_kv @ w_uk[i].T -- einsum('btc,hdc->bthd', c_kv, w_uk)."),
        Mistake("W^UV transposed", _mistake(uv_transposed=True),
                "W^UV is used transposed: w_uv is (n_h, d_v, d_c), v[:, :, i] = c_kv @ w_uv[i].T -- "
                "einsum('btc,hdc->bthd', c_kv, w_uv)."),
        Mistake("heads split in the wrong order", _mistake(heads_last=True),
                "the numbers are right but assigned to the wrong heads and channels: after one matmul with all "
                "heads stacked (n_h * d_h outputs), view the result as (B, T, n_h, d_h) -- head first, then its "
                "channels -- not as (B, T, d_h, n_h)."),
        Mistake("head axis before the token axis", _mistake(heads_first=True),
                "keys and values come out as (B, n_h, T, d): return them as (B, T, n_h, d) "
                "('btc,hdc->bthd'), the layout the attention code of this notebook expects."),
    ],
    diagnose_shape=_diagnose_compress_expand,
    hint="c_kv = kv_norm(h @ w_dkv.T), then per head k_nope = c_kv W^UK_i^T -- torch.einsum('btc,hdc->bthd', "
         "c_kv, w_uk) -- and v likewise with w_uv. Return (c_kv, k_nope, v).",
)
