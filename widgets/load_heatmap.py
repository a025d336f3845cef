"""Expert load at a glance: a layer × expert heatmap for one domain and one phase of a trace.

Cell (l, e) is expert e's share of layer l's routed (token, slot) choices relative to a perfectly balanced
layer,

    relative[l, e] = load[l, e] / mean_e' load[l, e']        (1 = its fair share, 0 = never chosen),

so a row's maximum is that layer's max/mean imbalance (the expert-activation paper's finding 1: load is uneven and the
imbalance differs from layer to layer and from workload to workload). ``load`` is
``minimoe.traces.analysis.expert_load`` of the tokens ``trace.where(phase, domain)`` selects; the pure function
``load_heatmap_data`` computes it. Two views are built on it:

- ``LoadHeatmapWidget``: domain and phase dropdowns that redraw the heatmap, for the live notebook;
- ``load_heatmap_figure(trace)``: a plain plotly figure for the static book, with one dropdown entry per
  (domain, phase) combination, all precomputed (no Python runs in the page). Every entry shares one
  colour scale, so colours compare across entries.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import plotly.graph_objects as go

from minimoe.traces.analysis import expert_load, max_over_mean
from minimoe.traces.format import Trace
from minimoe.widgets._panel import FigurePanel

ALL = "all"
PHASES = (ALL, "prefill", "decode")
COLORSCALE = "Viridis"


class LoadData(NamedTuple):
    domain: str
    phase: str
    tokens: int  # tokens in the selection
    load: np.ndarray  # int64 (L, E): routed choices per layer and expert
    relative: np.ndarray  # float (L, E): load / mean load of the layer
    max_over_mean: np.ndarray  # float (L,): each layer's max of `relative`


def domain_options(trace: Trace) -> list[str]:
    """"all" followed by the trace's domain labels (sorted)."""
    return [ALL] + ([str(d) for d in np.unique(trace.domain)] if trace.has_domain else [])


def load_heatmap_data(trace: Trace, domain: str = ALL, phase: str = ALL) -> LoadData:
    """The expert load of the tokens of ``domain`` (or "all") in ``phase`` ("all", "prefill", "decode")."""
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a minimoe.traces.format.Trace, got {type(trace).__name__}")
    if domain not in domain_options(trace):
        raise ValueError(f"domain must be one of {domain_options(trace)}, got {domain!r}")
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {list(PHASES)}, got {phase!r}")
    selected = trace.where(phase=None if phase == ALL else phase, domain=None if domain == ALL else domain)
    load = expert_load(selected)  # (L, E)
    if (load.sum(1) == 0).any():
        raise ValueError(f"no routed token in some layer for domain={domain!r}, phase={phase!r} "
                         f"({selected.num_tokens} tokens selected)")
    relative = load / load.mean(1, keepdims=True)  # (L, E)
    return LoadData(domain, phase, selected.num_tokens, load, relative, max_over_mean(load))


def _heatmap(data: LoadData, zmax: float, visible: bool = True) -> go.Heatmap:
    num_layers, num_experts = data.load.shape
    return go.Heatmap(z=data.relative, x=list(range(num_experts)), y=[f"layer {l}" for l in range(num_layers)],
                      customdata=data.load, zmin=0.0, zmax=zmax, colorscale=COLORSCALE, visible=visible,
                      colorbar=dict(title="load / mean"),
                      hovertemplate="%{y}, expert %{x}<br>%{customdata} choices = %{z:.2f} x the mean"
                                    "<extra></extra>")


def _title(data: LoadData) -> str:
    imbalance = ", ".join(f"{v:.2f}" for v in data.max_over_mean)
    return (f"Expert load, domain {data.domain}, phase {data.phase} ({data.tokens:,} tokens)"
            f"<br><sub>max/mean per layer: {imbalance}</sub>")


def _layout(figure: go.Figure, title: str, num_layers: int) -> go.Figure:
    figure.update_layout(title=title, xaxis_title="expert", height=max(320, 170 + 40 * num_layers),
                         margin=dict(t=110), yaxis=dict(autorange="reversed"))
    return figure


def load_heatmap(data: LoadData, zmax: float | None = None) -> go.Figure:
    """One heatmap of ``data`` (colour scale 0 .. zmax, default its own maximum)."""
    heatmap = _heatmap(data, float(data.relative.max()) if zmax is None else zmax)
    return _layout(go.Figure(heatmap), _title(data), data.load.shape[0])


def load_heatmap_figure(trace: Trace, domains: list[str] | None = None, phases=PHASES) -> go.Figure:
    """Static figure: a dropdown over every (domain, phase) combination, precomputed."""
    domains = domain_options(trace) if domains is None else list(domains)
    combos = [load_heatmap_data(trace, d, p) for d in domains for p in phases]
    zmax = float(max(c.relative.max() for c in combos))
    figure = go.Figure([_heatmap(c, zmax, visible=i == 0) for i, c in enumerate(combos)])
    buttons = [dict(label=f"{c.domain} · {c.phase}", method="update",
                    args=[{"visible": [j == i for j in range(len(combos))]}, {"title.text": _title(c)}])
               for i, c in enumerate(combos)]
    figure.update_layout(updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.22,
                                           yanchor="top", showactive=True)])
    return _layout(figure, _title(combos[0]), trace.num_layers)


class LoadHeatmapWidget(FigurePanel):
    """Domain and phase dropdowns over a trace's expert-load heatmap.

    ``controls`` maps "domain" and "phase" to their ipywidgets Dropdowns; changing either recomputes
    ``data`` (``load_heatmap_data``) and ``figure``. Display it as the last expression of a cell.
    """

    def __init__(self, trace: Trace, domain: str = ALL, phase: str = ALL):
        import ipywidgets as widgets

        self.trace = trace
        self.controls = {"domain": widgets.Dropdown(options=domain_options(trace), value=domain, description="domain"),
                         "phase": widgets.Dropdown(options=list(PHASES), value=phase, description="phase")}
        self.output = widgets.Output()
        self.panel = widgets.VBox([widgets.HBox(list(self.controls.values())), self.output])
        for control in self.controls.values():
            control.observe(self.update, names="value")
        self.update()

    def update(self, change=None) -> None:
        """Recompute and redraw (called by both dropdowns)."""
        self.data = load_heatmap_data(self.trace, self.controls["domain"].value, self.controls["phase"].value)
        self.draw(load_heatmap(self.data))
