"""Sparse MLA: each query attends over only its top-k cached entries, in the absorbed form.

Absorbed MLA is multi-query attention over one shared latent: every head's key is ``c_s`` (plus the shared
``k^R_s``) after ``W^{UK}`` has been folded into the query. So one top-k selection per query serves all
heads, and the gather of the selected ``c_s`` and ``k^R_s`` happens once, not once per head.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gather_tokens(x: Tensor, indices: Tensor) -> Tensor:
    """``x (B, S, d)`` gathered at ``indices (B, T, k)`` -> ``(B, T, k, d)``: each query's own selection."""
    b = torch.arange(x.shape[0], device=x.device)[:, None, None]  # (B, 1, 1)
    return x[b, indices]  # (B, T, k, d)


def sparse_absorbed_attention(q_nope: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor, w_uk: Tensor,
                              w_uv: Tensor, softmax_scale: float, indices: Tensor, valid: Tensor) -> Tensor:
    """Absorbed MLA attention (:func:`helpers.mla.absorbed_attention`) over each query's selected entries only.

    Args:
        q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, softmax_scale: as in :func:`helpers.mla.absorbed_attention`.
        indices: ``(B, T, k)`` positions in the cache chosen for each query (the indexer's top-k).
        valid: ``(B, T, k)`` bool, False for slots to ignore (a query with fewer than ``k`` visible tokens).

    Returns:
        ``o (B, T, n_h, d_v)``. The cost per query is O(k), not O(S): only ``k`` latents are read.
    """
    c_sel = gather_tokens(c_kv, indices)  # (B, T, k, d_c): gathered once, shared by all heads
    r_sel = gather_tokens(k_rope, indices)  # (B, T, k, d_r)
    q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, n_h, d_c): W^{UK} absorbed into the query
    scores = (torch.einsum("bthc,btkc->bthk", q_latent, c_sel)
              + torch.einsum("bthr,btkr->bthk", q_rope, r_sel)) * softmax_scale  # (B, T, n_h, k)
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)  # (B, T, n_h, k)
    o_latent = torch.einsum("bthk,btkc->bthc", p, c_sel)  # (B, T, n_h, d_c)
    return torch.einsum("bthc,hdc->bthd", o_latent, w_uv)  # (B, T, n_h, d_v): W^{UV} applied once
