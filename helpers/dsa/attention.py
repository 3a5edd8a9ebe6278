"""Sparse MLA: each query attends over only its top-k cached entries, in the absorbed form.

Absorbed MLA is multi-query attention over one shared latent: every head's key is ``c_s`` (plus the shared
``k^R_s``) after ``W^{UK}`` has been folded into the query. So one top-k selection per query serves all
heads, and the gather of the selected ``c_s`` and ``k^R_s`` happens once, not once per head.

Both are registered with MLA's backends (:data:`helpers.mla.attention.ATTENTION_BACKENDS`): ``"sparse"``, the
absorbed form above (DeepSeek's), and ``"sparse_naive"``, the plain reading: gather the chosen latents, expand
them with ``W^{UK}``, ``W^{UV}`` into per-head keys and values, attend. They take the indexer's ``indices, valid``
where the dense backends take ``start_pos``; the softmax runs in fp32 (:func:`helpers.precision.softmax`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from helpers.mla.attention import check_latent_inputs, register_attention
from helpers.precision import softmax


def gather_tokens(x: Tensor, indices: Tensor) -> Tensor:
    """``x (B, S, d)`` gathered at ``indices (B, T, k)`` -> ``(B, T, k, d)``: each query's own selection."""
    b = torch.arange(x.shape[0], device=x.device)[:, None, None]  # (B, 1, 1)
    return x[b, indices]  # (B, T, k, d)


def check_selection(q_nope: Tensor, indices: Tensor, valid: Tensor) -> None:
    """``ValueError`` unless ``indices`` (int64) and ``valid`` (bool) are both ``(B, T, k)`` for ``q_nope (B, T, ...)``."""
    for name, sel, dtype in (("indices", indices, torch.long), ("valid", valid, torch.bool)):
        if not isinstance(sel, Tensor) or sel.dtype != dtype or sel.dim() != 3 or sel.shape[:2] != q_nope.shape[:2]:
            got = f"{tuple(sel.shape)} {sel.dtype}" if isinstance(sel, Tensor) else type(sel).__name__
            raise ValueError(f"{name} must be a {dtype} tensor (B, T, k) = {(*q_nope.shape[:2], 'k')}, got {got} "
                             "(the indexer's select_topk gives both)")
    if indices.shape != valid.shape:
        raise ValueError(f"indices {tuple(indices.shape)} and valid {tuple(valid.shape)} must have the same shape")


@register_attention("sparse_naive", needs_selection=True)
def sparse_naive_attention(q_nope: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor, w_uk: Tensor,
                           w_uv: Tensor, softmax_scale: float, indices: Tensor, valid: Tensor) -> Tensor:
    """MLA's naive attention (:func:`helpers.mla.naive_attention`, V2 eq. 12-18) over each query's selected entries.

    The ``k`` chosen latents of every query are gathered and expanded into per-head keys ``W^{UK}_i c_s`` and
    values ``W^{UV}_i c_s``; arguments and result as in :func:`sparse_absorbed_attention`.
    """
    check_latent_inputs(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv)
    check_selection(q_nope, indices, valid)
    c_sel = gather_tokens(c_kv, indices)  # (B, T, k, d_c)
    r_sel = gather_tokens(k_rope, indices)  # (B, T, k, d_r)
    k_nope = torch.einsum("btkc,hdc->btkhd", c_sel, w_uk)  # (B, T, k, n_h, d_n): expanded per query
    v = torch.einsum("btkc,hdc->btkhd", c_sel, w_uv)  # (B, T, k, n_h, d_v)
    scores = (torch.einsum("bthd,btkhd->bthk", q_nope, k_nope)
              + torch.einsum("bthr,btkr->bthk", q_rope, r_sel)) * softmax_scale  # (B, T, n_h, k)
    p = softmax(scores.masked_fill(~valid[:, :, None, :], float("-inf")), dim=-1)  # (B, T, n_h, k)
    return torch.einsum("bthk,btkhd->bthd", p, v)  # (B, T, n_h, d_v)


@register_attention("sparse", needs_selection=True)
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
    check_latent_inputs(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv)
    check_selection(q_nope, indices, valid)
    c_sel = gather_tokens(c_kv, indices)  # (B, T, k, d_c): gathered once, shared by all heads
    r_sel = gather_tokens(k_rope, indices)  # (B, T, k, d_r)
    q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, n_h, d_c): W^{UK} absorbed into the query
    scores = (torch.einsum("bthc,btkc->bthk", q_latent, c_sel)
              + torch.einsum("bthr,btkr->bthk", q_rope, r_sel)) * softmax_scale  # (B, T, n_h, k)
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    p = softmax(scores, dim=-1)  # (B, T, n_h, k), fp32 inside
    o_latent = torch.einsum("bthk,btkc->bthc", p, c_sel)  # (B, T, n_h, d_c)
    return torch.einsum("bthc,hdc->bthd", o_latent, w_uv)  # (B, T, n_h, d_v): W^{UV} applied once
