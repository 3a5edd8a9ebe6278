"""Exercise checkers of the DeepSeek-V4 notebooks, built on :mod:`helpers.teaching.checks`.

Import them by module (``from helpers.v4.checks import hyper as hyper_checks``).

===================================  =================================================================  ========
checker                              the learner writes                                                 notebook
===================================  =================================================================  ========
``hyper.check_sinkhorn``             ``sinkhorn(logits [..,n,n], iters, eps)``                          40
``hyper.check_hc_update``            ``hc_update(streams, out, post, comb) -> new streams``             40
``attention.check_sink_attention``   attention with a per-head sink logit in the softmax                41
``attention.check_hca_pool``         HCA's gated pooling of ``m'`` tokens into one entry                 41
``attention.check_csa_pool``         CSA's overlapping two-series pooling (width ``2m``, stride ``m``)   42
``attention.check_visible_entries``  which compressed entries a query may see                           42
``moe.check_v4_route``               ``v4_route(logits, bias, top_k, routed_scaling_factor)``           43
``moe.check_hash_route``             ``hash_route(logits, input_ids, tid2eid, routed_scaling_factor)``  43
``moe.check_clamped_swiglu``         ``clamped_swiglu(gate, up, limit)``                                43
``model.check_v4_block``             one V4 block: two hyper-connections around attention and the MoE   44
``cost.check_v4_layer_cache``        ``v4_layer_cache_elements(kind, context, head_dim, ...)``          45
===================================  =================================================================  ========
"""
