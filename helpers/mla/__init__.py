"""Multi-head Latent Attention: low-rank KV, decoupled RoPE, weight absorption, the latent cache.

=================  ===========================================================================
module             holds
=================  ===========================================================================
``rope``           rotary embeddings in both pair layouts (interleaved and half-split); ``YaRN``, the
                   long-context RoPE of DeepSeek-V2/V3 (stretched frequencies, softmax-scale correction)
``cache``          the growing buffer, the MHA/GQA ``KVCache``, MLA's ``LatentCache``, the causal mask
``baselines``      :class:`MultiHeadAttention`: MHA, GQA and MQA, the baselines MLA is measured against
``attention``      MLA's attention over the latent, naive (re-expand) and absorbed, registered by name in
                   ``ATTENTION_BACKENDS`` (``register_attention``, ``attention_backend``)
``layer``          :class:`MultiHeadLatentAttention`, the finished layer: its build-time rules
                   (``check_mla_settings``), ``from_config`` (the one config-to-MLA mapping), ``new_cache``
``hf``             conversions to and from ``transformers`` (gathered in :mod:`helpers.hf`)
``checks``         the exercise checkers of notebooks 20-24
``bench``          the decode benchmark behind ``python -m helpers.bench mla``
=================  ===========================================================================
"""

from helpers.mla.attention import ATTENTION_BACKENDS, absorbed_attention, attention_backend, naive_attention
from helpers.mla.baselines import MultiHeadAttention
from helpers.mla.cache import GrowingBuffer, KVCache, LatentCache, causal_mask
from helpers.mla.layer import MultiHeadLatentAttention
from helpers.mla.rope import YaRN, apply_rope, rope_cos_sin

__all__ = ["MultiHeadLatentAttention", "MultiHeadAttention", "LatentCache", "KVCache", "GrowingBuffer",
           "causal_mask", "naive_attention", "absorbed_attention", "ATTENTION_BACKENDS", "attention_backend",
           "apply_rope", "rope_cos_sin", "YaRN"]
