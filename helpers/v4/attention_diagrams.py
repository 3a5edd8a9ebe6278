"""Pictures of notebooks 41-42: what each query of a V4 layer reads, CSA's overlapping windows, the cache over calls.

Each function draws on its own figure and returns it; colours: dark = read, light = not read.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from torch import Tensor

from helpers.v4.cache import visible_entries, window_mask


def draw_visibility(n_tokens: int, window: int, ratio: int, chosen: Tensor | None = None,
                    title: str = "What each query reads") -> plt.Figure:
    """Two panels for queries at positions ``0..n_tokens-1``: the sliding window over the tokens, and the
    compressed entries (grey: visible, by :func:`visible_entries`; dark: read, ``chosen (T, N)`` bool if given)."""
    positions = torch.arange(n_tokens)
    n_entries = n_tokens // ratio
    seen = window_mask(positions, 0, n_tokens, window).int().numpy()  # (T, T)
    visible = visible_entries(positions, n_entries, ratio).int().numpy()  # (T, N)
    if chosen is not None:
        visible = visible + chosen.int().numpy()  # 2 where visible and chosen
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4), width_ratios=[n_tokens, max(n_entries, 1) + 2])
    left.imshow(seen, cmap=ListedColormap(["#f2f2f2", "#1f77b4"]), vmin=0, vmax=1)
    left.set(title=f"sliding window ({window} tokens)", xlabel="key token position", ylabel="query position t")
    cmap = ListedColormap(["#f2f2f2", "#b0c4de" if chosen is not None else "#d62728", "#d62728"])
    right.imshow(visible, cmap=cmap, vmin=0, vmax=2, aspect="auto")
    right.set(title=f"compressed entries (m = {ratio})", xlabel="entry w", ylabel="query position t",
              xticks=range(n_entries))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def draw_csa_layout(ratio: int, n_windows: int) -> plt.Figure:
    """Which tokens each CSA entry pools: window ``w - 1``'s ``C^a`` (orange) and window ``w``'s ``C^b`` (blue)."""
    grid = np.zeros((n_windows, n_windows * ratio))
    for w in range(n_windows):
        grid[w, w * ratio:(w + 1) * ratio] = 2  # C^b of its own window
        if w:
            grid[w, (w - 1) * ratio: w * ratio] = 1  # C^a of the previous window
    fig, ax = plt.subplots(figsize=(9, 2.6))
    ax.imshow(grid, cmap=ListedColormap(["#f2f2f2", "#ff7f0e", "#1f77b4"]), vmin=0, vmax=2, aspect="auto")
    ax.set(title=f"CSA: entry w pools 2m = {2 * ratio} tokens, stride m = {ratio} (orange C^a, blue C^b)",
           xlabel="token position", ylabel="entry w", yticks=range(n_windows))
    fig.tight_layout()
    return fig


def draw_cache_timeline(chunks: list[int], window: int, ratio: int) -> plt.Figure:
    """The cache after each call of ``chunks`` tokens, per token: pending in the open window (orange), pooled
    into an entry and still in the sliding window (purple), pooled only (green), not seen yet (white)."""
    total = sum(chunks)
    grid = np.zeros((len(chunks), total))
    positions = np.arange(total)
    seen = 0
    for row, step in enumerate(chunks):
        seen += step
        closed = seen // ratio * ratio  # tokens 0..closed-1 are pooled into entries
        in_window = positions >= seen - (window - 1)  # kept in the sliding window for the next query
        grid[row, :closed] = np.where(in_window[:closed], 2, 3)
        grid[row, closed:seen] = 1
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(chunks) + 1.4))
    ax.imshow(grid, cmap=ListedColormap(["#ffffff", "#ff7f0e", "#9467bd", "#2ca02c"]), vmin=0, vmax=3, aspect="auto")
    ax.set(title=f"the cache after each call (window {window}, m = {ratio}): orange pending, "
                 "purple window + entry, green entry only", xlabel="token position", ylabel="after call",
           yticks=range(len(chunks)), yticklabels=[f"{i + 1}: +{c}" for i, c in enumerate(chunks)])
    ax.title.set_fontsize(9)
    fig.tight_layout()
    return fig
