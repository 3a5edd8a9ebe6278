"""The balancing experiment of notebook 13: run a sweep, summarise it, draw it, say what it shows.

The notebook keeps the task and the training step (what a learner should read); this module holds
the bookkeeping around them, so the notebook's cells stay small:

- :func:`run_all` runs every (method, value, seed) job with a progress bar and leaves the finished
  bar as text in the cell's output;
- :func:`summarise` reduces the seeds of each (method, value) to mean, min and max;
- :func:`print_table`, :func:`plot_tradeoff` and :func:`plot_histories` show the summary;
- :func:`tradeoff_sentences` states, from the numbers, what the sweep shows (and what it does not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

from helpers.teaching.plotting import axes

METHOD_STYLE = {"none": ("black", "o"), "batch aux": ("tab:orange", "s"), "seq aux": ("tab:red", "^"),
                "bias": ("tab:blue", "D")}
METRICS = ("loss", "max_vio", "max_vio_batch")


def run_all(fn: Callable[..., Any], jobs: Sequence[tuple], desc: str) -> dict[tuple, Any]:
    """``{job: fn(*job)}`` for every job, with a progress bar; the finished bar stays as text."""
    bar = tqdm(jobs, desc=desc)
    results = {job: fn(*job) for job in bar}
    bar.close()
    try:  # in a notebook, replace the widget (whose saved text is its first state) by the final bar
        from IPython import get_ipython
        from IPython.display import clear_output
        if get_ipython() is not None and getattr(bar, "container", None) is not None:  # a widget bar
            clear_output()
    except ImportError:
        pass
    print(str(bar))
    return results


def summarise(results: dict[tuple, dict[str, float]]) -> list[dict[str, Any]]:
    """Group ``{(method, value, seed): {metric: number}}`` by (method, value): mean, min, max per metric."""
    groups: dict[tuple, list[dict[str, float]]] = {}
    for (method, value, _seed), metrics in results.items():
        groups.setdefault((method, value), []).append(metrics)
    rows = []
    for (method, value), runs in groups.items():
        row: dict[str, Any] = {"method": method, "value": value, "seeds": len(runs)}
        for metric in METRICS:
            values = torch.tensor([run[metric] for run in runs])
            row[metric], row[metric + "_min"], row[metric + "_max"] = (values.mean().item(), values.min().item(),
                                                                      values.max().item())
        rows.append(row)
    return rows


def _label(row: dict[str, Any]) -> str:
    name = {"batch aux": "alpha", "seq aux": "alpha", "bias": "gamma"}.get(row["method"])
    return f"{row['method']}" + (f" ({name}={row['value']:g})" if name else "")


def print_table(rows: Iterable[dict[str, Any]]) -> None:
    """One line per (method, value): eval MaxVio, training-batch MaxVio, eval loss with its seed range."""
    print(f"{'method':26s} {'MaxVio eval':>11s} {'MaxVio batch':>12s} {'eval MSE':>9s}   (min - max over seeds)")
    for r in rows:
        print(f"{_label(r):26s} {r['max_vio']:11.2f} {r['max_vio_batch']:12.2f} {r['loss']:9.4f}   "
              f"({r['loss_min']:.4f} - {r['loss_max']:.4f})")


def plot_tradeoff(rows: Sequence[dict[str, Any]], ax: plt.Axes | None = None) -> plt.Axes:
    """Quality against balance: one point per (method, value), bars spanning the seeds, sweeps joined."""
    ax = axes("Balance against quality (evaluation batch, mean of the seeds)",
              "MaxVio (0 = perfect balance)", "evaluation MSE", ax=ax)
    for method, (colour, marker) in METHOD_STYLE.items():
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        xs, ys = [r["max_vio"] for r in mine], [r["loss"] for r in mine]
        xerr = [[x - r["max_vio_min"] for x, r in zip(xs, mine)], [r["max_vio_max"] - x for x, r in zip(xs, mine)]]
        yerr = [[y - r["loss_min"] for y, r in zip(ys, mine)], [r["loss_max"] - y for y, r in zip(ys, mine)]]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, color=colour, marker=marker, ls="-" if len(mine) > 1 else "",
                    lw=1, elinewidth=0.6, alpha=0.9, capsize=2, label=method)
        for x, y, r in zip(xs, ys, mine):
            if method != "none":
                ax.annotate(f"{r['value']:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7,
                            color=colour)
    ax.legend(title="balancing (labels: alpha or gamma)")
    return ax


def smooth(values: Sequence[float], width: int = 10) -> list[float]:
    """Running mean over the last ``width`` values, so noisy curves are readable."""
    out = torch.tensor(values, dtype=torch.float64).cumsum(0)
    out[width:] = out[width:] - out[:-width].clone()
    return (out / torch.arange(1, len(values) + 1).clamp(max=width)).tolist()


def plot_histories(histories: dict[str, dict[str, list[float]]]) -> plt.Figure:
    """MaxVio of each training batch and training MSE against the step, one line per run."""
    fig, (ax_vio, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    axes("Load imbalance during training", "step", "MaxVio of the batch (running mean of 10)", ax=ax_vio)
    axes("Regression loss during training", "step", "training MSE (running mean of 10)", ax=ax_loss)
    for label, history in histories.items():
        colour = METHOD_STYLE.get(label.split(" (")[0], ("grey", ""))[0]
        ax_vio.plot(smooth(history["max_vio"]), label=label, color=colour)
        ax_loss.plot(smooth(history["loss"]), label=label, color=colour)
    ax_loss.set_yscale("log")
    ax_vio.legend()
    return fig


def tradeoff_sentences(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What the sweep shows, stated from its numbers (a difference counts only beyond the seeds' range)."""
    none = next(r for r in rows if r["method"] == "none")
    out = [f"No balancing: MaxVio {none['max_vio']:.2f}, evaluation MSE {none['loss']:.4f} "
           f"(seeds {none['loss_min']:.4f} - {none['loss_max']:.4f})."]

    def versus_none(r: dict[str, Any]) -> str:
        if r["loss_min"] > none["loss_max"]:
            return "worse than no balancing beyond the seed range"
        if r["loss_max"] < none["loss_min"]:
            return "better than no balancing beyond the seed range"
        return "within the seed range of no balancing"

    for method in ("batch aux", "seq aux"):
        sweep = sorted((r for r in rows if r["method"] == method), key=lambda r: r["value"])
        if not sweep:
            continue
        rises = sum(b["loss"] > a["loss"] for a, b in zip(sweep, sweep[1:]))
        falls = sum(b["max_vio"] < a["max_vio"] for a, b in zip(sweep, sweep[1:]))
        out.append(f"{method}: alpha {sweep[0]['value']:g} -> {sweep[-1]['value']:g} takes MaxVio "
                   f"{sweep[0]['max_vio']:.2f} -> {sweep[-1]['max_vio']:.2f} (lower at {falls} of {len(sweep) - 1} "
                   f"steps up in alpha) and the MSE {sweep[0]['loss']:.4f} -> {sweep[-1]['loss']:.4f} (higher at "
                   f"{rises} of {len(sweep) - 1}); the largest alpha is {versus_none(sweep[-1])}.")
    bias = [r for r in rows if r["method"] == "bias"]
    aux = [r for r in rows if r["method"] in ("batch aux", "seq aux")]
    for r in sorted(bias, key=lambda r: r["value"]):
        out.append(f"bias, gamma {r['value']:g}: MaxVio {r['max_vio']:.2f}, MSE {r['loss']:.4f}, "
                   f"{versus_none(r)}.")
    if bias and aux:
        beaten = [a for a in aux if any(b["max_vio"] <= a["max_vio"] and b["loss"] <= a["loss"] for b in bias)]
        out.append(f"{len(beaten)} of {len(aux)} auxiliary-loss settings are matched or beaten on both balance "
                   f"and MSE by some gamma of the bias.")
    return out
