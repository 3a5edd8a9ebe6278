"""The notebooks as a learner sees them: JupyterLab in headless Chromium, driven by Playwright.

Run by ``make test-browser`` (not by plain ``pytest``: this file's name does not match ``test_*.py``,
so only an explicit path collects it). It starts JupyterLab through ``make lab`` itself (the same
command, root and settings; only a local port, a token and ``--no-browser`` added; fresh user
settings and workspaces, as on a learner's first start), opens notebooks in Chromium
(``/usr/bin/chromium``, Debian's package; Playwright never downloads a browser), clears the stored
outputs, runs every cell, and asserts what a learner would see: every code cell executed, no error
output, as many rendered plots as the committed notebook holds, progress bars drawn as widgets where
the notebook has them, no news prompt. In an exercise notebook it reads the stub's message (no
traceback), types the correct answer and sees the checker's tick. It moves a slider of an interactive
plot (``helpers.teaching.widgets``) and sees the plot change. It also opens the ``make site`` pages.
Screenshots and the measured times go to ``build/browser/``; each screenshot that claims to show a plot or a
message is taken after its cell has been scrolled into view and rendered (JupyterLab draws only the cells
near the viewport), and the test checks that the plot's pixels are on the screen and not blank.

Waits are on JupyterLab's own state (the status bar's kernel status, the notebook's execution
indicator, the ``[*]`` prompts), never on sleeps; nothing is retried. With
``BROWSER_TEST_SERVER_MPLBACKEND=Agg`` the server (and so every kernel) gets that backend: the plot
assertions must then fail, which proves the test sees missing plots. With
``BROWSER_TEST_NOTEBOOKS=all`` every notebook is run (the minutes of INSTRUCTORS.md come from that).
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from types import SimpleNamespace

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "browser"
CHROMIUM = pathlib.Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1366, "height": 768}  # a common laptop screen
NOTEBOOKS = ["00_why_deepseek_is_cheap.ipynb", "13_moe_load_balancing.ipynb", "22_mla_decoupled_rope.ipynb",
             "40_v4_hyper_connections.ipynb"]
if os.environ.get("BROWSER_TEST_NOTEBOOKS") == "all":  # every notebook (for INSTRUCTORS.md's minutes)
    from helpers.teaching.site import notebook_order

    NOTEBOOKS = notebook_order(ROOT / "README.md")
EXERCISE = "10_moe_from_dense_to_experts.ipynb"
SLIDER = "13_moe_load_balancing.ipynb"  # its gamma slider: the first explore() cell
RUN_TIMEOUT = 600  # seconds for one Run All
STABLE = 3.0  # seconds the finished state must hold
TIMES: dict[str, float] = {}

# What the page shows, read in one call (textContent: the notebook is windowed, innerText of off-screen
# cells is empty).
STATE_JS = """(panelId) => {
  const panel = document.getElementById(panelId);
  const cells = [...panel.querySelectorAll('.jp-CodeCell')];
  const bar = document.querySelector('#jp-main-statusbar');
  const ind = panel.querySelector('.jp-Notebook-ExecutionIndicator');
  return {
    prompts: cells.map(c => (c.querySelector('.jp-InputPrompt') || {}).textContent || ''),
    outputs: cells.map(c => [...c.querySelectorAll('.jp-OutputArea-output')].map(o => ({
        mime: o.getAttribute('data-mime-type') || '', text: o.textContent,
        imgs: o.querySelectorAll('img').length}))),
    indicator: ind ? ind.getAttribute('data-status') : null,
    idle: bar ? bar.textContent.includes('| Idle') : false,
    progress: panel.querySelectorAll('.widget-hprogress').length,
    news: [...document.querySelectorAll('.Toastify__toast')].map(t => t.textContent).join(' | '),
  };
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab started by ``make lab``, on a local port with a token; stopped after the module."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found. Install Debian's Chromium (`sudo apt-get install chromium`; "
                    ".ci/run does it) or set CHROMIUM=/path/to/chromium. Playwright must not download one.")
    OUT.mkdir(parents=True, exist_ok=True)
    home = tmp_path_factory.mktemp("lab")
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env.update(JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "ws"))
    # A learner's settings with one change: no autosave, so a run never writes a committed notebook.
    docmanager = home / "settings" / "@jupyterlab" / "docmanager-extension"
    docmanager.mkdir(parents=True)
    (docmanager / "plugin.jupyterlab-settings").write_text('{"autosave": false}\n')
    if os.environ.get("BROWSER_TEST_SERVER_MPLBACKEND"):  # the self-test: plots must then go missing
        env["MPLBACKEND"] = os.environ["BROWSER_TEST_SERVER_MPLBACKEND"]
    opts = f"--no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port={port} --IdentityProvider.token={token}"
    log = open(OUT / "jupyterlab.log", "w")
    server = subprocess.Popen(["make", "--no-print-directory", "lab", f"LAB_OPTS={opts}"], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"JupyterLab did not answer on {url}; see {OUT / 'jupyterlab.log'}")
        time.sleep(0.5)
    yield SimpleNamespace(url=url, token=token, home=home)
    os.killpg(server.pid, 15)
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(lab.home / "profile"), executable_path=str(CHROMIUM), headless=True, args=FLAGS,
            viewport=VIEWPORT)
        context.set_default_timeout(60_000)
        yield context
        context.close()
    (OUT / "times.json").write_text(json.dumps(TIMES, indent=1) + "\n")


