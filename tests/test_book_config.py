"""The book's configuration and the shape of its notebooks, checked without executing anything.

- every notebook in book/ is listed in book/_toc.yml, and every entry of the toc exists;
- the book is built offline: notebooks are executed by the build, and no launch button needs the network;
- every notebook draws its figures with ``use_site_renderer()`` (the site serves plotly.js once, offline), and
  live widget cells leave no dead output in the static book;
- notebooks are stored with the outputs of one clean run from top to bottom (``tools/execute_notebooks.py``), so
  that a reader sees every result without installing anything: every code cell executed in order, every figure
  with a static image, no errors, warnings, temporary paths or object reprs, no output left by a live widget,
  and the outputs of all chapters together within a size budget; the cells whose output nbval checks
  (``# NBVAL_CHECK_OUTPUT``) keep theirs, which ``pytest --nbval-lax`` compares against a fresh run;
- every notebook that runs torch sets its thread count, so that the run times it states and the numbers it
  asserts hold on a 2-core machine (two threads per process on two shared cores can be many times slower).

Running the notebooks themselves is nbval's job: ``pytest --nbval-lax --nbval-current-env book/``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

BOOK = Path(__file__).resolve().parent.parent / "book"
SKIPPED_DIRS = {"_build", ".ipynb_checkpoints"}
NOTEBOOKS = sorted(p for p in BOOK.rglob("*.ipynb") if not SKIPPED_DIRS & set(p.relative_to(BOOK).parts))
RENDERER_ASSIGNMENT = re.compile(r"""^\s*(?:plotly\.io|pio)\.renderers\.default\s*=\s*["']([^"']+)["']""", re.M)
MAX_NOTEBOOK_BYTES = 2_000_000  # a chapter of prose, code and the outputs of a run, figures as JSON + PNG
MAX_OUTPUT_BYTES = 10_000_000  # the stored outputs of all chapters together
PLOTLY_MIME = "application/vnd.plotly.v1+json"
REFUSED_TEXT = {"a temporary path": re.compile(r"(?<![\w.])/(?:tmp|var/folders|private/var)/"),
                "an object repr": re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>"),
                "a warning": re.compile(r"\b\w*Warning\b:")}


def load_yaml(name: str) -> dict:
    return yaml.safe_load((BOOK / name).read_text())


def toc_files(node) -> list[str]:
    """Every ``file:`` entry of a jb-book toc (root, parts, chapters, sections), in order."""
    found = []
    if isinstance(node, dict):
        for key in ("root", "file"):
            if key in node:
                found.append(str(node[key]))
        for key in ("parts", "chapters", "sections"):
            for child in node.get(key, []) or []:
                found += toc_files(child)
    return found


def resolve(entry: str) -> Path | None:
    """The file a toc entry names (an extension is optional in jb-book tocs), or None."""
    for candidate in (BOOK / entry, BOOK / f"{entry}.ipynb", BOOK / f"{entry}.md"):
        if candidate.is_file():
            return candidate
    return None


def code_cells(path: Path) -> list[dict]:
    notebook = json.loads(path.read_text())
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def nbval_checks_output(cell: dict) -> bool:
    """nbval's rule: a comment line ``# NBVAL_CHECK_OUTPUT`` anywhere in the cell, or the tag."""
    comments = [line.strip().lstrip("#").strip() for line in source(cell).splitlines() if line.strip().startswith("#")]
    return "NBVAL_CHECK_OUTPUT" in comments or "nbval-check-output" in cell.get("metadata", {}).get("tags", [])


def test_there_is_a_book_with_notebooks():
    assert (BOOK / "_config.yml").is_file() and (BOOK / "_toc.yml").is_file() and (BOOK / "intro.md").is_file()
    assert NOTEBOOKS, f"no notebook found in {BOOK}"


def test_toc_is_a_jupyter_book_toc_rooted_at_the_intro():
    toc = load_yaml("_toc.yml")
    assert toc["format"] == "jb-book", f"expected format jb-book, got {toc.get('format')!r}"
    assert Path(toc["root"]).stem == "intro"


