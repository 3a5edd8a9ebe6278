"""Decode-time caches: a growing preallocated buffer, the MHA/GQA key-value cache, MLA's latent cache.

``GrowingBuffer`` appends along one axis with amortised O(1) copies; ``KVCache`` holds keys and
values per key/value head (``2 n_g d_h`` elements per token); ``LatentCache`` holds only the latent
``c^{KV}`` and the shared RoPE key ``k^R`` (``d_c + d_h^R`` elements per token, V2 paper §2.1.3).
``causal_mask`` is the mask of queries that start at a cache offset (drawn by
:func:`helpers.mla.diagrams.draw_causal_mask` in notebook 20).
"""

from __future__ import annotations

import torch
from torch import Tensor

from helpers.rules import require_positive


class GrowingBuffer:
    """Tensors that grow along one axis, preallocated so an append copies only the new entries.

    The capacity doubles when it runs out (or is ``max_length`` from the start), so appending one
    token at a time costs amortised O(1) copies instead of re-copying the whole cache each step as
    ``torch.cat`` would. ``views()`` returns the filled part, without copying.

    The buffers are written in place: a cache is an inference structure. To train, call the layer
    without a cache.
    """

    def __init__(self, axis: int, max_length: int | None = None) -> None:
        if max_length is not None:
            require_positive(max_length=max_length)
        self.axis = axis
        self.max_length = max_length
        self.length = 0
        self.owner: object | None = None  # the layer that filled it (see bind)
        self._buffers: list[Tensor] = []

    def bind(self, layer: object) -> None:
        """Tie this cache to ``layer`` on its first use; ``ValueError`` if another layer already filled it.

        Two attention layers writing into one cache would each read the other's entries as their own past
        and corrupt both outputs without a word: every layer needs its own cache (``layer.new_cache()``).
        """
        if self.owner is None:
            self.owner = layer
        elif self.owner is not layer:
            raise ValueError(f"this {type(self).__name__} already holds the entries of another "
                             f"{type(self.owner).__name__}: give every attention layer its own cache "
                             "(layer.new_cache(), or model.new_caches() for a whole model)")

    def truncate(self, length: int) -> None:
        """Forget every entry from ``length`` on (a rejected draft, a re-timed step); the buffers stay allocated."""
        if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= self.length:
            raise ValueError(f"length must be an integer in 0..{self.length} (the cached entries), got {length!r}")
        self.length = length

    def append(self, *new: Tensor) -> tuple[Tensor, ...]:
        """Write ``new`` (each ``T`` entries long along ``axis``) after the filled part; return all entries."""
        steps = {t.shape[self.axis] for t in new}
        if len(steps) != 1:
            raise ValueError(f"all appended tensors must have the same length along axis {self.axis}, got {steps}")
        step = steps.pop()
        if self._buffers:
            if len(new) != len(self._buffers):
                raise ValueError(f"this cache holds {len(self._buffers)} tensors per append, got {len(new)}")
            for buf, t in zip(self._buffers, new):
                if t.dtype != buf.dtype or t.device != buf.device:  # copy_ would cast silently
                    raise TypeError(f"cache holds {buf.dtype} on {buf.device}, got {t.dtype} on {t.device}: "
                                    "continue a cache in the dtype and device it was started with")
                want = buf.shape[: self.axis] + buf.shape[self.axis + 1:]
                got = t.shape[: self.axis] + t.shape[self.axis + 1:]
                if want != got:
                    raise ValueError(f"cache holds entries of shape {tuple(want)} (without the sequence axis), "
                                     f"got {tuple(got)}")
        needed = self.length + step
        capacity = self._buffers[0].shape[self.axis] if self._buffers else 0
        if needed > capacity or not self._buffers:  # (an empty first append still allocates: T = 0 works)
            if self.max_length is not None and needed > self.max_length:
                raise ValueError(f"cache is full: max_length={self.max_length}, asked for {needed} entries")
            new_capacity = self.max_length or max(needed, 2 * capacity, 16)
            self._buffers = [self._grow(buf, t, new_capacity) for buf, t in
                             zip(self._buffers or [None] * len(new), new)]
        for buf, t in zip(self._buffers, new):
            buf.narrow(self.axis, self.length, step).copy_(t)
        self.length = needed
        return self.views()

    def _grow(self, old: Tensor | None, like: Tensor, capacity: int) -> Tensor:
        shape = list(like.shape)
        shape[self.axis] = capacity
        buf = like.new_empty(shape)
        if old is not None:
            buf.narrow(self.axis, 0, self.length).copy_(old.narrow(self.axis, 0, self.length))
        return buf

    def views(self) -> tuple[Tensor, ...]:
        return tuple(buf.narrow(self.axis, 0, self.length) for buf in self._buffers)

    def nbytes(self) -> int:
        """Bytes of the filled entries (the reserved but unfilled capacity is not counted)."""
        return sum(v.numel() * v.element_size() for v in self.views())

    def reserved_bytes(self) -> int:
        """Bytes allocated, filled or not (up to twice :meth:`nbytes` when growing by doubling)."""
        return sum(b.numel() * b.element_size() for b in self._buffers)

    def bytes_per_token(self) -> float:
        """Cached bytes per token of one sequence: ``nbytes() / (batch * length)``."""
        if self.length == 0:
            raise ValueError("the cache is empty: append something before asking for bytes per token")
        batch = self._buffers[0].shape[0]
        return self.nbytes() / (batch * self.length)


