"""Generate the workshop (exercise) versions of the notebooks.

The notebooks are written with full solutions. A solution region is marked in a code cell::

    def route_topk(logits, k):
        # BEGIN SOLUTION
        # HINT: softmax over the expert dimension, then torch.topk, then renormalise.
        probs = logits.softmax(dim=-1)
        ...
        # END SOLUTION

In the exercise version the region becomes its ``# HINT:`` lines (a first nudge that does not give
the answer away; the checker prints the full hint on request) followed by
``raise NotImplementedError(...)`` at the marker's indentation; everything else is kept, outputs
are cleared, and a banner cell says what to do.

Open questions carry their answer key in a markdown cell, between ``<!-- BEGIN ANSWER -->`` and
``<!-- END ANSWER -->`` (in the full notebook, wrap the answer in ``<details>`` so it stays folded).
The exercise version replaces the region with a line saying where the answer is. Run ``python -m helpers.teaching.exercises notebooks exercises``
(``make exercises``).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil

import nbformat

BEGIN, END, HINT = "# BEGIN SOLUTION", "# END SOLUTION", "# HINT:"
# Short, so the line fits the editor; the hint is in the comments above it, the checker repeats it.
STUB_MESSAGE = "Exercise: replace this line with your code"
_marker = re.compile(r"^(\s*)(# BEGIN SOLUTION|# END SOLUTION)\s*$")

ANSWER = re.compile(r"<!-- BEGIN ANSWER -->.*?<!-- END ANSWER -->", re.S)
ANSWER_REMOVED = "*(The answer is in the full notebook, for instructors.)*"

BANNER = (
    "> **Exercise version.** Solutions are replaced by `raise NotImplementedError` and a hint. "
    "Fill them in; the checker cell after each one tells you what is wrong, or prints a tick. "
    "The full notebook is `notebooks/{name}`."
)


def strip_solutions(source: str, where: str = "cell") -> tuple[str, int]:
    """Replace every solution region in ``source``; return the new source and how many regions.

    Raises:
        ValueError: a BEGIN without END (or the reverse), or nested regions, naming ``where``.
    """
    out: list[str] = []
    regions, inside, indent, hints = 0, False, "", []
    for number, line in enumerate(source.splitlines(), start=1):
        m = _marker.match(line)
        if m and m.group(2) == BEGIN:
            if inside:
                raise ValueError(f"{where}, line {number}: nested '{BEGIN}'; close the first region with '{END}'")
            inside, indent, hints = True, m.group(1), []
        elif m and m.group(2) == END:
            if not inside:
                raise ValueError(f"{where}, line {number}: '{END}' without a '{BEGIN}' before it")
            out.extend(f"{indent}{h}" for h in hints)
            out.append(f"{indent}raise NotImplementedError({STUB_MESSAGE!r})")
            inside, regions = False, regions + 1
        elif inside:
            if line.strip().startswith(HINT):
                hints.append(line.strip())
        else:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: '{BEGIN}' is never closed; add '{END}' at the end of the solution")
    return "\n".join(out), regions


def strip_answers(markdown: str, where: str = "cell") -> tuple[str, int]:
    """Replace every answer-key region of a markdown cell; return the new text and how many regions."""
    if markdown.count("<!-- BEGIN ANSWER -->") != markdown.count("<!-- END ANSWER -->"):
        raise ValueError(f"{where}: every '<!-- BEGIN ANSWER -->' needs its '<!-- END ANSWER -->'")
    return ANSWER.subn(ANSWER_REMOVED, markdown)


def make_exercise_notebook(src: pathlib.Path, dst: pathlib.Path) -> int:
    """Write the exercise version of ``src`` to ``dst``; return the number of solution regions."""
    nb = nbformat.read(src, as_version=4)
    total = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            cell.source = strip_answers(cell.source, where=f"{src.name}, cell {i}")[0]
        if cell.cell_type != "code":
            continue
        cell.source, n = strip_solutions(cell.source, where=f"{src.name}, cell {i}")
        total += n
        cell.outputs, cell.execution_count = [], None
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(BANNER.format(name=src.name)))
    dst.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dst)
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=pathlib.Path, help="folder with the solution notebooks")
    parser.add_argument("dst", type=pathlib.Path, help="folder for the exercise notebooks")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        raise ValueError(f"src must be a folder of notebooks, got {args.src}")
    for src in sorted(args.src.glob("[0-9]*.ipynb")):
        n = make_exercise_notebook(src, args.dst / src.name)
        print(f"{src.name}: {n} exercise(s)")
    for extra in ("GLOSSARY.md", "results"):  # every file the notebooks read or link
        source = args.src / extra
        if source.is_dir():
            shutil.copytree(source, args.dst / extra, dirs_exist_ok=True)
        elif source.exists():
            shutil.copyfile(source, args.dst / extra)


if __name__ == "__main__":
    main()
