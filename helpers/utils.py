"""Seeding, determinism and small argument checks used across the collection."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int = 0, *, deterministic: bool = True) -> torch.Generator:
    """Seed Python, NumPy and PyTorch so a notebook prints the same numbers on every run.

    Args:
        seed: a non-negative integer.
        deterministic: also ask PyTorch for deterministic kernels (warn-only where none exists).

    Returns:
        A ``torch.Generator`` seeded with ``seed``, for code that wants its own stream.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


def require_positive(**fields: int | None) -> None:
    """Raise ``ValueError`` naming the first field that is not a positive int (``None`` is skipped)."""
    for name, value in fields.items():
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def validate_routing(n_routed_experts: int, num_experts_per_tok: int, n_group: int = 1, topk_group: int = 1) -> None:
    """Raise ``ValueError`` naming the field if group-limited top-k routing is impossible.

    The one home of these rules: the MoE layer, the router and ``helpers.configs`` all call it. It lives
    here, not in ``helpers.configs``, so that the layers never import ``transformers`` (about 15 s on a
    slow machine).
    """
    require_positive(n_routed_experts=n_routed_experts, num_experts_per_tok=num_experts_per_tok,
                     n_group=n_group, topk_group=topk_group)
    if n_routed_experts % n_group:
        raise ValueError(f"n_routed_experts ({n_routed_experts}) must be divisible by n_group ({n_group})")
    if topk_group > n_group:
        raise ValueError(f"topk_group ({topk_group}) must be at most n_group ({n_group})")
    reachable = topk_group * (n_routed_experts // n_group)
    if num_experts_per_tok > reachable:
        raise ValueError(f"num_experts_per_tok ({num_experts_per_tok}) exceeds the {reachable} experts "
                         f"reachable in topk_group={topk_group} groups of {n_routed_experts // n_group}; "
                         "lower num_experts_per_tok or raise topk_group")
