"""Evidence for the cached-layer checker: what the reference MLA caches and outputs, recomputed without a cache.

:class:`_Evidence` recomputes the latent, the RoPE key and each position's output from the whole
sequence at once, and tries the simple alternatives (a mask that hides cached keys, a query rotated at
another position, attention over the new token alone) that can reproduce a wrong output exactly;
:mod:`helpers.mla.checks.cached` reports only what these show.
"""

from __future__ import annotations

import torch
from torch import Tensor

from helpers.mla import MultiHeadLatentAttention, apply_rope, naive_attention

ATOL, RTOL = 1e-5, 1e-4


def _rotate(layer: MultiHeadLatentAttention, x: Tensor, positions: Tensor, heads: bool) -> Tensor:
    cos, sin = layer.rope_tables(positions)
    if heads:
        cos, sin = cos[:, None], sin[:, None]
    return apply_rope(x, cos, sin, layer.rope_interleave)


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=ATOL, rtol=RTOL)


def _rows_differ(got: Tensor, want: Tensor) -> list[int]:
    """Token positions (axis 1 of ``(B, S, width)``) where two cached tensors differ."""
    bad = ~torch.isclose(got.double(), want.double(), atol=ATOL, rtol=RTOL)
    return bad.any(dim=2).any(dim=0).nonzero().flatten().tolist()


def _tokens_differ(got: Tensor, want: Tensor, first: int) -> str:
    bad = ~torch.isclose(got.double(), want.double(), atol=ATOL, rtol=RTOL, equal_nan=True)
    positions = [first + i for i in bad.any(dim=2).any(dim=0).nonzero().flatten().tolist()]
    nan = torch.isnan(got).any(dim=2).any(dim=0).nonzero().flatten().tolist()
    text = f"the output differs at position(s) {positions} (largest difference " \
           f"{(got - want).abs().nan_to_num(nan=float('inf')).max().item():.3g})"
    if nan:
        text += (f"; NaN at position(s) {[first + i for i in nan]}: a softmax over a row whose keys are all "
                 "masked (-inf) gives NaN")
    return text


class _Evidence:
    """Recomputes, without a cache, what the reference layer caches and outputs, and simple alternatives."""

    def __init__(self, ref: MultiHeadLatentAttention, x: Tensor) -> None:
        self.ref, self.x = ref, x
        b, t, _ = x.shape
        q = ref.wq(x) if ref.q_lora_rank is None else ref.wq_b(ref.q_norm(ref.wq_a(x)))
        self.q_nope, self.q_rope = q.view(b, t, ref.n_heads, ref.qk_head_dim).split(
            [ref.qk_nope_head_dim, ref.qk_rope_head_dim], dim=-1)
        self.c_raw, self.k_raw = ref.wkv_a(x).split([ref.kv_lora_rank, ref.qk_rope_head_dim], dim=-1)
        self.c_kv = ref.kv_norm(self.c_raw)
        self.k_rope = _rotate(ref, self.k_raw, torch.arange(t), heads=False)

    def output(self, p: int, *, q_position: int | None = None, keys: list[int] | None = None) -> Tensor:
        """Output ``(B, H)`` of the token at position ``p``, its query rotated at ``q_position`` (default ``p``),
        attending over the cached tokens ``keys`` (default ``0..p``)."""
        ref = self.ref
        keys = list(range(p + 1)) if keys is None else keys
        q_rope = _rotate(ref, self.q_rope[:, p:p + 1], torch.tensor([p if q_position is None else q_position]),
                         heads=True)
        w_uk, w_uv = ref.up_projections()
        o = naive_attention(self.q_nope[:, p:p + 1], q_rope, self.c_kv[:, keys], self.k_rope[:, keys], w_uk, w_uv,
                            ref.softmax_scale, len(keys) - 1)
        return ref.wo(o.reshape(o.shape[0], 1, -1))[:, 0]

    def k_rope_angle(self, got_row: Tensor, p: int) -> int | None:
        """The position whose RoPE angle the cached ``k^R`` row for position ``p`` carries, if any nearby."""
        for q in range(-2 * self.x.shape[1], 3 * self.x.shape[1]):
            if _close(got_row, _rotate(self.ref, self.k_raw[:, p:p + 1], torch.tensor([q]), heads=False)[:, 0]):
                return q
        return None

    def explain_step(self, got: Tensor, p: int) -> str | None:
        """Which simple alternative reproduces the wrong output ``got (B, H)`` of the token at position ``p``."""
        for m in range(p):
            if _close(got, self.output(p, keys=list(range(m + 1)))):
                return (f"it equals attention over keys 0..{m} only, where the token at position {p} should see "
                        f"keys 0..{p}: the causal mask (its offset) hides cached keys it should see")
        if p > 0 and _close(got, self.output(p, keys=[p])):
            return (f"it equals attention over the new token alone (key {p}), not over the cached keys 0..{p}: "
                    "attend over everything the cache returns after appending")
        for q in range(-2 * self.x.shape[1], 3 * self.x.shape[1]):
            if q != p and _close(got, self.output(p, q_position=q)):
                return (f"it equals the output with the query's RoPE part rotated at position {q} instead of {p}: "
                        "q^R must be rotated at the token's absolute position")
        return None
