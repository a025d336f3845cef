"""How the chapters' plotly figures reach the built book: HTML without plotly.js, which the site serves once.

``use_site_renderer()`` makes every displayed figure carry two outputs: the plotly MIME type (what JupyterLab
draws in a live notebook) and an HTML ``<div>`` whose script calls ``Plotly.newPlot`` on a plotly.js that the
page already loaded (the book's ``_ext/offline_site.py`` serves one copy for the whole site). Each chapter calls
it once, in its setup cell.
"""

from __future__ import annotations

import plotly.io as pio
from plotly.io._base_renderers import MimetypeRenderer

RENDERER = "minimoe_site"


class SiteRenderer(MimetypeRenderer):
    """A plotly renderer that emits ``text/html`` with ``include_plotlyjs=False`` (no CDN, no inline copy)."""

    def to_mimebundle(self, fig_dict) -> dict:
        html = pio.to_html(fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False,
                           config={"responsive": True, "displaylogo": False})
        return {"text/html": html}


def use_site_renderer() -> None:
    """Draw figures for both the live notebook and the static site (sets ``plotly.io.renderers.default``)."""
    pio.renderers[RENDERER] = SiteRenderer()
    pio.renderers.default = f"plotly_mimetype+{RENDERER}"