def test_every_toc_entry_exists_once():
    entries = toc_files(load_yaml("_toc.yml"))
    missing = [entry for entry in entries if resolve(entry) is None]
    assert not missing, f"_toc.yml lists files that do not exist in book/: {missing}"
    resolved = [resolve(entry) for entry in entries]
    duplicates = sorted({str(p.relative_to(BOOK)) for p in resolved if resolved.count(p) > 1})
    assert not duplicates, f"_toc.yml lists these files more than once: {duplicates}"


def test_every_notebook_is_in_the_toc():
    listed = {resolve(entry) for entry in toc_files(load_yaml("_toc.yml"))}
    unlisted = [str(p.relative_to(BOOK)) for p in NOTEBOOKS if p not in listed]
    assert not unlisted, f"notebooks missing from book/_toc.yml: {unlisted}"


def test_config_builds_offline():
    config = load_yaml("_config.yml")
    assert config["title"] == "minimoe"
    # the build runs every chapter again, so the site shows what the code does now, not the stored outputs
    assert config["execute"]["execute_notebooks"] in ("cache", "force", "auto"), config["execute"]
    launch = config.get("launch_buttons", {})
    for key in ("binderhub_url", "jupyterhub_url", "colab_url"):
        assert not launch.get(key), f"launch_buttons.{key} needs the network: {launch.get(key)!r}"
    assert not launch.get("thebe", False), "Thebe needs a remote kernel"
    html = config.get("html", {})
    for key in ("use_repository_button", "use_issues_button", "use_edit_page_button"):
        assert not html.get(key, False), f"html.{key} links to a remote repository"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_draws_figures_for_the_site(path):
    sources = "\n".join(source(cell) for cell in code_cells(path))
    assert "use_site_renderer()" in sources, (
        f"{path.name} never calls minimoe.widgets.site.use_site_renderer(): its figures would be missing from "
        "the static book, or would each embed their own copy of plotly.js")
    assert not RENDERER_ASSIGNMENT.findall(sources), f"{path.name} sets its own plotly renderer"


def test_the_site_serves_plotly_js_once_and_loads_nothing_from_another_host():
    config = load_yaml("_config.yml")
    sphinx = config["sphinx"]
    assert "offline_site" in sphinx["local_extensions"]  # book/_ext/offline_site.py: one plotly.js, lean MathJax
    assert sphinx["config"]["nb_ipywidgets_js"] == {}  # no require.js / widget manager from a CDN
    assert "sphinx-mathjax-offline" in sphinx["extra_extensions"]  # MathJax from the site too


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_live_widget_cells_leave_no_dead_output_in_the_site(path):
    for cell in code_cells(path):
        last = (source(cell).strip().splitlines() or [""])[-1]
        if re.match(r"^\w+Widget\(", last):  # a cell that displays an ipywidgets panel
            assert "remove-output" in cell.get("metadata", {}).get("tags", []), (
                f"{path.name}: the widget cell {last[:40]!r} would show a dead output in the static book; tag it "
                "remove-output (its static figure is drawn by another cell)")


