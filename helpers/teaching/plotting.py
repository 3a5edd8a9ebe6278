"""Plot defaults: every figure has a title and labelled axes with units, and is a modest PNG."""

from __future__ import annotations

import matplotlib.pyplot as plt

STYLE = {
    "figure.figsize": (7.0, 4.0),
    "figure.dpi": 80,
    "savefig.dpi": 100,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 12,
    "legend.frameon": False,
}


def use_defaults() -> None:
    """Apply the collection's matplotlib style (notebooks call this once, in their import cell)."""
    plt.rcParams.update(STYLE)
    try:  # inside IPython, ask for PNG figures (SVG would make committed notebooks large)
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        if get_ipython() is not None:
            set_matplotlib_formats("png")
    except ImportError:
        pass


def axes(title: str, xlabel: str, ylabel: str, *, ax: plt.Axes | None = None, **subplots_kw) -> plt.Axes:
    """A new (or given) Axes with its title and axis labels set; every one of them is required."""
    for name, text in (("title", title), ("xlabel", xlabel), ("ylabel", ylabel)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name} must be a non-empty string: every plot says what it shows")
    if ax is None:
        _, ax = plt.subplots(**subplots_kw)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax
