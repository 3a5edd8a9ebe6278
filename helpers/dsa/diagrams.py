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


def plot_warmup(saved: dict, axs=None):
    """The capstone warm-up (``notebooks/results/dsa_warmup.json``): left, top-k recall of the attention mass
    against k per layer, before (fresh indexer, dashed) and after the warm-up (solid), with the k most recent tokens
    (dotted); right, how much the whole model's validation loss exceeds dense attention's, against k, with sparse
    attention (trained indexers, fresh indexers, the k most recent tokens); log scales (gaps floored at 1e-5)."""
    import matplotlib.pyplot as plt

    from helpers.teaching.plotting import axes

    if axs is None:
        _, axs = plt.subplots(1, 2, figsize=(12, 4.2))
    ks = saved["topks"]
    ax = axes("Top-k recall of the attention mass (validation text)", "k (tokens kept per query, log scale)",
              "share of the heads' attention mass kept", ax=axs[0])
    from matplotlib.lines import Line2D

    styles = {"before": ("--", "fresh indexer"), "after": ("-", "after warm-up"), "recent": (":", "k most recent")}
    for layer in saved["layers"]:
        for name, (style, _) in styles.items():
            ax.plot(ks, [layer["recall"][name][str(k)] for k in ks], style, color=f"C{layer['layer']}", marker="o",
                    ms=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    handles = ([Line2D([], [], color=f"C{layer['layer']}", label=f"block {layer['layer']}") for layer in saved["layers"]]
               + [Line2D([], [], color="grey", ls=style, label=label) for style, label in styles.values()])
    ax.legend(handles=handles, fontsize=7, loc="lower right", ncol=2)
    ax = axes("Validation loss of the whole model, above dense", "k (tokens kept per query, log scale)",
              "loss minus dense loss (nats per token, log scale)", ax=axs[1])
    loss = saved["val_loss"]
    for name, label, style, color in (("trained", "sparse, indexers after warm-up", "-o", "C3"),
                                      ("random", "sparse, fresh (random) indexers", "--o", "C7"),
                                      ("recent", "sparse, k most recent tokens", ":o", "C4")):
        ax.plot(ks, [max(loss[name][str(k)] - loss["dense"], 1e-5) for k in ks], style, ms=3, color=color,
                label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.legend(fontsize=8, title=f"dense: {loss['dense']:.3f} nats/token", title_fontsize=8)
    axs[0].figure.tight_layout()
    return axs
