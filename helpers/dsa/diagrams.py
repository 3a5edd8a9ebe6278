"""Drawings of notebook 25: which cached tokens each query selects, the indexer's distribution against the
attention's, the top-k recall against k."""

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


def draw_score_maps(maps: dict[str, Tensor], title: str = "", axs=None):
    """Query x token heatmaps of distributions ``(T, S)`` side by side, on one log colour scale (the future,
    exactly 0, stays white): e.g. the main attention summed over heads against ``Softmax(I_t,:)``."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    from helpers.teaching.plotting import axes

    if axs is None:
        _, axs = plt.subplots(1, len(maps), figsize=(4.2 * len(maps), 3.8), sharey=True)
    for ax, (name, m) in zip(axs, maps.items()):
        axes(name, "cached token s (position)", "query t (position)", ax=ax)
        image = ax.imshow(m.masked_fill(m <= 0, float("nan")), norm=LogNorm(1e-4, 1), cmap="magma_r",
                          aspect="auto", interpolation="nearest")
        ax.grid(False)
    axs[0].figure.colorbar(image, ax=list(axs), label="probability (log scale)")
    if title:
        axs[0].figure.suptitle(title, y=1.04)
    return axs


def draw_recall_at_k(k: int, p: Tensor, order: Tensor, curves: dict[str, Tensor]):
    """One figure for a chosen ``k``. Left: the attention distribution ``p (T, S)`` of one window, the tokens
    outside each query's top-``k`` (by ``order (T, S)``, best first) greyed out. Right: the top-k recall
    ``curves`` (name -> ``(S,)`` for k = 1..S, :func:`helpers.dsa.warmup.recall_curve`) with ``k`` marked."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    from helpers.teaching.plotting import axes

    t, s = p.shape
    keep = torch.zeros(t, s, dtype=torch.bool).scatter(1, order[:, :k], True)  # (T, S)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw=dict(width_ratios=(1, 1.2)))
    kept = p.masked_fill(~keep | (p <= 0), float("nan"))
    dropped = torch.where(~keep & (p > 0), 1.0, float("nan"))
    axes(f"Attention kept by the top-{k} (window 0)", "cached token s (position)", "query t (position)", ax=left)
    left.imshow(dropped, cmap="Greys", vmin=0, vmax=4, aspect="auto", interpolation="nearest")
    left.imshow(kept, norm=LogNorm(1e-4, 1), cmap="magma_r", aspect="auto", interpolation="nearest")
    left.grid(False)
    axes("Top-k recall (validation windows)", "k (tokens kept per query, log scale)",
         "share of the attention mass kept", ax=right)
    ks = torch.arange(1, s + 1)
    for name, curve in curves.items():
        right.plot(ks, curve, label=f"{name}: {curve[k - 1]:.1%} at k = {k}")
    right.axvline(k, color="black", linewidth=0.8)
    right.set_xscale("log", base=2)
    right.set_ylim(0, 1.02)
    right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
