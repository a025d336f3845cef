"""One request, two phases: does its prefill routing predict its decode routing?

For one request r of a trace, per MoE layer l, the expert histograms of its prompt tokens (prefill) and of
its generated tokens (decode),

    prefill[l, e] = #(prompt token, slot) of r routed to e in layer l          (the same for decode),

drawn side by side as shares of the phase's choices in the layer, with the Pearson correlation r of the
two histograms over all L·E cells (the expert-activation paper's finding 3; the number ``minimoe.traces.analysis.
prefill_decode_similarity`` reports as the request's ``matched`` value) and the per-layer correlations.
The pure function ``prefill_decode_data`` computes it from ``minimoe.traces.analysis.expert_load`` of the request's
tokens. Two views are built on it:

- ``PrefillDecodeWidget``: a request selector (labelled with domain and r) that redraws the bars;
- ``prefill_decode_figure(trace)``: a plain plotly figure for the static book with a dropdown over a few
  requests, all precomputed: by default, in every domain, the requests at the 10th, 50th and 90th
  percentile of r, so the dropdown shows weak, typical and strong agreement.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from minimoe.traces.analysis import expert_load, prefill_decode_similarity
from minimoe.traces.format import Trace
from minimoe.widgets._panel import FigurePanel

PREFILL_COLOR, DECODE_COLOR = "#1f77b4", "#ff7f0e"


class PrefillDecodeData(NamedTuple):
    request: int
    domain: str  # "" when the trace has no domain labels
    prefill: np.ndarray  # int64 (L, E): the prompt tokens' routed choices
    decode: np.ndarray  # int64 (L, E): the generated tokens' routed choices
    pearson: float  # over all L·E cells
    pearson_per_layer: np.ndarray  # (L,), nan where a layer's histogram is constant


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.ravel().astype(np.float64), y.ravel().astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    norm = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / norm) if norm > 0 else float("nan")


def prefill_decode_data(trace: Trace, request: int) -> PrefillDecodeData:
    """The prefill and decode expert histograms of one request, and their correlation."""
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a minimoe.traces.format.Trace, got {type(trace).__name__}")
    if isinstance(request, bool) or not isinstance(request, (int, np.integer)) \
            or not 0 <= request < trace.num_requests:
        raise ValueError(f"request must be an int in [0, {trace.num_requests}), got {request!r}")
    tokens = trace.requests(np.array([request]))
    phases = {name: tokens.where(phase=name) for name in ("prefill", "decode")}
    missing = [name for name, part in phases.items() if part.num_tokens == 0]
    if missing:
        raise ValueError(f"request {request} has no {' and no '.join(missing)} tokens")
    prefill, decode = expert_load(phases["prefill"]), expert_load(phases["decode"])  # (L, E) each
    domain = str(tokens.domain[0]) if tokens.has_domain else ""
    per_layer = np.array([_pearson(p, d) for p, d in zip(prefill, decode)])
    return PrefillDecodeData(int(request), domain, prefill, decode, _pearson(prefill, decode), per_layer)


def _shares(counts: np.ndarray) -> np.ndarray:
    return counts / np.maximum(counts.sum(1, keepdims=True), 1)  # (L, E) fractions of each layer's choices


def _bars(data: PrefillDecodeData, visible: bool = True) -> list[tuple[go.Bar, int]]:
    experts = list(range(data.prefill.shape[1]))
    out = []
    for layer in range(data.prefill.shape[0]):
        for phase, counts, color in (("prefill", data.prefill, PREFILL_COLOR), ("decode", data.decode, DECODE_COLOR)):
            out.append((go.Bar(x=experts, y=_shares(counts)[layer], name=phase, marker_color=color,
                               legendgroup=phase, showlegend=layer == 0, visible=visible, customdata=counts[layer],
                               hovertemplate=f"layer {layer}, expert %{{x}}: %{{customdata}} {phase} choices "
                                             "(%{y:.1%})<extra></extra>"), layer + 1))
    return out


def _title(data: PrefillDecodeData) -> str:
    domain = f" ({data.domain})" if data.domain else ""
    layers = ", ".join(f"{v:.2f}" for v in data.pearson_per_layer)
    return (f"Request {data.request}{domain}: prefill vs decode expert shares, Pearson r = {data.pearson:.3f}"
            f"<br><sub>r per layer: {layers}</sub>")


def _grid(num_layers: int) -> go.Figure:
    figure = make_subplots(rows=num_layers, cols=1, shared_xaxes=True, vertical_spacing=0.04,
                           subplot_titles=[f"layer {l}" for l in range(num_layers)])
    figure.update_layout(barmode="group", height=140 + 150 * num_layers, margin=dict(t=110),
                         legend=dict(orientation="h", x=0, y=1.0, yanchor="bottom", xanchor="left"))
    figure.update_xaxes(title_text="expert", row=num_layers, col=1)
    figure.update_yaxes(tickformat=".0%")
    return figure


def prefill_decode_view(data: PrefillDecodeData) -> go.Figure:
    """Bars of one request's prefill and decode expert shares, one row per layer."""
    figure = _grid(data.prefill.shape[0])
    for bar, row in _bars(data):
        figure.add_trace(bar, row=row, col=1)
    figure.update_layout(title=_title(data))
    return figure


