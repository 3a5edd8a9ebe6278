"""Checker of notebook 20's exercise: causal attention at a cache offset, with grouped key/value heads.

``causal_attention(q, k, v, start_pos) -> o``: ``q (B, n_h, T, d_h)`` are the new tokens at absolute
positions ``start_pos .. start_pos + T - 1``; ``k, v (B, n_kv, S, d_h)`` are all ``S`` tokens so far, with
``n_kv`` dividing ``n_h`` and query head ``i`` reading key/value head ``i // (n_h / n_kv)`` (GQA; ``n_kv =
n_h`` is MHA). DeepSeek-V2 eq. 1-8 and :class:`helpers.mla.MultiHeadAttention`.

The one-step mistakes are switches of :func:`_attention_with`, each flipped by one :class:`Mistake`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from helpers.mla.cache import causal_mask
from helpers.mla.checks.common import ShapeAwareChecker, _gen, _randn, where_attention_differs
from helpers.teaching.checks import Case, Mistake


def _attention_with(q: Tensor, k: Tensor, v: Tensor, start_pos: int = 0, *, offset: str = "start_pos",
                    scale: str = "sqrt_d_h", softmax_dim: int = -1, mask: str = "-inf", grouping: str = "block",
                    swap_kv: bool = False, transpose_out: bool = False) -> Tensor:
    """Causal grouped attention with switches; the defaults are right, each other value is one mistake."""
    b, n_h, t, d_h = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    if swap_kv:
        k, v = v, k
    group = n_h // n_kv
    heads = torch.arange(n_h) // group if grouping == "block" else torch.arange(n_h) % n_kv  # (n_h,)
    k, v = k[:, heads], v[:, heads]  # (B, n_h, S, d_h): head i reads key/value head heads[i]
    width = {"sqrt_d_h": math.sqrt(d_h), "sqrt_d_model": math.sqrt(n_h * d_h), "d_h": d_h, "none": 1.0}[scale]
    scores = q @ k.transpose(-2, -1) / width  # (B, n_h, T, S)
    first = {"start_pos": start_pos, "zero": 0, "minus_one": start_pos - 1, "plus_one": start_pos + 1}[offset]
    visible = causal_mask(t, s, first)  # (T, S)
    if mask == "-inf":
        scores = scores.masked_fill(~visible, float("-inf"))
    elif mask == "zero":
        scores = scores.masked_fill(~visible, 0.0)
    p = scores.softmax(dim=softmax_dim)
    if mask == "after_softmax":
        p = p * visible
    o = p @ v  # (B, n_h, T, d_h)
    return o.transpose(1, 2) if transpose_out else o


def _mistake(**switch: Any) -> Callable[..., Tensor]:
    return lambda q, k, v, start_pos=0: _attention_with(q, k, v, start_pos, **switch)


def _case(description: str, seed: int, b: int, n_h: int, n_kv: int, t: int, start: int, d_h: int) -> Case:
    g = _gen(seed)
    s = start + t
    return Case(description, dict(q=_randn(b, n_h, t, d_h, g=g), k=_randn(b, n_kv, s, d_h, g=g),
                                  v=_randn(b, n_kv, s, d_h, g=g), start_pos=start))


def _cases() -> list[Case]:
    return [
        _case("a chunk of T=3 new tokens at start_pos=4 (S=7 keys), n_h=6 query heads sharing n_kv=2 "
              "key/value heads, d_h=5, B=2", 0, 2, 6, 2, 3, 4, 5),
        _case("prefill: T=S=5, start_pos=0, n_h=n_kv=3 (plain MHA), d_h=4, B=1", 1, 1, 3, 3, 5, 0, 4),
        _case("one decode step: T=1 at start_pos=8 (S=9), n_h=4, n_kv=1 (MQA), d_h=6, B=3", 2, 3, 4, 1, 1, 8, 6),
    ]


def _diagnose(got: Tensor, want: Tensor, kwargs: dict[str, Any]) -> str:
    t, start = kwargs["q"].shape[2], kwargs["start_pos"]
    return where_attention_differs(got, want, head_axis=1, token_axis=2, positions=range(start, start + t))


check_causal_attention = ShapeAwareChecker(
    name="causal_attention",
    nudge="scores of every query against every key, scaled; hide the keys a query may not see yet (it sits "
          "at position start_pos + t); a softmax over the keys; then mix the values. Each query head reads "
          "the key/value head of its group.",
    cases=_cases,
    reference=_attention_with,
    mistakes=[
        Mistake("mask offset ignored", _mistake(offset="zero"),
                "the mask ignores start_pos: query t of the chunk sits at absolute position start_pos + t and "
                "sees keys 0 .. start_pos + t; your mask lets it see only keys 0 .. t, as if nothing were cached."),
        Mistake("mask off by one: diagonal hidden", _mistake(offset="minus_one"),
                "off by one: each query may also see its own key (key j is visible when j <= start_pos + t, "
                "not j < start_pos + t)."),
        Mistake("mask off by one: next key visible", _mistake(offset="plus_one"),
                "off by one: each query also sees the key just after it (one token in the future); the last "
                "visible key is start_pos + t."),
        Mistake("no causal mask", _mistake(mask="none"),
                "no causal mask (or an offset as large as the number of keys S, e.g. the cache length after "
                "appending): every query sees every key, future ones included. Set the scores of keys "
                "j > start_pos + t to -inf before the softmax."),
        Mistake("masked with 0 instead of -inf", _mistake(mask="zero"),
                "the hidden keys were set to a score of 0, which still gets weight exp(0) in the softmax: "
                "fill them with float('-inf')."),
        Mistake("mask applied after the softmax", _mistake(mask="after_softmax"),
                "the mask was applied after the softmax, so the visible weights no longer sum to 1: mask the "
                "scores with -inf before the softmax."),
        Mistake("scale by d_model", _mistake(scale="sqrt_d_model"),
                "the scores are divided by sqrt(n_h * d_h) (the model width); the scale is per head: "
                "1 / sqrt(d_h), with d_h = q.shape[-1]."),
        Mistake("scale by d_h, not its square root", _mistake(scale="d_h"),
                "the scores are divided by d_h; divide by sqrt(d_h)."),
        Mistake("no scale", _mistake(scale="none"),
                "the scores are not scaled: divide them by sqrt(d_h) before the softmax."),
        Mistake("softmax over the queries", _mistake(softmax_dim=-2),
                "the softmax runs over the queries (dim=-2); each query's weights must sum to 1 over the "
                "keys: softmax(dim=-1)."),
        Mistake("wrong head grouping (i % n_kv)", _mistake(grouping="modulo"),
                "query heads read the wrong key/value heads: head i belongs to group i // (n_h // n_kv) "
                "(consecutive heads share a key/value head: repeat_interleave), not i % n_kv (repeat)."),
        Mistake("keys and values swapped", _mistake(swap_kv=True),
                "keys and values are swapped: score the queries against k, then mix v."),
        Mistake("output with tokens before heads", _mistake(transpose_out=True),
                "the output is (B, T, n_h, d_h): it was transposed for the output projection. Return it as "
                "(B, n_h, T, d_h), like q; the layer transposes it afterwards."),
    ],
    diagnose=_diagnose,
    hint="group = n_h // n_kv; k = k.repeat_interleave(group, dim=1) and v likewise (head i reads i // group); "
         "scores = q @ k.transpose(-2, -1) / sqrt(d_h); visible = helpers.mla.causal_mask(T, S, start_pos) "
         "(key j <= start_pos + t); scores.masked_fill(~visible, -inf).softmax(dim=-1) @ v.",
)
