"""Routing at a glance: which experts each token picks, and which picks a capacity limit drops.

A heatmap of tokens (rows) × experts (columns) shows the router probabilities (or the routing
weights); each (token, expert) choice is marked, a kept choice with a ring and a dropped one with a
red cross. Above it, the (token, expert) choices each expert received, split into kept and dropped,
with the capacity C = ceil(T·k/E · capacity_factor) drawn as a line (GShard, Lepikhin et al. 2020);
to the right, how many of its k choices each token lost.

Everything is computed by one pure function, ``routing_data(logits, family, top_k,
capacity_factor, ...)``, which runs the logits through a ``minimoe.model.moe.MoELayer`` whose router
weight is the identity matrix: the layer's router sees exactly the given logits, and its own
selection rule (``minimoe.model.router``) and capacity rule decide. Nothing is re-implemented here.
Two views are built on it:

- ``RoutingWidget``: ipywidgets controls (top-k, router family, capacity factor, what the heatmap
  shows) that redraw the figure and a summary line, for the live notebook;
- ``routing_figure(...)``: a plain plotly figure for the static book, with a dropdown over router
  settings and a slider over capacity factors, all precomputed (no Python runs in the page).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from minimoe.model.moe import MoEConfig, MoELayer
from minimoe.model.aux_losses import router_probabilities
from minimoe.model.router import ROUTER_FAMILIES, RoutingResult
from minimoe.widgets._panel import FigurePanel

SHOW_OPTIONS = ("probabilities", "weights")
CAPACITY_FACTORS = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # 0 = dropless
KEPT_COLOR, DROPPED_COLOR = "#1f5fa8", "#d62728"


@dataclass
class RoutingData:
    """What one router setting does to T tokens over E experts (k choices per token)."""

    family: str
    top_k: int
    capacity_factor: float
    routing: RoutingResult  # the layer's own routing result
    probabilities: torch.Tensor  # (T, E) router probabilities (``minimoe.model.aux_losses.router_probabilities``)
    weights: torch.Tensor  # (T, E) the weight of each chosen expert, 0 elsewhere
    kept: torch.Tensor  # (T, k) bool, False = the choice was dropped by the capacity limit
    capacity: int | None  # C, or None when dropless
    dropped_pairs: int  # dropped (token, expert) choices (the layer's ``dropped_tokens``)

    @property
    def num_tokens(self) -> int:
        return self.probabilities.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probabilities.shape[1]

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """(E,) choices each expert received, before the capacity limit."""
        return torch.bincount(self.routing.expert_ids.reshape(-1), minlength=self.num_experts)

    @property
    def kept_per_expert(self) -> torch.Tensor:
        """(E,) choices each expert keeps (at most C)."""
        return torch.bincount(self.routing.expert_ids[self.kept], minlength=self.num_experts)

    @property
    def dropped_per_token(self) -> torch.Tensor:
        """(T,) how many of its k choices each token lost."""
        return (~self.kept).sum(dim=1)

    def summary(self) -> str:
        """One line: the setting, tokens per expert, the capacity and what was dropped."""
        lost_any, lost_all = int((self.dropped_per_token > 0).sum()), int((self.dropped_per_token == self.top_k).sum())
        capacity = "dropless" if self.capacity is None else f"capacity C={self.capacity}"
        return (f"{self.family} top-{self.top_k}, {capacity}: tokens per expert {self.tokens_per_expert.tolist()}; "
                f"dropped {self.dropped_pairs} of {self.num_tokens * self.top_k} choices "
                f"({lost_any} tokens lost an expert, {lost_all} lost all)")

    def title(self) -> str:
        """The summary as a two-line figure title."""
        head, _, tail = self.summary().partition(": ")
        return f"{head}<br><sup>{tail}</sup>"


def routing_data(logits: torch.Tensor, family: str = "softmax", top_k: int = 2, capacity_factor: float = 0.0, *,
                 bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0) -> RoutingData:
    """Route ``logits`` (T, E) with ``minimoe``'s own layer and capacity rule.

    ``bias``, ``n_group``, ``topk_group`` and ``routed_scaling_factor`` are DeepSeek-V3's
    (``bias`` is its ``e_score_correction_bias``); ``norm_topk_prob`` applies to softmax and
    DeepSeek-V3. The logits are routed in float32. Invalid settings raise ``MoEConfig``'s errors.
    """
    _check_logits(logits)
    if family not in ROUTER_FAMILIES:
        raise ValueError(f"family must be one of {ROUTER_FAMILIES}, got {family!r}")
    if bias is not None and family != "deepseek_v3":
        raise ValueError(f"a score-correction bias only exists for family='deepseek_v3', got family={family!r}")
    num_experts = logits.shape[1]
    options = dict(n_group=n_group, topk_group=topk_group, routed_scaling_factor=routed_scaling_factor) \
        if family == "deepseek_v3" else {}
    config = MoEConfig(num_experts=num_experts, top_k=top_k, intermediate_size=1, router=family,
                       norm_topk_prob=norm_topk_prob, capacity_factor=float(capacity_factor), **options)
    layer = MoELayer(num_experts, config).eval()  # hidden size E: the "hidden state" is the logits
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(num_experts))  # logits @ I^T = logits, exactly
        if bias is not None:
            layer.router.e_score_correction_bias.copy_(bias)
        layer(logits.detach().float().cpu())
    routing = layer.last_routing
    kept = layer.last_kept if layer.last_kept is not None else torch.ones_like(routing.expert_ids, dtype=torch.bool)
    weights = torch.zeros(logits.shape, dtype=torch.float32).scatter_(1, routing.expert_ids, routing.weights)
    return RoutingData(family, top_k, float(capacity_factor), routing, router_probabilities(routing), weights, kept,
                       layer.capacity, layer.dropped_tokens)


def _check_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a 2-D float tensor (tokens, experts), got {shape}")


def example_logits(num_tokens: int = 24, num_experts: int = 8, skew: float = 1.5, seed: int = 0) -> torch.Tensor:
    """(T, E) standard-normal router logits plus a popularity that falls linearly from ``skew``
    (expert 0) to 0 (the last expert): a router that prefers some experts, as trained ones do."""
    if num_tokens < 1 or num_experts < 2:
        raise ValueError(f"need num_tokens >= 1 and num_experts >= 2, got {num_tokens} and {num_experts}")
    generator = torch.Generator().manual_seed(seed)
    popularity = torch.linspace(skew, 0.0, num_experts)  # (E,)
    return torch.randn(num_tokens, num_experts, generator=generator) + popularity


def feasible_topk_group(num_experts: int, top_k: int, n_group: int, topk_group: int) -> int:
    """The smallest number of kept groups >= ``topk_group`` that still holds k experts."""
    return min(n_group, max(topk_group, math.ceil(top_k / (num_experts // n_group))))


# ---------------------------------------------------------------------------------------------
# Drawing one setting: the traces and where they go (row, col) in a 2 × 2 grid.
# ---------------------------------------------------------------------------------------------
def _traces(data: RoutingData, show: str, zmax: float) -> list[tuple[go.BaseTraceType, int, int]]:
    if show not in SHOW_OPTIONS:
        raise ValueError(f"show must be one of {SHOW_OPTIONS}, got {show!r}")
    values = data.probabilities if show == "probabilities" else data.weights  # (T, E)
    tokens = list(range(data.num_tokens))
    experts = list(range(data.num_experts))
    token_ids = torch.arange(data.num_tokens).unsqueeze(1).expand_as(data.kept)  # (T, k)
    label = "router probability" if show == "probabilities" else "routing weight"
    heatmap = go.Heatmap(z=values.tolist(), x=experts, y=tokens, zmin=0.0, zmax=zmax, colorscale="Blues",
                         colorbar=dict(title=dict(text=label, side="right"), x=1.02, len=0.75, y=0.375),
                         hovertemplate=f"token %{{y}}, expert %{{x}}<br>{label} %{{z:.3f}}<extra></extra>")
    traces = [(heatmap, 2, 1)]
    for name, mask, symbol, color in (("kept choice", data.kept, "circle-open", KEPT_COLOR),
                                      ("dropped choice", ~data.kept, "x", DROPPED_COLOR)):
        marker = dict(symbol=symbol, size=9, color=color, line=dict(width=2, color=color))
        traces.append((go.Scatter(x=data.routing.expert_ids[mask].tolist(), y=token_ids[mask].tolist(),
                                  mode="markers", name=name, legendgroup=name, marker=marker,
                                  hovertemplate=f"token %{{y}} → expert %{{x}}: {name}<extra></extra>"), 2, 1))
    dropped_per_expert = data.tokens_per_expert - data.kept_per_expert
    for name, counts, color in (("kept choice", data.kept_per_expert, KEPT_COLOR),
                                ("dropped choice", dropped_per_expert, DROPPED_COLOR)):
        traces.append((go.Bar(x=experts, y=counts.tolist(), name=name, legendgroup=name, showlegend=False,
                              marker_color=color, hovertemplate=f"expert %{{x}}: %{{y}} {name}s<extra></extra>"), 1, 1))
    capacity = [] if data.capacity is None else [data.capacity, data.capacity]
    traces.append((go.Scatter(x=[-0.5, data.num_experts - 0.5] if capacity else [], y=capacity, mode="lines",
                              name="capacity C", line=dict(color="black", dash="dash"),
                              hovertemplate="capacity C = %{y}<extra></extra>"), 1, 1))
    traces.append((go.Bar(x=data.dropped_per_token.tolist(), y=tokens, orientation="h", name="dropped choice",
                          legendgroup="dropped choice", showlegend=False, marker_color=DROPPED_COLOR,
                          hovertemplate="token %{y} lost %{x} of its choices<extra></extra>"), 2, 2))
    return traces


TRACES_PER_SETTING = 7  # heatmap, kept/dropped markers, kept/dropped bars, capacity line, lost bars


def _grid(datas: list[RoutingData], show: str) -> tuple[go.Figure, float]:
    """An empty 2 × 2 grid sized for ``datas``, and the colour scale's top for the heatmaps."""
    figure = make_subplots(rows=2, cols=2, shared_xaxes=True, shared_yaxes=True, column_widths=[0.84, 0.16],
                           row_heights=[0.25, 0.75], specs=[[{}, None], [{}, {}]], horizontal_spacing=0.02,
                           vertical_spacing=0.04)
    legend = dict(orientation="h", x=1.0, xanchor="right", y=1.0, yanchor="bottom")
    figure.update_layout(barmode="stack", height=260 + 18 * datas[0].num_tokens, margin=dict(t=90, r=20),
                         legend=legend, plot_bgcolor="white")
    figure.update_yaxes(autorange="reversed", title_text="token", row=2, col=1)
    figure.update_yaxes(autorange="reversed", row=2, col=2)
    figure.update_yaxes(title_text="choices", row=1, col=1)
    figure.update_xaxes(title_text="expert", dtick=1, row=2, col=1)
    max_top_k = max(d.top_k for d in datas)
    figure.update_xaxes(title_text="lost", dtick=1, range=[0, max_top_k + 0.5], row=2, col=2)
    zmax = 1.0 if show == "probabilities" else max(1.0, max(float(d.weights.max()) for d in datas))
    return figure, zmax


