"""DeepSeek-V4 in miniature: manifold-constrained hyper-connections, compressed attention, V4's MoE, the whole model.

======================  ==========================================================================================
module                  holds (DeepSeek-V4 report, §2)
======================  ==========================================================================================
``hyper``               :class:`HyperConnection`, :class:`HyperHead`, ``expand_streams``, ``sinkhorn`` (§2.2)
``attention``           :class:`V4Attention`: sliding window, CSA, HCA, sinks, grouped output (§2.3)
``compressor``          the token compressors and the lightning indexer (§2.3.1-2.3.2)
``cache``               :class:`V4Cache`: the window, the pending tokens, the compressed entries
``rope``, ``norms``     V4's trailing-slice RoPE and its fp32 RMSNorms
``moe``                 :class:`V4MoE`: sqrt-softplus scores, hash or top-k routing, clamped SwiGLU (§2.1)
``model``               :class:`DeepSeekV4`: the pieces assembled by :mod:`helpers.model.blocks`' registries
``cost``                parameters, KV cache and FLOPs per token of V3, V3.2, V4-Flash and V4-Pro at long context
``attention_diagrams``  notebooks 41-42's pictures (what each query reads, CSA's windows, the cache over calls)
``train``               ``python -m helpers.v4.train``: the miniature trained beside V3 (AdamW and Muon)
``bench``               ``python -m helpers.bench v4``: decode speed against ``transformers``
``hf``                  conversions to and from ``transformers``' ``DeepseekV4*`` modules, and the export
``checks``              the notebooks' exercise checkers
======================  ==========================================================================================

Import the pieces from their modules. The pieces import nothing from the model family; :mod:`helpers.model.blocks`
registers them by name, and :mod:`helpers.v4.model` builds the model from those registries.
"""
