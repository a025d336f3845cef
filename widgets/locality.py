"""Where the experts live and what crosses the network: a cluster drawing and its node-to-node traffic.

Left, the cluster of one MoE layer: nodes side by side, each a frame around its GPUs, each GPU a column
of its physical expert slots, each slot labelled with the expert it holds (a replicated expert appears
in several slots). A slot is coloured by the domain that uses its expert most (the largest share in
``minimoe.traces.analysis.domain_popularity``), or by the evaluated (token, expert) pairs it serves. Right, the
de-duplicated node-to-node bytes of ``TrafficReport.node_matrix`` over all layers: off the diagonal the
RDMA copies node m sends node n (one per token and remote node), on the diagonal the NVLink hops inside
node n (``minimoe.placement.traffic``).

Everything comes from one pure function, ``locality_data(trace, method, topology, ...)``, which runs the
fitting protocol of ``minimoe.placement.experiments`` (``masks``, ``fit``) and ``minimoe.placement.traffic.measure``: fit a
method on the prefill / online-window / oracle tokens, evaluate it on the held-out decode tokens.
Which slot serves which pair is ``Placement.route``'s rule, the one ``measure`` uses. Two views:

- ``LocalityWidget``: method, topology, fit-mode, layer and colour selectors (ipywidgets), live notebook;
- ``locality_figure(results)``: a plain plotly figure for the static book, one dropdown entry per
  precomputed ``LocalityData`` (e.g. every (method, topology) pair), no Python in the page.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from minimoe.traces.analysis import domain_popularity
from minimoe.placement.experiments import FIT_MODES, METHODS, fit, masks
from minimoe.placement.phy2log import Placement
from minimoe.placement.topology import Topology
from minimoe.placement.traffic import TrafficReport, measure
from minimoe.widgets._panel import FigurePanel

COLOR_BY = ("domain", "load")
TOPOLOGIES = ("2x2", "4x2", "2x4", "4x4")
DOMAIN_COLORS = qualitative.Set2
MB = 1e6


def parse_topology(topology) -> Topology:
    """A Topology from a Topology, a (nodes, gpus_per_node) pair or a "NxG" string."""
    if isinstance(topology, Topology):
        return topology
    if isinstance(topology, str):
        parts = topology.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"topology string must look like '4x2' (nodes x GPUs per node), got {topology!r}")
        return Topology(int(parts[0]), int(parts[1]))
    if isinstance(topology, (tuple, list)) and len(topology) == 2:
        return Topology(*topology)
    raise TypeError(f"topology must be a Topology, a (nodes, gpus) pair or a 'NxG' string, got {topology!r}")


def default_replicas(num_experts: int, topology: Topology, spare_slots_per_gpu: int = 1) -> int:
    """Slots per layer: enough for every expert, rounded up to equal slots per GPU, plus spares on each GPU."""
    if isinstance(spare_slots_per_gpu, bool) or not isinstance(spare_slots_per_gpu, int) or spare_slots_per_gpu < 0:
        raise ValueError(f"spare_slots_per_gpu must be an int >= 0, got {spare_slots_per_gpu!r}")
    gpus = topology.num_gpus
    return (-(-num_experts // gpus) + spare_slots_per_gpu) * gpus


@dataclass
class LocalityData:
    """One method fitted on one topology, measured on the evaluated (held-out decode) tokens."""

    method: str
    fit: str
    topology: Topology
    layer: int  # the layer the cluster drawing shows
    placement: Placement
    sources: np.ndarray  # int64 (R,): GPU of each request
    report: TrafficReport  # evaluated tokens, all layers
    gpu_experts: np.ndarray  # int64 (G, S): the expert in each slot of each GPU, layer `layer`
    slot_load: np.ndarray  # int64 (G, S): evaluated (token, expert) pairs each slot serves, layer `layer`
    domains: list[str]  # domain labels, [] when the trace has none
    expert_domain: np.ndarray  # int64 (E,): index into `domains` of each expert's heaviest user (-1: none)

    @property
    def node_matrix(self) -> np.ndarray:
        """(N, N) bytes: node m -> node n over RDMA off the diagonal, NVLink hops inside n on it."""
        return self.report.node_matrix

    @property
    def label(self) -> str:
        return f"{self.method} · {self.topology}"

    def summary(self) -> str:
        report = self.report
        return (f"{self.method} on {self.topology} fitted on {self.fit}, {report.num_tokens:,} evaluated tokens: "
                f"inter-node {report.inter_node_bytes / MB:,.1f} MB de-duplicated, "
                f"{report.pair_bytes_inter / MB:,.1f} MB per (token, expert); node-local pairs "
                f"{report.pair_node_local_fraction:.1%}; load max/mean {report.load_max_over_mean:.2f}")


def locality_data(trace, method: str = "grouping+locality", topology="4x2", fit_mode: str = "prefill",
                  layer: int = 0, num_replicas: int | None = None, spare_slots_per_gpu: int = 1, window: int = 8,
                  seed: int = 0, hidden_size: int = 7168) -> LocalityData:
    """Fit ``method`` (``minimoe.placement.experiments.METHODS``) on the ``fit_mode`` tokens of ``trace`` (prefill,
    online, oracle; ``minimoe.placement.experiments.masks``), measure it on the evaluated decode tokens, and lay out
    ``layer`` for drawing. ``num_replicas`` defaults to ``default_replicas(E, topology, spare_slots_per_gpu)``."""
    topology = parse_topology(topology)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    if fit_mode not in FIT_MODES:
        raise ValueError(f"unknown fit mode {fit_mode!r}; expected one of {list(FIT_MODES)}")
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < trace.num_layers:
        raise ValueError(f"layer must be an int in [0, {trace.num_layers}), got {layer!r}")
    num_replicas = num_replicas or default_replicas(trace.num_experts, topology, spare_slots_per_gpu)
    token_sets = masks(trace, window)
    placement, sources = fit(trace, topology, method, token_sets[fit_mode], num_replicas, seed)
    report = measure(trace, placement, topology, sources=sources, tokens=token_sets["eval"], hidden_size=hidden_size)

    rows = np.flatnonzero(token_sets["eval"])  # the token index measure() routes with is the trace row
    source_gpu = topology.request_ranks(trace.num_requests, sources)[trace.request[rows]]
    slots = placement.route(layer, trace.experts[rows, layer].astype(np.int64), source_gpu, rows)  # (T, k)
    slot_load = np.bincount(slots[slots >= 0], minlength=placement.num_slots)
    shape = (topology.num_gpus, placement.slots_per_gpu)
    domains, expert_domain = [], np.full(trace.num_experts, -1, dtype=np.int64)
    if trace.has_domain:
        labels, popularity = domain_popularity(trace)  # (D,), (D, L, E)
        domains = [str(label) for label in labels]
        used = popularity[:, layer].sum(0) > 0
        expert_domain[used] = popularity[:, layer].argmax(0)[used]
    return LocalityData(method, fit_mode, topology, int(layer), placement, np.asarray(sources), report,
                        placement.phy2log[layer].reshape(shape), slot_load.reshape(shape), domains, expert_domain)


def locality_results(trace, methods=METHODS, topologies=TOPOLOGIES, **options) -> list[LocalityData]:
    """``locality_data`` for every (method, topology) pair, topologies outermost."""
    return [locality_data(trace, method, topology, **options) for topology in topologies for method in methods]


# ---------------------------------------------------------------------------------------------
# Drawing: four traces per result (slots, node frames, labels, node matrix).
# ---------------------------------------------------------------------------------------------
TRACES_PER_RESULT = 4


def _columns(topology: Topology) -> np.ndarray:
    """x position of each GPU: a node's GPUs side by side, one empty column between nodes."""
    gpu = np.arange(topology.num_gpus)
    return gpu // topology.gpus_per_node * (topology.gpus_per_node + 1) + gpu % topology.gpus_per_node