def routing_heatmap(data: RoutingData, show: str = "probabilities") -> go.Figure:
    """The figure of one setting (what the widget draws)."""
    figure, zmax = _grid([data], show)
    for trace, row, col in _traces(data, show, zmax):
        figure.add_trace(trace, row=row, col=col)
    figure.update_layout(title=dict(text=data.title(), font=dict(size=13)))
    return figure


def setting_label(setting: dict) -> str:
    """'deepseek_v3 top-2, 4 groups keep 2' for a setting dict of ``routing_data`` arguments."""
    label = f"{setting.get('family', 'softmax')} top-{setting.get('top_k', 2)}"
    if setting.get("family") == "deepseek_v3" and setting.get("n_group", 1) > 1:
        label += f", {setting['n_group']} groups keep {setting.get('topk_group', 1)}"
    return label


def default_settings(num_experts: int) -> list[dict]:
    """Mixtral-like top-1 and top-2, DeepSeek-V3 group-limited top-2, Llama 4 top-1."""
    n_group = 4 if num_experts % 4 == 0 and num_experts >= 8 else 1
    return [dict(family="softmax", top_k=1), dict(family="softmax", top_k=2),
            dict(family="deepseek_v3", top_k=2, n_group=n_group, topk_group=min(2, n_group)),
            dict(family="llama4", top_k=1)]


