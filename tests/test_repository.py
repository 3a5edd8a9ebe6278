"""The collection's own conventions: every notebook is listed, links resolve, outputs are clean."""

import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))


def _links(text: str) -> set[str]:
    return set(re.findall(r"\(([^)\s]+\.(?:ipynb|md))\)", text))


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
