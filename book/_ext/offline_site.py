"""Sphinx extension: the static book works offline, light and clean.

- **plotly.js once.** Each chapter draws its figures with ``minimoe.widgets.site.use_site_renderer()``, which
  writes every figure as a ``<div>`` plus a call to ``Plotly.newPlot`` and leaves plotly.js out. This extension
  copies the installed ``plotly`` package's plotly.js into the site's ``_static/`` and loads it on every page:
  one copy (about 5 MB) for the whole course instead of one per page, and nothing from a CDN.
- **MathJax, only what the pages use.** ``sphinx-mathjax-offline`` ships all of MathJax 3 (about 24 MB); the
  pages load ``tex-chtml.js``, which reads its CommonHTML fonts and, on demand, TeX extensions. Everything else
  (SVG output, speech rules, other combined builds) is removed from the built site.
- **No remote-kernel scripts.** Jupyter Book always adds sphinx-thebe's configuration script (which names a
  CDN) — twice in some builds, a JavaScript error. The book runs no remote kernel, so those scripts are dropped.
- **A theme mode.** The theme's mode switch needs a default, or it logs an error on every page load.
- **Notebooks to download, without their outputs.** The chapters are committed with the outputs of a run, so
  that they read on their own; the page already shows those results, and the ``.ipynb`` a reader downloads
  from it (the copy in ``_sources/``) is for running, so its outputs (megabytes of figures) are removed there.
- **No developer files.** Source maps (``*.map``, read only by a browser's developer tools) and the theme's
  message catalogues (``_static/locales``, used when the site is built, not when it is read) are removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

PLOTLY_JS = "plotly.min.js"
MATHJAX_KEEP = {"tex-chtml.js", "input/tex", "output/chtml", "a11y", "ui", "adaptors"}


def _plotly_js() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / PLOTLY_JS


def _lean_mathjax(static: Path) -> None:
    mathjax = static / "mathjax"
    if not mathjax.is_dir():
        return
    for path in sorted(mathjax.rglob("*"), key=lambda p: -len(p.parts)):  # deepest first
        relative = path.relative_to(mathjax).as_posix()
        kept = any(relative == keep or relative.startswith(keep + "/") or keep.startswith(relative + "/")
                   for keep in MATHJAX_KEEP)
        if not kept:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _notebook_without_outputs(path: Path) -> None:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
    path.write_text(json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _finish(app, exception) -> None:
    if exception is None and app.builder.format == "html":
        static = Path(app.outdir) / "_static"
        static.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_plotly_js(), static / PLOTLY_JS)
        _lean_mathjax(static)
        for source_map in static.rglob("*.map"):
            source_map.unlink()
        shutil.rmtree(static / "locales", ignore_errors=True)
        for notebook in (Path(app.outdir) / "_sources").rglob("*.ipynb"):
            _notebook_without_outputs(notebook)


def _page(app, pagename, templatename, context, doctree) -> None:
    context.setdefault("default_mode", "light")
    scripts, seen = [], set()
    for script in context.get("script_files", []):
        text = f"{script} {getattr(script, 'attributes', {})}"
        if "thebe" in text.lower() or text in seen:
            continue
        seen.add(text)
        scripts.append(script)
    context["script_files"] = scripts


def setup(app):
    if not _plotly_js().is_file():
        raise RuntimeError(f"plotly.js not found at {_plotly_js()}: is the plotly package installed?")
    app.add_js_file(PLOTLY_JS)  # in <head>, before any figure's inline script runs
    app.connect("html-page-context", _page)
    app.connect("build-finished", _finish)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
