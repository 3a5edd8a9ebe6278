"""Interactive figures: move a value, watch the plot change; the default stays a plain picture.

:func:`explore` shows ``draw(**defaults)`` as an ordinary matplotlib output, so the static site, nbval and a
reader without a kernel see the default result, then displays the controls and an output area below them that
redraws ``draw(**values)`` on every change (JupyterLab with a live kernel). Each redraw renders the figure to
PNG and replaces the output area's content in one message, so nothing flickers and no stale plot piles up.
If ``draw`` raises ``ValueError`` for a combination of values (a rule of the layer it draws), the message is
shown in place of the plot.

The controls come from :func:`choice` (a slider over listed values, e.g. log-spaced) and :func:`integer`.
Keep ``draw`` fast (well under a second): precompute what does not depend on the controls.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets

from helpers.rules import require_positive

LAYOUT = dict(description_width="initial")  # full descriptions such as "gamma (bias speed)"
HINT = "Move a control: the plot for the chosen values appears here (the default is drawn above)."


def choice(description: str, values: Sequence, value: Any, fmt: str = "{}") -> ipywidgets.SelectionSlider:
    """A slider over ``values`` (shown with ``fmt``), starting at ``value``; ``ValueError`` if it is not one of them."""
    values = list(values)
    if value not in values:
        raise ValueError(f"value={value!r} is not among values={values}: pick the default from the slider's values")
    return ipywidgets.SelectionSlider(options=[(fmt.format(v), v) for v in values], value=value,
                                      description=description, style=LAYOUT, continuous_update=False)


def integer(description: str, low: int, high: int, value: int, step: int = 1) -> ipywidgets.IntSlider:
    """An integer slider ``low..high`` starting at ``value``."""
    if not low <= value <= high:
        raise ValueError(f"value={value} lies outside low..high = {low}..{high}: choose a default inside the range")
    require_positive(step=step)
    return ipywidgets.IntSlider(value=value, min=low, max=high, step=step, description=description, style=LAYOUT,
                                continuous_update=False)


def figure_png(fig) -> str:
    """``fig`` as base64 PNG text, drawn as the inline backend draws a plot (the figure's dpi, tight bounding
    box), so a redraw has the size of the static default; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class Explorer:
    """Controls plus an output area that shows ``draw(**values)``; built and displayed by :func:`explore`.

    Attributes:
        controls: ``{name: widget}``; output: the ``ipywidgets.Output`` the plot goes to;
        seconds: how long the last redraw took; widget: the whole box (controls above the output).
    """

    def __init__(self, draw: Callable[..., Any], controls: dict[str, ipywidgets.ValueWidget]) -> None:
        if not controls:
            raise ValueError("controls is empty: give at least one control, e.g. controls={'k': integer(...)}")
        self.draw, self.controls = draw, dict(controls)
        self.output = ipywidgets.Output()
        self.output.outputs = (_stream(HINT),)
        self.seconds = 0.0
        self.widget = ipywidgets.VBox([ipywidgets.HBox(list(self.controls.values())), self.output])
        for control in self.controls.values():
            control.observe(lambda _change: self.redraw(), names="value")

    def values(self) -> dict[str, Any]:
        return {name: control.value for name, control in self.controls.items()}

    def redraw(self) -> None:
        """Draw the figure for the controls' current values into the output area (or the ValueError's message)."""
        start = time.perf_counter()
        try:
            shown = _image(figure_png(self.draw(**self.values())))
        except ValueError as error:
            shown = _stream(f"{type(error).__name__}: {error}")
        self.output.outputs = (shown,)
        self.seconds = time.perf_counter() - start


def explore(draw: Callable[..., Any], **controls: ipywidgets.ValueWidget) -> Explorer:
    """Show ``draw(**defaults)`` as a plain figure, then the controls and the output area that redraws on a change.

    Args:
        draw: returns a matplotlib figure for keyword values named like ``controls``.
        controls: one widget per keyword of ``draw`` (:func:`choice`, :func:`integer`); their values are the
            defaults drawn statically.

    Returns:
        the :class:`Explorer` (end the notebook line with ``;`` so its repr is not printed).
    """
    import matplotlib.pyplot as plt
    from IPython.display import display

    explorer = Explorer(draw, controls)
    fig = draw(**explorer.values())
    display(fig)  # the static picture: image/png in the saved notebook
    plt.close(fig)
    display(explorer.widget)
    return explorer


def _image(png: str) -> dict:
    return {"output_type": "display_data", "data": {"image/png": png, "text/plain": "<Figure>"}, "metadata": {}}


def _stream(text: str) -> dict:
    return {"output_type": "stream", "name": "stdout", "text": text + "\n"}
