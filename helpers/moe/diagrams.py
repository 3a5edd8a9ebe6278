"""Pictures of the MoE notebooks, drawn in code with matplotlib (our own drawings, not the papers' figures).

=============================  ===========================================================================
function                       draws
=============================  ===========================================================================
:func:`draw_expert_layouts`    a dense FFN, N coarse experts, and mN fine-grained experts with shared ones,
                               at the same activated parameters: which experts a token uses (notebook 12)
:func:`draw_sorted_dispatch`   a real routing table's (token, expert) pairs, sorted by expert into one block
                               per expert, and added back to their tokens (notebook 11)
:func:`draw_gating_matrix`     the affinities ``s`` (T, E) beside the gating matrix ``G`` (T, E), which is
                               zero off each token's top-k; groups and kept groups if given (notebooks 10, 12)
=============================  ===========================================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Patch, Rectangle
from torch import Tensor

from helpers.teaching.plotting import axes

ACTIVE, SHARED, IDLE = "tab:orange", "tab:purple", "0.88"


def _expert_colors(n_experts: int) -> list:
    cmap = plt.get_cmap("tab10" if n_experts <= 10 else "tab20")
    return [cmap(e % cmap.N) for e in range(n_experts)]


def draw_expert_layouts(hidden_size: int, intermediate_size: int, n_experts: int, top_k: int, m: int,
                        n_shared: int, *, seed: int = 0, ax: plt.Axes | None = None) -> plt.Axes:
    """Three FFN layers with the same activated parameters, drawn as blocks whose width is the expert width.

    Row 1, a dense FFN of width ``top_k * I``. Row 2, ``N`` coarse experts of width ``I``, ``top_k``
    of them used by one token (orange). Row 3, DeepSeekMoE (arXiv 2401.06066 §3): each expert cut into
    ``m`` of width ``I/m``; ``n_shared`` of the ``mN`` pieces become shared experts (purple, every token
    uses them), and a token uses ``m * top_k - n_shared`` routed ones, so activated and total parameters
    stay those of row 2. The token's choices are random (``seed``): an illustration, not a trained router.

    Returns:
        The Axes; x is the FFN width in hidden units, one row per layer.
    """
    gen = torch.Generator().manual_seed(seed)
    fine = intermediate_size // m
    n_routed, k_routed = m * n_experts - n_shared, m * top_k - n_shared
    coarse_pick = set(torch.randperm(n_experts, generator=gen)[:top_k].tolist())
    fine_pick = set(torch.randperm(n_routed, generator=gen)[:k_routed].tolist())
    rows = [  # (label, [(width, color)])
        (f"dense FFN\nwidth {top_k * intermediate_size}", [(top_k * intermediate_size, ACTIVE)]),
        (f"{n_experts} experts of width {intermediate_size}\ntop-{top_k}",
         [(intermediate_size, ACTIVE if e in coarse_pick else IDLE) for e in range(n_experts)]),
        (f"{n_shared} shared + {n_routed} routed\nof width {fine}, top-{k_routed}",
         [(fine, SHARED)] * n_shared + [(fine, ACTIVE if e in fine_pick else IDLE) for e in range(n_routed)]),
    ]
    ax = axes("Same activated parameters, three layouts (one token's experts in colour)",
              "FFN width (hidden units; each block is one expert)", "layer", ax=ax,
              figsize=(9.5, 3.6))
    for y, (_label, blocks) in enumerate(rows):
        x = 0
        for width, color in blocks:
            ax.add_patch(Rectangle((x, -y - 0.3), width, 0.6, facecolor=color, edgecolor="white", linewidth=0.6))
            x += width
        active = sum(w for w, c in blocks if c != IDLE)
        ax.text(x + 60, -y, f"activated {3 * hidden_size * active:,} of {3 * hidden_size * x:,} params",
                va="center", fontsize=8.5)
    total = n_experts * intermediate_size
    ax.set_xlim(0, total * 1.45)
    ax.set_ylim(-len(rows) + 0.4, 0.6)
    ax.set_yticks([-y for y in range(len(rows))], [label for label, _ in rows], fontsize=8.5)
    ax.grid(False)
    ax.legend(handles=[Patch(color=ACTIVE, label="routed, used by this token"),
                       Patch(color=SHARED, label="shared, used by every token"),
                       Patch(color=IDLE, label="not used by this token")],
              loc="upper right", fontsize=8)
    return ax


def draw_sorted_dispatch(indices: Tensor, n_experts: int, *, ax: plt.Axes | None = None) -> plt.Axes:
    """The sorted dispatch of a routing table ``indices`` (T, k), column by column.

    Tokens -> their ``T*k`` (token, expert) pairs in pair order (``p = t*k + j``) -> the pairs sorted
    by expert (``order = flat.argsort(stable=True)``), one contiguous slice per expert -> each row added
    back to its token ``order // k`` with ``index_add_``. Lines and boxes are coloured by expert.

    Returns:
        The Axes; x is the step, y the row (0 at the top).
    """
    n_tokens, top_k = indices.shape
    flat = indices.reshape(-1)  # (T*k,)
    order = flat.argsort(stable=True)  # (T*k,)
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    colors = _expert_colors(n_experts)
    n_pairs = len(flat)
    ax = axes("Sort and dispatch: pairs sorted by expert, one block per expert, rows added back",
              "step", "row (0 at the top)", ax=ax, figsize=(9.5, 0.42 * n_pairs + 1.2))
    token_y = [(t + 0.5) * top_k - 0.5 for t in range(n_tokens)]  # tokens centred on their pairs
    xs = (0.0, 1.6, 3.6, 5.5)

    def box(x: float, y: float, text: str, color, width: float = 0.9) -> None:
        ax.add_patch(Rectangle((x - width / 2, y - 0.4), width, 0.8, facecolor=color, edgecolor="0.3", lw=0.6))
        ax.text(x, y, text, ha="center", va="center", fontsize=8)

    for t in range(n_tokens):
        box(xs[0], token_y[t], f"token {t}", "white")
        box(xs[3], token_y[t], f"y[{t}]", "white")
    for p in range(n_pairs):
        e = int(flat[p])
        box(xs[1], p, f"t{p // top_k} → e{e}", colors[e])
        ax.plot([xs[0] + 0.45, xs[1] - 0.45], [token_y[p // top_k], p], color="0.6", lw=0.7)
    for rank, p in enumerate(order.tolist()):
        e, t = int(flat[p]), p // top_k
        box(xs[2], rank, f"p{p}: x[{t}]", colors[e])
        ax.plot([xs[1] + 0.45, xs[2] - 0.45], [p, rank], color=colors[e], lw=1.1)  # the permutation
        ax.plot([xs[2] + 0.8, xs[3] - 0.45], [rank, token_y[t]], color=colors[e], lw=1.1, ls="--")  # index_add_
    start, empty = 0, []
    for e, n in enumerate(counts):  # each expert's slice: a bar with its name, or a note that it has none
        if n:
            ax.plot([xs[2] + 0.52, xs[2] + 0.52], [start - 0.4, start + n - 0.6], color=colors[e], lw=3)
            ax.text(xs[2] + 0.64, start + (n - 1) / 2, f"expert {e}: {n} rows", rotation=90, ha="center",
                    va="center", fontsize=7, color=colors[e])
        else:
            empty.append(e)
        start += n
    note = f"\n(no rows: expert {', '.join(map(str, empty))})" if empty else ""
    ax.set_xticks(xs, ["tokens", "pairs p = t·k + j\n(expert of each)", "sorted by expert\n(order)" + note,
                       "index_add_ into\nits token"], fontsize=8.5)
    ax.set_xlim(-0.7, xs[3] + 0.7)
    ax.set_ylim(n_pairs - 0.3, -0.7)
    ax.set_yticks([])
    ax.grid(False)
    return ax


def draw_gating_matrix(scores: Tensor, gates: Tensor, *, score_name: str = "s (softmax affinity)",
                       gate_name: str = "g (gating value)", n_group: int = 1,
                       kept_groups: Tensor | None = None, suptitle: str | None = None) -> plt.Figure:
    """Two heatmaps over (token, expert): the affinities ``scores`` and the gating matrix ``gates``.

    ``gates`` is zero off each token's top-k; zeros are drawn white, so the k chosen experts of every
    row stand out. With ``n_group > 1`` lines separate the groups, and ``kept_groups`` (T, G)
    boolean fades, on the scores, the groups each token may not use.

    Returns:
        The Figure with both panels and their colour bars.
    """
    scores, gates = scores.detach().float(), gates.detach().float()
    n_tokens, n_experts = scores.shape
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, max(3.2, 0.4 * n_tokens + 1.6)))
    panels = ((left, scores, f"affinities {score_name}", "viridis", score_name),
              (right, gates, f"gating matrix G: {gate_name}, zero off the top-k", "Oranges", gate_name))
    for ax, values, title, cmap_name, label in panels:
        axes(title, "expert i (index)", "token t (index)", ax=ax)
        cmap = plt.get_cmap(cmap_name).with_extremes(bad="white")
        shown = np.ma.masked_equal(values.numpy(), 0.0) if values is gates else values.numpy()
        image = ax.imshow(shown, cmap=cmap, aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=ax, label=label, fraction=0.046, pad=0.03)
        ax.set_xticks(range(n_experts))
        ax.set_yticks(range(n_tokens))
        ax.tick_params(labelsize=7)
        ax.grid(False)
        for g in range(1, n_group):
            ax.axvline(g * n_experts / n_group - 0.5, color="black", lw=1.2)
    if kept_groups is not None:  # fade the groups a token may not use
        size = n_experts // n_group
        for t, g in (~kept_groups).nonzero().tolist():
            left.add_patch(Rectangle((g * size - 0.5, t - 0.5), size, 1, facecolor="white", alpha=0.7, lw=0))
    for t, e in (gates != 0).nonzero().tolist():
        right.text(e, t, f"{gates[t, e]:.2f}", ha="center", va="center", fontsize=6.5)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    return fig


def gates_from_routing(weights: Tensor, indices: Tensor, n_experts: int) -> Tensor:
    """The dense gating matrix (T, E): ``weights`` scattered to ``indices``, zero elsewhere."""
    return torch.zeros(len(indices), n_experts, dtype=weights.dtype).scatter(1, indices, weights)


__all__: Sequence[str] = ["draw_expert_layouts", "draw_sorted_dispatch", "draw_gating_matrix", "gates_from_routing"]
