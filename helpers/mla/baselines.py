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

from helpers.inputs import check_hidden
from helpers.mla.cache import KVCache, causal_mask
from helpers.mla.rope import apply_rope, rope_cos_sin
from helpers.precision import softmax
from helpers.rules import require_number, require_positive


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

    Parameters: ``wq (n_h d_h, H)``, ``wk``/``wv (n_g d_h, H)``, ``wo (H, n_h d_h)`` (no biases).
    """

    def __init__(self, hidden_size: int, n_heads: int, head_dim: int, n_kv_heads: int | None = None,
                 rope_theta: float | None = None) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        require_positive(hidden_size=hidden_size, n_heads=n_heads, head_dim=head_dim, n_kv_heads=n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads}); "
                             "pick n_kv_heads among the divisors of n_heads")
        if rope_theta is not None:
            require_number("rope_theta", rope_theta, positive=True)
            if head_dim % 2:
                raise ValueError(f"with RoPE, head_dim must be even (RoPE rotates pairs), got head_dim={head_dim}")
        self.hidden_size, self.n_heads, self.head_dim, self.n_kv_heads = hidden_size, n_heads, head_dim, n_kv_heads
        self.rope_theta = rope_theta
        self.wq = nn.Linear(hidden_size, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, hidden_size, bias=False)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """Attend causally: ``x (B, T, H) -> (B, T, H)``.

        Without a cache the tokens sit at positions ``0..T-1``; with one, at ``cache.length..`` and their
        keys and values are appended to it. Bad input (shape, dtype, device, another kind of cache, a cache
        of another batch or layer) raises before the cache changes.
        """
        check_hidden("x", x, self.hidden_size, self.wq.weight, rank=3,
                     layout=f"[batch, tokens, hidden_size={self.hidden_size}]", owner="MultiHeadAttention")
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise ValueError(f"cache must be a KVCache for MultiHeadAttention, got {type(cache).__name__}: "
                                 "create one with KVCache() and pass the same object at every step")
            if cache.length and cache.k.shape[:2] != (x.shape[0], self.n_kv_heads):
                raise ValueError(f"cache holds (batch, kv heads) = {tuple(cache.k.shape[:2])} but x and this layer "
                                 f"give {(x.shape[0], self.n_kv_heads)}: use one cache per layer and batch")
            cache.bind(self)
        b, t, _ = x.shape
        g = self.n_heads // self.n_kv_heads  # query heads per key/value head
        start = cache.length if cache is not None else 0
        # 1) Project; heads first so each head is a [T, d_h] matrix.
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_h, T, d_h)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_g, T, d_h)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_g, T, d_h)
        if self.rope_theta is not None:
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
        p = softmax(scores, dim=-1).view(b, self.n_kv_heads, g * t, s)  # (B, n_g, g*T, S), fp32 inside
        o = (p @ v).view(b, self.n_heads, t, self.head_dim)  # (B, n_h, T, d_h)
        # 4) Concatenate heads and project out.
        return self.wo(o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))  # (B, T, H)
