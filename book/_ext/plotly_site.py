"""Sphinx extension: serve plotly.js once, from the site itself.

Each chapter draws its figures with ``minimoe.widgets.site.use_site_renderer()``, which writes every figure as
a ``<div>`` plus a call to ``Plotly.newPlot`` and leaves plotly.js out. This extension copies the plotly.js of
the installed ``plotly`` package into the built site's ``_static/`` and loads it on every page, so the whole
course carries one copy (about 5 MB) instead of one per page, and no page fetches anything from another host.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PLOTLY_JS = "plotly.min.js"


def _plotly_js() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / PLOTLY_JS


def _copy(app, exception) -> None:
    if exception is None and app.builder.format == "html":
        target = Path(app.outdir) / "_static" / PLOTLY_JS
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_plotly_js(), target)


def setup(app):
    if not _plotly_js().is_file():
        raise RuntimeError(f"plotly.js not found at {_plotly_js()}: is the plotly package installed?")
    app.add_js_file(PLOTLY_JS)  # in <head>, before any figure's inline script runs
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
