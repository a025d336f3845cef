"""Clean a book notebook for committing, and optionally strip its outputs.

    python tools/strip_notebook.py book/*.ipynb                    # clean: outputs kept
    python tools/strip_notebook.py --remove-outputs book/05_*.ipynb  # also drop the outputs nbval does not check

The chapters are committed with the outputs of a full run (``tools/execute_notebooks.py`` writes them), so a
reader sees every result without running anything. Cleaning removes what a run leaves besides its results:
execution timing metadata of every cell and the saved ipywidgets state of the notebook (megabytes of view state
the book does not use). ``--remove-outputs`` also empties every code cell that nbval does not check (a comment
line ``# NBVAL_CHECK_OUTPUT``, or the tag ``nbval-check-output``: those keep their outputs and execution counts,
which ``pytest --nbval-lax`` compares against a fresh run), for a notebook that is being rewritten before its
next full run. Everything else (cell ids, tags, the kernelspec, the JSON layout of nbformat: indent 1, sorted
keys) is kept, so a cleaned notebook diffs cleanly. A file that is already clean is left untouched.
tests/test_book_config.py checks the committed result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CHECK_MARKER = "NBVAL_CHECK_OUTPUT"
CHECK_TAG = "nbval-check-output"
WIDGET_STATE_KEY = "widgets"  # notebook metadata: {"application/vnd.jupyter.widget-state+json": {...}}
CELL_METADATA_DROPPED = ("execution", "collapsed", "scrolled")  # run timings and view state


def source_text(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def nbval_checks_output(cell: dict) -> bool:
    """nbval's rule: a comment line reading ``# NBVAL_CHECK_OUTPUT``, or the cell tag."""
    for line in source_text(cell).splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and stripped.lstrip("#").strip() == CHECK_MARKER:
            return True
    return CHECK_TAG in cell.get("metadata", {}).get("tags", [])


def clean(notebook: dict) -> dict:
    """The notebook (changed in place and returned) without timing metadata and saved widget state."""
    if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list):
        raise ValueError("not a Jupyter notebook: expected a JSON object with a 'cells' list")
    notebook.get("metadata", {}).pop(WIDGET_STATE_KEY, None)
    for cell in notebook["cells"]:
        metadata = cell.get("metadata", {})
        for key in CELL_METADATA_DROPPED:
            metadata.pop(key, None)
    return notebook


def strip(notebook: dict) -> dict:
    """The notebook (changed in place and returned), cleaned, with only nbval-checked outputs kept."""
    for cell in clean(notebook)["cells"]:
        if cell.get("cell_type") == "code" and not nbval_checks_output(cell):
            cell["outputs"] = []
            cell["execution_count"] = None
    return notebook


def dumps(notebook: dict) -> str:
    """JSON in nbformat's own layout (what Jupyter writes)."""
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def strip_file(path: Path, remove_outputs: bool = False) -> bool:
    """Clean (or strip) one notebook file in place; True if it changed."""
    text = path.read_text(encoding="utf-8")
    try:
        notebook = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    stripped = dumps(strip(notebook) if remove_outputs else clean(notebook))
    if stripped == text:
        return False
    path.write_text(stripped, encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path, help="notebook files (.ipynb) to clean in place")
    parser.add_argument("--remove-outputs", action="store_true",
                        help="also remove the outputs of every cell nbval does not check")
    args = parser.parse_args(argv)
    for path in args.notebooks:
        if path.suffix != ".ipynb" or not path.is_file():
            parser.error(f"{path} is not an .ipynb file")
    for path in args.notebooks:
        changed = strip_file(path, args.remove_outputs)
        done = "stripped" if args.remove_outputs else "cleaned"
        print(f"{path}: {done if changed else 'already ' + done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
