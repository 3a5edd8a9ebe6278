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
        _compress_expand_case("B=2, T=5, H=32, n_h=4, d_h=d_v=8, d_c=12", 0, 2, 5, 32, 4, 8, 8, 12),
        _compress_expand_case("B=1, T=3, H=24, n_h=2, d_h=6, d_v=10, d_c=8", 1, 1, 3, 24, 2, 6, 10, 8),
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


def _mistake_cache_expanded_kv(h, w_dkv, kv_norm, w_uk, w_uv):
    c_kv, k_nope, v = reference_compress_expand(h, w_dkv, kv_norm, w_uk, w_uv)
    return torch.cat([k_nope.flatten(2), v.flatten(2)], dim=-1), k_nope, v  # caches n_h (d_h + d_v) per token


def _mistake_no_kv_norm(h, w_dkv, kv_norm, w_uk, w_uv):
    c_kv = h @ w_dkv.T  # (B, T, d_c), never normalised
    return c_kv, torch.einsum("btc,hdc->bthd", c_kv, w_uk), torch.einsum("btc,hdc->bthd", c_kv, w_uv)


def _mistake_cache_before_norm(h, w_dkv, kv_norm, w_uk, w_uv):
    _, k_nope, v = reference_compress_expand(h, w_dkv, kv_norm, w_uk, w_uv)
    return h @ w_dkv.T, k_nope, v


def _mistake_swap_uk_uv(h, w_dkv, kv_norm, w_uk, w_uv):
    if w_uk.shape != w_uv.shape:
        return None
    return reference_compress_expand(h, w_dkv, kv_norm, w_uv, w_uk)


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
    nudge="one down-projection to the latent, a norm, then one up-projection per head for keys and one for values.",
    cases=_compress_expand_cases,
    reference=reference_compress_expand,
    mistakes=[
        Mistake("expanded K/V cached", _mistake_cache_expanded_kv, _EXPANDED_MESSAGE.format(
            got="keys and values concatenated", want="(B, T, d_c)", d_c="d_c", expanded="n_h (d_h + d_v)")),
        Mistake("no kv_norm", _mistake_no_kv_norm,
                "c_kv is missing its RMSNorm: apply kv_norm to W^DKV h before caching and expanding "
                "(kv_norm in DeepSeek's code, kv_a_layernorm in transformers)."),
        Mistake("cached before kv_norm", _mistake_cache_before_norm,
                "keys and values are right but the cached c_kv is the latent *before* kv_norm: cache the "
                "normalised latent, the same one you expand."),
        Mistake("W^UK and W^UV swapped", _mistake_swap_uk_uv,
                "keys and values are swapped: keys come from w_uk (k_nope = W^UK c_kv), values from w_uv."),
    ],
    diagnose_shape=_diagnose_compress_expand,
    hint="c_kv = kv_norm(h @ w_dkv.T); then per head k_nope = c_kv W^UK_i^T -- torch.einsum('btc,hdc->bthd', "
         "c_kv, w_uk) -- and v likewise with w_uv. Return (c_kv, k_nope, v).",
)
