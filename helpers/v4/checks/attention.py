"""Exercise checkers of notebooks 41 and 42 (DeepSeek-V4 compressed attention), on :mod:`helpers.teaching.checks`.

- :data:`check_sink_attention` -- ``sink_attention(q, kv, sinks, allowed, cos, sin, scale) -> o (B, T, H, d)``:
  shared-KV attention with a sink per head, the output's RoPE slice rotated back (notebook 41);
- :data:`check_hca_pool` -- ``hca_pool(kv, gate, position_bias, ratio) -> (B, W, d)``: HCA's gated pooling of the
  closed windows (notebook 41);
- :data:`check_csa_pool` -- ``csa_pool(kv, gate, position_bias, ratio) -> (B, W, d)``: CSA's overlapping pooling
  (notebook 42);
- :data:`check_visible_entries` -- ``visible_entries(positions, n_entries, ratio) -> (T, N)`` bool: which
  compressed entries a query may read (notebook 42).

Each known mistake is a one-step deviation from the reference; ``checker.audit()`` proves each gets its own message
(tests/test_v4_attention_checks.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from helpers.teaching.checks import Case, Checker, Mistake
from helpers.v4.attention import _softmax_with_sink
from helpers.v4.cache import window_mask
from helpers.v4.compressor import pool_windows
from helpers.v4.rope import rope_cos_sin, rotate_trailing


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- shared-KV attention with sinks
def _sink_case(description: str, seed: int, b: int, t: int, h: int, d: int, d_r: int, window: int) -> Case:
    g = _gen(seed)
    positions = torch.arange(t)
    cos, sin = rope_cos_sin(positions, d_r)
    return Case(description, dict(q=torch.randn(b, t, h, d, generator=g), kv=torch.randn(b, t, d, generator=g),
                                  sinks=torch.randn(h, generator=g) * 2, allowed=window_mask(positions, 0, t, window),
                                  cos=cos, sin=sin, scale=d ** -0.5))


def _sink_cases() -> list[Case]:
    return [_sink_case("B=2, T=6, 3 heads, d=8 with d_R=4, window 4", 1, 2, 6, 3, 8, 4, 4),
            _sink_case("B=1, T=5, 2 heads, d=6 with d_R=2, window 5", 2, 1, 5, 2, 6, 2, 5)]


def _sink_with(q: Tensor, kv: Tensor, sinks: Tensor, allowed: Tensor, cos: Tensor, sin: Tensor, scale: float, *,
               sink: bool = True, inverse: str = "-sin", mask: bool = True, scaled: bool = True) -> Tensor:
    logits = torch.einsum("bthd,bsd->bths", q, kv) * (scale if scaled else 1.0)  # (B, T, H, S)
    if mask:
        logits = logits.masked_fill(~allowed[None, :, None, :], float("-inf"))
    p = _softmax_with_sink(logits, sinks) if sink else logits.softmax(dim=-1)  # (B, T, H, S)
    o = torch.einsum("bths,bsd->bthd", p, kv)  # (B, T, H, d)
    if inverse == "none":
        return o
    return rotate_trailing(o, cos[:, None], (-sin if inverse == "-sin" else sin)[:, None])


def reference_sink_attention(q: Tensor, kv: Tensor, sinks: Tensor, allowed: Tensor, cos: Tensor, sin: Tensor,
                             scale: float) -> Tensor:
    """``o (B, T, H, d)``: softmax with a sink per head over the allowed keys, values = keys, RoPE slice rotated back."""
    return _sink_with(q, kv, sinks, allowed, cos, sin, scale)


def _k(**switch):
    return lambda **kw: _sink_with(**kw, **switch)


check_sink_attention = Checker(
    name="sink_attention",
    nudge="scores q . k over the shared KV head, masked, a softmax whose denominator also holds exp(sink of the "
          "head), the weighted sum of the SAME kv, then undo the RoPE of the values on the output.",
    hint="logits = einsum('bthd,bsd->bths', q, kv) * scale, masked_fill(~allowed[None, :, None, :], -inf); append "
         "sinks[None, None, :, None] as one more column, softmax over the last axis, drop that column; "
         "o = einsum('bths,bsd->bthd', p, kv); return rotate_trailing(o, cos[:, None], -sin[:, None]).",
    cases=_sink_cases,
    reference=reference_sink_attention,
    mistakes=[
        Mistake("no sink", _k(sink=False),
                "the softmax has no sink: each head's weights sum to 1, so a head cannot attend to nothing; put "
                "exp(sink_i) in the denominator (append the sink as an extra logit column, then drop its share)"),
        Mistake("inverse RoPE with +sin", _k(inverse="+sin"),
                "the output's RoPE slice was rotated forward by the query position, not back: use -sin (the "
                "inverse rotation), so a value rotated at p_s contributes at angle p_s - p_t"),
        Mistake("no inverse RoPE", _k(inverse="none"),
                "the output's trailing RoPE channels were left rotated: values are keys here (K = V), so they carry "
                "their position's rotation; rotate the output back by -p_t (rotate_trailing with -sin)"),
        Mistake("mask ignored", _k(mask=False),
                "every query attended to every key: apply the sliding-window causal mask before the softmax"),
        Mistake("no scale", _k(scaled=False),
                "the logits are sqrt(d) times too large: multiply q . k by scale = d**-0.5"),
    ],
)


# ---------------------------------------------------------------- HCA and CSA pooling
def _pool_case(description: str, seed: int, b: int, t: int, d: int, ratio: int, overlap: bool) -> Case:
    g = _gen(seed)
    width = (2 if overlap else 1) * d
    return Case(description, dict(kv=torch.randn(b, t, width, generator=g), gate=torch.randn(b, t, width, generator=g),
                                  position_bias=torch.randn(ratio, width, generator=g), ratio=ratio))


def _pool_with(kv: Tensor, gate: Tensor, position_bias: Tensor, ratio: int, *, overlap: bool, axis: int = 2,
               bias: bool = True, keep_partial: bool = False, layout: str = "right") -> Tensor:
    b, t, width = kv.shape
    n = -(-t // ratio) if keep_partial else t // ratio  # windows pooled
    if n * ratio > t:  # the open window padded as if it were complete
        pad = kv.new_zeros(b, n * ratio - t, width)
        kv, gate = torch.cat([kv, pad], 1), torch.cat([gate, pad], 1)
    kv = kv[:, : n * ratio].view(b, n, ratio, width)  # (B, W, m, c d)
    gate = gate[:, : n * ratio].view(b, n, ratio, width) + (position_bias if bias else 0)
    if overlap:
        d = width // 2
        halves = [(x[..., :d], x[..., d:]) for x in (kv, gate)]  # (C^a, C^b) of kv and of the gate
        if layout == "swapped":
            halves = [(second, first) for first, second in halves]
        if layout == "no overlap":
            kv, gate = halves[0][1], halves[1][1]
        else:
            if layout != "not shifted":  # C^a one window later; window 0 gets zeros with gate -inf
                halves = [(torch.cat([torch.full_like(a[:, :1], fill), a[:, :-1]], 1), c)
                          for (a, c), fill in zip(halves, (0.0, float("-inf")))]
            kv, gate = (torch.cat(pair, dim=2) for pair in halves)  # (B, W, 2m, d)
    return (kv * gate.softmax(axis)).sum(2)  # (B, W, d)


def reference_hca_pool(kv: Tensor, gate: Tensor, position_bias: Tensor, ratio: int) -> Tensor:
    """``(B, W, d)``: each closed window of ``ratio`` tokens pooled by ``softmax_j(Z_j + B_j)`` per channel."""
    n = kv.shape[1] // ratio
    kv, gate = (x[:, : n * ratio].view(x.shape[0], n, ratio, -1) for x in (kv, gate))  # (B, W, m, d)
    return pool_windows(kv, gate + position_bias, overlap=False)


def reference_csa_pool(kv: Tensor, gate: Tensor, position_bias: Tensor, ratio: int) -> Tensor:
    """``(B, W, d)``: entry ``w`` pools ``C^a`` of window ``w - 1`` and ``C^b`` of window ``w`` (first call)."""
    n = kv.shape[1] // ratio
    kv, gate = (x[:, : n * ratio].view(x.shape[0], n, ratio, -1) for x in (kv, gate))  # (B, W, m, 2d)
    return pool_windows(kv, gate + position_bias, overlap=True)


def _h(**switch):
    return lambda **kw: _pool_with(**kw, overlap=False, **switch)


def _c(**switch):
    return lambda **kw: _pool_with(**kw, overlap=True, **switch)


check_hca_pool = Checker(
    name="hca_pool",
    nudge="cut the closed windows into (B, W, m, d), add the bias of each place in the window to the gate, then a "
          "softmax over the window's tokens, channel by channel.",
    hint="W = T // ratio; kv = kv[:, :W*ratio].view(B, W, ratio, d); gate likewise, + position_bias; "
         "return (kv * gate.softmax(dim=2)).sum(dim=2)",
    cases=lambda: [_pool_case("B=2, T=11 tokens, d=3, m'=4 (2 closed windows + 3 open)", 3, 2, 11, 3, 4, False),
                   _pool_case("B=1, T=15 tokens, d=5, m'=5 (3 closed windows)", 4, 1, 15, 5, 5, False)],
    reference=reference_hca_pool,
    mistakes=[
        Mistake("softmax over channels", _h(axis=3),
                "the gate softmax ran over the channels: it runs over the window's tokens (axis 2 of (B, W, m, d)), "
                "one softmax per channel, so each channel picks its own mix of the m tokens"),
        Mistake("softmax over windows", _h(axis=1),
                "the gate softmax ran across windows: each window is pooled on its own, softmax over its m tokens"),
        Mistake("no position bias", _h(bias=False),
                "the learned bias B of each place in the window is missing: add position_bias (m, d) to the gate "
                "logits before the softmax"),
        Mistake("open window pooled", _h(keep_partial=True),
                "the last, incomplete window was pooled too: only closed windows of ratio tokens make an entry (the "
                "open one waits for its last token)"),
    ],
)

check_csa_pool = Checker(
    name="csa_pool",
    nudge="two series per token: C^a = kv[..., :d] feeds the NEXT window's entry, C^b = kv[..., d:] the current "
          "one's; entry w pools 2m tokens, softmax over them per channel; entry 0 has no previous window.",
    hint="view as (B, W, m, 2d), add position_bias; shift C^a one window later, filling window 0 with zeros and "
         "gate -inf; cat([C^a shifted, C^b], dim=2) for kv and gate; (kv * gate.softmax(dim=2)).sum(dim=2)",
    cases=lambda: [_pool_case("B=2, T=13 tokens, d=3, m=4 (3 closed windows + 1 open)", 5, 2, 13, 3, 4, True),
                   _pool_case("B=1, T=9 tokens, d=4, m=3 (3 closed windows)", 6, 1, 9, 4, 3, True)],
    reference=reference_csa_pool,
    mistakes=[
        Mistake("C^a and C^b swapped", _c(layout="swapped"),
                "the two series are swapped: C^a = kv[..., :d] is the half carried to the NEXT window's entry, "
                "C^b = kv[..., d:] the half pooled into the current window's entry"),
        Mistake("previous window not shifted", _c(layout="not shifted"),
                "entry w pooled C^a and C^b of the same window: C^a must come from window w - 1 (shift it one window "
                "later; window 0 gets zeros with gate -inf)"),
        Mistake("no overlap", _c(layout="no overlap"),
                "each entry pooled only its own window's C^b: CSA's windows overlap, entry w also pools window "
                "w - 1's C^a (2m tokens, stride m)"),
        Mistake("softmax over channels", _c(axis=3),
                "the gate softmax ran over the channels: it runs over the 2m tokens of the entry, one per channel"),
        Mistake("no position bias", _c(bias=False),
                "the learned bias B (m, 2d) is missing: add it to the gate logits of every window before the layout"),
    ],
)


# ---------------------------------------------------------------- which entries a query may see
def _visible_with(positions: Tensor, n_entries: int, ratio: int, *, rule: str = "(t+1)//m") -> Tensor:
    w = torch.arange(n_entries)[None, :]  # (1, N)
    t = positions[:, None]  # (T, 1)
    return {"(t+1)//m": w < (t + 1) // ratio, "t//m": w < t // ratio, "<=": w <= (t + 1) // ratio,
            "first token": w * ratio <= t}[rule]


def reference_visible_entries(positions: Tensor, n_entries: int, ratio: int) -> Tensor:
    """``(T, N)`` bool: the query at ``t`` sees entry ``w`` iff ``w < (t + 1) // m``."""
    return _visible_with(positions, n_entries, ratio)


