"""Re-run notebooks in place, top to bottom, so committed outputs come from one clean run.

``python -m helpers.teaching.execute notebooks/*.ipynb`` (``make execute``) prints each notebook's wall
time. With ``--times FILE`` the times are saved (merged into FILE, a JSON map of notebook name to
seconds), and with ``--readme README.md`` the "minutes" column of the README's notebook table is
rewritten from them, so the minutes the README quotes are always those of the last run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import time

import nbformat
from nbclient import NotebookClient

ROW = re.compile(r"^(\| \[[^\]]+\]\(notebooks/(?P<name>[^)]+\.ipynb)\) \|.*\| )(?P<minutes>[0-9.]+|—)( \|)$", re.M)


def execute_in_place(path: pathlib.Path, timeout: int = 900) -> float:
    """Execute ``path`` with a fresh kernel in its own folder, save it, return the seconds taken."""
    os.environ.pop("MPLBACKEND", None)  # the kernel inherits it; with Agg, plt.show() would draw nothing
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nbformat.write(nb, path)
    return seconds


def minutes(seconds: float) -> str:
    """How the README shows a run time: minutes with one decimal."""
    return f"{seconds / 60:.1f}"


def update_readme(readme: pathlib.Path, times: dict[str, float]) -> int:
    """Rewrite the minutes column of the README's notebook table from ``times``; return rows changed."""
    text = readme.read_text()

    def row(m: re.Match) -> str:
        name = m.group("name")
        return m.group(1) + (minutes(times[name]) if name in times else m.group("minutes")) + m.group(4)

    new, n = ROW.subn(row, text)
    readme.write_text(new)
    return n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=pathlib.Path)
    parser.add_argument("--times", type=pathlib.Path, help="JSON file to merge the wall times into")
    parser.add_argument("--readme", type=pathlib.Path, help="README whose notebook table gets the minutes")
    args = parser.parse_args(argv)
    times = json.loads(args.times.read_text()) if args.times and args.times.exists() else {}
    for path in args.notebooks:
        seconds = execute_in_place(path)
        times[path.name] = round(seconds, 1)
        print(f"{path.name:55s} {seconds:6.1f} s", flush=True)
        if args.times:  # saved after every notebook, so an interrupted run keeps what it measured
            args.times.write_text(json.dumps(dict(sorted(times.items())), indent=1) + "\n")
    if args.readme:
        print(f"{args.readme}: {update_readme(args.readme, times)} notebook rows")


if __name__ == "__main__":
    main()
