"""The baselines MLA is measured against: multi-head, grouped-query and multi-query attention.

One module covers all three (DeepSeek-V2 paper, arXiv 2405.04434, Sec. 2.1.1 and Table 1):
``n_kv_heads == n_heads`` is multi-head attention (MHA), ``1 < n_kv_heads < n_heads`` is
grouped-query attention (GQA, ``n_g`` groups of query heads share one key/value head) and
``n_kv_heads == 1`` is multi-query attention (MQA). At decode time each layer caches keys and values
for every key/value head: ``2 n_g d_h`` elements per token, which is what :class:`KVCache` holds.

RoPE is optional (``rope_theta=None``, the default, leaves it out): it changes neither the size of
the cache nor the cost of a decode step, which is all these baselines are used for. With RoPE on,
keys are cached after rotation, as usual.

Notebook 20 builds these pieces step by step; this file is the finished version.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from helpers.utils import require_positive


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
        self._buffers: list[Tensor] = []

    def append(self, *new: Tensor) -> tuple[Tensor, ...]:
        """Write ``new`` (each ``T`` entries long along ``axis``) after the filled part; return all entries."""
        steps = {t.shape[self.axis] for t in new}
        if len(steps) != 1:
            raise ValueError(f"all appended tensors must have the same length along axis {self.axis}, got {steps}")
        step = steps.pop()
        if self._buffers:
            for buf, t in zip(self._buffers, new):
                want = buf.shape[: self.axis] + buf.shape[self.axis + 1:]
                got = t.shape[: self.axis] + t.shape[self.axis + 1:]
                if want != got:
                    raise ValueError(f"cache holds entries of shape {tuple(want)} (without the sequence axis), "
                                     f"got {tuple(got)}")
        needed = self.length + step
        capacity = self._buffers[0].shape[self.axis] if self._buffers else 0
        if needed > capacity:
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
        k, v: the cached keys and values, ``[B, n_kv_heads, S, d_h]`` (views of preallocated buffers).
        length: ``S``, the number of cached tokens.

    ``bytes_per_token()`` is ``2 n_kv_heads d_h`` times the bytes per element (V2 paper, Table 1).
    """

    def __init__(self, max_length: int | None = None) -> None:
        super().__init__(axis=2, max_length=max_length)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k, v [B, n_kv_heads, T, d_h]``; return all cached keys and values ``[B, n_kv_heads, S, d_h]``."""
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
    """``[t, s]`` boolean mask, True where query ``i`` (at position ``start_pos + i``) may see key ``j``."""
    rows = torch.arange(start_pos, start_pos + t, device=device)[:, None]  # (t, 1)
    cols = torch.arange(s, device=device)[None, :]  # (1, s)
    return cols <= rows  # (t, s)


class MultiHeadAttention(nn.Module):
    """Causal multi-head attention with ``n_kv_heads`` key/value heads: MHA, GQA or MQA.

    ``o_{t,i} = sum_j Softmax_j(q_{t,i}^T k_{j,g(i)} / sqrt(d_h)) v_{j,g(i)}`` and ``u_t = W^O [o_{t,1}; ...]``
    (V2 paper eq. 1-5), where query head ``i`` reads key/value head ``g(i) = i // (n_heads / n_kv_heads)``.

    Args:
        hidden_size: ``H``, the model width.
        n_heads: ``n_h``, query heads.
        head_dim: ``d_h``, the width of one head.
        n_kv_heads: ``n_g``, key/value heads; ``None`` means ``n_heads`` (MHA), ``1`` is MQA. Must divide ``n_heads``.
        rope_theta: RoPE base; ``None`` (default) uses no positional encoding.

    Parameters: ``wq [n_h d_h, H]``, ``wk``/``wv [n_g d_h, H]``, ``wo [H, n_h d_h]`` (no biases).
    """

    def __init__(self, hidden_size: int, n_heads: int, head_dim: int, n_kv_heads: int | None = None,
                 rope_theta: float | None = None) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        require_positive(hidden_size=hidden_size, n_heads=n_heads, head_dim=head_dim, n_kv_heads=n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads}); "
                             "pick n_kv_heads among the divisors of n_heads")
        if rope_theta is not None and (head_dim % 2 or rope_theta <= 0):
            raise ValueError(f"with RoPE, head_dim must be even and rope_theta positive, got head_dim={head_dim}, "
                             f"rope_theta={rope_theta}")
        self.hidden_size, self.n_heads, self.head_dim, self.n_kv_heads = hidden_size, n_heads, head_dim, n_kv_heads
        self.rope_theta = rope_theta
        self.wq = nn.Linear(hidden_size, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, hidden_size, bias=False)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """Attend causally: ``x [B, T, H] -> [B, T, H]``.

        Without a cache the tokens sit at positions ``0..T-1``; with one, at ``cache.length..`` and their
        keys and values are appended to it.
        """
        b, t, _ = x.shape
        g = self.n_heads // self.n_kv_heads  # query heads per key/value head
        start = cache.length if cache is not None else 0
        # 1) Project; heads first so each head is a [T, d_h] matrix.
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_h, T, d_h)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_g, T, d_h)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_g, T, d_h)
        if self.rope_theta is not None:
            from helpers.mla import apply_rope, rope_cos_sin

            cos, sin = rope_cos_sin(torch.arange(start, start + t, device=x.device), self.head_dim, self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # 2) Cache keys and values; attend over everything cached so far.
        if cache is not None:
            k, v = cache.append(k, v)  # (B, n_g, S, d_h)
        s = k.shape[2]
        # 3) Group the query heads that share a key/value head (no copy of the cache, unlike repeat_kv).
        q = q.reshape(b, self.n_kv_heads, g * t, self.head_dim)  # (B, n_g, g*T, d_h)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, n_g, g*T, S)
        scores = scores.view(b, self.n_kv_heads, g, t, s)  # (B, n_g, g, T, S)
        if t > 1:
            scores = scores.masked_fill(~causal_mask(t, s, start, x.device), float("-inf"))
        p = torch.softmax(scores, dim=-1).view(b, self.n_kv_heads, g * t, s)  # (B, n_g, g*T, S)
        o = (p @ v).view(b, self.n_heads, t, self.head_dim)  # (B, n_h, T, d_h)
        # 4) Concatenate heads and project out.
        return self.wo(o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))  # (B, T, H)
