"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2): MLA whose queries each attend over their top-k tokens.

:class:`SparseLatentAttention` extends :class:`helpers.mla.MultiHeadLatentAttention` (same parameters, same
latent cache, same absorbed attention) with a :class:`~helpers.dsa.indexer.LightningIndexer`. For every new
token the indexer scores all cached tokens, the ``index_topk`` best are kept, and absorbed MLA runs over
those only (:func:`~helpers.dsa.attention.sparse_absorbed_attention`). The selection is not differentiable
and, as in ``transformers``, is computed under ``torch.no_grad()``: the main loss never trains the indexer
(the V3.2 report trains it with its own KL loss; :func:`helpers.dsa.warmup.indexer_kl_loss`).

Backends (by name, as MLA's): ``"sparse"`` (default, absorbed over the top-k), ``"sparse_naive"`` (gather the
top-k latents and expand them); ``absorb=True``/``False`` picks between those two, ``sparse=False`` attends over
every visible token with MLA's ``"absorbed"``/``"naive"`` instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from helpers.dsa import attention as _sparse_backends  # noqa: F401 (registers "sparse" and "sparse_naive")
from helpers.dsa.indexer import IndexerKeyCache, LightningIndexer, select_topk
from helpers.inputs import check_attention_input
from helpers.mla import LatentCache, MultiHeadLatentAttention
from helpers.mla.attention import attention_backend
from helpers.mla.rope import YaRN
from helpers.rules import require_bool, require_positive


def check_dsa_settings(q_lora_rank: int | None, index_topk: int) -> None:
    """Build-time rules DSA adds to MLA's (:func:`helpers.mla.layer.check_mla_settings`) and the indexer's
    (:func:`helpers.dsa.indexer.check_indexer_settings`): ``ValueError`` naming the field."""
    if q_lora_rank is None:
        raise ValueError("q_lora_rank is None, but the lightning indexer reads the compressed query c^Q: "
                         "give q_lora_rank (1536 in DeepSeek-V3.2)")
    require_positive(index_topk=index_topk)


class SparseLatentCache(LatentCache):
    """MLA's latent cache (``c^{KV}``, ``k^R``) with the indexer's key cache beside it (``.indexer``).

    Per token and layer it holds ``d_c + d_h^R`` latent elements plus ``index_head_dim`` indexer elements.
    """

    def __init__(self, max_length: int | None = None) -> None:
        super().__init__(max_length=max_length)
        self.indexer = IndexerKeyCache(max_length=max_length)

    def truncate(self, length: int) -> None:
        """Forget every token from ``length`` on, in both caches (a rejected draft, a re-timed step)."""
        super().truncate(length)
        self.indexer.truncate(length)

    def nbytes(self) -> int:
        return super().nbytes() + self.indexer.nbytes()


