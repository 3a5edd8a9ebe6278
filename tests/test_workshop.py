"""The workshop folder runs: every generated exercise notebook, executed in a kernel from its own folder.

For each notebook with exercises, a kernel (one for all, reset between notebooks) runs the exercise version's code cells up to its last
checker cell with the stubs in place: every checker cell must report the stub (its first-hint
message, no traceback through the framework) and no other cell may fail, except with the stub's own
``NotImplementedError`` where a cell calls the learner's function. Then the same kernel re-runs the
cells from the first exercise on with the solutions filled back in: every checker prints its tick
and nothing fails. The cells after the last checker are the full notebook's (nbval runs those).
"""

from __future__ import annotations

import os
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

from helpers.teaching.exercises import main as make_exercises

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
WITH_EXERCISES = [p.name for p in sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))
                  if "# BEGIN SOLUTION" in p.read_text()]
CHECK = re.compile(r"\bcheck_\w+\(")
STUB = "raise NotImplementedError('Exercise"


@pytest.fixture(scope="module")
def workshop(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("workshop") / "exercises"
    make_exercises([str(NOTEBOOKS), str(folder)])
    return folder


@pytest.fixture(scope="module")
def kernel(workshop):
    """One kernel in the workshop folder for every notebook (``%reset -f`` between them): torch and
    transformers are imported once. Plots are nbval's and the browser test's business; an off-screen
    backend keeps this test fast."""
    client = NotebookClient(nbformat.v4.new_notebook(), timeout=300, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(workshop)}})
    with client.setup_kernel(env={**os.environ, "MPLBACKEND": "Agg"}):
        yield client


def _errors(cell) -> list[dict]:
    return [o for o in cell.outputs if o.output_type == "error"]


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@pytest.mark.parametrize("name", WITH_EXERCISES)
def test_exercise_notebook_with_stubs_then_solutions(workshop, kernel, name):
    nb = nbformat.read(workshop / name, as_version=4)
    full = [c for c in nbformat.read(NOTEBOOKS / name, as_version=4).cells if c.cell_type == "code"]
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) == len(full), "the exercise version must keep every code cell, in order"
    stubs = [i for i, c in enumerate(code) if STUB in c.source]
    checkers = [i for i, c in enumerate(code) if CHECK.search(c.source) and i not in stubs]
    assert stubs and checkers and checkers[-1] > stubs[0], f"{name}: exercises {stubs}, checker cells {checkers}"
    reset = nbformat.v4.new_code_cell("%reset -f\nimport matplotlib.pyplot\nmatplotlib.pyplot.close('all')")
    nb.cells.insert(0, reset)
    index = {id(c): i for i, c in enumerate(nb.cells)}
    client = kernel
    client.nb = nb
    client.execute_cell(reset, 0)
    assert not _errors(reset), _errors(reset)
    for cell in code[: checkers[-1] + 1]:
        client.execute_cell(cell, index[id(cell)])
    failed: list[str] = []  # sources of the cells that stopped at a stub
    for i, cell in enumerate(code[: checkers[-1] + 1]):
        for error in _errors(cell):
            shown = "\n".join(error["traceback"])
            if i in checkers and i > stubs[0]:
                assert error["ename"] == "CheckFailure" and "stub" in shown, (
                    f"{name}, code cell {i}: the checker should report the stub, showed:\n{shown}")
                assert "Traceback" not in shown and "checks.py" not in shown, shown
            elif error["ename"] == "NotImplementedError" and error["evalue"].startswith("Exercise"):
                failed.append(cell.source)  # a cell calling the learner's function meets the stub
            else:  # only a name that a cell stopped by the stub would have defined may be missing
                missing = re.match(r"name '(\w+)' is not defined", error["evalue"])
                assert error["ename"] == "NameError" and missing and any(
                    re.search(rf"\b{missing.group(1)}\b", s) for s in failed), (
                    f"{name}, code cell {i} failed with the stubs in place: {error['ename']}: "
                    f"{error['evalue']}")
                failed.append(cell.source)
    reported = [i for i in checkers if i > stubs[0] and _errors(code[i])]
    assert reported, f"{name}: no checker cell reported the stub"

    for i in range(stubs[0], checkers[-1] + 1):  # the solutions filled back in, then re-run
        cell = code[i]
        if i in stubs:
            cell.source = full[i].source
        cell.outputs = []
        client.execute_cell(cell, index[id(cell)])
        assert not _errors(cell), f"{name}, code cell {i} with the solutions: {_errors(cell)[0]['evalue']}"
    for i in checkers:
        if i > stubs[0] and "✓" not in _text(code[i]) and CHECK.search(code[i].source.splitlines()[-1]):
            pytest.fail(f"{name}, checker cell {i} printed no tick: {_text(code[i])!r}")


def test_instructors_kit_is_generated_from_the_checkers():
    """INSTRUCTORS.md's mistakes, answer keys and run times are those the code and the saved run give."""
    from helpers.teaching.instructors import render

    kit = NOTEBOOKS.parent / "INSTRUCTORS.md"
    assert render(kit.read_text()) == kit.read_text(), (
        "INSTRUCTORS.md is out of date: run `python -m helpers.teaching.instructors INSTRUCTORS.md`")
    assert "INSTRUCTORS.md" in (NOTEBOOKS.parent / "README.md").read_text(), "the README must link the kit"
