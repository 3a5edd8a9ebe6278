"""helpers.teaching.widgets: the default drawn once as a plain figure, a redraw per change, errors as text."""

import base64

import matplotlib.pyplot as plt
import pytest

from helpers.teaching import widgets


def _draw(k: int, scale: float):
    if k > 3 and scale > 1:
        raise ValueError(f"k ({k}) must be at most 3 when scale > 1")
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot(range(k + 1), [scale * i for i in range(k + 1)])
    return fig


def _explorer(monkeypatch):
    plt.close("all")  # figures other tests left open must not count as ours
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    explorer = widgets.explore(_draw, k=widgets.integer("k", 1, 8, 2),
                               scale=widgets.choice("scale", [0.5, 1.0, 2.0], 1.0, "{:g}"))
    return explorer, shown


def test_default_is_a_plain_figure_then_the_controls(monkeypatch):
    explorer, shown = _explorer(monkeypatch)
    assert isinstance(shown[0], plt.Figure) and shown[1] is explorer.widget
    assert explorer.values() == {"k": 2, "scale": 1.0}
    assert [o["output_type"] for o in explorer.output.outputs] == ["stream"]  # the hint, no plot yet
    assert not plt.get_fignums(), "the static figure must be closed, or inline backends draw it twice"


def test_moving_a_control_redraws_the_plot(monkeypatch):
    explorer, _ = _explorer(monkeypatch)
    explorer.controls["k"].value = 5
    first = explorer.output.outputs[0]["data"]["image/png"]
    assert base64.b64decode(first).startswith(b"\x89PNG")
    explorer.controls["scale"].value = 0.5
    second = explorer.output.outputs[0]["data"]["image/png"]
    assert len(explorer.output.outputs) == 1 and second != first
    assert 0 < explorer.seconds < 5, "the redraw's time is recorded (a tiny figure: far below this bound)"
    assert not plt.get_fignums()


def test_a_value_error_is_shown_instead_of_the_plot(monkeypatch):
    explorer, _ = _explorer(monkeypatch)
    explorer.controls["k"].value = 5
    explorer.controls["scale"].value = 2.0
    (out,) = explorer.output.outputs
    assert out["output_type"] == "stream" and "k (5) must be at most 3" in out["text"]


def test_controls_refuse_defaults_outside_their_range():
    with pytest.raises(ValueError, match="not among values"):
        widgets.choice("gamma", [0.1, 0.2], 0.3)
    with pytest.raises(ValueError, match="outside low..high"):
        widgets.integer("k", 1, 4, 9)
    with pytest.raises(ValueError, match="step must be a positive integer"):
        widgets.integer("k", 1, 4, 2, step=0)
    with pytest.raises(ValueError, match="controls is empty"):
        widgets.Explorer(_draw, {})