class SparseLatentAttention(MultiHeadLatentAttention):
    """MLA plus the lightning indexer and top-k sparse attention (DeepSeek-V3.2's ``DeepseekV32Attention``).

    Args:
        index_topk: ``k``, tokens each query attends to (2048 in V3.2).
        index_n_heads: ``n_I``, indexer query heads (64 in V3.2).
        index_head_dim: ``d_I``, indexer head width (128 in V3.2), at least ``qk_rope_head_dim``.
        q_lora_rank: required: the indexer reads the compressed query ``c^Q``.
        backend: ``"sparse"`` (default), ``"sparse_naive"``, or a dense MLA backend (``"absorbed"``, ``"naive"``).
        everything else: as :class:`~helpers.mla.MultiHeadLatentAttention` (V3.2 rotates the main attention's
            RoPE in interleaved pairs, ``rope_interleave=True``); ``yarn`` also stretches the indexer's RoPE.

    Call it like the MLA layer: ``layer(x, cache=cache, absorb=None)`` with ``x (B, T, H)`` and an optional
    :class:`SparseLatentCache` continued from its length; ``sparse=False`` attends densely (same caches).
    """

    default_backend = "sparse"
    has_selection = True

    def __init__(self, hidden_size: int, n_heads: int, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, q_lora_rank: int | None, index_topk: int,
                 index_n_heads: int, index_head_dim: int, rope_theta: float = 10000.0,
                 rope_interleave: bool = True, rms_norm_eps: float = 1e-6, backend: str | None = None,
                 yarn: YaRN | None = None) -> None:
        check_dsa_settings(q_lora_rank, index_topk)
        super().__init__(hidden_size, n_heads, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
                         q_lora_rank=q_lora_rank, rope_theta=rope_theta, rope_interleave=rope_interleave,
                         rms_norm_eps=rms_norm_eps, backend=backend, yarn=yarn)
        self.index_topk = index_topk
        self.indexer = LightningIndexer(hidden_size, q_lora_rank, index_n_heads, index_head_dim,
                                        qk_rope_head_dim, rope_theta, yarn)

    @staticmethod
    def settings_from_config(config: Any) -> dict[str, Any]:
        """MLA's mapping (:meth:`MultiHeadLatentAttention.settings_from_config`) plus the indexer's fields of a
        ``DeepseekV32Config`` (``index_topk``, ``index_n_heads``, ``index_head_dim``)."""
        return dict(MultiHeadLatentAttention.settings_from_config(config), index_topk=config.index_topk,
                    index_n_heads=config.index_n_heads, index_head_dim=config.index_head_dim)

    def settings(self) -> dict[str, Any]:
        return dict(super().settings(), index_topk=self.index_topk, index_n_heads=self.indexer.n_heads,
                    index_head_dim=self.indexer.head_dim)

    def config_fields(self) -> dict[str, Any]:
        """The ``DeepseekV32Config`` fields describing this layer (V3.2 has no ``rope_interleave``: always True)."""
        fields = super().config_fields()
        del fields["rope_interleave"]
        return dict(fields, index_topk=self.index_topk, index_n_heads=self.indexer.n_heads,
                    index_head_dim=self.indexer.head_dim)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", index_topk={self.index_topk}"

    def new_cache(self, max_length: int | None = None) -> SparseLatentCache:
        """An empty cache for this layer: latents, RoPE keys and indexer keys."""
        return SparseLatentCache(max_length=max_length)

    def backend_for(self, absorb: bool | None, sparse: bool = True) -> str:
        """The backend a call uses: the layer's for ``absorb=None``; else the absorbed or naive form, sparse or dense."""
        if sparse:
            return self.backend if absorb is None else ("sparse" if absorb else "sparse_naive")
        return "naive" if absorb is False else "absorbed"

    def select(self, x: Tensor, cache: SparseLatentCache | None = None) -> tuple[Tensor, Tensor]:
        """The indexer's top-k for the new tokens ``x (B, T, H)``: ``indices, valid`` (both ``(B, T, k)``).

        Appends the new indexer keys to ``cache.indexer``. Runs without gradients, as in ``transformers``.
        """
        with torch.no_grad():
            q_latent = self.q_norm(self.wq_a(x))  # (B, T, q_lora_rank): the c^Q the main query is built from
            scores, start = self.indexer(x, q_latent, cache.indexer if cache is not None else None)  # (B, T, S)
            return select_topk(scores, start, self.index_topk)

    def forward(self, x: Tensor, cache: SparseLatentCache | None = None, absorb: bool | None = None,
                sparse: bool = True, return_indices: bool = False, *,
                validate: bool = True) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Attend causally over each query's top-k tokens: ``x (B, T, H) -> (B, T, H)``.

        Args:
            x: the new tokens, at positions ``cache.length ..`` (or ``0 ..`` without a cache).
            cache: a :class:`SparseLatentCache` (a plain ``LatentCache`` has no room for the indexer keys).
            absorb: ``None``: the layer's backend; ``True``/``False``: the absorbed or the naive form.
            sparse: ``False`` attends over every visible token (dense MLA) for comparison.
            return_indices: also return the selection ``indices, valid``.
            validate: ``False`` skips the input checks, for a caller that checked once at its edge (the model's
                decode loop, as in :meth:`MultiHeadLatentAttention.forward`).
        """
        if validate:
            check_attention_input(self, x, cache, SparseLatentCache, absorb=absorb)
            require_bool(sparse=sparse, return_indices=return_indices)
        if cache is not None:
            if cache.indexer.length != cache.length:
                raise ValueError(f"cache is inconsistent: {cache.length} latents but {cache.indexer.length} "
                                 "indexer keys")
            cache.bind(self)
        b, t, _ = x.shape
        attend = attention_backend(self.backend_for(absorb, sparse))
        indices, valid = self.select(x, cache)  # (B, T, k) each
        q_nope, q_rope, c_kv, k_rope, start = self.attention_inputs(x, cache)  # MLA's own projections and cache
        w_uk, w_uv = self.up_projections()
        where = (indices, valid) if attend.needs_selection else (start,)  # sparse: the top-k; dense: causal
        o = attend(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, self.softmax_scale, *where)  # (B, T, n_h, d_v)
        out = self.wo(o.reshape(b, t, self.n_heads * self.v_head_dim))  # (B, T, H)
        return (out, indices, valid) if return_indices else out
