"""Shared tools of the MoE checkers: seeded generators, experts, routing tables, weight sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from helpers.layers import SwiGLU


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sort_routing(out: Any) -> Any:
    """Normalise a router's ``(weights [T,k], indices [T,k])``: indices sorted per token, weights alike.

    Anything that is not such a pair is returned unchanged, so the comparison can describe it.
    """
    if not (isinstance(out, (tuple, list)) and len(out) == 2
            and all(isinstance(t, Tensor) for t in out)):
        return out
    weights, indices = out
    if weights.shape != indices.shape or indices.dim() != 2 or indices.dtype.is_floating_point:
        return out
    indices, order = indices.sort(dim=-1)  # (T, k)
    return weights.gather(-1, order), indices


def make_experts(n_experts: int, hidden_size: int, intermediate_size: int, seed: int) -> list[SwiGLU]:
    """``n_experts`` :class:`helpers.SwiGLU` experts with seeded weights (the global RNG is untouched)."""
    gen = _generator(seed)
    with torch.random.fork_rng(devices=[]):
        experts = [SwiGLU(hidden_size, intermediate_size) for _ in range(n_experts)]
    with torch.no_grad():
        for expert in experts:
            for p in expert.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return experts


def stack_experts(experts: Sequence[SwiGLU]) -> tuple[Tensor, Tensor]:
    """Fuse a list of SwiGLU experts into ``w_gate_up`` (E, 2I, H) and ``w_down`` (E, H, I), like ``transformers``."""
    w_gate_up = torch.stack([torch.cat([e.w_gate.weight, e.w_up.weight], dim=0) for e in experts])  # (E, 2I, H)
    w_down = torch.stack([e.w_down.weight for e in experts])  # (E, H, I)
    return w_gate_up, w_down


def _random_routing(n_tokens: int, n_experts: int, top_k: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Distinct experts per token (top-k of random scores) and positive weights that do not sum to 1."""
    indices = torch.rand(n_tokens, n_experts, generator=gen).topk(top_k, dim=-1).indices  # (T, k)
    weights = 0.2 + torch.rand(n_tokens, top_k, generator=gen)  # (T, k)
    return weights, indices


def _weight_sums(got: Any, want: Any, expected_sum: float, what: str) -> str | None:
    """If the expert sets are right but a token's weights do not sum to ``expected_sum``, say so."""
    try:
        (g_w, g_i), (w_w, w_i) = got, want
        if g_w.shape != w_w.shape or g_i.shape != w_i.shape:
            return None
        sums = g_w.detach().double().sum(dim=-1)  # (T,)
        off = (sums - expected_sum).abs() > 1e-4
        if off.any():
            t = int(off.nonzero()[0, 0])
            return f"weights for token {t} sum to {sums[t].item():.2f}, expected {expected_sum:g}; {what}"
        if not torch.equal(g_i, w_i):
            t = int((g_i != w_i).any(dim=-1).nonzero()[0, 0])
            return (f"token {t} chose experts {g_i[t].tolist()}, expected {w_i[t].tolist()}: "
                    "pick the k experts with the highest scores over the expert dimension (dim=-1)")
    except (TypeError, ValueError, RuntimeError, AttributeError):
        return None
    return None
