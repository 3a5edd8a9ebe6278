"""The indexer's dense warm-up (DeepSeek-V3.2-Exp report, "dense warm-up stage" of continued pre-training).

Everything but the indexer is frozen and attention stays dense. The target for query ``t`` is the main
attention's distribution summed over heads and L1-normalised, ``p_{t,:}``; the loss is
``sum_t KL(p_{t,:} || Softmax(I_{t,:}))``, so the indexer learns to put its largest scores where the heads
put their attention mass. The indexer's inputs are detached: its loss trains only the indexer.
:func:`topk_recall` measures what the warm-up is for: the share of the attention mass the top-k keeps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from helpers.dsa.layer import SparseLatentAttention
from helpers.mla.cache import causal_mask


def attention_distribution(layer: SparseLatentAttention, x: Tensor) -> Tensor:
    """The main (dense) attention of ``x (B, T, H)`` from positions ``0..``, summed over heads, L1-normalised:
    ``(B, T, S=T)``; no gradient."""
    with torch.no_grad():
        q_nope, q_rope, c_kv, k_rope, _ = layer.attention_inputs(x)
        w_uk, _ = layer.up_projections()
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, n_h, d_c)
        scores = (torch.einsum("bthc,bsc->bths", q_latent, c_kv)
                  + torch.einsum("bthr,bsr->bths", q_rope, k_rope)) * layer.softmax_scale  # (B, T, n_h, S)
        visible = causal_mask(x.shape[1], x.shape[1], 0, x.device)  # (T, S)
        p = torch.softmax(scores.masked_fill(~visible[None, :, None], float("-inf")), dim=-1).sum(dim=2)  # (B, T, S)
        return p / p.sum(dim=-1, keepdim=True)


def indexer_log_probs(layer: SparseLatentAttention, x: Tensor) -> Tensor:
    """``log Softmax(I_{t,:})`` over the visible tokens, ``(B, T, S)``; differentiable in the indexer only."""
    x = x.detach()
    with torch.no_grad():
        q_latent = layer.q_norm(layer.wq_a(x))
    scores, _ = layer.indexer(x, q_latent)  # (B, T, S)
    visible = causal_mask(x.shape[1], x.shape[1], 0, x.device)
    return torch.log_softmax(scores.masked_fill(~visible[None], float("-inf")), dim=-1)


def indexer_kl_loss(layer: SparseLatentAttention, x: Tensor) -> Tensor:
    """Mean over queries of ``KL(p_{t,:} || Softmax(I_{t,:}))`` (V3.2 report, dense warm-up loss)."""
    p = attention_distribution(layer, x)  # (B, T, S)
    log_q = indexer_log_probs(layer, x)
    kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - log_q), torch.zeros_like(p)).sum(dim=-1)  # (B, T)
    return kl.mean()


def topk_recall(layer: SparseLatentAttention, x: Tensor, topk: int | None = None) -> float:
    """Share of the main attention's mass (summed over heads) on the indexer's top-k, averaged over the queries
    that see more than ``k`` tokens (the others keep everything)."""
    k = layer.index_topk if topk is None else topk
    p = attention_distribution(layer, x)  # (B, T, S)
    with torch.no_grad():
        log_q = indexer_log_probs(layer, x)
    idx = log_q.topk(min(k, x.shape[1]), dim=-1).indices  # (B, T, k)
    kept = p.gather(-1, idx).sum(dim=-1)  # (B, T)
    rows = torch.arange(x.shape[1], device=x.device) >= k  # queries that see more than k tokens
    return float(kept[:, rows].mean()) if rows.any() else 1.0