def _domain_colorscale(num_domains: int) -> list:
    """A stepped colour scale: value d in [d - 0.5, d + 0.5] gets DOMAIN_COLORS[d]; -1 (unused) grey."""
    colors = ["#dddddd"] + [DOMAIN_COLORS[d % len(DOMAIN_COLORS)] for d in range(num_domains)]
    scale = []
    for i, color in enumerate(colors):
        scale += [[i / len(colors), color], [(i + 1) / len(colors), color]]
    return scale


def _traces(data: LocalityData, color_by: str, zmax_matrix: float, zmax_load: float) -> list:
    if color_by not in COLOR_BY:
        raise ValueError(f"color_by must be one of {COLOR_BY}, got {color_by!r}")
    topology, (num_gpus, num_slots) = data.topology, data.gpu_experts.shape
    columns = _columns(topology)
    width = int(columns[-1]) + 1
    experts = data.gpu_experts.T  # (S, G)
    if color_by == "domain":
        values = data.expert_domain[experts].astype(float)  # (S, G)
        style = dict(colorscale=_domain_colorscale(len(data.domains)), zmin=-1.5, zmax=len(data.domains) - 0.5,
                     showscale=False)
    else:
        values = data.slot_load.T.astype(float)
        bar = dict(title="pairs served", orientation="h", x=0.3, xanchor="center", y=-0.08, yanchor="top", len=0.5,
                   thickness=12)
        style = dict(colorscale="Blues", zmin=0, zmax=zmax_load, colorbar=bar)
    z = np.full((num_slots, width), np.nan)
    text = np.full((num_slots, width), "", dtype=object)
    hover = np.full((num_slots, width), "", dtype=object)
    counts = data.placement.replica_counts()[data.layer]
    for gpu, column in enumerate(columns):
        z[:, column] = values[:, gpu]
        for slot in range(num_slots):
            expert = int(experts[slot, gpu])
            owner = data.domains[data.expert_domain[expert]] if data.expert_domain[expert] >= 0 else "none"
            text[slot, column] = str(expert)
            hover[slot, column] = (f"GPU {gpu} (node {gpu // topology.gpus_per_node}), slot {slot}<br>expert {expert}"
                                   f" ({counts[expert]} replica{'s' if counts[expert] > 1 else ''})<br>"
                                   f"serves {data.slot_load[gpu, slot]:,} evaluated pairs<br>heaviest user: {owner}")
    slots = go.Heatmap(z=z, x=list(range(width)), y=list(range(num_slots)), text=text.tolist(),
                       texttemplate="%{text}", hovertext=hover.tolist(), hoverinfo="text", xgap=3, ygap=3, **style)
    frame_x, frame_y = [], []
    for node in range(topology.num_nodes):
        left = node * (topology.gpus_per_node + 1) - 0.55
        right = left + topology.gpus_per_node + 0.1
        frame_x += [left, right, right, left, left, None]
        frame_y += [-0.6, -0.6, num_slots - 0.4, num_slots - 0.4, -0.6, None]
    frames = go.Scatter(x=frame_x, y=frame_y, mode="lines", line=dict(color="black", width=1.5), hoverinfo="skip",
                        showlegend=False)
    node_centres = [n * (topology.gpus_per_node + 1) + (topology.gpus_per_node - 1) / 2
                    for n in range(topology.num_nodes)]
    labels = go.Scatter(x=node_centres + columns.tolist(), y=[-1.1] * topology.num_nodes + [num_slots] * num_gpus,
                        text=[f"<b>node {n}</b>" for n in range(topology.num_nodes)]
                        + [f"GPU {g}" for g in range(num_gpus)],
                        mode="text", hoverinfo="skip", showlegend=False)
    nodes = list(range(topology.num_nodes))
    matrix = go.Heatmap(z=(data.node_matrix / MB).tolist(), x=nodes, y=nodes, colorscale="Reds", zmin=0,
                        zmax=zmax_matrix, texttemplate="%{z:.1f}", colorbar=dict(title="MB", x=1.02, len=0.8),
                        hovertemplate="node %{y} → node %{x}: %{z:.2f} MB<extra></extra>")
    return [slots, frames, labels, matrix]


