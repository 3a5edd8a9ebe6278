"""Import what a notebook builds, so tests can compare it with ``helpers`` and run checkers on it.

Only code cells whose first line is ``# EXPORT`` are run, in order, in one fresh namespace; keep
them to imports and definitions (no plots, no long loops). With ``exercise=True`` the solution
regions are replaced by their stubs first, exactly as ``make exercises`` does.
"""

from __future__ import annotations

import pathlib
from types import SimpleNamespace

import nbformat

from helpers.teaching.exercises import strip_solutions

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


def load_notebook(name: str, *, exercise: bool = False) -> SimpleNamespace:
    """Run the ``# EXPORT`` cells of ``notebooks/<name>`` and return what they defined."""
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    namespace: dict = {"__name__": f"notebook_{path.stem}"}
    exported = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not cell.source.startswith("# EXPORT"):
            continue
        source = strip_solutions(cell.source, where=f"{name}, cell {i}")[0] if exercise else cell.source
        exec(compile(source, f"{name}[cell {i}]", "exec"), namespace)
        exported += 1
    if exported == 0:
        raise ValueError(f"{name} has no cell starting with '# EXPORT'; mark the cells tests should import")
    return SimpleNamespace(**{k: v for k, v in namespace.items() if not k.startswith("__")})
