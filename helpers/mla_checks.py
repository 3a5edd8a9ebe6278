"""Exercise checkers for the MLA notebooks (20-24), built on :mod:`helpers.checks`.

Each checker compares a learner's function with the finished pieces in :mod:`helpers.mla` and, when
the answer is wrong, recognises the usual mistakes and says what is wrong and where to look:

- :data:`check_compress_expand` -- ``compress_expand(h, w_dkv, kv_norm, w_uk, w_uv) -> (c_kv, k_nope, v)``
  (notebook 21; V2 paper eq. 9-11);
- :data:`check_split_rope` -- ``split_and_rope(q, k_rope, cos, sin, qk_nope_head_dim, interleave)
  -> (q_nope, q_rope, k_rope)`` (notebook 22; V2 paper eq. 14-16);
- :data:`check_absorbed_attention` -- ``absorbed_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv,
  softmax_scale, start_pos) -> o`` (notebook 23; V2 paper Sec. 2.1.2, eq. 17).

Every known mistake is a small function below that makes that mistake on purpose (``_mistake_*``);
the checker matches the learner's output against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from helpers.checks import Case, Checker, Mistake
from helpers.mla import LatentCache, MultiHeadLatentAttention, apply_rope, naive_attention, rope_cos_sin


@dataclass
class ShapeAwareChecker(Checker):
    """A :class:`~helpers.checks.Checker` that can also explain a wrong *shape* or structure.

    ``Checker`` asks ``diagnose`` only when shapes already match; some MLA mistakes show up precisely as a
    shape (expanded keys/values cached instead of the latent, a per-head ``k^R``). When the answer differs
    in structure or shape and no known mistake matched, ``diagnose_shape(got, want, kwargs)`` is asked on
    each case in turn for a specific message.
    """

    diagnose_shape: Callable[[Any, Any, dict[str, Any]], str | None] | None = None

    def explain(self, fn: Callable[..., Any]) -> str | None:
        message = super().explain(fn)
        if message is None or self.diagnose_shape is None or not any(
                generic in message for generic in ("shape (", "value(s), expected")):
            return message
        for case, fresh in zip(self.cases(), self.cases()):
            got = fn(**case.kwargs)  # it ran without raising in super().explain
            specific = self.diagnose_shape(got, self.reference(**fresh.kwargs), fresh.kwargs)
            if specific:
                return str(self._fail(case, specific))
        return message


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, g: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=g)


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


# ---------------------------------------------------------------------------------------------------
# split_and_rope (notebook 22): split the query into its nope and rope parts, rotate q^R and the shared k^R.
# ---------------------------------------------------------------------------------------------------

def _split_rope_case(description: str, seed: int, b: int, t: int, start: int, n_heads: int, d_nope: int,
                     d_rope: int, interleave: bool) -> Case:
    g = _gen(seed)
    cos, sin = rope_cos_sin(torch.arange(start, start + t), d_rope)
    return Case(description, dict(
        q=_randn(b, t, n_heads, d_nope + d_rope, g=g), k_rope=_randn(b, t, d_rope, g=g),
        cos=cos, sin=sin, qk_nope_head_dim=d_nope, interleave=interleave))


def _split_rope_cases() -> list[Case]:
    return [
        _split_rope_case("interleave=True, positions 0..3, n_h=3, d_h=6, d_h^R=8", 0, 2, 4, 0, 3, 6, 8, True),
        _split_rope_case("interleave=False, positions 5..7, n_h=2, d_h=4, d_h^R=4", 1, 1, 3, 5, 2, 4, 4, False),
        _split_rope_case("interleave=True, one decode step at position 9, d_h^R=6", 2, 2, 1, 9, 4, 8, 6, True),
    ]


def reference_split_and_rope(q: Tensor, k_rope: Tensor, cos: Tensor, sin: Tensor, qk_nope_head_dim: int,
                             interleave: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``q [B, T, n_h, d_h + d_h^R]`` -> ``q_nope``, rotated ``q_rope``, and rotated shared ``k_rope [B, T, d_h^R]``.

    The split and rotation of :class:`helpers.mla.MultiHeadLatentAttention` (V2 paper eq. 14-16), with
    :func:`helpers.mla.apply_rope`.
    """
    q_nope, q_rope = q.split([qk_nope_head_dim, q.shape[-1] - qk_nope_head_dim], dim=-1)
    q_rope = apply_rope(q_rope, cos[:, None], sin[:, None], interleave)  # (B, T, n_h, d_h^R)
    return q_nope, q_rope, apply_rope(k_rope, cos, sin, interleave)  # k_rope (B, T, d_h^R)


