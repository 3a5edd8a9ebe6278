"""MLA's attention over the latent cache, computed two ways: naive (re-expand) and absorbed, registered by name.

``naive_attention`` expands every cached latent into per-head keys and values (V2 eq. 12-18), the plain
reading of the equations and the default; ``absorbed_attention`` folds ``W^{UK}`` into the query and ``W^{UV}``
into the output and attends over the latent directly (V2 §2.1.2), the fast variant. Both take the same arguments
and return the same numbers (up to rounding: in bf16 they round different intermediates, notebook 23).

Backends are looked up by name in :data:`ATTENTION_BACKENDS`, as ``transformers`` looks attention up in
``ALL_ATTENTION_FUNCTIONS``: ``"naive"`` and ``"absorbed"`` here, ``"sparse"`` and ``"sparse_naive"`` added by
:mod:`helpers.dsa` (which needs the lightning indexer's selection, so only its layer can use them). Every
softmax runs in fp32 and returns to the scores' dtype (:func:`helpers.precision.softmax`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from helpers.mla.cache import causal_mask
from helpers.precision import softmax
from helpers.rules import closest_name, require_count

ATTENTION_BACKENDS: dict[str, Callable[..., Tensor]] = {}
"""Name -> attention over the latent. A backend with ``needs_selection`` set also takes ``indices, valid``."""


def register_attention(name: str, *, needs_selection: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: file ``fn`` in :data:`ATTENTION_BACKENDS` under ``name`` (``needs_selection``: a sparse backend,
    called with the indexer's ``indices, valid`` instead of ``start_pos``)."""
    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        fn.needs_selection = needs_selection
        ATTENTION_BACKENDS[name] = fn
        return fn
    return register