def output_text(output: dict) -> str:
    parts = ["".join(output.get("text", ""))]
    parts += ["".join(value) for mime, value in output.get("data", {}).items() if mime.startswith("text/")]
    return "\n".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_checked_cells_keep_the_output_nbval_compares(path):
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.name} is {path.stat().st_size:,} bytes"
    for index, cell in enumerate(code_cells(path)):
        first_line = (source(cell).splitlines() or [""])[0][:60]
        if nbval_checks_output(cell):
            assert cell["outputs"], f"{path.name} code cell {index} ({first_line!r}) is NBVAL_CHECK_OUTPUT but " \
                                    "has no stored output to compare with"
            assert cell["execution_count"] is not None, (
                f"{path.name} code cell {index} ({first_line!r}) has outputs but no execution_count: nbval "
                "reports 'Unrun reference cell has outputs'")
            for output in cell["outputs"]:
                assert output["output_type"] != "error", f"{path.name} code cell {index} stored an error"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_with_the_outputs_of_one_clean_run(path):
    cells = code_cells(path)
    counts = [cell["execution_count"] for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: execution counts {counts} are not one run from top to bottom: "
        f"python tools/execute_notebooks.py book/{path.name}")
    for index, cell in enumerate(cells):
        where = f"{path.name} code cell {index} ({(source(cell).splitlines() or [''])[0][:60]!r})"
        if "remove-output" in cell.get("metadata", {}).get("tags", []):
            assert not cell["outputs"], f"{where}: a live widget's output is stored; the book hides it"
        for output in cell["outputs"]:
            assert output["output_type"] != "error", f"{where} stored an error"
            assert output.get("name") != "stderr", f"{where} stored text on stderr: {output_text(output)[:200]!r}"
            data = output.get("data", {})
            assert "application/vnd.jupyter.widget-view+json" not in data, f"{where} stored a widget view"
            if PLOTLY_MIME in data or "image/png" in data:
                assert "image/png" in data, f"{where}: a figure without a static image (the repository's web " \
                                            "view and other static viewers draw only the image)"
                assert "text/html" not in data, f"{where}: the site's figure HTML is stored (it draws nothing " \
                                                "without the site's plotly.js, and viewers prefer it to the image)"
                assert len(json.dumps(data.get(PLOTLY_MIME, ""))) <= 100_000, f"{where}: a figure's JSON is large"
            for what, pattern in REFUSED_TEXT.items():
                match = pattern.search(output_text(output))
                assert not match, f"{where} shows {what} to the reader: {match.group(0)!r}"


def test_the_stored_outputs_of_all_chapters_stay_small():
    sizes = {path.name: sum(len(json.dumps(cell["outputs"])) for cell in code_cells(path)) for path in NOTEBOOKS}
    assert sum(sizes.values()) <= MAX_OUTPUT_BYTES, f"stored outputs take {sum(sizes.values()):,} bytes: {sizes}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_title_and_version_cell(path):
    notebook = json.loads(path.read_text())
    first = notebook["cells"][0]
    assert first["cell_type"] == "markdown" and source(first).lstrip().startswith("# "), \
        f"{path.name} must start with a markdown title ('# ...')"
    assert any("NBVAL_IGNORE_OUTPUT" in source(cell) and "__version__" in source(cell) for cell in code_cells(path)), \
        f"{path.name} needs a version cell marked # NBVAL_IGNORE_OUTPUT (STYLE.md, 'The book')"
    assert notebook["metadata"].get("kernelspec", {}).get("name") == "python3", \
        f"{path.name}: the kernelspec must be python3 so nbval and the book build find the kernel"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_sets_the_torch_thread_count(path):
    code = "\n".join(source(cell) for cell in code_cells(path))
    if re.search(r"^\s*import torch\b", code, re.M):
        assert re.search(r"^\s*torch\.set_num_threads\(", code, re.M), \
            f"{path.name} imports torch but never calls torch.set_num_threads(...)"


MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def test_every_diagram_is_drawn_by_the_script_and_shown_by_a_chapter():
    shown = set()
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "markdown":
                for target in MARKDOWN_IMAGE.findall(source(cell)):
                    assert not target.startswith(("http://", "https://", "/")), f"{path.name}: {target} is not local"
                    assert (BOOK / target).is_file(), f"{path.name} shows {target}, which does not exist"
                    shown.add((BOOK / target).resolve())
    figures = BOOK / "figures"
    stored = {p.resolve() for p in figures.glob("*") if p.is_file()}
    assert stored <= shown, f"diagrams no chapter shows: {sorted(p.name for p in stored - shown)}"
    drawn = set(re.findall(r'save\(figure, "(\w+)"\)', (BOOK.parent / "tools" / "draw_figures.py").read_text()))
    assert {p.stem for p in stored} == drawn, "book/figures/ and tools/draw_figures.py disagree"
    assert all(p.suffix == ".png" and p.stat().st_size < 150_000 for p in stored)  # the repository's web view shows PNG
