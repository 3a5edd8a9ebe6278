"""Exercise checkers of notebook 25 (DeepSeek Sparse Attention), built on :mod:`helpers.teaching.checks`.

- :data:`check_lightning_scores` -- ``lightning_scores(q, k, w) -> I (B, T, S)``: the indexer score
  ``I_{t,s} = sum_j w_{t,j} ReLU(q_{t,j} . k_s)`` with ``transformers``' two scales (``d_I^{-1/2}`` on every
  dot product, ``n_I^{-1/2}`` on the head weights);
- :data:`check_topk_sparse_attention` -- ``topk_sparse_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv,
  softmax_scale, scores, topk, start_pos) -> o``: causal top-k of the indexer scores, one gather of the
  selected latents for all heads, absorbed attention over them.

The known mistakes are one-step deviations from a reference with switches (each ``Mistake`` flips one);
``checker.audit()`` proves each gets its own message (tests/test_dsa_checks.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from helpers.dsa.attention import gather_tokens
from helpers.teaching.checks import Case, Checker, Mistake


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- the indexer score
def _score_case(description: str, seed: int, b: int, t: int, s: int, n_i: int, d_i: int) -> Case:
    g = _gen(seed)
    return Case(description, dict(q=torch.randn(b, t, n_i, d_i, generator=g), k=torch.randn(b, s, d_i, generator=g),
                                  w=torch.randn(b, t, n_i, generator=g)))


def _score_cases() -> list[Case]:
    # every size differs (B, T, S, n_I, d_I), and n_I != d_I so the two scales cannot stand in for each other
    return [_score_case("B=2, T=3, S=5, n_I=3 heads, d_I=8", 1, 2, 3, 5, 3, 8),
            _score_case("B=1, T=4, S=7, n_I=2 heads, d_I=10", 2, 1, 4, 7, 2, 10)]


def _scores_with(q: Tensor, k: Tensor, w: Tensor, *, relu: str = "per head", weights: str = "outside",
                 dot_scale: str = "sqrt", head_scale: bool = True, softmax: bool = False) -> Tensor:
    n_i, d_i = q.shape[-2], q.shape[-1]
    dots = torch.einsum("btjd,bsd->btjs", q, k) * {"sqrt": d_i ** -0.5, "none": 1.0, "full": 1.0 / d_i}[dot_scale]
    w = w * (n_i ** -0.5 if head_scale else 1.0)  # (B, T, n_I)
    if weights == "ignored":
        w = torch.ones_like(w) * (n_i ** -0.5 if head_scale else 1.0)
    if weights == "inside":
        per_head = torch.relu(dots * w[..., None])  # (B, T, n_I, S)
        out = per_head.sum(dim=2)
    elif relu == "per head":
        out = torch.einsum("btj,btjs->bts", w, torch.relu(dots))
    elif relu == "after sum":
        out = torch.relu(torch.einsum("btj,btjs->bts", w, dots))
    else:  # no ReLU
        out = torch.einsum("btj,btjs->bts", w, dots)
    return torch.softmax(out, dim=-1) if softmax else out


def reference_lightning_scores(q: Tensor, k: Tensor, w: Tensor) -> Tensor:
    """``I (B, T, S)`` from ``q (B, T, n_I, d_I)``, ``k (B, S, d_I)`` and raw head weights ``w (B, T, n_I)``."""
    return _scores_with(q, k, w)


def _s(**switch):
    return lambda **kw: _scores_with(**kw, **switch)


check_lightning_scores = Checker(
    name="lightning_scores",
    nudge="one dot product per indexer head against the ONE shared key, a ReLU, then a weighted sum over "
          "the heads; two scales, one for each of the two widths.",
    hint="dots = einsum('btjd,bsd->btjs', q, k) * d_I**-0.5 (d_I = q.shape[-1]); "
         "I = einsum('btj,btjs->bts', w * n_I**-0.5, relu(dots)) (n_I = q.shape[-2]). The ReLU acts on each "
         "head's dot product before the weights; the weights may be negative.",
    cases=_score_cases,
    reference=reference_lightning_scores,
    mistakes=[
        Mistake("no ReLU", _s(relu="none"),
                "the scores match a weighted sum of the raw dot products: apply ReLU to each head's q . k "
                "before weighting (I = sum_j w_j ReLU(q_j . k))"),
        Mistake("ReLU after the head sum", _s(relu="after sum"),
                "the ReLU was applied to the weighted sum over heads: it belongs on each head's dot product, "
                "before the weights w_{t,j} (which may be negative)"),
        Mistake("weights inside the ReLU", _s(weights="inside"),
                "the head weight was multiplied in before the ReLU: ReLU(w_j q_j . k) drops heads with negative "
                "weights; the weights multiply ReLU(q_j . k) from outside"),
        Mistake("weights ignored", _s(weights="ignored"),
                "every head counts the same: multiply each head's ReLU(q_j . k) by its weight w_{t,j}"),
        Mistake("no dot-product scale", _s(dot_scale="none"),
                "the scores are sqrt(d_I) times too large: multiply every q . k by d_I**-0.5 "
                "(d_I = index_head_dim = q.shape[-1]), transformers' softmax_scale"),
        Mistake("dot product divided by d_I", _s(dot_scale="full"),
                "the dot products were divided by d_I: the scale is d_I**-0.5, one over the square root"),
        Mistake("no head-weight scale", _s(head_scale=False),
                "the scores are sqrt(n_I) times too large: the head weights are multiplied by n_I**-0.5 "
                "(n_I = index_n_heads = q.shape[-2])"),
        Mistake("no scale at all", _s(dot_scale="none", head_scale=False),
                "both scales are missing: d_I**-0.5 on the dot products and n_I**-0.5 on the head weights"),
        Mistake("softmax over the keys", _s(softmax=True),
                "the scores were turned into a softmax: the indexer only ranks tokens, return the raw I_{t,s} "
                "(a softmax is used only in the warm-up loss)"),
    ],
)


# ---------------------------------------------------------------- top-k, gather, sparse absorbed attention
def _sparse_case(description: str, seed: int, b: int, t: int, start: int, h: int, d_n: int, d_r: int, d_v: int,
                 d_c: int, topk: int) -> Case:
    g = _gen(seed)
    s = start + t
    return Case(description, dict(
        q_nope=torch.randn(b, t, h, d_n, generator=g), q_rope=torch.randn(b, t, h, d_r, generator=g),
        c_kv=torch.randn(b, s, d_c, generator=g), k_rope=torch.randn(b, s, d_r, generator=g),
        w_uk=torch.randn(h, d_n, d_c, generator=g) / d_c ** 0.5, w_uv=torch.randn(h, d_v, d_c, generator=g) / d_c ** 0.5,
        softmax_scale=(d_n + d_r) ** -0.5, scores=torch.randn(b, t, s, generator=g), topk=topk, start_pos=start))


def _sparse_cases() -> list[Case]:
    # prefill with k above the first queries' visible counts (padded slots) and below the last ones' (a real
    # choice), and a decode step; B=2 so a gather that ignores the batch is caught. The cached cases tell the
    # position mistakes apart: positions restarting at 0 fail at decode; an offset applied twice hides nothing
    # in the decode and short-chunk cases (like no mask at all) but still hides keys when T > start_pos.
    return [_sparse_case("prefill: B=2, T=S=7, start_pos=0, k=3, n_h=2, d_h=6, d_h^R=4, d_v=5, d_c=9",
                         1, 2, 7, 0, 2, 6, 4, 5, 9, 3),
            _sparse_case("decode: B=2, T=1, start_pos=8 (S=9), k=4, n_h=3, d_h=5, d_h^R=2, d_v=7, d_c=11",
                         2, 2, 1, 8, 3, 5, 2, 7, 11, 4),
            _sparse_case("chunk: B=1, T=3, start_pos=5 (S=8), k=5, n_h=2, d_h=4, d_h^R=6, d_v=3, d_c=10",
                         3, 1, 3, 5, 2, 4, 6, 3, 10, 5),
            _sparse_case("long chunk after a short cache: B=1, T=5, start_pos=2 (S=7), k=3, n_h=2, d_h=5, d_h^R=3, "
                         "d_v=4, d_c=6", 4, 1, 5, 2, 2, 5, 3, 4, 6, 3)]


def _sparse_with(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, softmax_scale, scores, topk, start_pos, *,
                 causal: str = "before topk", offset: str = "start_pos", largest: bool = True, batch: bool = True,
                 mask_pad: bool = True, select: bool = True, rope: bool = True, scale: bool = True,
                 softmax_dim: int = -1) -> Tensor:
    t, s = scores.shape[1], scores.shape[2]
    first = {"start_pos": start_pos, "zero": 0, "twice": 2 * start_pos, "plus one": start_pos + 1}[offset]
    rows = first + torch.arange(t)[:, None]  # (T, 1) the absolute position of each query
    visible = torch.arange(s)[None, :] < rows if causal == "strict" else torch.arange(s)[None, :] <= rows  # (T, S)
    if causal == "none":
        visible = torch.ones_like(visible)
    if not select:
        topk = s
    fill = float("-inf") if largest else float("inf")
    values, idx = scores.masked_fill(~visible[None], fill).topk(min(topk, s), dim=-1, largest=largest)  # (B, T, k)
    valid = values.isfinite() if mask_pad else torch.ones_like(idx, dtype=torch.bool)
    if batch:
        c_sel, r_sel = gather_tokens(c_kv, idx), gather_tokens(k_rope, idx)  # (B, T, k, d_c), (B, T, k, d_r)
    else:  # every batch row read from sequence 0's cache
        c_sel, r_sel = c_kv[0][idx], k_rope[0][idx]
    q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)
    logits = torch.einsum("bthc,btkc->bthk", q_latent, c_sel)
    if rope:
        logits = logits + torch.einsum("bthr,btkr->bthk", q_rope, r_sel)
    logits = logits * (softmax_scale if scale else 1.0)
    p = torch.softmax(logits.masked_fill(~valid[:, :, None, :], float("-inf")), dim=softmax_dim)
    return torch.einsum("bthc,hdc->bthd", torch.einsum("bthk,btkc->bthc", p, c_sel), w_uv)


def reference_topk_sparse_attention(**kwargs: Any) -> Tensor:
    """``o (B, T, n_h, d_v)``: absorbed MLA over each query's top-``k`` visible tokens by ``scores``."""
    return _sparse_with(**kwargs)