def _mistake_rope_on_nope_part(q, k_rope, cos, sin, qk_nope_head_dim, interleave=True):
    d_rope = q.shape[-1] - qk_nope_head_dim
    q_rope, q_nope = q.split([d_rope, qk_nope_head_dim], dim=-1)  # the rope part taken from the front
    return (q_nope, apply_rope(q_rope, cos[:, None], sin[:, None], interleave),
            apply_rope(k_rope, cos, sin, interleave))


def _mistake_per_head_k_rope(q, k_rope, cos, sin, qk_nope_head_dim, interleave=True):
    q_nope, q_rope, k = reference_split_and_rope(q, k_rope, cos, sin, qk_nope_head_dim, interleave)
    return q_nope, q_rope, k[:, :, None].expand(-1, -1, q.shape[2], -1)  # one copy per head


def _mistake_always_halves(q, k_rope, cos, sin, qk_nope_head_dim, interleave=True):
    return reference_split_and_rope(q, k_rope, cos, sin, qk_nope_head_dim, interleave=False)


def _mistake_always_pairs(q, k_rope, cos, sin, qk_nope_head_dim, interleave=True):
    return reference_split_and_rope(q, k_rope, cos, sin, qk_nope_head_dim, interleave=True)


def _deinterleave(x: Tensor) -> Tensor:
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def _mistake_transformers_output_layout(q, k_rope, cos, sin, qk_nope_head_dim, interleave=True):
    q_nope, q_rope, k = reference_split_and_rope(q, k_rope, cos, sin, qk_nope_head_dim, interleave)
    if not interleave:
        return None
    return q_nope, _deinterleave(q_rope), _deinterleave(k)


def _mistake_rotate_backwards(q, k_rope, cos, sin, qk_nope_head_dim, interleave=True):
    return reference_split_and_rope(q, k_rope, cos, -sin, qk_nope_head_dim, interleave)


def _mistake_k_rope_not_rotated(q, k_rope, cos, sin, qk_nope_head_dim, interleave=True):
    q_nope, q_rope, _ = reference_split_and_rope(q, k_rope, cos, sin, qk_nope_head_dim, interleave)
    return q_nope, q_rope, k_rope


def _diagnose_split_rope_shape(got: Any, want: Any, kwargs: dict[str, Any]) -> str | None:
    if isinstance(got, (tuple, list)) and len(got) == 3 and isinstance(got[2], Tensor) and got[2].dim() == 4:
        return (f"k_rope has a head axis {tuple(got[2].shape)}: MLA has one RoPE key k^R per token, shared by all "
                f"heads; return it as {tuple(want[2].shape)} (it is broadcast over heads when scoring).")
    return None


def _diagnose_split_rope(got: Any, want: Any, kwargs: dict[str, Any]) -> str | None:
    if not torch.allclose(got[0], want[0]):
        return ("q_nope is wrong: it is the first qk_nope_head_dim channels of each head, passed through "
                "without any rotation.")
    return None


