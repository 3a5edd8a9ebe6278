"""The lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2) and its key cache.

For a query token ``t`` and an earlier token ``s`` the indexer's score is (V3.2 report, eq. 1)

    I_{t,s} = sum_j w_{t,j} ReLU(q_{t,j} . k_s)

with ``n_I`` small query heads ``q_{t,j}`` (``index_n_heads`` of width ``index_head_dim``) projected from the
compressed query ``c^Q_t`` (the same ``q_norm(wq_a(h_t))`` the main attention uses), ONE key ``k_s`` shared by
all indexer heads (projected from ``h_s`` and passed through a LayerNorm), and per-head weights ``w_{t,j}``
projected from ``h_t``. Every query keeps its ``index_topk`` best-scoring tokens.

Exactly as ``transformers``' ``DeepseekV32Indexer`` (5.23), with our names:

=====================  ==================  =====================================================
ours                   ``transformers``    what
=====================  ==================  =====================================================
``wq_b``               ``wq_b``            ``c^Q_t -> q_{t,j}``, ``[n_I * d_I, q_lora_rank]``
``wk``                 ``wk``              ``h_s -> k_s``, ``[d_I, hidden]``
``k_norm``             ``k_norm``          ``nn.LayerNorm(d_I, eps=1e-6)`` (with bias) on ``k_s``
``weights_proj``       ``weights_proj``    ``h_t -> w_{t,j}``, ``[n_I, hidden]``
=====================  ==================  =====================================================

Scales: every ``q . k`` is multiplied by ``softmax_scale = d_I ** -0.5`` before the ReLU, and the head
weights by ``n_I ** -0.5``. RoPE: the FIRST ``qk_rope_head_dim`` channels of ``q_{t,j}`` and ``k_s`` are
rotated, in the half-split layout (pairs ``(x_i, x_{i + d/2})``, ``rotate_half``), while the main MLA
attention rotates interleaved pairs ``(x0, x1), (x2, x3), ...`` in the LAST channels of its query. Both
are RoPE (same frequencies, same relative-position property); they differ only in which channels form a
pair. The indexer's projections were trained with the half-split pairing, so only that pairing reproduces
the checkpoint's scores: the same weights rotated in interleaved pairs give different ``q . k``
(``transformers``: "The indexer uses NON-interleaved (half-split) RoPE -- unlike the main MLA attention").
The reference also applies a Hadamard rotation and FP8 to ``q`` and ``k``; the rotation is orthogonal (it
preserves every ``q . k``), FP8 is a precision choice, and ``transformers`` (and we) skip both.

YaRN: with a YaRN config the indexer rotates with the main attention's cos and sin, stretched frequencies and
``attention_factor`` included (``transformers`` hands both the same ``position_embeddings``); its own scale
``d_I ** -0.5`` is not multiplied by ``mscale^2``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from helpers.mla.cache import GrowingBuffer
from helpers.mla.rope import YaRN, apply_rope, require_yarn, rope_cos_sin
from helpers.rules import require_number, require_positive


def index_scores(q: Tensor, k: Tensor, weights: Tensor, softmax_scale: float) -> Tensor:
    """``I_{t,s} = sum_j w_{t,j} ReLU(scale * q_{t,j} . k_s)`` (V3.2 report eq. 1, with the ``transformers`` scale).

    Args:
        q: ``(B, T, n_I, d_I)`` indexer queries (rotated); k: ``(B, S, d_I)`` the shared indexer keys (rotated).
        weights: ``(B, T, n_I)`` per-head weights, already multiplied by ``n_I ** -0.5``.
        softmax_scale: ``d_I ** -0.5``.

    Returns:
        ``(B, T, S)`` float32 scores (no causal mask yet).
    """
    dots = torch.einsum("btjd,bsd->btjs", q.float(), k.float()) * softmax_scale  # (B, T, n_I, S)
    return torch.einsum("btj,btjs->bts", weights.float(), torch.relu(dots))  # (B, T, S): one key for all heads


def select_topk(scores: Tensor, start_pos: int, topk: int) -> tuple[Tensor, Tensor]:
    """The ``topk`` best cached tokens of each query, causally: query ``t`` may pick tokens ``0..start_pos + t``.

    Args:
        scores: ``(B, T, S)`` indexer scores; start_pos: absolute position of the first query.
        topk: ``index_topk``; ``min(topk, S)`` tokens are returned per query.

    Returns:
        ``indices (B, T, k)`` (int64, best first) and ``valid (B, T, k)`` (bool): False where a query has fewer
        than ``k`` visible tokens and the slot holds a future token (the attention must ignore it; the same
        happens in ``transformers``, whose padded picks are masked again by the causal mask).

    Ties: ``torch.topk`` does not specify which of equal scores it keeps, here or in ``transformers``; with
    real-valued scores exact ties are rare, but ReLU can make whole rows of a head zero, so compare selections
    as sets and only where the ``k``-th and ``k+1``-th scores differ (tests/test_dsa_hf.py does).
    """
    t, s = scores.shape[1], scores.shape[2]
    visible = torch.arange(s, device=scores.device)[None, :] <= start_pos + torch.arange(t, device=scores.device)[:, None]
    masked = scores.masked_fill(~visible[None], float("-inf"))  # (B, T, S)
    values, indices = masked.topk(min(topk, s), dim=-1)  # (B, T, k)
    return indices, values > float("-inf")


def check_indexer_settings(hidden_size: int, q_lora_rank: int, index_n_heads: int, index_head_dim: int,
                           qk_rope_head_dim: int, rope_theta: float) -> None:
    """Build-time rules of the lightning indexer: ``ValueError`` naming the field.

    Sizes are positive integers; ``index_head_dim`` is at least ``qk_rope_head_dim`` (RoPE rotates the first
    ``qk_rope_head_dim`` channels of each head); ``rope_theta`` is finite and positive.
    """
    require_positive(hidden_size=hidden_size, q_lora_rank=q_lora_rank, index_n_heads=index_n_heads,
                     index_head_dim=index_head_dim, qk_rope_head_dim=qk_rope_head_dim)
    if index_head_dim < qk_rope_head_dim:
        raise ValueError(f"index_head_dim ({index_head_dim}) must be at least qk_rope_head_dim "
                         f"({qk_rope_head_dim}): RoPE rotates the first qk_rope_head_dim channels of each "
                         "indexer head; raise index_head_dim")
    require_number("rope_theta", rope_theta, positive=True)


class IndexerKeyCache(GrowingBuffer):
    """The indexer's key cache, kept beside the latent cache: ``k_s`` ``(B, S, index_head_dim)`` per token."""

    def __init__(self, max_length: int | None = None) -> None:
        super().__init__(axis=1, max_length=max_length)

    def append(self, k: Tensor) -> Tensor:
        """Append ``k (B, T, d_I)``; return every cached key ``(B, S, d_I)``."""
        if k.dim() != 3:
            raise ValueError(f"indexer keys must be [B, T, index_head_dim], got {tuple(k.shape)}")
        return super().append(k)[0]

    @property
    def k(self) -> Tensor:
        return self.views()[0]


