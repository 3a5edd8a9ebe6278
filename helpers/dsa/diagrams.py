"""Drawings of notebook 25: which cached tokens each query selects."""

from __future__ import annotations

import torch
from torch import Tensor


def draw_selection(indices: Tensor, valid: Tensor, start_pos: int = 0, title: str = "", ax=None):
    """A query x cached-token grid: dark where the indexer selected the token, light where it was visible but
    dropped, white in the future (not visible).

    Args:
        indices, valid: ``(T, k)`` selection of one sequence (:func:`helpers.dsa.select_topk`).
        start_pos: absolute position of the first query.
    """
    from helpers.teaching.plotting import axes

    t, s = indices.shape[0], start_pos + indices.shape[0]
    grid = torch.zeros(t, s)
    visible = torch.arange(s)[None, :] <= start_pos + torch.arange(t)[:, None]
    grid[visible] = 1.0
    for q in range(t):
        grid[q, indices[q][valid[q]]] = 2.0
    ax = axes(title or f"Top-{indices.shape[1]} selection per query", "cached token s (position)",
              "query t (position)", ax=ax)
    ax.imshow(grid, cmap="Blues", vmin=0, vmax=2.2, aspect="auto", interpolation="nearest",
              extent=(-0.5, s - 0.5, start_pos + t - 0.5, start_pos - 0.5))
    ax.grid(False)
    return ax
