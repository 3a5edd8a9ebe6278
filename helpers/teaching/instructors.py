"""Write the generated parts of INSTRUCTORS.md, so they cannot drift from the code and the last browser run.

* between ``<!-- BEGIN mistakes -->`` and ``<!-- END mistakes -->``: for every exercise checker (every
  :class:`~helpers.teaching.checks.Checker` in ``helpers.moe.checks`` and ``helpers.mla.checks``), the
  notebook that uses it, the first hint a learner sees on the stub, and each known mistake with the
  message the checker then gives (``checker.mistakes``);
* between ``<!-- BEGIN answers -->`` and ``<!-- END answers -->``: where the folded answer keys of the
  open questions are (notebook and section);
* between ``<!-- BEGIN run-times -->`` and ``<!-- END run-times -->``: the seconds each notebook's Run
  All took in JupyterLab in Chromium (``make test-browser``, saved in ``tests/browser/run_all_seconds.json``;
  ``--times build/browser/times.json`` merges a new run's figures in first).

``python -m helpers.teaching.instructors INSTRUCTORS.md [--times build/browser/times.json]``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re

from helpers.teaching.checks import Checker

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAVED_TIMES = ROOT / "tests" / "browser" / "run_all_seconds.json"


def checkers() -> list[tuple[str, Checker]]:
    """Every exercise checker of the collection, as (import name, checker)."""
    from helpers.dsa import checks as dsa_checks
    from helpers.mla import checks as mla_checks
    from helpers.moe import checks as moe_checks

    found = []
    for module, prefix in ((moe_checks, "moe_checks."), (mla_checks, ""), (dsa_checks, "")):
        for attr in sorted(dir(module)):
            value = getattr(module, attr)
            if isinstance(value, Checker):
                found.append((value.checker_name or prefix + attr, value))
    return found


def listed(notebooks: pathlib.Path) -> list[pathlib.Path]:
    """The notebooks of the README's table, in its order (the collection a workshop uses)."""
    from helpers.teaching.site import notebook_order

    return [notebooks / name for name in notebook_order(notebooks.parent / "README.md")]


def notebooks_using(checker_name: str, notebooks: pathlib.Path) -> list[str]:
    call = re.compile(rf"\b{re.escape(checker_name.split('.')[-1])}\(")
    return [p.name for p in listed(notebooks) if call.search(p.read_text())]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def mistakes_section(notebooks: pathlib.Path) -> str:
    """Markdown: per notebook and exercise, the stub's first hint and every known mistake's message."""
    rows = []
    for name, checker in checkers():
        used = notebooks_using(name, notebooks)
        if used:  # a checker of a notebook not yet in the README's table waits for its row
            at = (notebooks / used[0]).read_text().find(name.split(".")[-1] + "(")
            rows.append(((used[0], at), name, checker, used))
    out = []
    for _, name, checker, used in sorted(rows, key=lambda r: r[0]):
        where = ", ".join(f"[{u[:2]}](notebooks/{u})" for u in used) or "no notebook"
        out.append(f"#### `{checker.name}`: notebook {where}, checker `{name}` ({len(checker.mistakes)} known mistakes)\n")
        out.append(f"First hint, shown on the stub: *{_one_line(checker.nudge)}* "
                   f"(the full hint: `{name}.show_hint()`). The mistakes it names:\n")
        out.extend(f"- **{m.name}**: {_one_line(m.message)}" for m in checker.mistakes)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def answers_section(notebooks: pathlib.Path) -> str:
    """Markdown: where the folded answer keys of the open questions are, by notebook and section."""
    out = []
    for path in listed(notebooks):
        heading, where = "(top)", []
        for cell in json.loads(path.read_text())["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] != "markdown":
                continue
            for line in source.splitlines():
                if line.startswith("#"):
                    heading = line.lstrip("#").strip()
            where += [heading] * source.count("<!-- BEGIN ANSWER -->")
        if where:
            sections = "; ".join(f"{n}x {h}" if (n := where.count(h)) > 1 else h for h in dict.fromkeys(where))
            out.append(f"- [{path.name[:2]}](notebooks/{path.name}): {len(where)} answer key(s), in: {sections}")
        else:
            out.append(f"- [{path.name[:2]}](notebooks/{path.name}): no open question with an answer key")
    return "\n".join(out) + "\n"


def times_section(times: dict[str, float]) -> str:
    if not times:
        return "*(no browser run saved yet: run `make test-browser`, then this script with `--times`)*\n"
    lines = ["| notebook | Run All in JupyterLab (s) |", "|---|---:|"]
    lines += [f"| {name.removesuffix('.ipynb')} | {seconds:.0f} |" for name, seconds in sorted(times.items())]
    return "\n".join(lines) + "\n"


def replace_block(text: str, tag: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- BEGIN {tag} -->\n).*?(<!-- END {tag} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"add '<!-- BEGIN {tag} -->' and '<!-- END {tag} -->' lines where the block goes")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def render(text: str, notebooks: pathlib.Path = ROOT / "notebooks", times_file: pathlib.Path = SAVED_TIMES) -> str:
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    text = replace_block(text, "mistakes", mistakes_section(notebooks))
    text = replace_block(text, "answers", answers_section(notebooks))
    return replace_block(text, "run-times", times_section(times))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=pathlib.Path, help="INSTRUCTORS.md")
    parser.add_argument("--times", type=pathlib.Path, help="times.json of a browser run, merged into the saved ones")
    args = parser.parse_args(argv)
    if args.times:
        saved = json.loads(SAVED_TIMES.read_text()) if SAVED_TIMES.exists() else {}
        saved.update({k: v for k, v in json.loads(args.times.read_text()).items() if k[:2].isdigit()})
        SAVED_TIMES.write_text(json.dumps(dict(sorted(saved.items())), indent=1) + "\n")
    args.file.write_text(render(args.file.read_text()))
    print(f"{args.file}: mistakes of {len(checkers())} checkers, run times written")


if __name__ == "__main__":
    main()
