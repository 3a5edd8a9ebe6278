"""Exercise checkers for the MLA notebooks (20-24, 26), built on :mod:`helpers.teaching.checks`.

Each checker compares a learner's function with the finished pieces in :mod:`helpers.mla` and, when
the answer is wrong, recognises the usual one-step mistakes and says what is wrong and where to look;
when no known mistake matches, it says what differs (which heads, positions, NaN rows) without guessing:

- :data:`check_causal_attention` -- ``causal_attention(q, k, v, start_pos) -> o`` with grouped key/value
  heads and a cache offset (notebook 20; V2 paper eq. 1-8);
- :data:`check_compress_expand` -- ``compress_expand(h, w_dkv, kv_norm, w_uk, w_uv) -> (c_kv, k_nope, v)``
  (notebook 21; V2 paper eq. 9-11);
- :data:`check_split_rope` -- ``split_and_rope(q, k_rope, cos, sin, qk_nope_head_dim, interleave)
  -> (q_nope, q_rope, k_rope)`` (notebook 22; V2 paper eq. 14-16);
- :data:`check_cached_mla` -- a whole MLA layer class: prefill, then token-by-token decode with a
  :class:`helpers.mla.LatentCache`, against the full pass without a cache (notebook 22);
- :data:`check_absorbed_attention` -- ``absorbed_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv,
  softmax_scale, start_pos) -> o`` (notebook 23; V2 paper Sec. 2.1.2, eq. 17);
- :data:`check_sequence_cache_bytes` -- ``sequence_cache_bytes(config, kind, tokens, dtype, n_groups)``,
  the KV cache of one sequence from a model config (notebook 24);
- :data:`check_yarn_inv_freq` -- ``yarn_inv_freq(dim, base, factor, original_max_position_embeddings, beta_fast,
  beta_slow)``, YaRN's stretched RoPE frequencies, and :data:`check_yarn_softmax_scale` --
  ``yarn_softmax_scale(qk_nope_head_dim, qk_rope_head_dim, factor, mscale_all_dim)``, DeepSeek's softmax-scale
  correction (notebook 26; YaRN §3.2, §3.4; DeepSeek-V3 §4.3).

Each known mistake is a small function (or, for the layer, a class) that makes that mistake on purpose;
``checker.audit()`` runs them all, and the tests prove each gets its own message.
"""

from helpers.mla.checks.absorption import check_absorbed_attention
from helpers.mla.checks.attention import check_causal_attention
from helpers.mla.checks.cached import check_cached_mla
from helpers.mla.checks.compression import check_compress_expand
from helpers.mla.checks.rope import check_split_rope
from helpers.mla.checks.scale import check_sequence_cache_bytes
from helpers.mla.checks.yarn import check_yarn_inv_freq, check_yarn_softmax_scale

__all__ = ["check_causal_attention", "check_compress_expand", "check_split_rope", "check_cached_mla",
           "check_absorbed_attention", "check_sequence_cache_bytes", "check_yarn_inv_freq", "check_yarn_softmax_scale"]
