"""Exercise checkers of the DeepSeek-V4 notebooks, built on :mod:`helpers.teaching.checks`.

Import them by module (``from helpers.v4.checks import hyper as hyper_checks``). The table lists the checkers of
notebooks 40, 43 and 45; the attention and whole-model notebooks' checkers are in their own modules of this package.

==============================  ===========================================================  ========
checker                         the learner writes                                           notebook
==============================  ===========================================================  ========
``hyper.check_sinkhorn``        ``sinkhorn(logits [..,n,n], iters, eps)``                     40
``hyper.check_hc_update``       ``hc_update(streams, out, post, comb) -> new streams``        40
``moe.check_v4_route``          ``v4_route(logits, bias, top_k, routed_scaling_factor)``      43
``moe.check_hash_route``        ``hash_route(logits, input_ids, tid2eid, routed_scaling_factor)``  43
``moe.check_clamped_swiglu``    ``clamped_swiglu(gate, up, limit)``                           43
``cost.check_v4_layer_cache``   ``v4_layer_cache_elements(kind, context, head_dim,           45
                                sliding_window, compress_rate, index_head_dim)``
==============================  ===========================================================  ========
"""
