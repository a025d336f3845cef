"""The built book serves plotly.js once: figures carry HTML that calls Plotly.newPlot without embedding it."""

import importlib.util
import json
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


def load_extension():
    spec = importlib.util.spec_from_file_location("offline_site", BOOK / "_ext" / "offline_site.py")
    extension = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extension)
    return extension


class FakeApp:
    """What the extension uses of a Sphinx application: an output folder, a builder, two registrations."""

    def __init__(self, outdir):
        self.outdir, self.builder, self.calls = str(outdir), type("Builder", (), {"format": "html"})(), {}

    def add_js_file(self, name):
        self.calls["js"] = name

    def connect(self, event, handler):
        self.calls[event] = handler


def test_the_book_extension_copies_plotly_js_and_keeps_only_the_mathjax_the_pages_use(tmp_path):
    extension, app = load_extension(), FakeApp(tmp_path)
    extension.setup(app)
    mathjax = tmp_path / "_static" / "mathjax"
    for name in ("tex-chtml.js", "tex-svg-full.js", "output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff",
                 "output/svg.js", "input/tex/extensions/ams.js", "sre/mathmaps/en.json"):
        (mathjax / name).parent.mkdir(parents=True, exist_ok=True)
        (mathjax / name).write_text("x")
    app.calls["build-finished"](app, None)
    copied = tmp_path / "_static" / "plotly.min.js"
    assert app.calls["js"] == "plotly.min.js" and copied.stat().st_size > 1_000_000
    assert "plotly.js v" in copied.read_text()[:2000]
    kept = sorted(p.relative_to(mathjax).as_posix() for p in mathjax.rglob("*") if p.is_file())
    assert kept == ["input/tex/extensions/ams.js", "output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff",
                    "tex-chtml.js"]


def test_the_book_extension_serves_notebooks_to_download_without_their_outputs(tmp_path):
    extension, app = load_extension(), FakeApp(tmp_path)
    extension.setup(app)
    sources = tmp_path / "_sources"
    sources.mkdir()
    figure = {"output_type": "display_data", "metadata": {}, "data": {"image/png": "iVBORw0KGgo" * 10_000}}
    notebook = {"cells": [{"cell_type": "markdown", "id": "m", "metadata": {}, "source": "# Title"},
                          {"cell_type": "code", "id": "c", "metadata": {}, "source": "figure.show()",
                           "execution_count": 7, "outputs": [figure]}],
                "metadata": {"kernelspec": {"name": "python3"}}, "nbformat": 4, "nbformat_minor": 5}
    (sources / "01_chapter.ipynb").write_text(json.dumps(notebook))
    (sources / "intro.md.txt").write_text("# minimoe")
    app.calls["build-finished"](app, None)
    served = json.loads((sources / "01_chapter.ipynb").read_text())
    assert served["cells"][1]["outputs"] == [] and served["cells"][1]["execution_count"] is None
    assert served["cells"][0] == notebook["cells"][0] and served["metadata"] == notebook["metadata"]
    assert (sources / "intro.md.txt").read_text() == "# minimoe"
    assert (sources / "01_chapter.ipynb").stat().st_size < 2_000


def test_the_book_extension_drops_remote_kernel_scripts_and_duplicates_and_sets_a_theme_mode(tmp_path):
    extension, app = load_extension(), FakeApp(tmp_path)

    class Script(str):
        def __new__(cls, name, body=""):
            script = super().__new__(cls, name)
            script.attributes = {"body": body} if body else {}
            return script

    thebe = Script("", 'const THEBE_JS_URL = "https://unpkg.com/thebe"')
    context = {"script_files": [Script("plotly.min.js"), thebe, Script("sphinx-thebe.js"), thebe,
                                Script("plotly.min.js"), Script("sphinx_highlight.js")]}
    extension._page(app, "intro", "page.html", context, None)
    assert context["script_files"] == ["plotly.min.js", "sphinx_highlight.js"]
    assert context["default_mode"] == "light"
