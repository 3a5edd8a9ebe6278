"""Pictures of the MLA notebooks, drawn in code with matplotlib (our own drawings, not the papers' figures).

=============================  ===========================================================================
function                       draws
=============================  ===========================================================================
:func:`draw_mla_dataflow`      what MLA projects, caches and rotates (notebook 22); ``absorb=True`` also
                               shows what weight absorption folds (notebook 23)
:func:`draw_causal_mask`       :func:`helpers.mla.causal_mask` of queries that start at a cache offset
                               (notebook 20)
:func:`plot_singular_values`   singular value spectra of stacked keys, with the latent width marked
                               (notebook 21)
=============================  ===========================================================================
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch
from torch import Tensor

from helpers.mla.cache import causal_mask
from helpers.teaching.plotting import axes

CACHED, WEIGHT, ACTIVATION, ROPE, FOLDED = "#f6c453", "#d7e3f4", "#ffffff", "#f4c7c3", "#c9e7c4"


class _Canvas:
    """Boxes by name, and arrows from the right edge of one box to the left edge of another."""

    def __init__(self, ax: plt.Axes) -> None:
        self.ax, self.boxes = ax, {}

    def box(self, name: str, xy: tuple[float, float], text: str, color: str, *, width: float = 1.9,
            height: float = 0.62, bold: bool = False, dashed: bool = False) -> None:
        x, y = xy
        self.boxes[name] = (x, y, width, height)
        self.ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.03",
                                         facecolor=color, edgecolor="black", linewidth=2.4 if bold else 1.0,
                                         linestyle="--" if dashed else "-"))
        self.ax.text(x, y, text, ha="center", va="center", fontsize=8.5, fontweight="bold" if bold else "normal")

    def arrow(self, source: str, target: str, *, down: bool = False) -> None:
        sx, sy, sw, sh = self.boxes[source]
        tx, ty, tw, th = self.boxes[target]
        start, end = ((sx, sy - sh / 2 - 0.04), (tx, ty + th / 2 + 0.04)) if down else (
            (sx + sw / 2 + 0.04, sy), (tx - tw / 2 - 0.04, ty))
        self.ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=10, linewidth=0.9,
                                          shrinkA=0, shrinkB=0, color="0.15"))


def draw_mla_dataflow(*, absorb: bool = False, ax: plt.Axes | None = None) -> plt.Axes:
    """MLA's data flow for one token (DeepSeek-V2 eq. 9-19): projections, RoPE, and what the cache holds.

    The latent ``c^{KV}`` and the shared, rotated ``k^R`` (gold, thick border) are the only cached tensors.
    With ``absorb=True`` the boxes of ``W^{UK}`` and ``W^{UV}`` are drawn in green where absorption moves
    them: ``W^{UK}`` onto the query side (``W^{UK}_i{}^T q^C``), ``W^{UV}`` onto the output side (next to
    ``W^O``); the per-head keys ``k^C`` and values ``v^C`` are then never formed (dashed box).

    Args:
        absorb: show the absorbed computation (notebook 23) instead of the naive one.
        ax: an existing Axes to draw on (a new 12 x 5 inch figure if ``None``).

    Returns:
        The Axes.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(12, 5))
    ax.set_xlim(-0.2, 13.9)
    ax.set_ylim(-1.1, 6.4)
    ax.axis("off")
    ax.set_title("MLA data flow, absorbed: W^UK folded into the query, W^UV into the output" if absorb
                 else "MLA data flow for one token: what is projected, rotated and cached")
    c = _Canvas(ax)
    # Query path (top): h -> W^DQ -> c^Q -> W^UQ (content) and W^QR (rotated) per head.
    c.box("hq", (0.8, 5.0), "h_t  (H)", ACTIVATION, width=1.2)
    c.box("cq", (3.0, 5.0), "W^DQ, q_norm\n-> c^Q_t  (d_c')", WEIGHT)
    c.box("qc", (5.5, 5.8), "W^UQ -> q^C_{t,i}\n(n_h x d_h)", WEIGHT)
    c.box("qr", (5.5, 4.2), "W^QR, RoPE(t) -> q^R_{t,i}\n(n_h x d_h^R)", ROPE, width=2.4)
    # Key/value path (bottom): h -> [W^DKV; W^KR] -> cached c^KV and k^R.
    c.box("hkv", (0.8, 1.6), "h_t  (H)", ACTIVATION, width=1.2)
    c.box("dkv", (3.0, 2.4), "W^DKV, kv_norm", WEIGHT)
    c.box("kr", (3.0, 0.8), "W^KR, RoPE(t)", ROPE)
    c.box("ckv", (5.5, 2.4), "CACHE c^KV_t\n(d_c per token)", CACHED, bold=True, width=2.2)
    c.box("krc", (5.5, 0.8), "CACHE k^R_t  (d_h^R)\none for all heads", CACHED, bold=True, width=2.2)
    for a, b in (("hq", "cq"), ("cq", "qc"), ("cq", "qr"), ("hkv", "dkv"), ("hkv", "kr"), ("dkv", "ckv"),
                 ("kr", "krc")):
        c.arrow(a, b)
    c.box("att", (10.6, 3.2), "attention, head i:\nsoftmax over cached j of\n(q^C.k^C + q^R.k^R) x scale",
          ACTIVATION, width=3.0, height=1.0)
    if absorb:
        c.box("uk", (8.1, 5.8), "W^UK_i^T q^C_{t,i}\n(query in latent space)", FOLDED, width=2.3)
        c.box("none", (8.1, 2.4), "k^C, v^C never formed:\nscores read c^KV directly", ACTIVATION,
              dashed=True, width=2.3)
        c.box("uv", (10.6, 1.2), "W^UV_i, then W^O\n-> u_t  (H)", FOLDED, width=2.3)
        for a, b in (("qc", "uk"), ("uk", "att"), ("ckv", "none"), ("none", "att")):
            c.arrow(a, b)
        c.arrow("att", "uv", down=True)
    else:
        c.box("uk", (8.1, 3.0), "W^UK -> k^C_{t,i}\n(n_h x d_h)", WEIGHT)
        c.box("uv", (8.1, 1.8), "W^UV -> v^C_{t,i}\n(n_h x d_v)", WEIGHT)
        c.box("wo", (13.0, 3.2), "W^O -> u_t\n(H)", WEIGHT, width=1.4)
        for a, b in (("ckv", "uk"), ("ckv", "uv"), ("uk", "att"), ("uv", "att"), ("qc", "att"), ("att", "wo")):
            c.arrow(a, b)
    c.arrow("qr", "att")
    c.arrow("krc", "att")
    legend = [Patch(facecolor=CACHED, edgecolor="black", label="cached: d_c + d_h^R numbers per token"),
              Patch(facecolor=ROPE, edgecolor="black", label="rotated by RoPE (the only place position enters)"),
              Patch(facecolor=WEIGHT, edgecolor="black", label="projection (weights)")]
    if absorb:
        legend.append(Patch(facecolor=FOLDED, edgecolor="black", label="moved by absorption"))
    ax.legend(handles=legend, loc="lower center", ncol=2, fontsize=8, frameon=True)
    return ax


