"""Shared tools of the MoE checkers: seeded generators, experts, routing tables, and the descriptions
of what differs when no known mistake matches (which tokens, which experts), never a guessed cause.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from helpers.layers import SwiGLU


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _is_routing(out: Any) -> bool:
    """True if ``out`` is a pair of same-shape (T, k) tensors, one of them integer (the expert ids)."""
    return (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)
            and out[0].shape == out[1].shape and out[0].dim() == 2
            and out[0].dtype.is_floating_point != out[1].dtype.is_floating_point)


def sort_routing(out: Any) -> Any:
    """Normalise a router's ``(weights [T,k], indices [T,k])``: indices sorted per token, weights alike.

    A pair returned the other way round, ``(indices, weights)``, is sorted the same way and stays in
    that order (so a checker can still name the swap). Anything else is returned unchanged, so the
    comparison can describe it.
    """
    if not _is_routing(out):
        return out
    swapped = not out[0].dtype.is_floating_point
    weights, indices = (out[1], out[0]) if swapped else out
    indices, order = indices.sort(dim=-1)  # (T, k)
    weights = weights.gather(-1, order)  # (T, k)
    return (indices, weights) if swapped else (weights, indices)


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


def _random_routing(n_tokens: int, n_experts: int, top_k: int, gen: torch.Generator,
                    unused: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
    """Distinct experts per token (top-k of random scores), none of them in ``unused``, and positive
    weights that do not sum to 1."""
    scores = torch.rand(n_tokens, n_experts, generator=gen)  # (T, E)
    scores[:, list(unused)] = -1.0
    indices = scores.topk(top_k, dim=-1).indices  # (T, k)
    weights = 0.2 + torch.rand(n_tokens, top_k, generator=gen)  # (T, k)
    return weights, indices


def _listed(items: Sequence[int], limit: int = 8) -> str:
    return ", ".join(map(str, list(items)[:limit])) + (", ..." if len(items) > limit else "")


def describe_routing(got: Any, want: Any, expected_sum: float | None = None) -> str | None:
    """Say what differs between two normalised routings ``(weights, indices)``, token by token.

    First the expert *sets* (indices are sorted per token by :func:`sort_routing`): which tokens chose
    other experts, and for the first of them which experts it gained and lost. If every set is right,
    which tokens' weights differ, and what the first one's weights sum to. Describes; never guesses.
    """
    if not (_is_routing(got) and _is_routing(want)) or got[0].dtype != want[0].dtype:
        return None
    (g_w, g_i), (w_w, w_i) = got, want
    if not g_w.dtype.is_floating_point:  # both returned as (indices, weights)
        (g_i, g_w), (w_i, w_w) = got, want
    n_tokens = len(w_i)
    wrong_set = (g_i != w_i).any(dim=-1).nonzero().flatten().tolist()
    if wrong_set:
        t = wrong_set[0]
        gained = sorted(set(g_i[t].tolist()) - set(w_i[t].tolist()))
        lost = sorted(set(w_i[t].tolist()) - set(g_i[t].tolist()))
        detail = (f"token {t} chose experts {g_i[t].tolist()}, expected {w_i[t].tolist()}"
                  + (f" (it has {gained} instead of {lost})" if gained else " (an expert appears in it more than once)"))
        return (f"the chosen expert sets differ for {len(wrong_set)} of {n_tokens} tokens "
                f"({_listed(wrong_set)}): {detail}")
    differ = ~torch.isclose(g_w.detach().double(), w_w.detach().double(), atol=1e-5, rtol=1e-4)  # (T, k)
    wrong_weight = differ.any(dim=-1).nonzero().flatten().tolist()
    if not wrong_weight:
        return None
    t = wrong_weight[0]
    fmt = lambda v: "[" + ", ".join(f"{x:.3f}" for x in v.tolist()) + "]"  # noqa: E731
    message = (f"every token chose the right experts, but the weights differ for {len(wrong_weight)} of "
               f"{n_tokens} tokens ({_listed(wrong_weight)}): token {t} has {fmt(g_w[t])} for experts "
               f"{g_i[t].tolist()}, expected {fmt(w_w[t])}")
    if expected_sum is not None:
        message += f"; its weights sum to {g_w[t].sum().item():.3f}, expected {expected_sum:g}"
    return message


def describe_token_rows(got: Tensor, want: Tensor, indices: Tensor) -> str | None:
    """Say which tokens' output rows differ and which experts those tokens were routed to.

    If one expert was chosen by every token whose row differs and by no token whose row is right,
    say so (a fact about the routing table, not a guessed cause).
    """
    if not (isinstance(got, Tensor) and isinstance(want, Tensor)) or got.shape != want.shape or got.dim() != 2:
        return None
    differ = ~torch.isclose(got.detach().double(), want.detach().double(), atol=1e-5, rtol=1e-4).all(dim=-1)
    tokens = differ.nonzero().flatten().tolist()
    if not tokens:
        return None
    n_tokens = len(want)
    err = (got.detach().double() - want.detach().double()).abs()  # (T, H)
    worst = int(err.max(dim=-1).values.argmax())
    message = (f"the output rows of {len(tokens)} of {n_tokens} tokens differ ({_listed(tokens)}); the largest "
               f"difference, {err[worst].max().item():.4g}, is in token {worst}'s row")
    zero = [t for t in tokens if not got[t].any()]
    if zero:
        message += f"; the rows of tokens {_listed(zero)} are all zeros"
    if len(tokens) < n_tokens:
        chosen = [set(row.tolist()) for row in indices]
        right = set().union(*(chosen[t] for t in range(n_tokens) if t not in tokens))
        only = sorted(set.intersection(*(chosen[t] for t in tokens)) - right)
        if only:
            message += (f"; every one of them was routed to expert {only[0]}, and no token whose row is "
                        f"right was: look at what happens to expert {only[0]}'s rows")
    else:
        message += " (every token)"
    return message


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