def _committed(path: pathlib.Path) -> dict:
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    return {"cells": code,
            "images": sum("image/png" in o.get("data", {}) for c in code for o in c.outputs),
            # the saved widget state holds a progress bar's model (sliders of interactive plots are not one)
            "progress": any(m.get("model_name", "").endswith("ProgressModel") for m in state.values())}


def _shutdown_kernels(lab) -> None:
    req = urllib.request.Request(f"{lab.url}/api/kernels?token={lab.token}")
    with urllib.request.urlopen(req) as r:
        kernels = json.load(r)
    for k in kernels:
        urllib.request.urlopen(urllib.request.Request(
            f"{lab.url}/api/kernels/{k['id']}?token={lab.token}", method="DELETE"))


def _open(browser, lab, path: str):
    """Open ``path`` in a fresh workspace; return the page and the notebook panel's id once the kernel is idle."""
    page = browser.new_page()
    page.goto(f"{lab.url}/lab/tree/{path}?reset&token={lab.token}")
    page.wait_for_selector(".jp-NotebookPanel .jp-CodeCell")
    page.wait_for_function("() => (document.querySelector('#jp-main-statusbar') || {}).textContent"
                           "?.includes('| Idle')", timeout=120_000)
    panel = page.locator(".jp-NotebookPanel:visible").first.get_attribute("id")
    return page, panel


def _command(page, menu: str, *commands: str) -> None:
    """Click ``menu`` in the menu bar, then its item bound to one of ``commands``."""
    page.locator(".lm-MenuBar-item", has_text=menu).first.click()
    page.locator(", ".join(f'.lm-Menu-item[data-command="{c}"]' for c in commands)).first.click()


def _run_all(page, panel: str, watch_progress: bool = False,
             commands: tuple[str, ...] = ("runmenu:run-all", "notebook:run-all-cells")) -> tuple[dict, float, bool]:
    """Run All (or another Run-menu command); wait until no cell is queued or running and the kernel is idle,
    holding for STABLE s."""
    start = time.monotonic()
    _command(page, "Run", *commands)
    saw_progress, started, stable_since = False, False, None
    while True:
        state = page.evaluate(STATE_JS, panel)
        saw_progress |= state["progress"] > 0
        running = any("[*]" in p for p in state["prompts"])
        started |= running or state["indicator"] == "busy"
        done = started and not running and state["indicator"] == "idle" and state["idle"]
        now = time.monotonic()
        stable_since = (stable_since or now) if done else None
        if stable_since and now - stable_since >= STABLE:
            return state, stable_since - start, saw_progress
        if now - start > RUN_TIMEOUT:
            pytest.fail(f"Run All did not finish in {RUN_TIMEOUT} s; last prompts: {state['prompts']}")
        time.sleep(0.2 if watch_progress else 0.5)


def _errors(state: dict) -> list[tuple[int, str]]:
    return [(i, o["text"][:300]) for i, outs in enumerate(state["outputs"]) for o in outs
            if o["mime"] == "application/vnd.jupyter.stderr"]


