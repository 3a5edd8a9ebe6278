"""The ``grouped`` backend: the pairs sorted by expert, every expert's product in one ``F.grouped_mm`` call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from helpers.moe.backends.registry import register_backend
from helpers.moe.backends.sorted_dispatch import sort_by_expert

GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""What ``F.grouped_mm`` accepts on a CPU (not float64)."""


def grouped_supported(u: Tensor, w_down: Tensor) -> bool:
    """Whether ``F.grouped_mm`` takes these operands: its dtypes, and rows of ``H`` and ``I`` values that are
    whole multiples of 16 bytes (its stride rule)."""
    size = u.element_size()
    return u.dtype in GROUPED_DTYPES and all(n * size % 16 == 0 for n in w_down.shape[-2:])


@register_backend("grouped")
def grouped_dispatch(u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    """V3 eq. 12's routed sum with the experts' products fused: sort once, then one ``F.grouped_mm`` per projection.

    The pairs sorted by expert (:func:`sort_by_expert`) form one ``(T*k, H)`` matrix of token rows whose
    consecutive slices belong to one expert each (``offs`` holds the slice ends); ``F.grouped_mm`` multiplies
    each slice by its expert's weight in one call, ``h = x W_gate_up^T`` then ``o = a W_down^T``; the
    ``g``-weighted rows are added back to their tokens with ``index_add_`` (V3 eq. 12). Same numbers as the
    loop over experts; autograd works through it (``F.grouped_mm`` has a backward).
    """
    if not grouped_supported(u, w_down):
        raise ValueError(f"the grouped path needs u in one of {GROUPED_DTYPES} with H and I multiples of 16 bytes, "
                         f"got {u.dtype}, H={w_down.shape[-2]}, I={w_down.shape[-1]}; use backend='sorted' or 'loop'")
    order, token, bounds = sort_by_expert(indices, w_gate_up.shape[0])
    g = weights.reshape(-1)[order].to(u.dtype)  # (T*k,) gating values of the sorted pairs
    offs = torch.tensor(bounds[1:], dtype=torch.int32, device=u.device)  # (E,) slice ends
    h = F.grouped_mm(u.index_select(0, token), w_gate_up.transpose(1, 2), offs=offs)  # (T*k, 2I)
    gate, up = h.split(w_down.shape[-1], dim=-1)  # (T*k, I) each
    o = F.grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offs)  # (T*k, H)
    return torch.zeros_like(u).index_add(0, token, o * g[:, None])  # (T, H)
