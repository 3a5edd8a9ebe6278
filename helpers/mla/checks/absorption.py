"""Checker of the absorbed attention of notebook 23 (V2 paper Sec. 2.1.2, eq. 17).
"""

from __future__ import annotations

import torch

from helpers.mla import naive_attention
from helpers.mla.checks.common import _gen, _randn
from helpers.teaching.checks import Case, Checker, Mistake

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
    nudge="move the query into latent space once, attend over the cached latents, then leave latent space once.",
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
