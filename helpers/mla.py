"""Multi-head Latent Attention (MLA), the finished layer (DeepSeek-V2, arXiv 2405.04434, Sec. 2.1).

Keys and values are compressed jointly into a latent ``c_t^{KV}`` of width ``d_c`` (``kv_lora_rank``);
positions enter through a separate, decoupled RoPE key ``k_t^R`` shared by all heads. At decode time
the cache holds only ``c_t^{KV}`` and ``k_t^R``: ``d_c + d_h^R`` elements per token per layer.

Two ways to compute the same attention from that cache:

- *naive*: expand the cached latent into per-head keys and values with ``W^{UK}``, ``W^{UV}`` on every
  step (what ``transformers`` does), then attend as usual;
- *absorbed*: fold ``W^{UK}`` into the query (``q^C_{t,i}{}^T W^{UK}_i c_j = (W^{UK}_i{}^T q^C_{t,i})^T c_j``)
  and ``W^{UV}`` into the output, so attention runs directly over the cached latent (V2 paper, Sec. 2.1.2,
  "we can absorb W^{UK} into W^{UQ}, and W^{UV} into W^O").

Parameter names follow DeepSeek's official ``inference/model.py``: ``wq`` (or ``wq_a``, ``q_norm``, ``wq_b``
with query compression), ``wkv_a``, ``kv_norm``, ``wkv_b``, ``wo``. ``helpers.mla_hf`` maps them to and
from the ``transformers`` names.

RoPE layout: with ``rope_interleave=True`` (DeepSeek's checkpoints) the rotated pairs are
``(x0, x1), (x2, x3), ...``; :func:`apply_rope` keeps that pair layout. ``transformers``'
``apply_rotary_pos_emb_interleave`` instead returns the rotated vector de-interleaved into halves
``(x0', x2', ..., x1', x3', ...)``. It applies the same permutation to queries and keys, so every
``q^R . k^R`` score, and hence the layer output, is identical; only the cached ``k^R`` differs by that
fixed permutation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from helpers.attention import GrowingBuffer, causal_mask
from helpers.utils import require_positive


def rope_cos_sin(positions: Tensor, dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Per-pair RoPE angles ``theta_{p,m} = p / base^{2m/dim}`` (RoFormer eq. 15) as cosines and sines.

    Args:
        positions: ``[T]`` absolute positions (integers).
        dim: the rotated width ``d_h^R``; must be even (RoPE rotates pairs).
        base: ``rope_theta``.

    Returns:
        ``cos, sin``, each ``[T, dim // 2]`` float32: one angle per pair, computed as ``transformers`` does.
    """
    require_positive(dim=dim)
    if dim % 2:
        raise ValueError(f"dim must be even (RoPE rotates pairs of channels), got {dim}")
    if base <= 0:
        raise ValueError(f"base (rope_theta) must be positive, got {base}")
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=positions.device) / dim))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleave: bool = True) -> Tensor:
    """Rotate each pair of channels of ``x`` by its angle (RoPE; V2 paper eq. 11 and 13 use it on ``q^R``, ``k^R``).

    Broadcasting: ``cos``/``sin`` (``[T, dim/2]`` from :func:`rope_cos_sin`) are broadcast right-aligned
    against the pair axis of ``x``, so the token axis must be the second-to-last dimension of ``x``
    (``x [..., T, dim]``). For ``x [B, T, heads, dim]`` pass ``cos[:, None]`` and ``sin[:, None]``
    (``[T, 1, dim/2]``).

    Args:
        x: ``[..., dim]`` with ``dim == 2 * cos.shape[-1]``.
        interleave: ``True``: pairs are ``(x0, x1), (x2, x3), ...`` (DeepSeek's official layout, ``transformers``
            ``rope_interleave=True``, and DeepSeek-V2's complex-number RoPE); the output keeps that pair
            layout. ``False``: pairs are ``(x_i, x_{i + dim/2})`` (``rotate_half``, as in Llama).

    Returns:
        The rotated tensor, same shape and dtype as ``x``.
    """
    dim = x.shape[-1]
    if dim != 2 * cos.shape[-1] or cos.shape != sin.shape:
        raise ValueError(f"x's last dimension ({dim}) must be twice that of cos and sin "
                         f"({tuple(cos.shape)}, {tuple(sin.shape)})")
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (..., dim/2) each
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)  # (..., dim)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (..., dim)


