"""Exercise checkers of notebooks 33 and 34, built on :mod:`helpers.teaching.checks`.

- :data:`check_quantize_blocks` -- ``quantize_blocks(x, block_shape, ue8m0) -> (q, scale)``, block-wise FP8
  quantisation with one scale per block (V3 §3.3.2; notebook 33);
- :data:`check_quantize_latent` -- ``quantize_latent(c_kv, k_rope, tile) -> (q, scale, k_rope_bf16)``, one token
  of FlashMLA's FP8 cache (notebook 34).

Each known mistake is a small function making it on purpose; ``checker.audit()`` runs them all, and
``tests/test_fp8.py`` proves that each gets its own message.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from helpers.fp8.formats import AMAX_FLOOR, E4M3_MAX, blocks, quantize
from helpers.teaching.checks import Case, Checker, Mistake


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _as_float(out: Any) -> Any:
    """Compare values: FP8 and BF16 tensors as float32 (the dtypes are checked by their own mistakes)."""
    if isinstance(out, (tuple, list)):
        return tuple(t.float() if isinstance(t, Tensor) else t for t in out)
    return out


# ---------------------------------------------------------------------------------------------------
# quantize_blocks (notebook 33)
# ---------------------------------------------------------------------------------------------------

def _blocks_cases() -> list[Case]:
    g = _gen(0)
    act = torch.randn(16, 64, generator=g)
    act[:, 5] *= 100.0  # an outlier channel, as in real activations
    weight = torch.randn(32, 48, generator=g) * 0.02
    weight[:16, :16] = 0.0  # an all-zero block
    return [
        Case("activations (16, 64) with an outlier channel, 1 x 16 tiles, free scales",
             dict(x=act, block_shape=(1, 16), ue8m0=False)),
        Case("weights (32, 48) with an all-zero block, 16 x 16 blocks, power-of-two (UE8M0) scales",
             dict(x=weight, block_shape=(16, 16), ue8m0=True)),
        Case("activations (16, 64), 1 x 16 tiles, power-of-two (UE8M0) scales",
             dict(x=act * 3.0, block_shape=(1, 16), ue8m0=True)),
    ]


def reference_quantize_blocks(x: Tensor, block_shape: tuple[int, int], ue8m0: bool) -> tuple[Tensor, Tensor]:
    """:func:`helpers.fp8.quantize`."""
    return quantize(x, block_shape, ue8m0=ue8m0)


def _quantize_with(x, block_shape, ue8m0, *, amax="block", fp8_max=E4M3_MAX, clamp=E4M3_MAX, round_down=False,
                   floor=AMAX_FLOOR, invert=False, cast=True):
    """quantize_blocks with switches; the defaults are right, each other value is one mistake."""
    r, c = block_shape
    xb = blocks(x, block_shape)  # (R/r, r, C/c, c)
    if amax == "block":
        m = xb.abs().amax(dim=(1, 3))  # (R/r, C/c)
    elif amax == "row band":  # one maximum over all columns of the r rows
        m = xb.abs().amax(dim=(1, 2, 3))[:, None].expand(-1, x.shape[1] // c)
    else:  # "tensor": one maximum for everything
        m = x.abs().max().expand(x.shape[0] // r, x.shape[1] // c)
    scale = m.clamp(min=floor) / fp8_max if floor else m / fp8_max
    if ue8m0:
        scale = torch.exp2((torch.floor if round_down else torch.ceil)(torch.log2(scale)))
    y = xb * scale[:, None, :, None] if invert else xb / scale[:, None, :, None]
    y = y.clamp(-clamp, clamp).reshape(x.shape)
    return (y.to(torch.float8_e4m3fn) if cast else y), scale


def _mistake(**switch: Any):
    return lambda x, block_shape, ue8m0: _quantize_with(x, block_shape, ue8m0, **switch)


def _transposed_tiles(x, block_shape, ue8m0):
    return _quantize_with(x, tuple(reversed(block_shape)), ue8m0)


BLOCK_MISTAKES = [
    Mistake("scale per row band", _mistake(amax="row band"),
            "each scale is the maximum of a whole band of rows (all C columns), not of one r x c block: the "
            "outlier channel then coarsens every value in its rows. Take the max over each block only: view x as "
            "(R/r, r, C/c, c) and reduce dims (1, 3)."),
    Mistake("tiles along the wrong axis", _transposed_tiles,
            "your tiles run along the wrong axis: block_shape is (rows, columns), so (1, 16) is one row of 16 "
            "channels (V3's 1 x 128 activation tile), not 16 rows of one column (the 128 x 1 tiles of Wgrad)."),
    Mistake("one scale per tensor", _mistake(amax="tensor"),
            "every block got the scale of the whole tensor's maximum (per-tensor scaling): compute one maximum "
            "per block, so one outlier coarsens only its own block."),
    Mistake("power of two rounded down", _mistake(round_down=True),
            "the power-of-two scale is rounded down (floor): then x / s exceeds 448 in the blocks whose maximum "
            "is not a power of two, and the cast clips it to 448. Round up, 2 ** ceil(log2(amax / 448)): the "
            "scale may only grow, so x / s stays within the range."),
    Mistake("scale from E5M2's range", _mistake(fp8_max=float(torch.finfo(torch.float8_e5m2).max)),
            "the scale divides by 57344, the largest float8_e5m2, but q is float8_e4m3fn: x / s reaches 57344 and "
            "every value above 448 is clipped. Divide the block maximum by 448."),
    Mistake("clamped to 240", _mistake(clamp=240.0),
            "you clamp to +-240, the range of float8_e4m3fnuz (AMD's variant); float8_e4m3fn reaches 448, and "
            "values between 240 and 448 were clipped. Clamp to +-448 (torch.finfo(torch.float8_e4m3fn).max)."),
    Mistake("multiplied by the scale", _mistake(invert=True),
            "you multiply x by the scale: quantising divides, q = x / s with s = amax / 448 (so the block maximum "
            "lands on 448); dequantising multiplies, x ~ q * s."),
    Mistake("zero block gives NaN", _mistake(floor=0.0),
            "an all-zero block gives scale 0, and 0 / 0 = NaN: floor the block maximum at a tiny positive number "
            "(e.g. 1e-12) before dividing, so its scale stays positive and finite."),
    Mistake("not cast to FP8", _mistake(cast=False),
            "q holds the scaled values but was never rounded to FP8: cast it, q.to(torch.float8_e4m3fn), or the "
            "GEMM would multiply numbers no FP8 tensor core sees."),
]


def _diagnose_blocks(got: Any, want: Any, kwargs: dict[str, Any]) -> str | None:
    q, scale = got
    if scale.shape == want[1].shape and torch.isnan(q).any():
        return "q holds NaN: look at the blocks whose scale is 0 (an all-zero block) or NaN"
    if scale.dim() == 2 and scale.shape[1] > 1 and torch.allclose(scale, scale[:, :1].expand_as(scale)) \
            and not torch.allclose(want[1], want[1][:, :1].expand_as(want[1])):
        return ("your scales are equal along each row of blocks, the expected ones are not: the maximum is taken "
                "over more than one block; reduce over the r x c block only")
    return None


check_quantize_blocks = Checker(
    name="quantize_blocks",
    cases=_blocks_cases,
    reference=reference_quantize_blocks,
    mistakes=BLOCK_MISTAKES,
    diagnose=_diagnose_blocks,
    normalize=_as_float,
    nudge="one maximum per block, scale = amax / 448 (rounded up to a power of two with ue8m0), q = x / scale",
    hint="View x as (R/r, r, C/c, c); amax = x.abs().amax(dim=(1, 3)).clamp(min=1e-12); scale = amax / 448, or "
         "torch.exp2(torch.ceil(torch.log2(amax / 448))) with ue8m0; q = (x_blocks / scale[:, None, :, None])"
         ".clamp(-448, 448).reshape(R, C).to(torch.float8_e4m3fn).",
)


# ---------------------------------------------------------------------------------------------------
# quantize_latent (notebook 34)
# ---------------------------------------------------------------------------------------------------

def _latent_cases() -> list[Case]:
    g = _gen(1)
    c_kv = torch.randn(2, 5, 64, generator=g) * torch.linspace(0.1, 4.0, 64)  # channels of different sizes
    return [
        Case("c_kv (2, 5, 64), k_rope (2, 5, 8), tiles of 16", dict(c_kv=c_kv, k_rope=torch.randn(2, 5, 8, generator=g),
                                                                    tile=16)),
        Case("c_kv (1, 7, 32) with one token 50x larger, k_rope (1, 7, 4), tiles of 32",
             dict(c_kv=torch.randn(1, 7, 32, generator=g) * torch.tensor([1.0] * 3 + [50.0] + [1.0] * 3)[:, None],
                  k_rope=torch.randn(1, 7, 4, generator=g), tile=32)),
    ]


def reference_quantize_latent(c_kv: Tensor, k_rope: Tensor, tile: int) -> tuple[Tensor, Tensor, Tensor]:
    """One :class:`helpers.fp8.cache.FP8LatentCache` append: E4M3 latent, a scale per tile, BF16 RoPE key."""
    from helpers.fp8.cache import FP8LatentCache

    cache = FP8LatentCache(tile=tile)
    cache.append(c_kv, k_rope)
    q, scale, rope = cache.views()
    return q, scale, rope


def _latent_with(c_kv, k_rope, tile, *, over="tile", rope="bf16"):
    b, s, d_c = c_kv.shape
    tiles = c_kv.view(b, s, d_c // tile, tile)
    if over == "tile":
        amax = tiles.abs().amax(dim=-1)  # (B, S, d_c/tile)
    elif over == "tokens":  # one scale per tile of channels, shared by every token
        amax = tiles.abs().amax(dim=(1, 3), keepdim=True).squeeze(-1).expand(b, s, d_c // tile)
    else:  # "token": one scale for the token's whole latent
        amax = tiles.abs().amax(dim=(2, 3))[..., None].expand(b, s, d_c // tile)
    scale = amax.clamp(min=AMAX_FLOOR) / E4M3_MAX
    q = (tiles / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).view(b, s, d_c).to(torch.float8_e4m3fn)
    if rope == "bf16":
        k = k_rope.to(torch.bfloat16)
    elif rope == "fp32":
        k = k_rope
    else:  # "fp8": quantised like the latent, one scale per token
        k = quantize(k_rope.reshape(b * s, -1), (1, k_rope.shape[-1]))[0].view(b, s, -1)
    return q, scale, k


def _latent_mistake(**switch: Any):
    return lambda c_kv, k_rope, tile: _latent_with(c_kv, k_rope, tile, **switch)


LATENT_MISTAKES = [
    Mistake("scale shared over tokens", _latent_mistake(over="tokens"),
            "your scale is shared by all tokens (the maximum runs over the sequence axis): the cache grows one "
            "token at a time, so a scale must belong to one token's tile of `tile` channels, fixed when that "
            "token is written; a later, larger token would otherwise change every earlier entry."),
    Mistake("one scale per token", _latent_mistake(over="token"),
            "one scale covers the token's whole latent: FlashMLA keeps one per tile of `tile` values (4 per "
            "512-wide latent), so a large channel coarsens only its own tile."),
    Mistake("RoPE key in FP8", _latent_mistake(rope="fp8"),
            "the RoPE key was quantised to FP8 too: FlashMLA keeps k^R in BF16 (the rotated position signal "
            "would blur on the coarse FP8 grid); cast it with k_rope.to(torch.bfloat16)."),
    Mistake("RoPE key left in FP32", _latent_mistake(rope="fp32"),
            "the RoPE key is left in FP32 (4 bytes per value): FlashMLA stores it in BF16, 2 bytes; cast it with "
            "k_rope.to(torch.bfloat16)."),
]


def _diagnose_latent(got: Any, want: Any, kwargs: dict[str, Any]) -> str | None:
    scale, ref = got[1], want[1]
    if scale.dim() == 3 and scale.shape[1] > 1 and torch.allclose(scale, scale[:, :1].expand_as(scale)) \
            and not torch.allclose(ref, ref[:, :1].expand_as(ref)):
        return "your scales are equal for every token: take each token's maximum over its own tile only"
    return None


check_quantize_latent = Checker(
    name="quantize_latent",
    cases=_latent_cases,
    reference=reference_quantize_latent,
    mistakes=LATENT_MISTAKES,
    diagnose=_diagnose_latent,
    normalize=_as_float,
    nudge="each token's latent in tiles of `tile` values, one scale per tile; the RoPE key stays out of FP8",
    hint="tiles = c_kv.view(B, S, d_c // tile, tile); scale = tiles.abs().amax(-1).clamp(min=1e-12) / 448; "
         "q = (tiles / scale[..., None]).clamp(-448, 448).view(B, S, d_c).to(torch.float8_e4m3fn); "
         "return q, scale, k_rope.to(torch.bfloat16).",
)
