"""FlashMLA's FP8 latent cache: the latent in E4M3 with one fp32 scale per 128 values, the RoPE key in BF16.

DeepSeek-V3.2's FlashMLA stores each token of the MLA cache in 656 bytes: the 512-wide latent ``c^{KV}_t`` as
512 E4M3 values plus 4 fp32 scales (one per tile of 128), and the 64-wide RoPE key ``k^R_t`` in BF16 (128
bytes), against 1152 bytes in BF16. The kernel dequantises the tiles it reads (``q * scale``) and attends in
higher precision; the RoPE key stays BF16 because rotated positions are what a coarse grid would blur.

:class:`FP8LatentCache` is a :class:`helpers.mla.LatentCache` that stores exactly that and hands back the
dequantised latent, so every MLA attention (naive or absorbed, :mod:`helpers.mla.attention`) runs over it
unchanged. :func:`fp8_caches` makes one per block of a :class:`helpers.model.DeepSeekV3`;
:func:`generate_greedy` decodes over any list of caches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from helpers.fp8.formats import quantize
from helpers.mla import GrowingBuffer, LatentCache
from helpers.model.generate import decode
from helpers.rules import require_positive

FLASHMLA_TILE = 128
"""Latent values per fp32 scale in FlashMLA's FP8 cache."""


class FP8LatentCache(LatentCache):
    """One MLA layer's cache stored as FlashMLA stores it (V3.2): E4M3 latent, fp32 tile scales, BF16 RoPE key.

    Args:
        max_length: preallocate this many tokens (``None``: grow by doubling).
        tile: latent values per scale (128 in FlashMLA; it must divide ``d_c``).

    Stored per token: ``q`` ``(d_c,)`` float8_e4m3fn, ``scale`` ``(d_c / tile,)`` float32, ``k_rope`` ``(d_h^R,)``
    bfloat16: ``d_c + 4 d_c / tile + 2 d_h^R`` bytes (:meth:`bytes_per_token` measures them from the tensors).
    ``c_kv`` and ``k_rope`` read back dequantised, in the dtype the cache was first filled with.
    """

    def __init__(self, max_length: int | None = None, tile: int = FLASHMLA_TILE) -> None:
        super().__init__(max_length=max_length)
        require_positive(tile=tile)
        self.tile = tile
        self.dtype: torch.dtype | None = None

    def append(self, c_kv: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        """Quantise and append ``c_kv (B, T, d_c)``, ``k_rope (B, T, d_h^R)``; return the whole cache dequantised."""
        if c_kv.dim() != 3 or k_rope.dim() != 3:
            raise ValueError(f"c_kv and k_rope must be [B, T, width], got {tuple(c_kv.shape)} and {tuple(k_rope.shape)}")
        b, t, d_c = c_kv.shape
        if d_c % self.tile:
            raise ValueError(f"tile ({self.tile}) must divide the latent width d_c ({d_c}): one scale per tile of "
                             f"each token's latent; use FP8LatentCache(tile=...) with a divisor of {d_c}")
        self.dtype = self.dtype or c_kv.dtype
        q, scale = quantize(c_kv.reshape(b * t, d_c), (1, self.tile))  # (B*T, d_c) e4m3, (B*T, d_c/tile) fp32
        GrowingBuffer.append(self, q.view(b, t, d_c), scale.view(b, t, -1), k_rope.to(torch.bfloat16))
        return self.c_kv, self.k_rope

    @property
    def c_kv(self) -> Tensor:
        """The cached latent, dequantised: ``(B, S, d_c)`` in the cache's dtype."""
        q, scale = self.views()[:2]  # (B, S, d_c) e4m3, (B, S, d_c/tile) fp32
        b, s, d_c = q.shape
        tiles = q.float().view(b, s, d_c // self.tile, self.tile) * scale[..., None]  # (B, S, d_c/tile, tile)
        return tiles.view(b, s, d_c).to(self.dtype)

    @property
    def k_rope(self) -> Tensor:
        """The cached RoPE key (stored in BF16): ``(B, S, d_h^R)`` in the cache's dtype."""
        return self.views()[2].to(self.dtype)


def fp8_caches(model, tile: int = FLASHMLA_TILE) -> list[FP8LatentCache]:
    """One empty :class:`FP8LatentCache` per decoder block of ``model`` (a :class:`helpers.model.DeepSeekV3`)."""
    return [FP8LatentCache(tile=tile) for _ in model.layers]


@torch.no_grad()
def generate_greedy(model, input_ids: Tensor, max_new_tokens: int, caches: list[LatentCache]) -> Tensor:
    """Greedy decoding over the given (empty) caches with absorbed attention: ``(B, T)`` -> ``(B, T + n)``.

    The prompt fills the caches in one prefill step, then :func:`helpers.model.generate.decode` adds one token
    at a time, as ``model.generate`` does over ``model.new_caches()``.
    """
    require_positive(max_new_tokens=max_new_tokens)
    logits = model.logits(model.run_blocks(input_ids, caches, absorb=True)[:, -1])  # prefill: (B, V)
    return torch.cat([input_ids, decode(model, logits, caches, max_new_tokens, absorb=True)], dim=1)


@torch.no_grad()
def decode_logits(model, ids: Tensor, n_prompt: int, caches: list[LatentCache]) -> Tensor:
    """The logits of every decode step when the tokens are given (teacher forcing): ``(B, L - n_prompt, V)``.

    ``ids[:, :n_prompt]`` is the prefill; then ``ids[:, n_prompt:]`` go in one at a time over ``caches``. The logits
    at step ``i`` predict ``ids[:, n_prompt + i]``, so two caches fed the same ``ids`` are compared position by
    position, with no divergence of the generated text in between.
    """
    out = [model.logits(model.run_blocks(ids[:, :n_prompt], caches, absorb=True)[:, -1])]  # (B, V)
    for i in range(n_prompt, ids.shape[1] - 1):
        out.append(model.logits(model.run_blocks(ids[:, i:i + 1], caches, absorb=True)[:, -1]))  # (B, V)
    return torch.stack(out, dim=1)  # (B, L - n_prompt, V)
