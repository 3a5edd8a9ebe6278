"""Checker of the absorbed attention of notebook 23 (V2 paper Sec. 2.1.2, eq. 17 with W^UK, W^UV absorbed).

The known mistakes are the one-step deviations from :func:`_absorbed_with`, a reference with switches
(each ``Mistake`` flips one switch): the scale (its width, missing, not on the RoPE score), the score
(RoPE part missing), the weights (``W^UK`` / ``W^UV`` transposed, swapped, ``W^UV`` not applied), the mask
(offset ignored, applied twice, none, off by one, applied after the softmax) and the softmax axis (heads,
queries). Two mask mistakes can agree on one case, so the named mistake must match on every case.
When nothing known matches, :func:`_describe` says which query positions and heads differ, and where
NaNs appear, without naming a cause.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from helpers.mla import naive_attention
from helpers.mla.checks.common import _gen, _randn
from helpers.teaching.checks import Case, Checker, Mistake, describe_difference


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
    # The first two cases have every size different (B, T, S, n_h, d_h, d_h^R, d_v, d_c), so different mistakes
    # give different numbers; the last has d_h = d_v = d_c, the only shapes on which transposed or swapped
    # W^UK / W^UV run without an error; the fourth has T > start_pos, where an offset applied twice still hides
    # some keys (on the others it hides none, like no mask at all).
    return [
        _attention_case("decode: B=2, T=1, start_pos=6 (S=7), n_h=3, d_h=8, d_h^R=4, d_v=10, d_c=14",
                        1, 2, 1, 6, 3, 8, 4, 10, 14),
        _attention_case("chunk: B=1, T=3, start_pos=4 (S=7), n_h=2, d_h=6, d_h^R=5, d_v=9, d_c=16",
                        2, 1, 3, 4, 2, 6, 5, 9, 16),
        _attention_case("prefill: B=2, T=S=5, start_pos=0, n_h=3, d_h=d_v=d_c=8, d_h^R=4", 0, 2, 5, 0, 3, 8, 4, 8, 8),
        _attention_case("long chunk after a short cache: B=1, T=5, start_pos=2 (S=7), n_h=2, d_h=5, d_h^R=3, d_v=7, "
                        "d_c=11", 3, 1, 5, 2, 2, 5, 3, 7, 11),
    ]


def _absorbed_with(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, softmax_scale, start_pos, *, scale="given",
                   rope_score=True, scale_rope=True, uk="w_uk", uv="w_uv", mask="causal", mask_offset="start_pos",
                   softmax_dim=-1) -> Tensor | None:
    """Absorbed attention with switches; the defaults are right, and each known mistake flips one switch.

    A transposed or swapped weight whose shape does not fit raises an einsum error in a learner's code (which
    the checker reports as such); on those shapes the switch is ignored, so the mistake is judged on a case
    where it runs silently.
    """
    t, s, d_c = q_nope.shape[1], c_kv.shape[1], c_kv.shape[-1]
    w_k = {"w_uk": w_uk, "w_uk^T": w_uk.transpose(1, 2), "w_uv": w_uv}[uk]
    w_v = {"w_uv": w_uv, "w_uv^T": w_uv.transpose(1, 2), "w_uk": w_uk, "none": None}[uv]
    if w_k.shape != w_uk.shape:
        w_k = w_uk
    if w_v is not None and w_v.shape != w_uv.shape:
        w_v = w_uv
    factor = {"given": softmax_scale, "none": 1.0, "nope width": q_nope.shape[-1] ** -0.5,
              "latent width": d_c ** -0.5}[scale]
    content = torch.einsum("bthc,bsc->bths", torch.einsum("bthd,hdc->bthc", q_nope, w_k), c_kv)  # (B, T, H, S)
    rope = torch.einsum("bthr,bsr->bths", q_rope, k_rope) if rope_score else torch.zeros_like(content)
    scores = content * factor + rope * (factor if scale_rope else 1.0)
    offset = {"start_pos": start_pos, "zero": 0, "twice": 2 * start_pos}[mask_offset]
    visible = torch.arange(s)[None, :] <= offset + torch.arange(t)[:, None]  # (T, S)
    if mask == "strict":  # query t sees keys < start_pos + t: not even itself
        visible = torch.arange(s)[None, :] < offset + torch.arange(t)[:, None]
    if mask in ("causal", "strict"):
        scores = scores.masked_fill(~visible[None, :, None, :], float("-inf"))
    p = torch.softmax(scores, dim=softmax_dim)
    if mask == "after softmax":
        p = p * visible[None, :, None, :]
    o_latent = torch.einsum("bths,bsc->bthc", p, c_kv)  # (B, T, H, d_c)
    return o_latent if w_v is None else torch.einsum("bthc,hdc->bthd", o_latent, w_v)


def _with(**switch) -> Callable[..., Any]:
    return lambda **kwargs: _absorbed_with(**kwargs, **switch)


def _describe(got: Tensor, want: Tensor, kwargs: dict[str, Any]) -> str | None:
    """Which query positions (absolute too) and heads differ, and where NaNs are: a description, not a cause."""
    if got.shape != want.shape or got.dim() != 4:
        return None
    start = kwargs["start_pos"]
    got, want = got.detach().double(), want.detach().double()
    nan = got.isnan() & ~want.isnan()
    differ = nan | ~torch.isclose(got, want, atol=1e-5, rtol=1e-4, equal_nan=True)  # (B, T, H, d_v)
    if not differ.any():
        return None
    t_bad = differ.any(-1).any(-1).any(0).nonzero().flatten().tolist()  # query positions
    h_bad = differ.any(-1).any(1).any(0).nonzero().flatten().tolist()  # heads
    t_all, h_all = got.shape[1], got.shape[2]
    where = (f"query positions t = {t_bad} of {t_all} (absolute positions {[start + t for t in t_bad]}), "
             f"heads {h_bad} of {h_all}")
    if nan.any():
        t_nan = nan.any(-1).any(-1).any(0).nonzero().flatten().tolist()
        return (f"NaN in the output at query positions t = {t_nan} (absolute {[start + t for t in t_nan]}); "
                f"differences at {where}. A softmax over a row whose scores are all -inf gives NaN: print the "
                "mask (and the scores) of those rows; query t must see keys 0..start_pos + t.")
    err = (got - want).abs().max().item()
    rest = "" if len(t_bad) == t_all and len(h_bad) == h_all else "; the other positions and heads match"
    return (f"the output differs at {where} (largest difference {err:.3g}){rest}. Print the "
            "scores and the softmax of one differing query and head next to the naive path's "
            "(helpers.mla.naive_attention) to find the first step that differs.")


@dataclass
class _AttentionChecker(Checker):
    """A Checker whose description of an unknown difference also covers NaN outputs (by query and head), and
    whose named mistake is one that matches the answer on every case (two mask mistakes can agree on one case)."""

    def _matches_everywhere(self, fn: Callable[..., Any], mistake: Mistake) -> bool:
        for case, fresh in zip(self.cases(), self.cases()):
            try:
                got = fn(**case.kwargs)
            except Exception:  # noqa: BLE001 - a learner's function may fail on a case
                return False
            if describe_difference(got, mistake.fn(**fresh.kwargs), atol=self.atol, rtol=self.rtol) is not None:
                return False
        return True

    def explain(self, fn: Callable[..., Any]) -> str | None:
        message = super().explain(fn)
        named = next((m for m in self.mistakes if message is not None and m.message in message), None)
        if named is not None and not self._matches_everywhere(fn, named):
            better = next((m for m in self.mistakes if self._matches_everywhere(fn, m)), None)
            if better is not None:
                return message.replace(named.message, better.message)
        if message is None or not any(m in message for m in ("NaN where", "an infinity where")):
            return message
        for case, fresh in zip(self.cases(), self.cases()):
            got = fn(**case.kwargs)
            specific = _describe(got, self.reference(**fresh.kwargs), fresh.kwargs)
            if specific:
                return str(self._fail(case, specific))
        return message


_SCALE = ("The softmax scale is 1/sqrt(qk_nope_head_dim + qk_rope_head_dim), the width of the whole query-key "
          "dot product: use the softmax_scale argument")


check_absorbed_attention = _AttentionChecker(
    name="absorbed_attention",
    nudge="which side of the score does W^UK move to, and which side of the output does W^UV? "
          "Never expand c_kv into per-head keys or values.",
    cases=_attention_cases,
    reference=naive_attention,
    mistakes=[
        Mistake("scale from the nope width", _with(scale="nope width"),
                "the scores are too large by sqrt((qk_nope_head_dim + qk_rope_head_dim) / qk_nope_head_dim): "
                "they are scaled by 1/sqrt(qk_nope_head_dim), the width of q_nope only. " + _SCALE + "."),
        Mistake("scale from the latent width", _with(scale="latent width"),
                "the scores are scaled by 1/sqrt(kv_lora_rank), the width of the absorbed query q_latent. "
                + _SCALE + ": absorption moves the query into latent space but leaves the score, and so its "
                "scale, unchanged."),
        Mistake("no scale", _with(scale="none"),
                "the scores are not scaled: multiply the whole score (content + RoPE) by softmax_scale "
                "before the softmax."),
        Mistake("RoPE score not scaled", _with(scale_rope=False),
                "only the content score is scaled: softmax_scale multiplies the sum "
                "(q_latent . c_kv + q_rope . k_rope), the RoPE part too."),
        Mistake("RoPE score missing", _with(rope_score=False),
                "the RoPE part of the score is missing: add q_rope . k_rope (one k_rope per token, shared by "
                "all heads) to the content score before scaling."),
        Mistake("W^UK transposed", _with(uk="w_uk^T"),
                "W^UK is transposed: w_uk is [n_h, d_h, d_c], and the absorbed query is W^UK_i^T q^C -- "
                "contract q_nope's d_h with w_uk's middle axis (einsum 'bthd,hdc->bthc')."),
        Mistake("W^UV transposed", _with(uv="w_uv^T"),
                "W^UV is transposed: w_uv is [n_h, d_v, d_c], so the output of head i is W^UV_i o_latent -- "
                "contract o_latent's d_c with w_uv's last axis (einsum 'bthc,hdc->bthd')."),
        Mistake("W^UK and W^UV swapped", _with(uk="w_uv", uv="w_uk"),
                "W^UK and W^UV are swapped, each absorbed on the wrong side: W^UK goes into the query (it "
                "shapes the scores), W^UV is applied to the attended latent (it shapes the output)."),
        Mistake("W^UV not applied", _with(uv="none"),
                "the output is still in latent space (the attended c_kv, width d_c): apply W^UV per head to "
                "get [B, T, n_h, d_v]."),
        Mistake("causal offset ignored", _with(mask_offset="zero"),
                "wrong causal offset during cached decode: query t sits at absolute position start_pos + t and "
                "sees keys 0..start_pos + t; your mask treats it as position t."),
        Mistake("no causal mask", _with(mask="none"),
                "no causal mask (or an offset that is too large, such as the cache length after appending): "
                "query t may only see keys 0..start_pos + t; mask the rest with -inf before the softmax."),
        Mistake("causal offset applied twice", _with(mask_offset="twice"),
                "the causal offset is applied twice: query t sees keys up to 2 * start_pos + t. The positions of "
                "the new queries are start_pos + t; add start_pos once (if positions already include it, do not "
                "add it again)."),
        Mistake("mask off by one", _with(mask="strict"),
                "the mask is off by one: query t must see key start_pos + t (itself) too, keys s <= start_pos + t; "
                "yours hides it (s < start_pos + t); at start_pos 0 the first query then sees no key at all (NaN)."),
        Mistake("mask after the softmax", _with(mask="after softmax"),
                "the future keys were zeroed after the softmax, so each row's weights no longer sum to 1: "
                "fill the scores with -inf before the softmax instead."),
        Mistake("softmax over the heads", _with(softmax_dim=2),
                "the softmax runs over the heads (axis 2 of [B, T, n_h, S]): each head's weights must sum to 1 "
                "over the keys, softmax(dim=-1)."),
        Mistake("softmax over the queries", _with(softmax_dim=1),
                "the softmax runs over the queries (axis 1 of [B, T, n_h, S]): each query's weights must sum "
                "to 1 over the keys, softmax(dim=-1)."),
    ],
    hint="q_latent = einsum('bthd,hdc->bthc', q_nope, w_uk)  (W^UK absorbed into the query, d_c wide);\n"
         "scores = (einsum('bthc,bsc->bths', q_latent, c_kv) + einsum('bthr,bsr->bths', q_rope, k_rope))"
         " * softmax_scale;\n"
         "mask key s for query t when s > start_pos + t (masked_fill with -inf), softmax over s (dim=-1);\n"
         "o_latent = einsum('bths,bsc->bthc', p, c_kv); return einsum('bthc,hdc->bthd', o_latent, w_uv).",
    diagnose=_describe,
    checker_name="check_absorbed_attention",
)