def _grid(domains: list[str], color_by: str) -> go.Figure:
    figure = make_subplots(rows=1, cols=2, column_widths=[0.64, 0.36], horizontal_spacing=0.1,
                           subplot_titles=("expert slots of one layer", "node → node MB, all layers"))
    figure.update_xaxes(visible=False, row=1, col=1)
    figure.update_yaxes(visible=False, autorange="reversed", row=1, col=1)
    figure.update_xaxes(title_text="to node", dtick=1, row=1, col=2)
    figure.update_yaxes(title_text="from node", dtick=1, autorange="reversed", row=1, col=2)
    figure.update_layout(height=520, margin=dict(t=130), plot_bgcolor="white",
                         legend=dict(orientation="h", x=0, y=-0.05, yanchor="top"))
    if color_by == "domain":  # a legend of the domain colours (never toggled)
        for index, domain in enumerate(domains):
            color = DOMAIN_COLORS[index % len(DOMAIN_COLORS)]
            figure.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"mostly {domain}",
                                        marker=dict(symbol="square", size=12, color=color)), row=1, col=1)
    return figure


def _title(data: LocalityData) -> str:
    head, _, tail = data.summary().partition(": ")
    return f"{head}, layer {data.layer}<br><sup>{tail}</sup>"


def _add(figure: go.Figure, data: LocalityData, color_by: str, zmax_matrix: float, zmax_load: float,
         visible: bool = True) -> None:
    for index, trace in enumerate(_traces(data, color_by, zmax_matrix, zmax_load)):
        figure.add_trace(trace.update(visible=visible), row=1, col=2 if index == 3 else 1)


