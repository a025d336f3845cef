"""The course says only what its cells show: checks on the text of the book, without executing it.

Running the chapters is nbval's job, and each chapter asserts, in the cells that print them, the numbers its
prose quotes: a changed output that contradicts the text fails there. This file checks that the prose keeps
to that rule, and that its sources can be opened:

- every decimal number and percentage in a chapter's prose appears in that chapter's code (as an asserted value
  or a constant the code runs with), in an output nbval compares (``# NBVAL_CHECK_OUTPUT``), in a recorded file
  of the repository that the same paragraph names, or in a paragraph that cites its source (``{cite}``);
- every citation key used by the book or by a module docstring (``[key]``) is an entry of book/references.bib,
  and every entry there is cited somewhere;
- every repository path the book names exists;
- the book never points at files outside the repository or describes the team's process, and no module
  docstring points at files outside the repository.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
NOTEBOOKS = sorted(p for p in BOOK.glob("*.ipynb"))
BIB = BOOK / "references.bib"
PACKAGE_FILES = sorted([*(ROOT / "minimoe").rglob("*.py"), *(ROOT / "widgets").rglob("*.py")])

CITE = re.compile(r"\{cite(?::\w+)?\}`([^`]+)`")
DOCSTRING_CITE = re.compile(r"\[([a-z][a-z-]*\d{4}[a-z0-9]*)\]")
BIB_KEY = re.compile(r"^@\w+\{([^,\s]+),", re.M)
REPO_PATH = re.compile(r"(?<![\w/.$])((?:benchmarks|checkpoints|tests|tools|minimoe|widgets|book)/[\w.\-/]*[\w])")
NUMBER = re.compile(r"(?<![\w.\-−])([-−]?\d+\.\d+%?|\d+%)(?![\w.]*\d)")
# words after which a decimal is a name, not a measurement: "section 4.7", "Llama 3.1", "Python 3.11", ...
NAME_BEFORE = re.compile(r"(?:section|sections|chapter|§|arxiv|llama|python|torch|transformers|version|cuda|nccl|qwen\d*)"
                         r"[\s~]*$", re.I)
OUTSIDE_FILES = ("REFERENCES.md", "ARCHITECTURE.md", "MISSION.md", "STYLE.md", "ENVIRONMENT.md", "../shared")
PROCESS_WORDS = ("paper 2", "PASS or MISS", "PASS / MISS", "outside this repository", "the issue", "the lead")


def cells(path: Path, kind: str) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == kind]


def text(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def checked_output(cell: dict) -> bool:
    return any(line.strip().lstrip("#").strip() == "NBVAL_CHECK_OUTPUT" for line in text(cell).splitlines()
               if line.strip().startswith("#"))


def prose(markdown: str) -> str:
    """The sentences of a markdown cell: no code, no math, no headings, no citation roles or links."""
    markdown = re.sub(r"```.*?```", " ", markdown, flags=re.S)  # code fences
    markdown = re.sub(r"\$\$.*?\$\$", " ", markdown, flags=re.S)  # display math
    markdown = re.sub(r"\$[^$\n]+\$", " ", markdown)  # inline math
    markdown = CITE.sub(" ", markdown)
    markdown = re.sub(r"`[^`\n]*`", " ", markdown)  # inline code
    markdown = re.sub(r"https?://\S+", " ", markdown)
    return "\n".join(line for line in markdown.splitlines() if not line.lstrip().startswith("#"))


def quoted_numbers(paragraph: str) -> list[str]:
    """Decimals and percentages of a paragraph's prose, as written (section numbers and versions left out)."""
    found = []
    for match in NUMBER.finditer(prose(paragraph)):
        if not NAME_BEFORE.search(prose(paragraph)[: match.start()]):
            found.append(match.group(1))
    return found


def value(number: str) -> float:
    return abs(float(number.replace("−", "-").rstrip("%")))


