"""Run book notebooks from top to bottom and store them with their outputs, readable without installing anything.

    PYTHONPATH=. python tools/execute_notebooks.py book/01_*.ipynb book/09_*.ipynb

The chapters are committed with the outputs of a CPU run, so that a reader browsing the repository (or any
notebook viewer) sees every printed result and every figure. For each notebook, in order, one at a time:

1. execute it in a fresh ``python3`` kernel whose working directory is the notebook's folder, with one thread
   per library (``OMP_NUM_THREADS=1``) and ``PYTHONHASHSEED=0``, as the test suite runs it;
2. make every figure static: a plotly figure gains a PNG rendered by kaleido (what a static viewer such as the
   repository's web view shows) and keeps its JSON (what JupyterLab draws, interactive, when the notebook is
   opened) unless that is over ``MAX_FIGURE_JSON`` characters; the HTML ``<div>`` meant for the built site is
   dropped, since it only draws on a page that loads plotly.js. Live ipywidgets panels (cells tagged
   ``remove-output``) keep no output;
3. refuse outputs a reader should never see: errors, anything written to stderr (warnings), temporary paths,
   object reprs (``<... object at 0x...>``);
4. write it in nbformat's layout with the timing metadata and saved widget state removed
   (``tools/strip_notebook.py``), so that a re-run diffs only where results changed.

The built site does not read these outputs: ``jupyter-book build`` runs every chapter again.

Needs the ``outputs`` extra (kaleido, ``pip install -e '.[outputs]'``) and a Chromium for kaleido to drive
(Debian: ``apt-get install chromium``); nothing is downloaded. Exit status 1, naming the notebook and the cell,
when a notebook fails or an output is refused; the file is then left as it was.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strip_notebook import clean, dumps  # noqa: E402  (the same cleaning as tools/strip_notebook.py)

PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
PNG_WIDTH = 760  # pixels, for figures whose layout leaves the width to the page; a chapter's text column
MAX_FIGURE_JSON = 100_000  # characters: a figure's data (e.g. a histogram of every raw value) beyond this is
# stored as its PNG only; re-running the cell brings the interactive figure back
REFUSED_TEXT = {  # what an output must not show a reader, and why
    "a temporary path": re.compile(r"(?<![\w.])/(?:tmp|var/folders|private/var)/"),
    "an object repr": re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>"),
    "a warning": re.compile(r"\b\w*Warning\b:"),
}


class RefusedOutput(ValueError):
    pass


def output_text(output: dict) -> str:
    text = output.get("text", "")
    parts = ["".join(text) if isinstance(text, list) else text]
    for mime, value in output.get("data", {}).items():
        if mime.startswith("text/"):
            parts.append("".join(value) if isinstance(value, list) else value)
    if output.get("output_type") == "error":
        parts.append(f"{output.get('ename')}: {output.get('evalue')}")
    return "\n".join(parts)


def refusal(output: dict) -> str | None:
    """Why this output must not be committed, or None."""
    if output.get("output_type") == "error":
        return f"an error ({output.get('ename')}: {output.get('evalue')})"
    if output.get("output_type") == "stream" and output.get("name") == "stderr":
        return f"text on stderr ({output_text(output).strip()[:200]!r})"
    text = output_text(output)
    for what, pattern in REFUSED_TEXT.items():
        match = pattern.search(text)
        if match:
            line = next(line for line in text.splitlines() if match.group(0) in line)
            return f"{what} ({line.strip()[:200]!r})"
    return None


def png_of(figure: dict) -> str:
    """A plotly figure (its JSON) drawn as a PNG by kaleido, base64-encoded as notebooks store images."""
    import plotly.io as pio

    width = figure.get("layout", {}).get("width") or PNG_WIDTH
    with warnings.catch_warnings():  # kaleido notes that a running server ignores per-call options
        warnings.simplefilter("ignore")
        image = pio.to_image(figure, format="png", width=width, scale=1)
    return base64.b64encode(image).decode("ascii")


def static_outputs(cell: dict) -> list[dict]:
    """The cell's outputs as committed: plotly figures with a PNG and without the site's HTML, no widgets."""
    if "remove-output" in cell.get("metadata", {}).get("tags", []):
        return []
    kept = []
    for output in cell.get("outputs", []):
        data = output.get("data", {})
        if WIDGET_MIME in data:
            continue
        if PLOTLY_MIME in data:
            data.pop("text/html", None)
            if "image/png" not in data:
                data["image/png"] = png_of(data[PLOTLY_MIME])
            if len(json.dumps(data[PLOTLY_MIME])) > MAX_FIGURE_JSON:
                del data[PLOTLY_MIME]
        kept.append(output)
    return kept


def execute(path: Path, timeout: int) -> dict:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(path, as_version=4)
    metadata = dict(notebook.metadata)
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", HF_HUB_OFFLINE="1",
                      TRANSFORMERS_OFFLINE="1", PYDEVD_DISABLE_FILE_VALIDATION="1")
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    try:
        client.execute()
    except CellExecutionError as error:
        raise RefusedOutput(f"{path}: a cell failed:\n{str(error)[-3000:]}") from None
    notebook.metadata = nbformat.from_dict({k: v for k, v in metadata.items() if k != "widgets"})
    executed = nbformat.from_dict(notebook)
    problems = []
    for index, cell in enumerate(executed.cells):
        if cell.cell_type != "code":
            continue
        first_line = (cell.source.strip().splitlines() or [""])[0][:60]
        for output in cell.outputs:
            why = refusal(output)
            if why:
                problems.append(f"{path} cell {index} ({first_line!r}): {why}")
    if problems:
        raise RefusedOutput("\n".join(problems))
    for cell in executed.cells:
        if cell.cell_type == "code":
            cell.outputs = static_outputs(cell)
    return clean(json.loads(nbformat.writes(executed)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path, help="notebook files (.ipynb) to run and store in place")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one cell may run (default: 1800)")
    args = parser.parse_args(argv)
    for path in args.notebooks:
        if path.suffix != ".ipynb" or not path.is_file():
            parser.error(f"{path} is not an .ipynb file")
    try:
        import kaleido  # noqa: F401
    except ImportError:
        parser.error("figures are stored as PNG by kaleido: pip install -e '.[outputs]' (and apt-get install chromium)")
    import kaleido
    import nbformat

    kaleido.start_sync_server(silence_warnings=True)  # one Chromium for every figure
    failed = 0
    try:
        for path in args.notebooks:
            start = time.perf_counter()
            try:
                notebook = execute(path, args.timeout)
            except RefusedOutput as problems:
                print(f"{path}: not written, outputs refused:\n{problems}", file=sys.stderr)
                failed += 1
                continue
            nbformat.validate(nbformat.from_dict(notebook))  # raises if the stored file would not open
            path.write_text(dumps(notebook), encoding="utf-8")
            size = path.stat().st_size
            print(f"{path}: executed in {time.perf_counter() - start:.0f} s, stored with outputs ({size:,} bytes)")
    finally:
        kaleido.stop_sync_server(silence_warnings=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