class LightningIndexer(nn.Module):
    """The lightning indexer: scores every cached token for every query (module docstring for the equations).

    Args:
        hidden_size: ``H``; q_lora_rank: width of the compressed query ``c^Q_t`` the indexer reads.
        index_n_heads: ``n_I``; index_head_dim: ``d_I`` (at least ``qk_rope_head_dim``).
        qk_rope_head_dim: how many leading channels get RoPE (the main attention's ``d_h^R``).
        rope_theta: RoPE base (the main attention's).
        yarn: the main attention's YaRN settings (:class:`~helpers.mla.rope.YaRN`), or ``None`` for plain RoPE.
    """

    def __init__(self, hidden_size: int, q_lora_rank: int, index_n_heads: int, index_head_dim: int,
                 qk_rope_head_dim: int, rope_theta: float = 10000.0, yarn: YaRN | None = None) -> None:
        super().__init__()
        check_indexer_settings(hidden_size, q_lora_rank, index_n_heads, index_head_dim, qk_rope_head_dim, rope_theta)
        require_yarn(yarn)
        self.n_heads, self.head_dim, self.rope_dim, self.rope_theta = index_n_heads, index_head_dim, qk_rope_head_dim, rope_theta
        self.yarn = yarn
        self.softmax_scale = index_head_dim ** -0.5
        self.wq_b = nn.Linear(q_lora_rank, index_n_heads * index_head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(index_head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(hidden_size, index_n_heads, bias=False)

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Half-split RoPE on the first ``qk_rope_head_dim`` channels; the rest pass unchanged."""
        x_rot, x_pass = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rope(x_rot, cos, sin, interleave=False), x_pass], dim=-1)

    def queries_keys_weights(self, x: Tensor, q_latent: Tensor, start_pos: int) -> tuple[Tensor, Tensor, Tensor]:
        """``q (B, T, n_I, d_I)``, ``k (B, T, d_I)`` (both rotated) and ``w (B, T, n_I)`` (scaled) for the new tokens."""
        b, t, _ = x.shape
        cos, sin = rope_cos_sin(torch.arange(start_pos, start_pos + t, device=x.device), self.rope_dim, self.rope_theta,
                                self.yarn)  # (T, d_r/2) each
        q = self.wq_b(q_latent).view(b, t, self.n_heads, self.head_dim)  # (B, T, n_I, d_I)
        q = self._rope(q, cos[:, None], sin[:, None])
        k = self._rope(self.k_norm(self.wk(x)), cos, sin)  # (B, T, d_I): one key per token, shared by all heads
        w = self.weights_proj(x).float() * self.n_heads ** -0.5  # (B, T, n_I)
        return q, k, w

    def forward(self, x: Tensor, q_latent: Tensor, cache: IndexerKeyCache | None = None) -> tuple[Tensor, int]:
        """Scores of the new tokens ``x (B, T, H)`` against every cached token (differentiable).

        Args:
            x: hidden states; q_latent: ``(B, T, q_lora_rank)``, the normalised compressed query ``c^Q``.
            cache: the indexer key cache; the new keys are appended to it.

        Returns:
            ``scores (B, T, S)`` (float32, before the causal mask) and ``start_pos``.
        """
        start = cache.length if cache is not None else 0
        q, k, w = self.queries_keys_weights(x, q_latent, start)
        if cache is not None:
            k = cache.append(k)  # (B, S, d_I)
        return index_scores(q, k, w, self.softmax_scale), start