def routing_figure(logits: torch.Tensor, settings: list[dict] | None = None,
                   capacity_factors: tuple[float, ...] = CAPACITY_FACTORS, show: str = "probabilities",
                   active_capacity: int = 3) -> go.Figure:
    """A static figure: a dropdown over router ``settings`` (dicts of ``routing_data`` arguments)
    and a slider over ``capacity_factors``, every combination precomputed. Choosing a setting
    swaps in its own slider and shows it at ``capacity_factors[active_capacity]``."""
    settings = default_settings(logits.shape[1]) if settings is None else list(settings)
    if not settings or not capacity_factors:
        raise ValueError("routing_figure needs at least one setting and one capacity factor")
    if not 0 <= active_capacity < len(capacity_factors):
        raise ValueError(f"active_capacity={active_capacity} must index {len(capacity_factors)} capacity factors")
    datas = [[routing_data(logits, capacity_factor=cf, **setting) for cf in capacity_factors] for setting in settings]
    figure, zmax = _grid([d for row in datas for d in row], show)
    for row in datas:
        for data in row:
            for trace, r, c in _traces(data, show, zmax):
                figure.add_trace(trace.update(visible=False), row=r, col=c)
    num_traces = len(figure.data)

    def visible(s: int, c: int) -> list[bool]:
        first = (s * len(capacity_factors) + c) * TRACES_PER_SETTING
        return [first <= i < first + TRACES_PER_SETTING for i in range(num_traces)]

    def slider(s: int) -> dict:
        steps = [dict(method="update", label="dropless" if cf <= 0 else f"{cf:g}",
                      args=[{"visible": visible(s, c)}, {"title.text": datas[s][c].title()}])
                 for c, cf in enumerate(capacity_factors)]
        return dict(active=active_capacity, steps=steps, currentvalue=dict(prefix="capacity factor: "),
                    pad=dict(t=40), x=0, len=0.84)

    buttons = [dict(method="update", label=setting_label(setting),
                    args=[{"visible": visible(s, active_capacity)},
                          {"title.text": datas[s][active_capacity].title(), "sliders": [slider(s)]}])
               for s, setting in enumerate(settings)]
    for i, on in enumerate(visible(0, active_capacity)):
        figure.data[i].visible = on
    menu = dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.18, yanchor="top", showactive=True)
    figure.update_layout(title=dict(text=datas[0][active_capacity].title(), font=dict(size=13)),
                         sliders=[slider(0)], updatemenus=[menu])
    return figure