# Bring an element (a plot, an output area) into the notebook's window and wait until JupyterLab has rendered its
# cell: images loaded, outputs' text laid out (innerText is empty while a cell is not rendered), and the element
# wholly on screen at the same place for two polls in a row (rendering Markdown and math above it moves it; if it
# moved out of the window it is scrolled back).
SHOWN_JS = """(el) => {
  const cell = el.closest('.jp-Cell') || el;
  const imgs = [...cell.querySelectorAll('.jp-OutputArea-output img')];
  const loaded = imgs.every(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().height > 0);
  const outs = [...cell.querySelectorAll('.jp-OutputArea-output')];
  const laidOut = outs.every(o => o.querySelector('img') || o.innerText.trim().length > 0);
  const r = el.getBoundingClientRect(), h = window.innerHeight;
  const inside = r.height > 0 && r.top >= 0 && (r.bottom <= h || (r.height > h && r.top < h / 4));
  if (!inside) { el.scrollIntoView({block: r.height > h ? 'start' : 'center'}); el.dataset.shownTop = ''; return false; }
  const steady = el.dataset.shownTop === String(r.top);
  el.dataset.shownTop = String(r.top);
  return loaded && laidOut && steady;
}"""
SCROLL_JS = "(el) => el.scrollIntoView({block: 'center'})"


def _show(page, element) -> None:
    """Scroll ``element`` (a locator) into view and wait until it is rendered, on screen and steady."""
    element.evaluate(SCROLL_JS)
    page.wait_for_function(SHOWN_JS, arg=element.element_handle(), polling=250)


def _plot_pixels_vary(page, img) -> float:
    """The spread (standard deviation of the grey levels) of the screen pixels where ``img`` is drawn: a blank
    area (a cell scrolled out of view, an image not yet painted) gives about 0."""
    import io

    from PIL import Image, ImageStat

    box = img.bounding_box()
    shot = Image.open(io.BytesIO(page.screenshot(clip=box))).convert("L")
    return ImageStat.Stat(shot).stddev[0]


def _screenshot(page, name: str, panel: str, first_image: bool = True) -> None:
    page.screenshot(path=str(OUT / f"{name}-end.png"))
    with_plot = page.evaluate("""(panelId) => [...document.getElementById(panelId).querySelectorAll('.jp-CodeCell')]
        .findIndex(c => c.querySelector('.jp-OutputArea-output img'))""", panel)
    if first_image and with_plot >= 0:
        plot = page.locator(f"#{panel} .jp-CodeCell").nth(with_plot).locator(".jp-OutputArea-output img").first
        _show(page, plot)
        page.screenshot(path=str(OUT / f"{name}-first-plot.png"))
        spread = _plot_pixels_vary(page, plot)
        assert spread > 5, f"{name}: the first plot's area on the screenshot is blank (pixel spread {spread:.1f})"


def _wide_code(page, panel: str) -> list[int]:
    """Code cells whose editor scrolls sideways at this window width (lines cut off)."""
    return page.evaluate("""(panelId) => [...document.getElementById(panelId).querySelectorAll('.jp-CodeCell')]
        .map((c, i) => { const s = c.querySelector('.cm-scroller');
                         return s && s.scrollWidth > s.clientWidth + 1 ? i : -1; }).filter(i => i >= 0)""", panel)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_run_all_shows_every_output(lab, browser, name):
    committed = _committed(ROOT / "notebooks" / name)
    saved = (ROOT / "notebooks" / name).read_bytes()
    page, panel = _open(browser, lab, f"notebooks/{name}")
    try:
        _command(page, "Edit", "editmenu:clear-all", "notebook:clear-all-cell-outputs")  # what follows comes from this run
        state, seconds, saw_progress = _run_all(page, panel, watch_progress=committed["progress"])
        TIMES[name] = round(seconds, 1)
        _screenshot(page, name.removesuffix(".ipynb"), panel)
        wide = _wide_code(page, panel)
        if wide:
            (OUT / f"{name}.wide_cells.json").write_text(json.dumps(wide) + "\n")
        assert not _errors(state), f"{name}: error output in code cells {_errors(state)}"
        assert len(state["prompts"]) == len(committed["cells"])
        unexecuted = [i for i, p in enumerate(state["prompts"]) if not any(ch.isdigit() for ch in p)]
        assert not unexecuted, f"{name}: code cells {unexecuted} did not run (prompts {state['prompts']})"
        images = sum(o["imgs"] for outs in state["outputs"] for o in outs)
        assert images == committed["images"], (
            f"{name}: {images} plot(s) rendered, the committed notebook holds {committed['images']} "
            "(a kernel with MPLBACKEND=Agg draws none)")
        if committed["progress"]:
            assert saw_progress, f"{name}: no progress bar widget (.widget-hprogress) appeared during the run"
        assert "news" not in state["news"].lower(), f"a JupyterLab prompt covers the outputs: {state['news']}"
    finally:
        page.close()
        _shutdown_kernels(lab)
        if (ROOT / "notebooks" / name).read_bytes() != saved:  # JupyterLab must never save the run
            (ROOT / "notebooks" / name).write_bytes(saved)
            pytest.fail(f"the browser run wrote notebooks/{name} (its committed bytes are back)")


