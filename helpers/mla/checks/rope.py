"""Checker of the decoupled RoPE split of notebook 22 (V2 paper eq. 14-16).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from helpers.mla import apply_rope, rope_cos_sin
from helpers.mla.checks.common import ShapeAwareChecker, _gen, _randn
from helpers.teaching.checks import Case, Mistake

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
        _split_rope_case("interleave=True, B=2, positions 0..3 (T=4), n_h=3, d_h=6, d_h^R=8", 0, 2, 4, 0, 3, 6, 8, True),
        _split_rope_case("interleave=False, B=1, positions 5..7 (T=3), n_h=2, d_h=10, d_h^R=4", 1, 1, 3, 5, 2, 10, 4,
                         False),
        _split_rope_case("interleave=True, B=2, one decode step at position 9, n_h=4, d_h=8, d_h^R=6", 2, 2, 1, 9, 4,
                         8, 6, True),
    ]


def reference_split_and_rope(q: Tensor, k_rope: Tensor, cos: Tensor, sin: Tensor, qk_nope_head_dim: int,
                             interleave: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``q (B, T, n_h, d_h + d_h^R)`` -> ``q_nope``, rotated ``q_rope``, and rotated shared ``k_rope (B, T, d_h^R)``.

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


def _mistake_q_rope_not_rotated(q, k_rope, cos, sin, qk_nope_head_dim, interleave=True):
    q_nope, _, k = reference_split_and_rope(q, k_rope, cos, sin, qk_nope_head_dim, interleave)
    return q_nope, q[..., qk_nope_head_dim:], k


def _mistake_cos_sin_swapped(q, k_rope, cos, sin, qk_nope_head_dim, interleave=True):
    return reference_split_and_rope(q, k_rope, sin, cos, qk_nope_head_dim, interleave)


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
    nudge="only the last qk_rope_head_dim numbers of each query head carry a position; the key's RoPE part is "
          "one vector per token, for all heads.",
    checker_name="check_split_rope",
    cases=_split_rope_cases,
    reference=reference_split_and_rope,
    mistakes=[
        Mistake("RoPE on the nope part", _mistake_rope_on_nope_part,
                "RoPE was applied to the front channels (the split sizes or their order are swapped): each head's "
                "query is laid out [q_nope (qk_nope_head_dim) | q_rope (qk_rope_head_dim)], so q_rope is the "
                "*last* qk_rope_head_dim channels and only those are rotated."),
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
        Mistake("q^R not rotated", _mistake_q_rope_not_rotated,
                "q_rope is returned unrotated: the query's RoPE part is rotated too (by the angles of its own "
                "position; give cos and sin a head axis, cos[:, None])."),
        Mistake("cos and sin swapped", _mistake_cos_sin_swapped,
                "cos and sin are swapped: a pair (x1, x2) becomes (x1 cos - x2 sin, x2 cos + x1 sin)."),
        Mistake("k^R not rotated", _mistake_k_rope_not_rotated,
                "k_rope is returned unrotated: the shared key gets the same RoPE rotation (same cos, sin) as "
                "the queries, before it is cached."),
    ],
    diagnose=_diagnose_split_rope,
    diagnose_shape=_diagnose_split_rope_shape,
    hint="q_nope, q_rope = q.split([qk_nope_head_dim, d_rope], dim=-1); rotate q_rope with "
         "cos[:, None], sin[:, None] (a head axis) and k_rope with cos, sin, using the pair layout `interleave`.",
)
