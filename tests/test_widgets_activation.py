"""The activation widgets: their data functions against brute force and minimoe.traces.analysis, the live widgets
updating when a selector changes, and the static figures' dropdown entries."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minimoe.traces import analysis
from minimoe.traces import Trace
from minimoe.widgets.load_heatmap import LoadHeatmapWidget, load_heatmap_data, load_heatmap_figure
from minimoe.widgets.prefill_decode import PrefillDecodeWidget, example_requests, prefill_decode_data, \
    prefill_decode_figure

FUZZ = settings(max_examples=25, deadline=None)
DOMAINS = ("code", "math", "chat")


def random_trace(seed, num_requests=9, num_layers=3, num_experts=7, top_k=2) -> Trace:
    """Requests of random lengths with both phases; experts skewed per domain so the views differ."""
    rng = np.random.default_rng(seed)
    prompt, decode = rng.integers(1, 7, num_requests), rng.integers(1, 6, num_requests)
    labels = np.array(DOMAINS)[np.arange(num_requests) % len(DOMAINS)]
    rows = []
    for r in range(num_requests):
        skew = rng.uniform(0.2, 3, num_experts)  # the request's own preference
        keys = rng.random((prompt[r] + decode[r], num_layers, num_experts)) ** skew
        rows.append(np.argsort(keys, axis=2)[..., :top_k])
    lengths = prompt + decode
    return Trace(experts=np.concatenate(rows), request=np.repeat(np.arange(num_requests), lengths),
                 phase=np.concatenate([np.repeat([0, 1], [p, d]) for p, d in zip(prompt, decode)]),
                 domain=np.repeat(labels, lengths), num_experts=num_experts, top_k=top_k, model="random")


def brute_histogram(trace, keep) -> np.ndarray:
    counts = np.zeros((trace.num_layers, trace.num_experts), np.int64)
    for n in range(trace.num_tokens):
        if keep(n):
            for l in range(trace.num_layers):
                for e in trace.experts[n, l]:
                    counts[l, e] += 1
    return counts


# ---- load heatmap ------------------------------------------------------------------------------------------
@FUZZ
@given(seed=st.integers(0, 10**6), domain=st.sampled_from(("all",) + DOMAINS),
       phase=st.sampled_from(("all", "prefill", "decode")))
def test_load_heatmap_data_matches_brute_force(seed, domain, phase):
    trace = random_trace(seed)
    data = load_heatmap_data(trace, domain, phase)
    code = {"all": None, "prefill": 0, "decode": 1}[phase]
    expected = brute_histogram(trace, lambda n: (domain == "all" or trace.domain[n] == domain)
                               and (code is None or trace.phase[n] == code))
    np.testing.assert_array_equal(data.load, expected)
    np.testing.assert_allclose(data.relative, expected / expected.mean(1, keepdims=True))
    np.testing.assert_allclose(data.max_over_mean, data.relative.max(1))
    assert data.tokens == sum(1 for n in range(trace.num_tokens) if (domain == "all" or trace.domain[n] == domain)
                              and (code is None or trace.phase[n] == code))


def test_load_heatmap_agrees_with_analysis_and_rejects_bad_selectors():
    trace = random_trace(3)
    np.testing.assert_allclose(load_heatmap_data(trace).max_over_mean,
                               analysis.layer_imbalance(trace)["max_over_mean"])
    with pytest.raises(ValueError, match="domain must be one of"):
        load_heatmap_data(trace, domain="poetry")
    with pytest.raises(ValueError, match="phase must be one of"):
        load_heatmap_data(trace, phase="generate")
    with pytest.raises(TypeError, match="Trace"):
        load_heatmap_data(trace.experts)


def test_load_heatmap_figure_has_one_entry_per_domain_and_phase():
    trace = random_trace(4)
    figure = load_heatmap_figure(trace)
    buttons = figure.layout.updatemenus[0].buttons
    expected = [f"{d} · {p}" for d in ("all", "chat", "code", "math") for p in ("all", "prefill", "decode")]
    assert [b.label for b in buttons] == expected
    assert len(figure.data) == len(expected) and [t.visible for t in figure.data].count(True) == 1
    zmax = max(np.max(t.z) for t in figure.data)
    for index, button in enumerate(buttons):  # each entry shows exactly its own precomputed heatmap
        visible = button.args[0]["visible"]
        assert visible == [i == index for i in range(len(buttons))]
        domain, phase = button.label.split(" · ")
        np.testing.assert_allclose(figure.data[index].z, load_heatmap_data(trace, domain, phase).relative)
        assert figure.data[index].zmax == zmax  # one colour scale for every entry


def test_load_heatmap_widget_updates_when_a_selector_changes():
    trace = random_trace(5)
    widget = LoadHeatmapWidget(trace)
    np.testing.assert_array_equal(widget.data.load, analysis.expert_load(trace))
    widget.controls["domain"].value = "math"
    widget.controls["phase"].value = "decode"
    expected = load_heatmap_data(trace, "math", "decode")
    np.testing.assert_array_equal(widget.data.load, expected.load)
    np.testing.assert_allclose(widget.figure.data[0].z, expected.relative)
    assert "math" in widget.figure.layout.title.text and "decode" in widget.figure.layout.title.text
    assert list(widget.controls["domain"].options) == ["all", "chat", "code", "math"]


# ---- prefill vs decode -------------------------------------------------------------------------------------
@FUZZ
@given(seed=st.integers(0, 10**6), request=st.integers(0, 8))
def test_prefill_decode_data_matches_brute_force_and_analysis(seed, request):
    trace = random_trace(seed)
    data = prefill_decode_data(trace, request)
    for phase, counts in ((0, data.prefill), (1, data.decode)):
        np.testing.assert_array_equal(
            counts, brute_histogram(trace, lambda n: trace.request[n] == request and trace.phase[n] == phase))
    assert data.domain == DOMAINS[request % 3]
    x, y = data.prefill.ravel(), data.decode.ravel()
    if x.std() > 0 and y.std() > 0:
        assert data.pearson == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
        similarity = analysis.prefill_decode_similarity(trace)
        assert data.pearson == pytest.approx(similarity.matched[list(similarity.requests).index(request)], abs=1e-12)
    for layer in range(trace.num_layers):
        p, d = data.prefill[layer], data.decode[layer]
        if p.std() > 0 and d.std() > 0:
            assert data.pearson_per_layer[layer] == pytest.approx(np.corrcoef(p, d)[0, 1], abs=1e-12)


def test_prefill_decode_data_rejects_bad_requests():
    trace = random_trace(6)
    with pytest.raises(ValueError, match=r"request must be an int in \[0, 9\)"):
        prefill_decode_data(trace, 9)
    only_prefill = trace.where(phase="prefill")
    with pytest.raises(ValueError, match="no decode tokens"):
        prefill_decode_data(only_prefill, 0)


def test_example_requests_sit_at_the_quantiles_of_their_domain():
    trace = random_trace(7, num_requests=30)
    similarity = analysis.prefill_decode_similarity(trace)
    picked = example_requests(trace, quantiles=(0.0, 1.0))
    domains = trace.request_domains()
    for label in DOMAINS:  # the lowest and the highest r of each domain
        values = {int(r): v for r, v in zip(similarity.requests, similarity.matched) if domains[r] == label}
        assert {min(values, key=values.get), max(values, key=values.get)} <= set(picked)
    assert len(picked) == 6


def test_prefill_decode_figure_has_a_dropdown_entry_per_request():
    trace = random_trace(8, num_requests=12)
    requests = [0, 4, 7]
    figure = prefill_decode_figure(trace, requests)
    buttons = figure.layout.updatemenus[0].buttons
    assert len(buttons) == 3
    per_request = 2 * trace.num_layers  # a prefill and a decode bar chart per layer
    assert len(figure.data) == 3 * per_request
    for index, (button, request) in enumerate(zip(buttons, requests)):
        data = prefill_decode_data(trace, request)
        assert button.label == f"{data.domain} · request {request} · r = {data.pearson:.2f}"
        visible = button.args[0]["visible"]
        assert visible == [i // per_request == index for i in range(len(figure.data))]
        shown = [t for t, v in zip(figure.data, visible) if v]
        np.testing.assert_allclose(shown[0].y, data.prefill[0] / data.prefill[0].sum())
        np.testing.assert_allclose(shown[1].y, data.decode[0] / data.decode[0].sum())
    assert len(prefill_decode_figure(trace).layout.updatemenus[0].buttons) == len(example_requests(trace))


def test_prefill_decode_widget_updates_when_the_request_changes():
    trace = random_trace(9)
    widget = PrefillDecodeWidget(trace)
    first = widget.data.request
    other = [value for _, value in widget.controls["request"].options if value != first][0]
    widget.controls["request"].value = other
    expected = prefill_decode_data(trace, other)
    assert widget.data.request == other and widget.data.pearson == expected.pearson
    np.testing.assert_allclose(widget.figure.data[1].y, expected.decode[0] / expected.decode[0].sum())
    assert f"Request {other}" in widget.figure.layout.title.text


@pytest.fixture
def ipython_shell(monkeypatch):
    """An IPython shell for one test, so the widgets draw; Output.append_display_data records what it gets
    (a terminal shell's formatter does not produce the plotly MIME bundle a kernel does)."""
    import ipywidgets
    from IPython.core.interactiveshell import InteractiveShell

    def append_display_data(self, obj):
        self.outputs = self.outputs + ({"output_type": "display_data", "figure": obj},)

    monkeypatch.setattr(ipywidgets.Output, "append_display_data", append_display_data)
    shell = InteractiveShell.instance()
    yield shell
    InteractiveShell.clear_instance()


def test_widgets_draw_into_their_output_in_ipython(ipython_shell):
    trace = random_trace(10)
    for widget, control, value in ((LoadHeatmapWidget(trace), "domain", "chat"),
                                   (PrefillDecodeWidget(trace), "request", 4)):
        assert [out["figure"] for out in widget.output.outputs] == [widget.figure]
        widget.controls[control].value = value
        assert [out["figure"] for out in widget.output.outputs] == [widget.figure]  # replaced, not appended
        assert (widget.data.domain if control == "domain" else widget.data.request) == value
