"""Re-run notebooks in place, top to bottom, so committed outputs come from one clean run.

``python -m helpers.teaching.execute notebooks/*.ipynb`` (``make execute``) prints each notebook's wall time.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import nbformat
from nbclient import NotebookClient


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=pathlib.Path)
    args = parser.parse_args(argv)
    for path in args.notebooks:
        print(f"{path.name:55s} {execute_in_place(path):6.1f} s", flush=True)


if __name__ == "__main__":
    main()
