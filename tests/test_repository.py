"""The collection's own conventions: every notebook is listed, links resolve, outputs are clean."""

import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))


def _links(text: str) -> set[str]:
    return set(re.findall(r"\]\(([^)\s]+\.(?:ipynb|md))\)", text))  # markdown links: [text](target)


def test_readme_and_orientation_map_list_every_notebook():
    readme = (ROOT / "README.md").read_text()
    orientation = "".join("".join(c["source"]) for c in
                          json.loads((ROOT / "notebooks" / "00_why_deepseek_is_cheap.ipynb").read_text())["cells"])
    for name in NOTEBOOKS:
        assert f"notebooks/{name}" in readme, f"README's notebook table does not list {name}"
        assert f"({name})" in orientation, f"the map in notebook 00 does not link {name}"


def test_links_resolve():
    for link in _links((ROOT / "README.md").read_text()):
        assert (ROOT / link).exists(), f"README links to missing {link}"
    for name in NOTEBOOKS:
        nb = json.loads((ROOT / "notebooks" / name).read_text())
        text = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
        for link in _links(text):
            assert (ROOT / "notebooks" / link).exists(), f"{name} links to missing {link}"
        assert "GLOSSARY.md" in text, f"{name} does not link the glossary"


def test_committed_notebooks_are_one_clean_run():
    for name in NOTEBOOKS:
        nb = json.loads((ROOT / "notebooks" / name).read_text())
        counts = [c["execution_count"] for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
        assert counts == list(range(1, len(counts) + 1)), f"{name}: execution counts {counts}; run `make execute`"
        for c in nb["cells"]:
            for out in c.get("outputs", []):
                assert out["output_type"] != "error", f"{name} has an error output"
                assert "/work/" not in json.dumps(out) and "/home/" not in json.dumps(out), f"{name} shows a machine path"


def test_readme_minutes_are_those_of_the_last_execute_run():
    """`make execute` saves each notebook's wall time and writes the README's minutes from them."""
    from helpers.teaching.execute import ROW, minutes

    times = json.loads((ROOT / "notebooks" / "results" / "execute_times.json").read_text())
    rows = {m.group("name"): m.group("minutes") for m in ROW.finditer((ROOT / "README.md").read_text())}
    assert set(rows) == set(NOTEBOOKS), "the README's notebook table must list every notebook once"
    for name in NOTEBOOKS:
        assert name in times, f"{name} has no saved run time; run `make execute`"
        assert rows[name] == minutes(times[name]), f"README minutes of {name} are not the last run's; run `make execute`"


DRAWS = re.compile(r"\b(plot_\w+|draw_\w+|axes)\(|plt\.(subplots|figure|show)\(|"
                   r"\b(ax\w*|plt)\.(imshow|plot|bar|barh|scatter|hist|matshow|loglog|semilogy|pcolormesh)\(")


def test_notebooks_that_draw_hold_their_pictures():
    """A cell that draws must carry its image (a kernel with MPLBACKEND=Agg would store none)."""
    for name in NOTEBOOKS:
        nb = json.loads((ROOT / "notebooks" / name).read_text())
        for i, c in enumerate(nb["cells"]):
            if c["cell_type"] == "code" and DRAWS.search("".join(c["source"])):
                images = [o for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
                assert images, f"{name}, cell {i} draws but holds no image; re-execute it with `make execute`"


def test_readme_benchmark_figures_are_the_saved_results():
    """The README's benchmark blocks are written from notebooks/results/ by `make bench`."""
    from helpers.teaching.readme import render

    readme = (ROOT / "README.md").read_text()
    assert "<!-- BEGIN moe-bench -->" in readme
    assert render(readme) == readme, "README benchmark figures differ from notebooks/results/; run " \
        "`python -m helpers.teaching.readme README.md`"


def test_notebook_code_fits_a_laptop_browser():
    """JupyterLab at 1366 pixels with the file browser open shows about 117 characters of code."""
    for name in NOTEBOOKS:
        nb = json.loads((ROOT / "notebooks" / name).read_text())
        for i, c in enumerate(nb["cells"]):
            if c["cell_type"] == "code":
                for line in "".join(c["source"]).splitlines():
                    assert len(line) <= 117, f"{name}, cell {i}: a {len(line)}-character line is cut off on a laptop"
