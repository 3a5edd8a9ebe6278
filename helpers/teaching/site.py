"""Render the collection to a static HTML site with nbconvert (``make site``).

Every notebook listed in the README's table becomes ``<name>.html`` with its stored outputs and plots
(nbconvert's ``lab`` template, images embedded); the index page is the README's table in its order,
and the glossary gets a page of its own. The index and glossary are rendered by the same exporter
(from one-cell markdown notebooks), so every page has the same look. Links between notebooks and to
the glossary are rewritten to the HTML pages. ``python -m helpers.teaching.site --readme README.md
--out build/site``.
"""

from __future__ import annotations

import argparse
import pathlib
import re

import nbformat
from nbconvert import HTMLExporter

TABLE = re.compile(r"^\| notebook \|.*?\n(?:\|.*\n?)+", re.M)
ROW = re.compile(r"^\| \[(?P<title>[^\]]+)\]\(notebooks/(?P<name>[^)]+\.ipynb)\) \|", re.M)
LINK = re.compile(r'href="(?:\.\./)?(?:notebooks/)?(?P<stem>[0-9]{2}_[A-Za-z0-9_]+)\.ipynb(?P<anchor>#[^"]*)?"')
GLOSSARY_LINK = re.compile(r'href="(?:\.\./)?(?:notebooks/)?GLOSSARY\.md(?P<anchor>#[^"]*)?"')


def notebook_order(readme: pathlib.Path) -> list[str]:
    """The notebook file names in the order of the README's table."""
    names = [m.group("name") for m in ROW.finditer(readme.read_text())]
    if not names:
        raise ValueError(f"{readme} has no notebook table rows like '| [00 · Title](notebooks/00_x.ipynb) |'")
    return names


def _html_links(html: str) -> str:
    html = LINK.sub(lambda m: f'href="{m.group("stem")}.html{m.group("anchor") or ""}"', html)
    return GLOSSARY_LINK.sub(lambda m: f'href="glossary.html{m.group("anchor") or ""}"', html)


def _markdown_page(exporter: HTMLExporter, title: str, markdown: str) -> str:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(markdown)])
    nb.metadata["title"] = title
    return exporter.from_notebook_node(nb)[0]


def index_markdown(readme: pathlib.Path) -> str:
    """The index page: the README's title and notebook table, linking the rendered pages."""
    text = readme.read_text()
    title = text.splitlines()[0]
    table = TABLE.search(text)
    if table is None:
        raise ValueError(f"{readme} has no notebook table (a line starting with '| notebook |')")
    rows = table.group(0).replace("](notebooks/", "](")
    return (f"{title}\n\nThe notebooks with the outputs of their last committed run, in the order of the "
            f"README's table. The [glossary](GLOSSARY.md) maps paper symbols to code names.\n\n{rows}")


def build(readme: pathlib.Path, out: pathlib.Path) -> list[pathlib.Path]:
    """Write the site into ``out``; return the pages written (index first)."""
    notebooks = readme.parent / "notebooks"
    exporter = HTMLExporter(template_name="lab")
    out.mkdir(parents=True, exist_ok=True)
    pages = [out / "index.html"]
    pages[0].write_text(_html_links(_markdown_page(exporter, "DeepSeek from scratch", index_markdown(readme))))
    glossary = notebooks / "GLOSSARY.md"
    if glossary.exists():
        pages.append(out / "glossary.html")
        pages[-1].write_text(_html_links(_markdown_page(exporter, "Glossary", glossary.read_text())))
    for name in notebook_order(readme):
        path = notebooks / name
        if not path.exists():
            raise ValueError(f"the README's table lists {name}, which is not in {notebooks}")
        html, _ = exporter.from_filename(str(path))
        pages.append(out / path.with_suffix(".html").name)
        pages[-1].write_text(_html_links(html))
    return pages


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=pathlib.Path, default=pathlib.Path("README.md"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("build/site"), help="folder for the pages")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {str(args.out)!r} exists and is not a folder")
    if not args.readme.is_file():
        parser.error(f"argument --readme: {str(args.readme)!r} is not a file; run from the repository root or "
                     "pass --readme path/to/README.md")
    pages = build(args.readme, args.out)
    print(f"{len(pages)} pages in {args.out}; open {args.out / 'index.html'}")


if __name__ == "__main__":
    main()
