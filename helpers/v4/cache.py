"""One V4 attention layer's decode cache, and which keys and compressed entries each query may see (V4 report §2.3).

A V4 layer reads two kinds of keys (``K = V``, one head):

- the **sliding window** (§2.3.3): the last ``n_win`` tokens' own entries. :class:`SlidingWindow` keeps the last
  ``n_win - 1`` of them between calls, so a new query (which sees itself) sees exactly ``n_win`` tokens;
- the **compressed entries** (§2.3.1 CSA, §2.3.2 HCA): one per closed window of ``m`` tokens. A window closes only
  when its last token has arrived, so :class:`CompressorState` holds the tokens of the window still open
  (``pending``), for CSA the last closed window's first series ``C^a`` (``overlap``: the next entry reads it), and
  the running entries (a :class:`~helpers.mla.cache.GrowingBuffer`).

Causality at window granularity (:func:`visible_entries`): entry ``w`` pools tokens ``w m .. w m + m - 1``, so the
query at position ``t`` may read it iff all of those are ``<= t``: ``w < (t + 1) // m``.

:class:`V4Cache` holds one window, a compressor state (CSA, HCA) and an indexer state (CSA), as the layer type needs
(``V4Attention.new_cache()``). A cache is an inference structure, written in place: train without one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from helpers.mla.cache import GrowingBuffer


def window_mask(positions: Tensor, key_start: int, n_keys: int, window: int) -> Tensor:
    """``(T, S)`` bool: query at ``positions[i]`` sees the key at position ``key_start + j`` iff
    ``0 <= positions[i] - (key_start + j) < window`` (itself and the ``window - 1`` tokens before it)."""
    keys = torch.arange(key_start, key_start + n_keys, device=positions.device)  # (S,)
    offset = positions[:, None] - keys[None, :]  # (T, S): how far back each key is
    return (offset >= 0) & (offset < window)


def visible_entries(positions: Tensor, n_entries: int, ratio: int) -> Tensor:
    """``(T, N)`` bool: query at position ``t`` sees compressed entry ``w`` iff ``w < (t + 1) // ratio``
    (the entry's whole window, tokens ``w m .. w m + m - 1``, is at or before ``t``)."""
    entries = torch.arange(n_entries, device=positions.device)  # (N,)
    return entries[None, :] < torch.div(positions[:, None] + 1, ratio, rounding_mode="floor")


class SlidingWindow:
    """The last ``window - 1`` tokens' ``K = V`` entries (``(B, S, d)``), and how many tokens went through.

    ``append(kv)`` returns the kept past followed by the new tokens (what the new queries attend over) and the
    position of the first of them; afterwards only the last ``window - 1`` are kept, as ``transformers``'
    ``DynamicSlidingWindowLayer`` does.
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.kv: Tensor | None = None
        self.length = 0  # tokens seen

    def append(self, kv: Tensor) -> tuple[Tensor, int]:
        """``kv (B, T, d)`` -> ``(keys (B, S, d), position of keys[:, 0])``."""
        keys = kv if self.kv is None else torch.cat([self.kv, kv], dim=1)  # (B, S, d)
        start = self.length + kv.shape[1] - keys.shape[1]
        self.kv = keys[:, max(keys.shape[1] - (self.window - 1), 0):]  # (B, <= window - 1, d)
        self.length += kv.shape[1]
        return keys, start


class CompressorState:
    """A compressor's state between calls: the open window's tokens, CSA's overlap, the entries so far.

    Attributes:
        pending_kv, pending_gate: ``(B, < m, c d)``, projected tokens of the window not yet closed.
        overlap_kv, overlap_gate: ``(B, m, d)``, the last closed window's ``C^a`` and its gate logits
            (CSA only: the next entry pools them with its own ``C^b``); ``None`` before the first window.
        entries: the compressed entries, ``entries.views()[0]`` is ``(B, N, d)``.
    """

    def __init__(self, ratio: int) -> None:
        self.ratio = ratio
        self.pending_kv: Tensor | None = None
        self.pending_gate: Tensor | None = None
        self.overlap_kv: Tensor | None = None
        self.overlap_gate: Tensor | None = None
        self.entries = GrowingBuffer(axis=1)

    def close_windows(self, kv: Tensor, gate: Tensor) -> tuple[Tensor, Tensor, int]:
        """Put ``kv, gate (B, T, c d)`` after the pending tokens; return the closed windows' tokens
        ``(B, W m, c d)`` each, and the position of their first token; keep the rest pending."""
        if self.pending_kv is not None:
            kv, gate = torch.cat([self.pending_kv, kv], dim=1), torch.cat([self.pending_gate, gate], dim=1)
        usable = kv.shape[1] // self.ratio * self.ratio
        self.pending_kv, self.pending_gate = kv[:, usable:], gate[:, usable:]
        return kv[:, :usable], gate[:, :usable], self.entries.length * self.ratio

    @property
    def n_entries(self) -> int:
        return self.entries.length


class V4Cache:
    """One V4 attention layer's cache: the sliding window, and the compressor and indexer states it needs.

    Attributes:
        window: :class:`SlidingWindow` (every layer type).
        compressor: :class:`CompressorState` for CSA and HCA layers, else ``None``.
        indexer: :class:`CompressorState` of the lightning indexer's own compressor (CSA only), else ``None``.
        length: tokens seen, the position of the next token.
    """

    def __init__(self, window: int, ratio: int | None = None, indexer: bool = False) -> None:
        self.window = SlidingWindow(window)
        self.compressor = CompressorState(ratio) if ratio else None
        self.indexer = CompressorState(ratio) if ratio and indexer else None

    @property
    def length(self) -> int:
        return self.window.length

    def nbytes(self) -> int:
        """Bytes held: the window, the pending tokens and overlaps, and the compressed entries."""
        held = [self.window.kv]
        for state in (self.compressor, self.indexer):
            if state is not None:
                held += [state.pending_kv, state.pending_gate, state.overlap_kv, state.overlap_gate]
                held += list(state.entries.views())
        return sum(t.numel() * t.element_size() for t in held if t is not None)