def _answer(stub: str, solved: str) -> str:
    """The exercise cell as a learner completes it: the stub's raise replaced by the solution's lines."""
    body = solved.split("# BEGIN SOLUTION\n", 1)[1].split("# END SOLUTION", 1)[0]
    body = "\n".join(line for line in body.splitlines() if not line.strip().startswith("# HINT:"))
    lines = stub.splitlines()
    at = next(i for i, line in enumerate(lines) if "raise NotImplementedError('Exercise" in line)
    return "\n".join(lines[:at] + [body.rstrip()] + lines[at + 1:])


def _show_output(page, panel: str, cell: int, name: str) -> str:
    """Screenshot cell ``cell`` with its output rendered on screen; return the output's visible text."""
    output = page.locator(f"#{panel} .jp-CodeCell").nth(cell).locator(".jp-OutputArea")
    _show(page, output)
    page.screenshot(path=str(OUT / name))
    return output.inner_text()


def test_exercise_stub_then_correct_answer(lab, browser):
    """The generated exercise: the stub's message without a traceback, then the typed answer's tick."""
    subprocess.run(["make", "--no-print-directory", "exercises"], cwd=ROOT, check=True, capture_output=True)
    exercise = nbformat.read(ROOT / "exercises" / EXERCISE, as_version=4)
    full = nbformat.read(ROOT / "notebooks" / EXERCISE, as_version=4)
    code = [c for c in exercise.cells if c.cell_type == "code"]
    first = next(i for i, c in enumerate(code) if "raise NotImplementedError" in c.source)
    answer = _answer(code[first].source, [c for c in full.cells if c.cell_type == "code"][first].source)
    page, panel = _open(browser, lab, f"exercises/{EXERCISE}")
    try:
        state, _, _ = _run_all(page, panel)  # Run All stops at the first failing checker
        errors = _errors(state)
        assert len(errors) == 1 and errors[0][0] > first, f"expected one failure, from the checker: {errors}"
        assert "still the exercise stub" in errors[0][1], errors[0][1]
        assert "Traceback" not in errors[0][1] and "checks.py" not in errors[0][1], (
            f"the checker's failure shows a traceback through the framework: {errors[0][1]}")
        checker = errors[0][0]
        shown = _show_output(page, panel, checker, "exercise-stub.png")
        assert "still the exercise stub" in shown, f"the screenshot's checker output is not rendered: {shown!r}"

        editor = page.locator(f"#{panel} .jp-CodeCell").nth(first).locator(".cm-content")
        editor.scroll_into_view_if_needed()
        editor.click()
        page.keyboard.press("Control+a")
        page.keyboard.insert_text(answer)  # as pasted: no auto-indent of typed lines
        state, seconds, _ = _run_all(page, panel)
        TIMES["exercise " + EXERCISE] = round(seconds, 1)
        assert not _errors(state), f"errors after typing the answer: {_errors(state)}"
        assert any("✓" in o["text"] for o in state["outputs"][checker]), (
            f"no tick from the checker cell {checker}: {state['outputs'][checker]}")
        unexecuted = [i for i, p in enumerate(state["prompts"]) if not any(ch.isdigit() for ch in p)]
        assert not unexecuted, f"code cells {unexecuted} did not run"
        images = sum(o["imgs"] for outs in state["outputs"] for o in outs)
        want = _committed(ROOT / "notebooks" / EXERCISE)["images"]
        assert images == want, f"exercise {EXERCISE}: {images} plot(s) rendered, the full notebook holds {want}"
        shown = _show_output(page, panel, checker, "exercise-tick.png")
        assert "✓" in shown, f"the screenshot's checker output is not rendered: {shown!r}"
    finally:
        page.close()
        _shutdown_kernels(lab)