check_split_rope = ShapeAwareChecker(
    name="split_and_rope",
    cases=_split_rope_cases,
    reference=reference_split_and_rope,
    mistakes=[
        Mistake("RoPE on the nope part", _mistake_rope_on_nope_part,
                "RoPE was applied to the content (nope) channels: each head's query is laid out "
                "[q_nope (qk_nope_head_dim) | q_rope (qk_rope_head_dim)], so q_rope is the *last* "
                "qk_rope_head_dim channels and only those are rotated."),
        Mistake("per-head k^R", _mistake_per_head_k_rope,
                "k_rope has one copy per head: MLA has a single RoPE key k^R per token, shared by all heads "
                "(it is cached once, beside c_kv); return it as [B, T, qk_rope_head_dim]."),
        Mistake("halves instead of pairs", _mistake_always_halves,
                "RoPE layouts mixed up: with interleave=True the rotated pairs are (x0, x1), (x2, x3), ... "
                "(x[..., 0::2], x[..., 1::2], DeepSeek's layout), but you rotated halves (x_i, x_{i+d/2})."),
        Mistake("pairs instead of halves", _mistake_always_pairs,
                "RoPE layouts mixed up: with interleave=False the rotated pairs are halves (x_i, x_{i+d/2}) "
                "(rotate_half, Llama's layout), but you rotated adjacent pairs (x0, x1), (x2, x3), ..."),
        Mistake("transformers' de-interleaved output", _mistake_transformers_output_layout,
                "right rotation, wrong output layout: you returned the rotated pairs de-interleaved (all "
                "first elements, then all second elements), as transformers' apply_rotary_pos_emb_interleave "
                "does. Scores are the same, but keep each rotated pair in place: stack them on a last axis "
                "and flatten."),
        Mistake("rotated backwards", _mistake_rotate_backwards,
                "the rotation goes the wrong way: for a pair (x1, x2) the result is "
                "(x1 cos - x2 sin, x2 cos + x1 sin)."),
        Mistake("k^R not rotated", _mistake_k_rope_not_rotated,
                "k_rope is returned unrotated: the shared key gets the same RoPE rotation (same cos, sin) as "
                "the queries, before it is cached."),
    ],
    diagnose=_diagnose_split_rope,
    diagnose_shape=_diagnose_split_rope_shape,
    hint="q_nope, q_rope = q.split([qk_nope_head_dim, d_rope], dim=-1); rotate q_rope with "
         "cos[:, None], sin[:, None] (a head axis) and k_rope with cos, sin, using the pair layout `interleave`.",
)


# ---------------------------------------------------------------------------------------------------
# absorbed_attention (notebook 23): attention computed over the cached latent.
# ---------------------------------------------------------------------------------------------------

def _attention_case(description: str, seed: int, b: int, t: int, start: int, n_heads: int, d_nope: int,
                    d_rope: int, d_v: int, d_c: int) -> Case:
    g = _gen(seed)
    s = start + t
    return Case(description, dict(
        q_nope=_randn(b, t, n_heads, d_nope, g=g), q_rope=_randn(b, t, n_heads, d_rope, g=g),
        c_kv=_randn(b, s, d_c, g=g), k_rope=_randn(b, s, d_rope, g=g),
        w_uk=_randn(n_heads, d_nope, d_c, g=g) / d_c**0.5, w_uv=_randn(n_heads, d_v, d_c, g=g) / d_c**0.5,
        softmax_scale=(d_nope + d_rope) ** -0.5, start_pos=start))


def _attention_cases() -> list[Case]:
    return [
        _attention_case("prefill: T=S=5, start_pos=0, n_h=3, d_h=d_v=d_c=8, d_h^R=4", 0, 2, 5, 0, 3, 8, 4, 8, 8),
        _attention_case("decode: T=1, start_pos=6 (S=7), n_h=2, d_h=d_v=8, d_c=12, d_h^R=4", 1, 2, 1, 6, 2, 8, 4, 8, 12),
        _attention_case("chunk: T=3, start_pos=4 (S=7), n_h=2, d_h=6, d_v=10, d_c=16, d_h^R=6", 2, 1, 3, 4, 2, 6, 6, 10, 16),
    ]


def _mistake_scale_nope_only(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, softmax_scale, start_pos):
    return naive_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, q_nope.shape[-1] ** -0.5, start_pos)


def _mistake_no_scale(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, softmax_scale, start_pos):
    return naive_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, 1.0, start_pos)


def _mistake_no_rope_score(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, softmax_scale, start_pos):
    return naive_attention(q_nope, torch.zeros_like(q_rope), c_kv, k_rope, w_uk, w_uv, softmax_scale, start_pos)


def _mistake_uv_transposed(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, softmax_scale, start_pos):
    if w_uv.shape[1] != w_uv.shape[2]:
        return None  # only runs silently when d_v == d_c
    return naive_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv.transpose(1, 2), softmax_scale, start_pos)