def _t(**switch):
    return lambda **kw: _sparse_with(**kw, **switch)


check_topk_sparse_attention = Checker(
    name="topk_sparse_attention",
    nudge="hide the future from the indexer scores, keep the k best per query, gather those latents and RoPE "
          "keys once (all heads share them), then run absorbed attention over the k gathered tokens only.",
    hint="visible = arange(S)[None, :] <= start_pos + arange(T)[:, None]; values, idx = scores.masked_fill("
         "~visible, -inf).topk(min(topk, S), dim=-1); valid = values.isfinite(); c_sel = c_kv[arange(B)[:, None, "
         "None], idx] (same for k_rope); scores over 'bthc,btkc->bthk' (+ the RoPE part) times softmax_scale, "
         "-inf where not valid, softmax over k, sum the gathered latents, apply w_uv.",
    cases=_sparse_cases,
    reference=reference_topk_sparse_attention,
    mistakes=[
        Mistake("positions restart at zero", _t(offset="zero"),
                "the start position was ignored: query t sits at absolute position start_pos + t (the cache holds "
                "start_pos earlier tokens), but your mask treats it as position t, so a decode step sees only the "
                "first tokens of the cache"),
        Mistake("offset applied twice", _t(offset="twice"),
                "the start position was added twice: query t may see tokens up to 2 * start_pos + t. Its position "
                "is start_pos + t; if your positions already include start_pos, do not add it again"),
        Mistake("mask off by one (sees the next token)", _t(offset="plus one"),
                "the mask is off by one: query t also sees token start_pos + t + 1, the next one; the visible "
                "tokens are s <= start_pos + t"),
        Mistake("no causal mask before top-k", _t(causal="none"),
                "queries attend to future tokens: mask the indexer scores with -inf beyond start_pos + t "
                "BEFORE taking the top-k"),
        Mistake("query cannot see itself", _t(causal="strict"),
                "query t never selects its own token (the mask is off by one the other way): the visible tokens "
                "are 0..start_pos + t inclusive (<=, not <)"),
        Mistake("k smallest scores", _t(largest=False),
                "the k LOWEST-scoring tokens were kept: topk must take the largest scores"),
        Mistake("gather ignores the batch", _t(batch=False),
                "every sequence read sequence 0's cache: gather with the batch index too, "
                "c_kv[arange(B)[:, None, None], idx]"),
        Mistake("padded slots attended", _t(mask_pad=False),
                "the first queries (fewer than k visible tokens) also attend to the -inf filler picks: "
                "mark slots whose selected score is -inf as invalid and mask them in the softmax"),
        Mistake("no selection (dense)", _t(select=False),
                "the output equals dense attention over every visible token: keep only the top-k tokens"),
        Mistake("RoPE score missing", _t(rope=False),
                "the RoPE part of the score is missing: add q_rope . k_rope of the gathered tokens"),
        Mistake("no softmax scale", _t(scale=False),
                "the scores were not multiplied by softmax_scale (1/sqrt(d_h + d_h^R))"),
        Mistake("softmax over the heads", _t(softmax_dim=2),
                "the softmax ran over the heads axis: normalise over the k selected tokens (the last axis)"),
    ],
)
