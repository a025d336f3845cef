"""The built book serves plotly.js once: figures carry HTML that calls Plotly.newPlot without embedding it."""

import importlib.util
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from minimoe.widgets.site import RENDERER, SiteRenderer, use_site_renderer

BOOK = Path(__file__).resolve().parents[1] / "book"


def test_site_renderer_emits_a_figure_without_plotly_js_or_any_outside_script():
    figure = go.Figure(go.Bar(x=["a", "b"], y=[1, 2]))
    bundle = SiteRenderer().to_mimebundle(figure.to_dict())
    html = bundle["text/html"]
    assert 'class="plotly-graph-div"' in html and "Plotly.newPlot" in html
    assert "plotly.js v" not in html and len(html) < 20_000  # no inline copy of the 4.8 MB library
    assert "https://" not in html and "<script src" not in html  # nothing from another host (no CDN, no MathJax)


def test_use_site_renderer_keeps_the_live_mimetype_and_adds_the_site_html():
    before = pio.renderers.default
    try:
        use_site_renderer()
        assert pio.renderers.default == f"plotly_mimetype+{RENDERER}"
        bundle = pio.renderers._build_mime_bundle(go.Figure().to_dict())
        assert set(bundle) == {"application/vnd.plotly.v1+json", "text/html"}
    finally:
        pio.renderers.default = before


def test_the_book_extension_copies_plotly_js_into_the_site(tmp_path):
    spec = importlib.util.spec_from_file_location("plotly_site", BOOK / "_ext" / "plotly_site.py")
    extension = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extension)
    calls = {}

    class App:
        outdir = str(tmp_path)
        builder = type("Builder", (), {"format": "html"})()

        def add_js_file(self, name):
            calls["js"] = name

        def connect(self, event, handler):
            calls[event] = handler

    app = App()
    extension.setup(app)
    calls["build-finished"](app, None)
    copied = tmp_path / "_static" / "plotly.min.js"
    assert calls["js"] == "plotly.min.js" and copied.stat().st_size > 1_000_000
    assert "plotly.js v" in copied.read_text()[:2000]
