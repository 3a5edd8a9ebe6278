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