class KVCache(GrowingBuffer):
    """One layer's cache of keys and values for every key/value head (MHA/GQA/MQA).

    Attributes:
        k, v: the cached keys and values, ``(B, n_kv_heads, S, d_h)`` (views of preallocated buffers).
        length: ``S``, the number of cached tokens.

    ``bytes_per_token()`` is ``2 n_kv_heads d_h`` times the bytes per element (V2 paper, Table 1).
    """

    def __init__(self, max_length: int | None = None) -> None:
        super().__init__(axis=2, max_length=max_length)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k, v (B, n_kv_heads, T, d_h)``; return all cached keys and values ``(B, n_kv_heads, S, d_h)``."""
        if k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"k and v must be [B, n_kv_heads, T, d_h], got {tuple(k.shape)} and {tuple(v.shape)}")
        return super().append(k, v)

    @property
    def k(self) -> Tensor:
        return self.views()[0]

    @property
    def v(self) -> Tensor:
        return self.views()[1]


def causal_mask(t: int, s: int, start_pos: int, device: torch.device | None = None) -> Tensor:
    """``(t, s)`` boolean mask, True where query ``i`` (at position ``start_pos + i``) may see key ``j``."""
    rows = torch.arange(start_pos, start_pos + t, device=device)[:, None]  # (t, 1)
    cols = torch.arange(s, device=device)[None, :]  # (1, s)
    return cols <= rows  # (t, s)



class LatentCache(GrowingBuffer):
    """One MLA layer's cache: only the latent ``c^{KV}`` and the shared RoPE key ``k^R`` (V2 paper, Sec. 2.1.3).

    Attributes:
        c_kv: ``(B, S, kv_lora_rank)``, the normalised latent (views of preallocated buffers).
        k_rope: ``(B, S, qk_rope_head_dim)``, the RoPE key after rotation.
        length: ``S``, the number of cached tokens.

    ``bytes_per_token()`` is ``(d_c + d_h^R)`` times the bytes per element (V2 paper, Table 1).
    """

    def __init__(self, max_length: int | None = None) -> None:
        super().__init__(axis=1, max_length=max_length)

    def append(self, c_kv: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``c_kv (B, T, d_c)`` and ``k_rope (B, T, d_h^R)``; return everything cached."""
        if c_kv.dim() != 3 or k_rope.dim() != 3:
            raise ValueError(f"c_kv and k_rope must be [B, T, width], got {tuple(c_kv.shape)} and {tuple(k_rope.shape)}")
        return super().append(c_kv, k_rope)

    @property
    def c_kv(self) -> Tensor:
        return self.views()[0]

    @property
    def k_rope(self) -> Tensor:
        return self.views()[1]