def locality_view(data: LocalityData, color_by: str = "domain") -> go.Figure:
    """The figure of one result (what the widget draws)."""
    figure = _grid(data.domains, color_by)
    _add(figure, data, color_by, float(data.node_matrix.max()) / MB, float(data.slot_load.max()))
    return figure.update_layout(title=dict(text=_title(data), font=dict(size=13)))


def locality_figure(results: list[LocalityData], color_by: str = "domain") -> go.Figure:
    """A static figure: one dropdown entry per precomputed result (e.g. ``locality_results(trace)``), all on
    one colour scale per panel, so colours compare across entries."""
    if not results:
        raise ValueError("locality_figure needs at least one LocalityData")
    zmax_matrix = max(float(r.node_matrix.max()) for r in results) / MB
    zmax_load = max(float(r.slot_load.max()) for r in results)
    figure = _grid(results[0].domains, color_by)
    fixed = len(figure.data)  # legend entries stay visible
    for index, data in enumerate(results):
        _add(figure, data, color_by, zmax_matrix, zmax_load, visible=index == 0)

    def visible(entry: int) -> list[bool]:
        first = fixed + entry * TRACES_PER_RESULT
        return [i < fixed or first <= i < first + TRACES_PER_RESULT for i in range(len(figure.data))]

    buttons = [dict(label=data.label, method="update", args=[{"visible": visible(i)}, {"title.text": _title(data)}])
               for i, data in enumerate(results)]
    figure.update_layout(title=dict(text=_title(results[0]), font=dict(size=13)),
                         updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.3,
                                           yanchor="top", showactive=True)])
    return figure


# ---------------------------------------------------------------------------------------------
# The live widget.
# ---------------------------------------------------------------------------------------------
class LocalityWidget(FigurePanel):
    """Method, topology, fit-mode, layer and colour selectors over ``locality_data`` of one trace.

    ``controls`` maps "method", "topology", "fit", "layer" and "color_by" to their ipywidgets; changing
    any of them recomputes ``data`` and ``figure`` (fits are cached per (method, topology, fit, layer)).
    ``options`` go to ``locality_data`` (e.g. ``window``, ``spare_slots_per_gpu``). Display it as the
    last expression of a cell.
    """

    def __init__(self, trace, method: str = "grouping+locality", topology: str = "4x2", fit_mode: str = "prefill",
                 layer: int = 0, color_by: str = "domain", topologies=TOPOLOGIES, methods=METHODS, **options):
        import ipywidgets as widgets

        self.trace, self.options, self.cache = trace, options, {}
        self.controls = {
            "method": widgets.Dropdown(options=list(methods), value=method, description="method"),
            "topology": widgets.Dropdown(options=list(topologies), value=topology, description="nodes x GPUs"),
            "fit": widgets.Dropdown(options=list(FIT_MODES), value=fit_mode, description="fitted on"),
            "layer": widgets.IntSlider(value=layer, min=0, max=trace.num_layers - 1, description="layer"),
            "color_by": widgets.ToggleButtons(options=list(COLOR_BY), value=color_by, description="colour"),
        }
        self.summary = widgets.Label()
        self.output = widgets.Output()
        self.panel = widgets.VBox([widgets.HBox([self.controls["method"], self.controls["topology"]]),
                                   widgets.HBox([self.controls["fit"], self.controls["layer"]]),
                                   self.controls["color_by"], self.summary, self.output])
        for control in self.controls.values():
            control.observe(self.update, names="value")
        self.update()

    def update(self, change=None) -> None:
        """Recompute (or reuse) the data and redraw (called by every control)."""
        key = tuple(self.controls[name].value for name in ("method", "topology", "fit", "layer"))
        if key not in self.cache:
            self.cache[key] = locality_data(self.trace, key[0], key[1], fit_mode=key[2], layer=key[3], **self.options)
        self.data = self.cache[key]
        self.summary.value = self.data.summary()
        self.draw(locality_view(self.data, self.controls["color_by"].value))
