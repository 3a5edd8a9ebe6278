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
# Anything that looks like a marker but is not exactly one (``#BEGIN SOLUTION``, ``# end solution``, code
# before it, ``# BEGIN SOLUTIONS``): refused, since it would otherwise be kept and publish the solution.
_near_marker = re.compile(r"(BEGIN|END)[ _-]*SOLUTION", re.I)
_near_answer = re.compile(r"<!--\s*(BEGIN|END)[ _-]*ANSWER", re.I)

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
        if not m and _near_marker.search(line):
            raise ValueError(f"{where}, line {number}: malformed solution marker {line.strip()!r}; write "
                             f"'{BEGIN}' or '{END}' alone on its line")
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
    """Replace every answer-key region of a markdown cell; return the new text and how many regions.

    Raises:
        ValueError: a malformed, nested or unclosed marker, naming ``where`` and the line.
    """
    inside = False
    for number, line in enumerate(markdown.splitlines(), start=1):
        for m in _near_answer.finditer(line):
            token = line[m.start():].split("-->")[0] + "-->" if "-->" in line[m.start():] else line[m.start():]
            kind = m.group(1).upper()
            if token not in ("<!-- BEGIN ANSWER -->", "<!-- END ANSWER -->"):
                raise ValueError(f"{where}, line {number}: malformed answer marker {token!r}; write "
                                 "'<!-- BEGIN ANSWER -->' or '<!-- END ANSWER -->'")
            if kind == "BEGIN" and inside:
                raise ValueError(f"{where}, line {number}: nested '<!-- BEGIN ANSWER -->'; close the first one")
            if kind == "END" and not inside:
                raise ValueError(f"{where}, line {number}: '<!-- END ANSWER -->' without a '<!-- BEGIN ANSWER -->'")
            inside = kind == "BEGIN"
    if inside:
        raise ValueError(f"{where}: '<!-- BEGIN ANSWER -->' is never closed; add '<!-- END ANSWER -->' after the answer")
    return ANSWER.subn(ANSWER_REMOVED, markdown)


def make_exercise_notebook(src: pathlib.Path, dst: pathlib.Path) -> int:
    """Write the exercise version of ``src`` to ``dst``; return the number of solution regions."""
    nb, total = exercise_notebook(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dst)
    return total


def exercise_notebook(src: pathlib.Path) -> tuple[nbformat.NotebookNode, int]:
    """The exercise version of ``src`` (in memory) and its number of solution regions."""
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
    return nb, total


def main(argv: list[str] | None = None) -> None:
    """Convert every notebook of ``src`` in memory first; write ``dst`` only if all of them converted.

    Refused before anything is written (an argparse error, exit status 2): ``src`` not a folder or without
    numbered notebooks, ``dst`` equal to or inside ``src`` (it would overwrite or mix with the solutions), a
    ``dst`` that exists and is not a folder, and any malformed or unclosed marker (named by notebook, cell, line).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=pathlib.Path, help="folder with the solution notebooks")
    parser.add_argument("dst", type=pathlib.Path, help="folder for the exercise notebooks")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        parser.error(f"src must be a folder of notebooks, got {str(args.src)!r}")
    sources = sorted(args.src.glob("[0-9]*.ipynb"))
    if not sources:
        parser.error(f"src {str(args.src)!r} has no notebooks named like '00_name.ipynb'; point it at notebooks/")
    src_root, dst_root = args.src.resolve(), args.dst.resolve()
    if dst_root == src_root or src_root in dst_root.parents:
        parser.error(f"dst {str(args.dst)!r} is {'the same folder as' if dst_root == src_root else 'inside'} src "
                     f"{str(args.src)!r}: the exercise versions would overwrite or mix with the solutions; "
                     "choose a folder outside it, e.g. exercises/")
    if args.dst.exists() and not args.dst.is_dir():
        parser.error(f"dst {str(args.dst)!r} exists and is not a folder")
    converted = []
    for src in sources:
        try:
            converted.append((src, *exercise_notebook(src)))
        except ValueError as exc:
            parser.error(f"{exc} (nothing was written)")
    args.dst.mkdir(parents=True, exist_ok=True)
    for src, nb, n in converted:
        nbformat.write(nb, args.dst / src.name)
        print(f"{src.name}: {n} exercise(s)")
    for extra in ("GLOSSARY.md", "results"):  # every file the notebooks read or link
        source = args.src / extra
        if source.is_dir():
            shutil.copytree(source, args.dst / extra, dirs_exist_ok=True)
        elif source.exists():
            shutil.copyfile(source, args.dst / extra)


if __name__ == "__main__":
    main()