class LatentCache(GrowingBuffer):
    """One MLA layer's cache: only the latent ``c^{KV}`` and the shared RoPE key ``k^R`` (V2 paper, Sec. 2.1.3).

    Attributes:
        c_kv: ``[B, S, kv_lora_rank]``, the normalised latent (views of preallocated buffers).
        k_rope: ``[B, S, qk_rope_head_dim]``, the RoPE key after rotation.
        length: ``S``, the number of cached tokens.

    ``bytes_per_token()`` is ``(d_c + d_h^R)`` times the bytes per element (V2 paper, Table 1).
    """

    def __init__(self, max_length: int | None = None) -> None:
        super().__init__(axis=1, max_length=max_length)

    def append(self, c_kv: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``c_kv [B, T, d_c]`` and ``k_rope [B, T, d_h^R]``; return everything cached."""
        if c_kv.dim() != 3 or k_rope.dim() != 3:
            raise ValueError(f"c_kv and k_rope must be [B, T, width], got {tuple(c_kv.shape)} and {tuple(k_rope.shape)}")
        return super().append(c_kv, k_rope)

    @property
    def c_kv(self) -> Tensor:
        return self.views()[0]

    @property
    def k_rope(self) -> Tensor:
        return self.views()[1]


def _softmax_causal(scores: Tensor, start_pos: int) -> Tensor:
    """Softmax over the last axis of ``scores [B, T, H, S]``; query ``t`` sees keys ``0..start_pos + t``."""
    t, s = scores.shape[1], scores.shape[-1]
    if t > 1 or start_pos + t < s:
        allowed = causal_mask(t, s, start_pos, scores.device)  # (T, S)
        scores = scores.masked_fill(~allowed[None, :, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)


def naive_attention(q_nope: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor, w_uk: Tensor, w_uv: Tensor,
                    softmax_scale: float, start_pos: int) -> Tensor:
    """MLA attention by re-expanding the latent into per-head keys and values (V2 paper eq. 12-18).

    ``k^C_{j,i} = W^{UK}_i c_j`` and ``v^C_{j,i} = W^{UV}_i c_j`` (eq. 12, 15) for every cached token ``j``,
    then ``o_{t,i} = sum_j Softmax_j((q^C_{t,i} . k^C_{j,i} + q^R_{t,i} . k^R_j) * scale) v^C_{j,i}`` (eq. 17).

    Args:
        q_nope: ``[B, T, H, d_n]`` content queries ``q^C``; q_rope: ``[B, T, H, d_r]`` rotated queries ``q^R``.
        c_kv: ``[B, S, d_c]`` cached latents; k_rope: ``[B, S, d_r]`` cached rotated keys ``k^R``.
        w_uk: ``[H, d_n, d_c]``; w_uv: ``[H, d_v, d_c]`` (views of ``wkv_b.weight``).
        softmax_scale: usually ``1 / sqrt(d_n + d_r)``.
        start_pos: absolute position of the first query; query ``t`` sees keys ``0..start_pos + t``.

    Returns:
        ``o [B, T, H, d_v]``, the per-head outputs before ``W^O``.
    """
    k_nope = torch.einsum("bsc,hdc->bshd", c_kv, w_uk)  # (B, S, H, d_n): re-expanded every call
    v = torch.einsum("bsc,hdc->bshd", c_kv, w_uv)  # (B, S, H, d_v)
    scores = (torch.einsum("bthd,bshd->bths", q_nope, k_nope)
              + torch.einsum("bthr,bsr->bths", q_rope, k_rope)) * softmax_scale  # (B, T, H, S)
    p = _softmax_causal(scores, start_pos)  # (B, T, H, S)
    return torch.einsum("bths,bshd->bthd", p, v)  # (B, T, H, d_v)


def absorbed_attention(q_nope: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor, w_uk: Tensor, w_uv: Tensor,
                       softmax_scale: float, start_pos: int) -> Tensor:
    """The same attention as :func:`naive_attention`, computed over the latent (V2 paper Sec. 2.1.2).

    ``q^C_{t,i} . (W^{UK}_i c_j) = (W^{UK}_i{}^T q^C_{t,i}) . c_j``: the query is moved into latent space once
    per step, instead of moving every cached latent into key space. Likewise
    ``sum_j p_j W^{UV}_i c_j = W^{UV}_i sum_j p_j c_j``: attend over latents, then apply ``W^{UV}_i`` once.
    Arguments and result as in :func:`naive_attention`.
    """
    q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, H, d_c): W^{UK} absorbed into the query
    scores = (torch.einsum("bthc,bsc->bths", q_latent, c_kv)
              + torch.einsum("bthr,bsr->bths", q_rope, k_rope)) * softmax_scale  # (B, T, H, S)
    p = _softmax_causal(scores, start_pos)  # (B, T, H, S)
    o_latent = torch.einsum("bths,bsc->bthc", p, c_kv)  # (B, T, H, d_c): attend in latent space
    return torch.einsum("bthc,hdc->bthd", o_latent, w_uv)  # (B, T, H, d_v): W^{UV} applied once


class MultiHeadLatentAttention(nn.Module):
    """Multi-head Latent Attention with decoupled RoPE, a latent cache, and naive or absorbed computation.

    Equations (DeepSeek-V2, arXiv 2405.04434, Sec. 2.1.2-2.1.3; DeepSeek-V3 2412.19437 eq. 1-11):

    - queries (eq. 12-13, 10-11): ``c^Q_t = W^{DQ} h_t`` (normalised by ``q_norm``), ``[q^C_t; q^R_t] = W^{UQ}, W^{QR}``
      applied to ``c^Q_t`` (``wq_b``), or straight from ``h_t`` (``wq``) without query compression;
      ``q^R`` is rotated with RoPE;
    - latent and RoPE key (eq. 9, 14): ``[c^{KV}_t; k^R_t] = [W^{DKV}; W^{KR}] h_t`` (``wkv_a``), ``c^{KV}_t`` is
      normalised by ``kv_norm``, ``k^R_t`` rotated with RoPE; these two are what :class:`LatentCache` holds;
    - keys and values (eq. 10-12, 15-16): ``k^C_{t,i} = W^{UK}_i c^{KV}_t``, ``v^C_{t,i} = W^{UV}_i c^{KV}_t`` (``wkv_b``);
    - attention and output (eq. 17-19): softmax over ``(q^C . k^C + q^R . k^R) / sqrt(d_h + d_h^R)``, then ``wo``.

    Args:
        hidden_size: ``H``.
        n_heads: ``n_h``.
        kv_lora_rank: ``d_c``, the latent width.
        qk_nope_head_dim: ``d_h``, the per-head content width of queries and keys.
        qk_rope_head_dim: ``d_h^R``, the RoPE width (even).
        v_head_dim: the per-head value width.
        q_lora_rank: ``d_c'``, the query latent width; ``None`` means no query compression (DeepSeek-V2-Lite).
        rope_theta: RoPE base. Only default RoPE (no YaRN scaling) is implemented.
        rope_interleave: pair layout for RoPE, see :func:`apply_rope`.
        rms_norm_eps: epsilon of ``q_norm`` and ``kv_norm``.
        absorb: default computation for :meth:`forward` (``False``: naive re-expansion; ``True``: absorbed).
    """

    def __init__(self, hidden_size: int, n_heads: int, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, q_lora_rank: int | None = None,
                 rope_theta: float = 10000.0, rope_interleave: bool = True, rms_norm_eps: float = 1e-6,
                 absorb: bool = False) -> None:
        super().__init__()
        require_positive(hidden_size=hidden_size, n_heads=n_heads, kv_lora_rank=kv_lora_rank,
                         qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim,
                         v_head_dim=v_head_dim, q_lora_rank=q_lora_rank)
        if qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs of channels), got {qk_rope_head_dim}")
        if not rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {rope_theta}")
        if not rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be positive, got {rms_norm_eps}")
        self.hidden_size, self.n_heads = hidden_size, n_heads
        self.kv_lora_rank, self.q_lora_rank = kv_lora_rank, q_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.rope_theta, self.rope_interleave, self.rms_norm_eps = rope_theta, rope_interleave, rms_norm_eps
        self.absorb = absorb
        self.softmax_scale = self.qk_head_dim ** -0.5
        if q_lora_rank is None:
            self.wq = nn.Linear(hidden_size, n_heads * self.qk_head_dim, bias=False)  # [W^{UQ}; W^{QR}] on h_t
        else:
            self.wq_a = nn.Linear(hidden_size, q_lora_rank, bias=False)  # W^{DQ}
            self.q_norm = nn.RMSNorm(q_lora_rank, eps=rms_norm_eps)
            self.wq_b = nn.Linear(q_lora_rank, n_heads * self.qk_head_dim, bias=False)  # [W^{UQ}; W^{QR}]
        self.wkv_a = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=False)  # [W^{DKV}; W^{KR}]
        self.kv_norm = nn.RMSNorm(kv_lora_rank, eps=rms_norm_eps)
        self.wkv_b = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)  # [W^{UK}; W^{UV}]
        self.wo = nn.Linear(n_heads * v_head_dim, hidden_size, bias=False)  # W^O

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, kv_lora_rank={self.kv_lora_rank}, q_lora_rank={self.q_lora_rank}, "
                f"qk_nope_head_dim={self.qk_nope_head_dim}, qk_rope_head_dim={self.qk_rope_head_dim}, "
                f"v_head_dim={self.v_head_dim}, rope_interleave={self.rope_interleave}, absorb={self.absorb}")

    def up_projections(self) -> tuple[Tensor, Tensor]:
        """``w_uk [n_h, d_h, d_c]`` and ``w_uv [n_h, d_v, d_c]``: views of ``wkv_b.weight`` (no copy)."""
        w = self.wkv_b.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    def attention_inputs(self, x: Tensor, cache: LatentCache | None = None
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Everything attention needs for the new tokens ``x [B, T, H]`` (V2 paper eq. 9-14).

        Appends the new ``c^{KV}`` and ``k^R`` to ``cache`` if one is given.

        Returns:
            ``q_nope [B, T, n_h, d_h]``, ``q_rope [B, T, n_h, d_h^R]`` (rotated), ``c_kv [B, S, d_c]``,
            ``k_rope [B, S, d_h^R]`` (all cached tokens, or the new ones without a cache), and ``start_pos``,
            the absolute position of the first new token.
        """
        b, t, _ = x.shape
        start = cache.length if cache is not None else 0
        # 1) Queries, split into content and RoPE parts.
        q = self.wq(x) if self.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))  # (B, T, n_h*(d_h+d_r))
        q = q.view(b, t, self.n_heads, self.qk_head_dim)  # (B, T, n_h, d_h + d_r)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        # 2) The latent and the shared RoPE key: the only things cached.
        c_kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)  # (B, T, d_c), (B, T, d_r)
        c_kv = self.kv_norm(c_kv)  # (B, T, d_c)
        # 3) Decoupled RoPE at absolute positions start..start+T-1.
        cos, sin = rope_cos_sin(torch.arange(start, start + t, device=x.device), self.qk_rope_head_dim, self.rope_theta)
        q_rope = apply_rope(q_rope, cos[:, None], sin[:, None], self.rope_interleave)  # (B, T, n_h, d_r)
        k_rope = apply_rope(k_rope, cos, sin, self.rope_interleave)  # (B, T, d_r)
        if cache is not None:
            c_kv, k_rope = cache.append(c_kv, k_rope)  # (B, S, d_c), (B, S, d_r)
        return q_nope, q_rope, c_kv, k_rope, start

    def forward(self, x: Tensor, cache: LatentCache | None = None, absorb: bool | None = None) -> Tensor:
        """Attend causally: ``x [B, T, H] -> [B, T, H]``.

        Without a cache the tokens sit at positions ``0..T-1``; with one, at ``cache.length..``, and their
        ``c^{KV}`` and ``k^R`` are appended to it. ``absorb=None`` uses ``self.absorb``.
        """
        b, t, _ = x.shape
        absorb = self.absorb if absorb is None else absorb
        q_nope, q_rope, c_kv, k_rope, start = self.attention_inputs(x, cache)
        # 4) Attention, naive or absorbed, then the output projection.
        w_uk, w_uv = self.up_projections()
        attend = absorbed_attention if absorb else naive_attention
        o = attend(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, self.softmax_scale, start)  # (B, T, n_h, d_v)
        return self.wo(o.reshape(b, t, self.n_heads * self.v_head_dim))  # (B, T, H)