def _v(rule):
    return lambda **kw: _visible_with(**kw, rule=rule)


check_visible_entries = Checker(
    name="visible_entries",
    nudge="entry w pools tokens w*m .. w*m + m - 1: the query at t may read it once ALL of them are at or before t.",
    hint="w = torch.arange(n_entries)[None, :]; return w < (positions[:, None] + 1) // ratio",
    cases=lambda: [Case("positions 0..11, 3 entries, m=4", dict(positions=torch.arange(12), n_entries=3, ratio=4)),
                   Case("positions 5..13 (a later call), 4 entries, m=3",
                        dict(positions=torch.arange(5, 14), n_entries=4, ratio=3))],
    reference=reference_visible_entries,
    mistakes=[
        Mistake("t // m", _v("t//m"),
                "the query at the last token of a window does not see that window's entry: the threshold is "
                "(t + 1) // m, not t // m (at t = m - 1 the first window is complete, the query is its last token)"),
        Mistake("<= instead of <", _v("<="),
                "one entry too many: entry w is visible iff w < (t + 1) // m; with <= a query reads the entry "
                "of a window that is not closed yet"),
        Mistake("visible from its first token", _v("first token"),
                "an entry became visible as soon as its window began (w * m <= t): it pools tokens up to "
                "w * m + m - 1, which are in the future until the window closes"),
    ],
)