def _mistake_uk_transposed(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, softmax_scale, start_pos):
    if w_uk.shape[1] != w_uk.shape[2]:
        return None  # only runs silently when d_h == d_c
    return naive_attention(q_nope, q_rope, c_kv, k_rope, w_uk.transpose(1, 2), w_uv, softmax_scale, start_pos)


def _mistake_uk_uv_swapped(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, softmax_scale, start_pos):
    if w_uk.shape != w_uv.shape:
        return None  # only runs silently when d_h == d_v
    return naive_attention(q_nope, q_rope, c_kv, k_rope, w_uv, w_uk, softmax_scale, start_pos)


def _mistake_uv_not_applied(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, softmax_scale, start_pos):
    identity = torch.eye(c_kv.shape[-1]).expand(w_uv.shape[0], -1, -1)  # (H, d_c, d_c)
    return naive_attention(q_nope, q_rope, c_kv, k_rope, w_uk, identity, softmax_scale, start_pos)  # o_latent


def _mistake_offset_ignored(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, softmax_scale, start_pos):
    return naive_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, softmax_scale, 0)


def _mistake_no_causal_mask(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, softmax_scale, start_pos):
    return naive_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, softmax_scale, c_kv.shape[1])


_SCALE_MESSAGE = (
    "scores are too large by sqrt((qk_nope_head_dim + qk_rope_head_dim) / {width}) (sqrt(192/128) at DeepSeek-V3's "
    "sizes for the nope width): the softmax scale must use qk_nope_head_dim + qk_rope_head_dim -- use the "
    "softmax_scale argument, not 1/sqrt({what}) (nor 1/sqrt(kv_lora_rank), the absorbed query's width).")

check_absorbed_attention = Checker(
    name="absorbed_attention",
    cases=_attention_cases,
    reference=naive_attention,
    mistakes=[
        Mistake("scale from the nope width", _mistake_scale_nope_only,
                _SCALE_MESSAGE.format(width="qk_nope_head_dim", what="q_nope.shape[-1]")),
        Mistake("no scale", _mistake_no_scale,
                "the scores are not scaled: multiply them by softmax_scale before the softmax."),
        Mistake("RoPE score missing", _mistake_no_rope_score,
                "the RoPE part of the score is missing: add q_rope . k_rope (one k_rope per token, shared by "
                "all heads) to the content score before scaling."),
        Mistake("W^UV transposed", _mistake_uv_transposed,
                "W^UV is transposed: w_uv is [n_h, d_v, d_c], so the output of head i is W^UV_i o_latent -- "
                "einsum('bthc,hdc->bthd', o_latent, w_uv)."),
        Mistake("W^UK transposed", _mistake_uk_transposed,
                "W^UK is transposed: w_uk is [n_h, d_h, d_c], and the absorbed query is W^UK_i^T q^C -- "
                "einsum('bthd,hdc->bthc', q_nope, w_uk)."),
        Mistake("W^UK and W^UV swapped", _mistake_uk_uv_swapped,
                "W^UV is absorbed on the wrong side (swapped with W^UK): W^UK goes into the query (it shapes "
                "the scores), W^UV is applied to the attended latent (it shapes the output)."),
        Mistake("W^UV not applied", _mistake_uv_not_applied,
                "the output is still in latent space (the attended c_kv, width d_c): apply W^UV per head -- "
                "einsum('bthc,hdc->bthd', o_latent, w_uv) -- to get [B, T, n_h, d_v]."),
        Mistake("causal offset ignored", _mistake_offset_ignored,
                "wrong causal offset during cached decode: query t sits at absolute position start_pos + t and "
                "sees keys 0..start_pos + t; your mask treats it as position t."),
        Mistake("no causal mask", _mistake_no_causal_mask,
                "no causal mask (or an offset that is too large, such as the cache length after appending): "
                "query t may only see keys 0..start_pos + t; mask the rest with -inf before the softmax."),
    ],
    hint="q_latent = einsum('bthd,hdc->bthc', q_nope, w_uk); scores = (q_latent . c_kv + q_rope . k_rope) * "
         "softmax_scale; causal mask with offset start_pos; softmax; o_latent = p . c_kv; then apply w_uv.",
)
