"""The pictures of notebook 14: the all-to-all matrix, the round trip per rank, destinations per token, load per rank."""

from __future__ import annotations

import statistics

import matplotlib.pyplot as plt
import numpy as np

from helpers.teaching.plotting import axes

PHASE_COLORS = {"route": "tab:gray", "dispatch": "tab:blue", "experts": "tab:orange", "combine": "tab:green",
                "sum": "tab:purple"}


def median_round(timelines_per_rank: list[list]) -> int:
    """The index of the round whose slowest rank took the median time."""
    rounds = len(timelines_per_rank[0])
    spans = [max(t[i][-1][2] for t in timelines_per_rank) - min(t[i][0][1] for t in timelines_per_rank)
             for i in range(rounds)]
    return spans.index(statistics.median_low(spans))


def plot_timeline(timelines_per_rank: list[list], ax: plt.Axes | None = None) -> plt.Axes:
    """One row per rank, one bar per phase of the median round, in milliseconds from the first start."""
    i = median_round(timelines_per_rank)
    t0 = min(t[i][0][1] for t in timelines_per_rank)
    ax = axes("One forward of the expert-parallel layer, per rank (median round)", "time since start (ms)", "rank",
              ax=ax, figsize=(8, 1.2 + 0.7 * len(timelines_per_rank)))
    for rank, rounds in enumerate(timelines_per_rank):
        for phase, start, end in rounds[i]:
            if phase in PHASE_COLORS:
                ax.broken_barh([(1e3 * (start - t0), 1e3 * (end - start))], (rank - 0.35, 0.7),
                               color=PHASE_COLORS[phase], label=phase if rank == 0 else None)
    ax.set_yticks(range(len(timelines_per_rank)))
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(PHASE_COLORS))
    return ax


def plot_all_to_all(send: list[list[int]], ranks_per_node: int = 1, ax: plt.Axes | None = None,
                    title: str = "One dispatch: rows sent from each rank to each rank",
                    vmax: float | None = None) -> plt.Axes:
    """Heat map of one all-to-all: ``send[i][j]`` rows from rank ``i`` (row) to rank ``j`` (column).

    The diagonal (rows a rank keeps) is outlined; with ``ranks_per_node > 1`` lines mark the nodes, so the
    off-diagonal blocks are the rows that cross a node boundary. Column sums (rows each rank receives) are
    written under the columns. ``vmax``: the top of the colour scale (share it between panels to compare them).
    """
    matrix = np.asarray(send, dtype=float)
    n = len(matrix)
    ax = axes(title, "destination rank (holds the experts)", "source rank (holds the tokens)", ax=ax,
              figsize=(1.6 + 0.9 * n, 1.2 + 0.8 * n))
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=vmax if vmax is not None else matrix.max())
    ax.figure.colorbar(image, ax=ax, label="rows (token, expert) pairs", shrink=0.8)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center",
                    color="white" if matrix[i, j] > 0.6 * image.get_clim()[1] else "black")
        ax.add_patch(plt.Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, lw=2, ec="tab:orange"))
    for b in range(ranks_per_node, n, ranks_per_node) if ranks_per_node > 1 else []:  # node boundaries
        ax.axhline(b - 0.5, color="black", lw=1.5)
        ax.axvline(b - 0.5, color="black", lw=1.5)
    ax.set_xticks(range(n), [f"{j}\nrecv {int(matrix[:, j].sum())}" for j in range(n)])
    ax.set_yticks(range(n))
    return ax


def plot_nodes_per_token(rows: list[dict], ax: plt.Axes | None = None) -> plt.Axes:
    """Histogram of distinct destination nodes per token, one bar group per routing."""
    ax = axes("V3 layout on paper: nodes each token's 8 experts live on", "distinct nodes per token",
              "share of tokens (%)", ax=ax)
    width = 0.8 / len(rows)
    for j, row in enumerate(rows):
        hist = np.asarray(row["nodes_hist"], dtype=float)
        ax.bar(np.arange(len(hist)) + (j - (len(rows) - 1) / 2) * width, 100 * hist / hist.sum(), width,
               label=row["routing"])
    ax.set_xticks(range(1, len(rows[0]["nodes_hist"])))
    ax.set_xlim(0.5, len(rows[0]["nodes_hist"]) - 0.5)
    ax.legend()
    return ax


def plot_rank_loads(before, after, labels=("one copy per expert", "with replicas"), ax: plt.Axes | None = None,
                    title: str = "Tokens per rank before and after replication", ylabel: str = "tokens routed to the rank") -> plt.Axes:
    """Bars of per-rank load for two layouts, with the mean as a line."""
    ax = axes(title, "rank", ylabel, ax=ax)
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    ranks = np.arange(len(before))
    ax.bar(ranks - 0.2, before, 0.4, label=labels[0])
    ax.bar(ranks + 0.2, after, 0.4, label=labels[1])
    ax.axhline(before.mean(), color="black", lw=1, ls="--", label="mean")
    ax.set_xticks(ranks)
    ax.legend()
    return ax


def plot_capstone_traffic(saved: dict, axs=None):
    """The trained capstone's traffic (``notebooks/results/traffic_capstone.json``), one bar per (routing, layer):
    other nodes per token (the rows a node-deduplicating dispatch sends across nodes), and the bytes the busiest
    rank receives per token of its own (our dispatch, fp32 rows) against the mean."""
    rows = saved["rows"]
    routings = list(dict.fromkeys(r["routing"] for r in rows))
    layers = sorted({r["layer"] for r in rows})
    if axs is None:
        _, axs = plt.subplots(1, 2, figsize=(12, 4.2))
    panels = (("nodes_off_node", "Other nodes each token must reach", "distinct other nodes per token"),
              ("max_recv_bytes_per_token", "Bytes received by the busiest rank", "bytes per token of that rank"))
    width = 0.8 / len(layers)
    for ax, (key, title, ylabel) in zip(axs, panels):
        axes(title, "routing", ylabel, ax=ax)
        for j, layer in enumerate(layers):
            values = [next(r[key] for r in rows if r["layer"] == layer and r["routing"] == name) for name in routings]
            ax.bar(np.arange(len(routings)) + (j - (len(layers) - 1) / 2) * width, values, width,
                   label=f"MoE of block {layer}")
        ax.set_xticks(range(len(routings)))
        ax.set_xticklabels([name.replace(", ", ",\n", 1) for name in routings], fontsize=7, rotation=20, ha="right")
        ax.set_ylim(top=1.3 * max(r[key] for r in rows))
        ax.legend(fontsize=8, loc="upper right")
    mean = sum(r["recv_bytes_per_token"] for r in rows) / len(rows)
    axs[1].axhline(mean, color="black", lw=1, ls="--", label="mean rank (all rows)")
    axs[1].legend(fontsize=8)
    axs[0].figure.tight_layout()
    return axs
