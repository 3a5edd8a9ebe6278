"""DeepSeek Sparse Attention (DeepSeek-V3.2): the lightning indexer on top of MLA.

=================  ===========================================================================
module             holds
=================  ===========================================================================
``indexer``        :class:`LightningIndexer` (``I_{t,s} = sum_j w_{t,j} ReLU(q_{t,j} . k_s)``), its key cache,
                   the top-k selection, its build-time rules (``check_indexer_settings``)
``attention``      sparse MLA: each query attends over its gathered top-k latents; registers the backends
                   ``"sparse"`` (absorbed) and ``"sparse_naive"`` (expanded) beside MLA's
``layer``          :class:`SparseLatentAttention` (extends :class:`helpers.mla.MultiHeadLatentAttention`; its
                   ``from_config`` adds the indexer fields) and :class:`SparseLatentCache` (the latent cache
                   with the indexer keys beside it)
``warmup``         the indexer's dense warm-up loss (KL to the main attention's distribution);
                   its run on the trained capstone (``python -m helpers.dsa.warmup``)
``hf``             conversions to and from ``transformers``' ``DeepseekV32Attention``
``cost``           FLOPs and bytes per decoded token from a configuration
``checks``         the exercise checkers of notebook 25
``diagrams``       the selection picture of notebook 25
``bench``          the decode benchmark behind ``python -m helpers.bench dsa``
=================  ===========================================================================

This package imports :mod:`helpers.mla`; nothing in :mod:`helpers.mla` imports it.
"""

from helpers.dsa.attention import gather_tokens, sparse_absorbed_attention, sparse_naive_attention
from helpers.dsa.indexer import IndexerKeyCache, LightningIndexer, index_scores, select_topk
from helpers.dsa.layer import SparseLatentAttention, SparseLatentCache

__all__ = ["LightningIndexer", "IndexerKeyCache", "index_scores", "select_topk", "gather_tokens",
           "sparse_absorbed_attention", "sparse_naive_attention", "SparseLatentAttention", "SparseLatentCache"]