# The interactive plot's output widget inside a cell, and the src of its image (a data: URL of the PNG).
WIDGET_IMG_JS = """(cell) => { const i = cell.querySelector('.jupyter-widgets .jp-OutputArea-output img');
                                return i && i.complete && i.naturalWidth > 0 ? i.src : null; }"""


def test_moving_a_slider_redraws_the_plot(lab, browser):
    """The learner's view of an interactive plot: the default drawn as a plain picture, a slider under it; moving
    the slider (keyboard on its handle, as a learner may) draws a new plot, and moving it again changes it again."""
    nb = nbformat.read(ROOT / "notebooks" / SLIDER, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    target = next(i for i, c in enumerate(code) if "explore(" in c.source)
    page, panel = _open(browser, lab, f"notebooks/{SLIDER}")
    try:
        cells = page.locator(f"#{panel} .jp-CodeCell")
        cells.nth(target + 1).evaluate(SCROLL_JS)  # the cell after the interactive one: run everything above it
        cells.nth(target + 1).locator(".jp-InputPrompt").click()
        state, _, _ = _run_all(page, panel, commands=("notebook:run-all-above",))
        assert not _errors(state), f"errors before the slider: {_errors(state)}"
        cell = cells.nth(target)
        slider = cell.locator(".widget-slider")
        slider.first.wait_for(state="attached")
        _show(page, slider.first)
        static = cell.locator(".jp-OutputArea-output img").first.get_attribute("src")
        assert page.evaluate(WIDGET_IMG_JS, cell.element_handle()) is None, "the widget drew a plot before a move"
        srcs = []
        for _ in range(2):
            before = page.evaluate(WIDGET_IMG_JS, cell.element_handle())
            slider.first.locator(".noUi-handle, [role=slider]").first.focus()
            page.keyboard.press("ArrowRight")
            page.wait_for_function(f"([cell, before]) => {{ const src = ({WIDGET_IMG_JS})(cell); "
                                   "return src !== null && src !== before; }",
                                   arg=[cell.element_handle(), before], timeout=30_000)
            srcs.append(page.evaluate(WIDGET_IMG_JS, cell.element_handle()))
        assert srcs[0] != static and srcs[1] != srcs[0], "moving the slider did not change the plot"
        widget_img = cell.locator(".jupyter-widgets .jp-OutputArea-output img").first
        _show(page, widget_img)
        page.screenshot(path=str(OUT / "slider-moved.png"))
        assert _plot_pixels_vary(page, widget_img) > 5, "the redrawn plot's area on the screenshot is blank"
        assert not _errors(page.evaluate(STATE_JS, panel)), "the redraw wrote an error"
    finally:
        page.close()
        _shutdown_kernels(lab)


def test_static_site_pages_load_with_their_plots(browser):
    """``make site``: the index lists every notebook in the README's order, each page has its plots."""
    site = ROOT / "build" / "site"
    shutil.rmtree(site, ignore_errors=True)
    subprocess.run(["make", "--no-print-directory", "site"], cwd=ROOT, check=True, capture_output=True)
    from helpers.teaching.site import notebook_order

    order = notebook_order(ROOT / "README.md")
    page = browser.new_page()
    try:
        page.goto((site / "index.html").as_uri(), wait_until="domcontentloaded")
        links = [h for h in page.eval_on_selector_all("a", "as => as.map(a => a.getAttribute('href'))")
                 if h and h.endswith(".html") and h[:2].isdigit()]
        assert links == [n.replace(".ipynb", ".html") for n in order], links
        page.screenshot(path=str(OUT / "site-index.png"))
        for name in order:
            page.goto((site / name.replace(".ipynb", ".html")).as_uri(), wait_until="domcontentloaded")
            images = page.locator(".jp-OutputArea-output img").count()
            want = _committed(ROOT / "notebooks" / name)["images"]
            assert images == want, f"site page of {name}: {images} images, the notebook holds {want}"
            assert page.locator(".jp-CodeCell").count() == len(_committed(ROOT / "notebooks" / name)["cells"])
        page.locator(".jp-OutputArea-output img").first.scroll_into_view_if_needed()
        page.screenshot(path=str(OUT / "site-page.png"))
    finally:
        page.close()