def draw_causal_mask(t: int, s: int, start_pos: int, *, ax: plt.Axes | None = None) -> plt.Axes:
    """Draw :func:`helpers.mla.causal_mask` ``(t, s, start_pos)``: which cached keys each new query may see.

    Rows are the ``t`` new queries at absolute positions ``start_pos .. start_pos + t - 1``; columns the
    ``s`` keys (``0 .. s - 1``, cached ones and the new ones). Visible entries are filled; a dashed line
    separates the keys that were already cached (``< start_pos``) from the new ones.
    """
    mask = causal_mask(t, s, start_pos)  # (t, s) bool
    xlabel = "key position j (token)" + ("; red line: cached | new" if 0 < start_pos < s else "")
    ax = axes(f"causal_mask(t={t}, s={s}, start_pos={start_pos})", xlabel, "query position (token)", ax=ax)
    ax.imshow(mask.float().numpy(), cmap="Blues", vmin=0, vmax=2.2, aspect="equal")
    ax.set_xticks(range(s))
    ax.set_yticks(range(t), [str(start_pos + i) for i in range(t)])
    ax.grid(False)
    for i in range(t):
        for j in range(s):
            ax.text(j, i, "✓" if mask[i, j] else "·", ha="center", va="center", fontsize=8,
                    color="black" if mask[i, j] else "0.6")
    if 0 < start_pos < s:
        ax.axvline(start_pos - 0.5, color="C3", linestyle="--", linewidth=1.5)
    return ax


def plot_singular_values(spectra: dict[str, Tensor], d_c: int, *, ax: plt.Axes | None = None,
                         title: str = "Singular values of the stacked keys") -> plt.Axes:
    """Plot each spectrum (singular values, largest first) normalised by its largest value, on a log scale.

    Args:
        spectra: name -> 1-D tensor of singular values (e.g. ``torch.linalg.svdvals`` of a ``(tokens, n_h d_h)``
            matrix of keys).
        d_c: the latent width ``kv_lora_rank``, drawn as a vertical line: an MLA spectrum cannot have more
            than ``d_c`` non-zero values.
        ax: an existing Axes, or ``None`` for a new one.
    """
    ax = axes(title, "index of the singular value (largest first)", "singular value / largest (log scale)", ax=ax)
    lowest = 1.0
    for name, values in spectra.items():
        values = values.detach().double()
        relative = (values / values[0]).clamp_min(1e-17)  # exact zeros would vanish from a log plot
        lowest = min(lowest, relative.min().item())
        ax.plot(torch.arange(1, len(values) + 1), relative, label=name)
    ax.axvline(d_c, color="0.3", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_ylim(lowest / 10, 3)
    ax.text(d_c, lowest / 5, f"  d_c = {d_c}", va="bottom", fontsize=9)
    ax.legend()
    return ax
