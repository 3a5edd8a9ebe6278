"""Seeding and determinism (configuration rules live in :mod:`helpers.rules`)."""

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