# ---------------------------------------------------------------------------------------------
# The live widget.
# ---------------------------------------------------------------------------------------------
class RoutingWidget(FigurePanel):
    """Controls for top-k, router family, capacity factor and what the heatmap shows.

    ``controls`` maps "top_k", "family", "capacity_factor" and "show" to their ipywidgets;
    changing any of them recomputes ``data`` (``routing_data``), ``figure`` and the ``summary``
    label. DeepSeek-V3 uses ``n_group`` groups and keeps ``topk_group`` of them, more if top-k
    needs more (``feasible_topk_group``). Display it as the last expression of a cell.
    """

    def __init__(self, logits: torch.Tensor, family: str = "softmax", top_k: int = 2, capacity_factor: float = 1.0,
                 show: str = "probabilities", n_group: int | None = None, topk_group: int = 2,
                 bias: torch.Tensor | None = None):
        import ipywidgets as widgets

        _check_logits(logits)
        self.logits, self.bias = logits, bias
        num_experts = logits.shape[1]
        self.n_group = n_group if n_group is not None else default_settings(num_experts)[2]["n_group"]
        self.topk_group = topk_group
        self.controls = {
            "top_k": widgets.IntSlider(value=top_k, min=1, max=num_experts, description="top-k"),
            "family": widgets.Dropdown(value=family, options=list(ROUTER_FAMILIES), description="router"),
            "capacity_factor": widgets.FloatSlider(value=capacity_factor, min=0.0, max=3.0, step=0.05,
                                                   description="capacity", readout_format=".2f"),
            "show": widgets.ToggleButtons(value=show, options=list(SHOW_OPTIONS), description="heatmap"),
        }
        self.summary, self.output = widgets.Label(), widgets.Output()
        controls, note = self.controls, widgets.Label("capacity factor 0 = dropless")
        self.panel = widgets.VBox([widgets.HBox([controls["top_k"], controls["family"]]),
                                   widgets.HBox([controls["capacity_factor"], note]), controls["show"], self.summary,
                                   self.output])
        for control in self.controls.values():
            control.observe(self.update, names="value")
        self.update()

    def settings(self) -> dict:
        """The ``routing_data`` arguments the controls describe now."""
        family, top_k = self.controls["family"].value, self.controls["top_k"].value
        settings = dict(family=family, top_k=top_k, capacity_factor=self.controls["capacity_factor"].value)
        if family == "deepseek_v3":
            num_experts = self.logits.shape[1]
            settings.update(bias=self.bias, n_group=self.n_group,
                            topk_group=feasible_topk_group(num_experts, top_k, self.n_group, self.topk_group))
        return settings

    def update(self, change=None) -> None:
        """Recompute and redraw (called by every control)."""
        self.data = routing_data(self.logits, **self.settings())
        self.summary.value = self.data.summary()
        self.draw(routing_heatmap(self.data, show=self.controls["show"].value))