def attention_backend(name: str) -> Callable[..., Tensor]:
    """The registered backend called ``name``; ``ValueError`` with the closest name for an unknown one."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {sorted(ATTENTION_BACKENDS)}, got {name!r}"
                         f"{closest_name(str(name), ATTENTION_BACKENDS)} (the sparse ones exist once helpers.dsa "
                         "is imported)")
    return ATTENTION_BACKENDS[name]


def check_latent_inputs(q_nope: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor, w_uk: Tensor,
                        w_uv: Tensor) -> None:
    """``ValueError`` naming the argument unless the shapes fit one another (ranks and shared widths only)."""
    tensors = dict(q_nope=q_nope, q_rope=q_rope, c_kv=c_kv, k_rope=k_rope, w_uk=w_uk, w_uv=w_uv)
    layouts = dict(q_nope="(B, T, n_h, d_n)", q_rope="(B, T, n_h, d_r)", c_kv="(B, S, d_c)", k_rope="(B, S, d_r)",
                   w_uk="(n_h, d_n, d_c)", w_uv="(n_h, d_v, d_c)")
    for name, x in tensors.items():
        if not isinstance(x, Tensor) or x.dim() != len(layouts[name].split(",")):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a tensor {layouts[name]}, got {got}")
    b, t, n_h, d_n = q_nope.shape
    s, d_c = c_kv.shape[1], c_kv.shape[2]
    d_r = q_rope.shape[-1]
    expected = dict(q_rope=(b, t, n_h, d_r), c_kv=(b, s, d_c), k_rope=(b, s, d_r), w_uk=(n_h, d_n, d_c),
                    w_uv=(n_h, w_uv.shape[1], d_c))
    for name, want in expected.items():
        if tuple(tensors[name].shape) != want:
            raise ValueError(f"{name} has shape {tuple(tensors[name].shape)} but the other arguments need {want} "
                             f"(q_nope {tuple(q_nope.shape)}, c_kv {tuple(c_kv.shape)}): batch, tokens, heads and "
                             "widths must agree")


@register_attention("naive")
def naive_attention(q_nope: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor, w_uk: Tensor, w_uv: Tensor,
                    softmax_scale: float, start_pos: int) -> Tensor:
    """MLA attention by re-expanding the latent into per-head keys and values (V2 paper eq. 12-18).

    ``k^C_{j,i} = W^{UK}_i c_j`` and ``v^C_{j,i} = W^{UV}_i c_j`` (eq. 12, 15) for every cached token ``j``, the
    full query and key of head ``i`` are ``q_{t,i} = [q^C_{t,i}; q^R_{t,i}]``, ``k_{j,i} = [k^C_{j,i}; k^R_j]``
    (eq. 15-16), and ``o_{t,i} = sum_j Softmax_j(q_{t,i} . k_{j,i} * scale) v^C_{j,i}`` (eq. 17).

    Args:
        q_nope: ``(B, T, n_h, d_n)`` content queries ``q^C``; q_rope: ``(B, T, n_h, d_r)`` rotated queries ``q^R``.
        c_kv: ``(B, S, d_c)`` cached latents; k_rope: ``(B, S, d_r)`` cached rotated keys ``k^R``.
        w_uk: ``(n_h, d_n, d_c)``; w_uv: ``(n_h, d_v, d_c)`` (views of ``wkv_b.weight``).
        softmax_scale: usually ``1 / sqrt(d_n + d_r)``.
        start_pos: absolute position of the first query; query ``t`` sees keys ``0..start_pos + t``.

    Returns:
        ``o (B, T, n_h, d_v)``, the per-head outputs before ``W^O``.
    """
    check_latent_inputs(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv)
    require_count(start_pos=start_pos)
    b, t, n_h, _ = q_nope.shape
    s, d_r = c_kv.shape[1], k_rope.shape[-1]
    k_nope = torch.einsum("bsc,hdc->bhsd", c_kv, w_uk)  # (B, n_h, S, d_n): re-expanded every call
    v = torch.einsum("bsc,hdc->bhsd", c_kv, w_uv)  # (B, n_h, S, d_v)
    q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # (B, n_h, T, d_n + d_r), eq. 15
    k = torch.cat([k_nope, k_rope[:, None].expand(b, n_h, s, d_r)], dim=-1)  # (B, n_h, S, d_n + d_r), eq. 16
    # One product for both parts of the score; scale and mask in place (the product is a fresh tensor).
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(softmax_scale)  # (B, n_h, T, S)
    if t > 1 or start_pos + t < s:
        scores = scores.masked_fill_(~causal_mask(t, s, start_pos, scores.device), float("-inf"))
    p = softmax(scores, dim=-1)  # (B, n_h, T, S), fp32 inside
    return torch.matmul(p, v).transpose(1, 2)  # (B, T, n_h, d_v)


@register_attention("absorbed")
def absorbed_attention(q_nope: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor, w_uk: Tensor, w_uv: Tensor,
                       softmax_scale: float, start_pos: int) -> Tensor:
    """The same attention as :func:`naive_attention`, computed over the latent (V2 paper Sec. 2.1.2).

    ``q^C_{t,i} . (W^{UK}_i c_j) = (W^{UK}_i{}^T q^C_{t,i}) . c_j``: the query is moved into latent space once
    per step, instead of moving every cached latent into key space. Likewise
    ``sum_j p_j W^{UV}_i c_j = W^{UV}_i sum_j p_j c_j``: attend over latents, then apply ``W^{UV}_i`` once.
    Arguments and result as in :func:`naive_attention`.
    """
    check_latent_inputs(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv)
    require_count(start_pos=start_pos)
    b, t, n_h, _ = q_nope.shape
    s = c_kv.shape[1]
    q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, n_h, d_c): W^{UK} absorbed into the query
    # Multi-query attention with one (d_c + d_r)-wide key head shared by the T * n_h query rows: two batched
    # products over the whole cache, the RoPE part fused in by baddbmm. Scores keep the cached tokens on the last,
    # contiguous axis, so the softmax reduces over contiguous memory (on a CPU about 1.5-2x faster at 4k-16k
    # cached tokens than computing them transposed, c_kv q^T, and reducing over a strided axis).
    rope_part = torch.bmm(q_rope.reshape(b, t * n_h, -1), k_rope.transpose(1, 2))  # (B, T*n_h, S)
    scores = torch.baddbmm(rope_part, q_latent.reshape(b, t * n_h, -1), c_kv.transpose(1, 2),
                           alpha=softmax_scale, beta=softmax_scale)  # (B, T*n_h, S), scaled
    if t > 1 or start_pos + t < s:
        allowed = causal_mask(t, s, start_pos, scores.device)  # (T, S)
        scores = scores.view(b, t, n_h, s).masked_fill(~allowed[None, :, None, :], float("-inf"))
    p = softmax(scores.reshape(b, t * n_h, s), dim=-1)  # (B, T*n_h, S), fp32 inside
    o_latent = torch.bmm(p, c_kv).view(b, t, n_h, -1)  # (B, T, n_h, d_c): attend in latent space
    return torch.einsum("bthc,hdc->bthd", o_latent, w_uv)  # (B, T, n_h, d_v): W^{UV} applied once
