"""The tools that store the chapters: what execute_notebooks.py refuses and keeps, and what strip_notebook.py drops.

The full run (a kernel, kaleido and Chromium) is what ``python tools/execute_notebooks.py book/*.ipynb`` does; here
its rules are checked on hand-made outputs, with the PNG renderer replaced.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load(name: str):
    sys.path.insert(0, str(TOOLS))
    try:
        spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(TOOLS))


execute = load("execute_notebooks")
strip = load("strip_notebook")


def stream(text, name="stdout"):
    return {"output_type": "stream", "name": name, "text": text}


@pytest.mark.parametrize("output, why", [
    (stream("written to /tmp/scaling_out_x1/run.json\n"), "a temporary path"),
    (stream("model <minimoe.model.Transformer object at 0x7f00deadbeef>\n"), "an object repr"),
    (stream("UserWarning: something\n"), "a warning"),
    (stream("anything\n", "stderr"), "text on stderr"),
    ({"output_type": "error", "ename": "ValueError", "evalue": "bad", "traceback": []}, "an error"),
    ({"output_type": "execute_result", "execution_count": 1, "metadata": {},
      "data": {"text/plain": "DeprecationWarning: old"}}, "a warning"),
])
def test_outputs_a_reader_must_not_see_are_refused(output, why):
    assert execute.refusal(output).startswith(why)


@pytest.mark.parametrize("text", ["3 requests, 54 tokens\n", "saved report/placement-4x2.json\n",
                                  "a warning-free run: no Warning here\n", "see benchmarks/results/tmp/x\n"])
def test_ordinary_results_are_kept(text):
    assert execute.refusal(stream(text)) is None


def test_figures_become_static_and_widgets_leave_nothing(monkeypatch):
    monkeypatch.setattr(execute, "png_of", lambda figure: f"PNG of {figure['layout']['title']}")
    figure = {"output_type": "display_data", "metadata": {},
              "data": {execute.PLOTLY_MIME: {"data": [], "layout": {"title": "t"}}, "text/html": "<div>...</div>"}}
    widget = {"output_type": "display_data", "metadata": {},
              "data": {execute.WIDGET_MIME: {"model_id": "1"}, "text/plain": "RoutingWidget(...)"}}
    cell = {"cell_type": "code", "metadata": {}, "outputs": [stream("hi\n"), figure, widget]}
    kept = execute.static_outputs(cell)
    assert kept[0] == stream("hi\n") and len(kept) == 2
    assert kept[1]["data"] == {execute.PLOTLY_MIME: {"data": [], "layout": {"title": "t"}}, "image/png": "PNG of t"}
    big = {"output_type": "display_data", "metadata": {},
           "data": {execute.PLOTLY_MIME: {"data": [{"x": list(range(30_000))}], "layout": {"title": "big"}}}}
    assert execute.static_outputs({"cell_type": "code", "metadata": {}, "outputs": [big]})[0]["data"] == \
        {"image/png": "PNG of big"}  # too large to store as JSON: the image only
    tagged = {"cell_type": "code", "metadata": {"tags": ["remove-output"]}, "outputs": [widget]}
    assert execute.static_outputs(tagged) == []


def notebook():
    checked = {"cell_type": "code", "id": "a", "source": "# NBVAL_CHECK_OUTPUT\nprint(1)", "execution_count": 1,
               "metadata": {"execution": {"iopub.status.busy": "2026"}}, "outputs": [stream("1\n")]}
    other = {"cell_type": "code", "id": "b", "source": "print(2)", "execution_count": 2, "metadata": {},
             "outputs": [stream("2\n")]}
    return {"cells": [checked, other], "metadata": {"widgets": {"state": {}}, "kernelspec": {"name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5}


def test_cleaning_keeps_outputs_and_drops_timings_and_widget_state():
    cleaned = strip.clean(notebook())
    assert [c["outputs"] for c in cleaned["cells"]] == [[stream("1\n")], [stream("2\n")]]
    assert cleaned["cells"][0]["metadata"] == {} and "widgets" not in cleaned["metadata"]


def test_stripping_keeps_only_what_nbval_compares(tmp_path):
    path = tmp_path / "chapter.ipynb"
    path.write_text(json.dumps(notebook()))
    assert strip.strip_file(path, remove_outputs=True) is True
    stored = json.loads(path.read_text())
    assert stored["cells"][0]["outputs"] == [stream("1\n")] and stored["cells"][0]["execution_count"] == 1
    assert stored["cells"][1]["outputs"] == [] and stored["cells"][1]["execution_count"] is None
    assert strip.strip_file(path, remove_outputs=True) is False  # already stripped: untouched