def code_constants(path: Path) -> set[float]:
    """Every numeric constant of the notebook's code (absolute values), as the code cells parse."""
    constants = set()
    for cell in cells(path, "code"):
        source = "\n".join(line for line in text(cell).splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                    and not isinstance(node.value, bool):
                constants.add(abs(float(node.value)))
    return constants


def checked_outputs(path: Path) -> str:
    parts = []
    for cell in cells(path, "code"):
        if checked_output(cell):
            for output in cell.get("outputs", []):
                parts.append("".join(output.get("text", "")))
                parts.append("".join(output.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def backed(number: str, constants: set[float], checked: str, paragraph: str) -> bool:
    if "{cite" in paragraph:
        return True
    literal = number.replace("−", "-").lstrip("-").rstrip("%")
    candidates = {value(number)} | ({value(number) / 100} if number.endswith("%") else set())
    if any(math.isclose(c, k, rel_tol=1e-9, abs_tol=1e-12) for c in candidates for k in constants):
        return True
    if re.search(rf"(?<![\d.]){re.escape(literal)}(?![\d])", checked):
        return True
    for name in REPO_PATH.findall(paragraph):
        path = ROOT / name
        if path.is_file() and re.search(rf"(?<![\d.]){re.escape(literal)}(?![\d])", path.read_text(errors="ignore")):
            return True
    return False


def paragraphs(markdown: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", markdown) if p.strip()]


def book_texts() -> list[tuple[str, str]]:
    """(where, markdown) for the intro, the other markdown pages and every notebook's markdown cells."""
    found = [(p.name, p.read_text()) for p in sorted(BOOK.glob("*.md"))]
    for path in NOTEBOOKS:
        found += [(f"{path.name} cell {i}", text(c)) for i, c in enumerate(cells(path, "markdown"))]
    return found


def bib_keys() -> set[str]:
    return set(BIB_KEY.findall(BIB.read_text()))


@functools.lru_cache(maxsize=None)
def docstrings(path: Path) -> str:
    tree = ast.parse(path.read_text())
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return "\n".join(doc for doc in (ast.get_docstring(n) for n in nodes) if doc)


# ---- tests ---------------------------------------------------------------------------------------------------
def test_the_parser_finds_quoted_numbers_and_skips_names():
    found = quoted_numbers("Mean $r$ 0.60 against 0.01, a 36.9% cut, Llama 3.1 and section 4.7, `0.5` in code, "
                           "{cite}`key` and 12 requests; −0.15 and 2.2x.")
    assert found == ["0.60", "0.01", "36.9%", "−0.15", "2.2"]


def test_the_backing_rules():
    assert backed("0.60", {0.6}, "", "mean r 0.60")  # an asserted constant
    assert backed("36.9%", {0.369}, "", "a 36.9% cut")  # a percentage asserted as a fraction
    assert backed("1.993", set(), "1.993 of 2 nodes", "1.993 nodes")  # an output nbval compares
    assert backed("0.70", set(), "", "correlations of 0.70 {cite}`choi2026eldr`")  # a cited source
    assert backed("324.1", set(), "", "recorded in benchmarks/results/alltoall_nccl_h200x2.txt: 324.1 GB/s")
    assert not backed("0.5", {0.598}, "0.598", "about 0.5")  # a rounded-off number that nothing states


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_number_in_the_prose_is_backed(path):
    constants, checked = code_constants(path), checked_outputs(path)
    unbacked = []
    for index, cell in enumerate(cells(path, "markdown")):
        for paragraph in paragraphs(text(cell)):
            unbacked += [f"markdown cell {index}: {number!r} in {' '.join(paragraph.split())[:90]!r}"
                         for number in quoted_numbers(paragraph) if not backed(number, constants, checked, paragraph)]
    assert not unbacked, (f"{path.name}: numbers in the prose that no cell asserts, no checked output shows, no "
                          "named repository file holds and no citation supports:\n" + "\n".join(unbacked))


def test_every_citation_key_is_in_the_bibliography():
    keys = bib_keys()
    assert len(keys) == len(BIB_KEY.findall(BIB.read_text())), "references.bib has a duplicate key"
    missing = [(where, key.strip()) for where, markdown in book_texts() for group in CITE.findall(markdown)
               for key in group.split(",") if key.strip() not in keys]
    missing += [(str(path.relative_to(ROOT)), key) for path in PACKAGE_FILES
                for key in DOCSTRING_CITE.findall(docstrings(path)) if key not in keys]
    assert not missing, f"citation keys that book/references.bib does not define: {missing}"


def test_every_bibliography_entry_is_cited():
    cited = {key.strip() for _, markdown in book_texts() for group in CITE.findall(markdown) for key in group.split(",")}
    cited |= {key for path in PACKAGE_FILES for key in DOCSTRING_CITE.findall(docstrings(path))}
    unused = sorted(bib_keys() - cited)
    assert not unused, f"references.bib entries that nothing cites (cite them or remove them): {unused}"


def test_the_bibliography_page_lists_the_entries():
    page = (BOOK / "bibliography.md").read_text()
    assert "```{bibliography}" in page
    config = (BOOK / "_config.yml").read_text()
    assert re.search(r"^bibtex_bibfiles:\s*\n\s*-\s*references\.bib", config, re.M), "_config.yml: bibtex_bibfiles"
    assert "bibliography" in (BOOK / "_toc.yml").read_text()


def test_every_repository_path_the_book_names_exists():
    missing = sorted({(where.split(" cell")[0], name) for where, markdown in book_texts()
                      for name in REPO_PATH.findall(markdown)
                      if "/_build/" not in name and not (ROOT / name).exists()})  # _build: what the book build writes
    assert not missing, f"the book names paths that are not in the repository: {missing}"


def test_the_book_points_only_inside_the_repository_and_never_at_the_process():
    found = []
    for where, markdown in book_texts():
        found += [(where, word) for word in (*OUTSIDE_FILES, *PROCESS_WORDS) if word.lower() in markdown.lower()]
    for path in NOTEBOOKS:  # code cells print text too
        for index, cell in enumerate(cells(path, "code")):
            found += [(f"{path.name} code cell {index}", word) for word in (*OUTSIDE_FILES, *PROCESS_WORDS)
                      if word.lower() in text(cell).lower()]
    assert not found, f"text that points outside the repository or at the team's process: {found}"


def test_module_docstrings_point_only_inside_the_repository():
    found = [(str(path.relative_to(ROOT)), word) for path in PACKAGE_FILES for word in OUTSIDE_FILES
             if word in docstrings(path)]
    assert not found, f"docstrings that cite files outside the repository: {found}"