def example_requests(trace: Trace, quantiles=(0.1, 0.5, 0.9), seed: int = 0) -> list[int]:
    """Per domain (or overall), the requests whose Pearson r sits at the given quantiles of that domain's r."""
    similarity = prefill_decode_similarity(trace, seed=seed)
    domains = trace.request_domains()[similarity.requests] if trace.has_domain else np.zeros(0)
    picked = []
    for label in np.unique(domains) if trace.has_domain else [None]:
        members = np.arange(len(similarity.requests)) if label is None else np.flatnonzero(domains == label)
        order = members[np.argsort(similarity.matched[members], kind="stable")]
        for q in quantiles:
            request = int(similarity.requests[order[int(round(q * (len(order) - 1)))]])
            if request not in picked:
                picked.append(request)
    return picked


def prefill_decode_figure(trace: Trace, requests: list[int] | None = None) -> go.Figure:
    """Static figure: a dropdown over ``requests`` (default ``example_requests(trace)``), precomputed."""
    requests = example_requests(trace) if requests is None else list(requests)
    if not requests:
        raise ValueError("requests is empty: nothing to show")
    datas = [prefill_decode_data(trace, r) for r in requests]
    figure = _grid(trace.num_layers)
    owner = []  # which request each trace of the figure belongs to
    for index, data in enumerate(datas):
        for bar, row in _bars(data, visible=index == 0):
            figure.add_trace(bar, row=row, col=1)
            owner.append(index)
    buttons = [dict(label=f"{d.domain + ' · ' if d.domain else ''}request {d.request} · r = {d.pearson:.2f}",
                    method="update", args=[{"visible": [o == i for o in owner]}, {"title.text": _title(d)}])
               for i, d in enumerate(datas)]
    figure.update_layout(title=_title(datas[0]),
                         updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.0,
                                           yanchor="bottom", showactive=True)])
    return figure


class PrefillDecodeWidget(FigurePanel):
    """A request selector over a trace's prefill-vs-decode histograms.

    ``controls["request"]`` is an ipywidgets Dropdown whose options are the requests with both phases,
    labelled "domain · request id · r"; changing it recomputes ``data`` (``prefill_decode_data``) and
    ``figure``. Display it as the last expression of a cell.
    """

    def __init__(self, trace: Trace, request: int | None = None):
        import ipywidgets as widgets

        self.trace = trace
        similarity = prefill_decode_similarity(trace)
        domains = trace.request_domains()
        options = [(f"{str(domains[r]) + ' · ' if trace.has_domain else ''}request {r} · r = {value:.2f}", int(r))
                   for r, value in zip(similarity.requests, similarity.matched)]
        self.controls = {"request": widgets.Dropdown(options=options, description="request",
                                                     value=options[0][1] if request is None else request)}
        self.output = widgets.Output()
        self.panel = widgets.VBox([self.controls["request"], self.output])
        self.controls["request"].observe(self.update, names="value")
        self.update()

    def update(self, change=None) -> None:
        """Recompute and redraw (called by the selector)."""
        self.data = prefill_decode_data(self.trace, self.controls["request"].value)
        self.draw(prefill_decode_view(self.data))
