"""Exercise checkers for the MLA notebooks (20-24), built on :mod:`helpers.teaching.checks`.

Each checker compares a learner's function with the finished pieces in :mod:`helpers.mla` and, when
the answer is wrong, recognises the usual mistakes and says what is wrong and where to look:

- :data:`check_compress_expand` -- ``compress_expand(h, w_dkv, kv_norm, w_uk, w_uv) -> (c_kv, k_nope, v)``
  (notebook 21; V2 paper eq. 9-11);
- :data:`check_split_rope` -- ``split_and_rope(q, k_rope, cos, sin, qk_nope_head_dim, interleave)
  -> (q_nope, q_rope, k_rope)`` (notebook 22; V2 paper eq. 14-16);
- :data:`check_absorbed_attention` -- ``absorbed_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv,
  softmax_scale, start_pos) -> o`` (notebook 23; V2 paper Sec. 2.1.2, eq. 17).

Every known mistake is a small function below that makes that mistake on purpose (``_mistake_*``);
the checker matches the learner's output against it.

"""

from helpers.mla.checks.absorption import check_absorbed_attention
from helpers.mla.checks.compression import check_compress_expand
from helpers.mla.checks.rope import check_split_rope

__all__ = ["check_compress_expand", "check_split_rope", "check_absorbed_attention"]
