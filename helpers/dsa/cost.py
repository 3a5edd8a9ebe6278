"""FLOPs and bytes of one decoded token's attention, dense MLA against DSA, from a configuration.

Per decoded token and per layer, with ``S`` cached tokens, ``n_h`` heads, latent ``d_c``, RoPE key ``d_h^R``,
indexer ``n_I`` heads of ``d_I`` and top-``k`` (a multiply-add counts as 2 FLOPs):

- dense absorbed MLA reads every cached ``[c; k^R]`` once for all heads: scores ``2 n_h S (d_c + d_h^R)``,
  weighted sum of latents ``2 n_h S d_c``; bytes ``S (d_c + d_h^R) b_latent``;
- DSA's indexer reads every cached indexer key: ``2 n_I S d_I`` for the ``q . k`` and ``2 n_I S`` for the
  head weighting; bytes ``S (d_I b_index + b_scale d_I / 128)`` (DeepSeek's reference caches the indexer keys
  in FP8 with one fp32 scale per block of 128; top-k over ``S`` scores is not counted);
- DSA's sparse attention is dense MLA with ``S`` replaced by ``min(k, S)``.

The projections (queries, latent, indexer queries, keys and weights, output) do not depend on ``S``; they are
reported separately (``projection_flops``) and their weights' bytes are not counted (shared by a batch).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


def decode_cost(config: Any, context: int, topk: int | None = None, bytes_latent: float = 2,
                bytes_index: float = 1, bytes_index_scale: float = 4) -> dict[str, float]:
    """FLOPs and cache bytes read for one decoded token in one layer.

    Args:
        config: a ``DeepseekV32Config`` (or anything with its field names).
        context: ``S``, cached tokens the new token attends to.
        topk: ``k`` (default ``config.index_topk``).
        bytes_latent: bytes per cached latent element (2: bf16, as DeepSeek's reference inference code caches
            them); bytes_index: per indexer key element (1: FP8, the reference's ``k_cache``);
            bytes_index_scale: per block of 128 indexer key elements (4: the reference's fp32 ``k_scale_cache``).

    Returns:
        ``dense_flops``, ``dense_bytes``, ``indexer_flops``, ``indexer_bytes``, ``sparse_flops``, ``sparse_bytes``,
        ``dsa_flops``, ``dsa_bytes`` (indexer + sparse), ``projection_flops`` (MLA's, S-independent) and
        ``indexer_projection_flops``.
    """
    s = context
    k = min(config.index_topk if topk is None else topk, s)
    n_h, d_c, d_r = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim
    n_i, d_i, h, d_n, d_v = config.index_n_heads, config.index_head_dim, config.hidden_size, \
        config.qk_nope_head_dim, config.v_head_dim

    def mla(tokens: int) -> tuple[float, float]:
        return 2 * n_h * tokens * (d_c + d_r) + 2 * n_h * tokens * d_c, tokens * (d_c + d_r) * bytes_latent

    dense_flops, dense_bytes = mla(s)
    sparse_flops, sparse_bytes = mla(k)
    indexer_flops = 2 * n_i * s * d_i + 2 * n_i * s
    indexer_bytes = s * (d_i * bytes_index + bytes_index_scale * -(-d_i // 128))
    q = config.q_lora_rank
    projection = 2 * (h * q + q * n_h * (d_n + d_r) + h * (d_c + d_r) + n_h * d_n * d_c + n_h * d_c * d_v + n_h * d_v * h)
    return dict(dense_flops=dense_flops, dense_bytes=dense_bytes, indexer_flops=indexer_flops,
                indexer_bytes=indexer_bytes, sparse_flops=sparse_flops, sparse_bytes=sparse_bytes,
                dsa_flops=indexer_flops + sparse_flops, dsa_bytes=indexer_bytes + sparse_bytes,
                projection_flops=projection, indexer_projection_flops=2 * (q * n_i * d_i + h * d_i + h * n_i))


def per_token_flops(config: Any) -> dict[str, int]:
    """Attention FLOPs per cached token scored: ``dense`` ``2 n_h (2 d_c + d_h^R)`` (absorbed MLA: scores against
    ``[c; k^R]`` and the weighted sum of ``c``, every head) and ``indexer`` ``2 n_I (d_I + 1)`` (one dot product
    per indexer head against the ONE shared key, and its head weight)."""
    n_h, d_c, d_r = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim
    return dict(dense=2 * n_h * (2 * d_c + d_r), indexer=2 * config.index_n_heads * (config.index_head_dim + 1))


def flop_crossover(config: Any, topk: int | None = None) -> float | None:
    """The context ``S`` above which DSA needs fewer attention FLOPs per decoded token than dense MLA.

    Below ``k`` DSA keeps every token and adds the indexer, so it never wins there; above, dense costs
    ``S * dense`` and DSA ``S * indexer + k * dense`` (:func:`per_token_flops`): equal at
    ``S = k * dense / (dense - indexer)``. ``None`` if the indexer costs as much per token as dense attention.
    """
    k = config.index_topk if topk is None else topk
    f = per_token_flops(config)
    return None if f["indexer"] >= f["dense"] else k * f["dense"] / (f["dense"] - f["indexer"])


def layer_config(attention: dict[str, Any]) -> SimpleNamespace:
    """A :class:`~helpers.dsa.SparseLatentAttention`'s keyword sizes (e.g. the benchmark's saved ``attention``)
    under ``DeepseekV32Config``'s field names, so :func:`decode_cost` can count that layer."""
    names = dict(n_heads="num_attention_heads")
    return SimpleNamespace(**{names.get(key, key): value for key, value in attention.items()})


def cost_table(config: Any, contexts=(4096, 16384, 32768, 131072), topk: int | None = None, **bytes_per) -> str:
    """A text table of :func:`decode_cost` per context: GFLOP and MB per token per layer, and the ratios."""
    lines = [f"{'context':>8s}  {'dense GFLOP':>11s}  {'DSA GFLOP':>9s}  {'(indexer)':>9s}  {'x fewer':>7s}  "
             f"{'dense MB':>8s}  {'DSA MB':>7s}  {'x fewer':>7s}"]
    for s in contexts:
        c = decode_cost(config, s, topk, **bytes_per)
        lines.append(f"{s:8d}  {c['dense_flops'] / 1e9:11.2f}  {c['dsa_flops'] / 1e9:9.2f}  "
                     f"{c['indexer_flops'] / 1e9:9.2f}  {c['dense_flops'] / c['dsa_flops']:7.1f}  "
                     f"{c['dense_bytes'] / 1e6:8.1f}  {c['dsa_bytes'] / 1e6:7.1f}  {c['dense_bytes'] / c['dsa_bytes']:7.1f}")
    return "\n".join(lines)
