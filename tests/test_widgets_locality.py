"""The locality widget: its data equal the fitting protocol + measure() and a brute-force replica count; every
expert is drawn on exactly the GPUs that host it; the live widget recomputes when a selector changes; the static
figure has one dropdown entry and one trace group per precomputed (method, topology) result."""

import numpy as np
import pytest

from minimoe.placement.experiments import METHODS, fit, masks
from minimoe.traces import synthetic_trace
from minimoe.placement import Topology
from minimoe.placement import measure
from minimoe.widgets.locality import (
    MB,
    TRACES_PER_RESULT,
    LocalityWidget,
    default_replicas,
    locality_data,
    locality_figure,
    locality_results,
    locality_view,
    parse_topology,
)

WINDOW = 4
TRACE = synthetic_trace(num_requests=24, tokens_per_request=16, num_layers=2, num_experts=12, top_k=3, seed=3)


def brute_force_slot_load(placement, layer, trace, sources, tokens):
    """Pairs each slot serves, routed one (token, expert) at a time by the documented rule: a replica on the
    token's GPU, else on its node, else anywhere; among equally near ones the (token row % count)-th in slot order."""
    load = np.zeros(placement.num_slots, dtype=np.int64)
    slots_per_gpu, per_node = placement.slots_per_gpu, placement.gpus_per_node
    for row in np.flatnonzero(tokens):
        source = int(sources[trace.request[row]])
        for expert in trace.experts[row, layer]:
            if expert < 0:
                continue
            replicas = [s for s in range(placement.num_slots) if placement.phy2log[layer, s] == expert]
            for near in (lambda s: s // slots_per_gpu == source,
                         lambda s: s // slots_per_gpu // per_node == source // per_node, lambda s: True):
                candidates = [s for s in replicas if near(s)]
                if candidates:
                    load[candidates[row % len(candidates)]] += 1
                    break
    return load.reshape(placement.num_gpus, slots_per_gpu)


@pytest.mark.parametrize("topology", ["2x2", "3x2"])
@pytest.mark.parametrize("method", METHODS)
def test_data_equal_the_protocol_measure_and_brute_force(method, topology):
    layer, mode = 1, "online"
    data = locality_data(TRACE, method, topology, fit_mode=mode, layer=layer, window=WINDOW)
    grid = parse_topology(topology)
    num_replicas = default_replicas(TRACE.num_experts, grid)
    assert num_replicas == (TRACE.num_experts // grid.num_gpus + 1) * grid.num_gpus  # 12 experts divide 4 and 6
    token_sets = masks(TRACE, WINDOW)
    placement, sources = fit(TRACE, grid, method, token_sets[mode], num_replicas, 0)
    report = measure(TRACE, placement, grid, sources=sources, tokens=token_sets["eval"])
    assert data.placement == placement and np.array_equal(data.sources, sources)
    assert data.report.as_dict() == report.as_dict()
    np.testing.assert_array_equal(data.node_matrix, report.node_matrix)
    # the node matrix holds every de-duplicated byte: RDMA off the diagonal, NVLink hops on it
    assert data.node_matrix.sum() == pytest.approx(report.inter_node_bytes + report.intra_node_bytes, rel=1e-12)
    off_diagonal = data.node_matrix.sum() - np.trace(data.node_matrix)
    assert off_diagonal == pytest.approx(report.inter_node_bytes, rel=1e-12)

    # every expert is drawn on exactly the GPUs that host it, once per replica
    drawn = np.zeros((TRACE.num_experts, grid.num_gpus), dtype=np.int64)
    for gpu, experts in enumerate(data.gpu_experts):
        np.add.at(drawn[:, gpu], experts, 1)
    np.testing.assert_array_equal(drawn > 0, placement.hosts("gpu")[layer])
    np.testing.assert_array_equal(drawn.sum(1), placement.replica_counts()[layer])

    # pairs served per slot: a brute-force routing, the per-GPU load of the report, the per-expert pair count
    expected = brute_force_slot_load(placement, layer, TRACE, sources, token_sets["eval"])
    np.testing.assert_array_equal(data.slot_load, expected)
    np.testing.assert_array_equal(data.slot_load.sum(1), report.per_layer["tokens_per_rank"][layer])
    evaluated = TRACE.experts[token_sets["eval"], layer]
    per_expert = np.zeros(TRACE.num_experts, dtype=np.int64)
    np.add.at(per_expert, data.gpu_experts.ravel(), data.slot_load.ravel())
    np.testing.assert_array_equal(per_expert, np.bincount(evaluated[evaluated >= 0], minlength=TRACE.num_experts))


def test_expert_colour_is_the_domain_that_uses_it_most():
    data = locality_data(TRACE, "contiguous", "2x2", layer=0, window=WINDOW)
    assert data.domains == sorted(set(TRACE.domain.tolist()))
    share = np.zeros((len(data.domains), TRACE.num_experts))  # each domain's pairs per expert / its pairs
    for row in range(TRACE.num_tokens):
        for expert in TRACE.experts[row, 0]:
            share[data.domains.index(TRACE.domain[row]), expert] += 1
    share /= share.sum(1, keepdims=True)
    np.testing.assert_array_equal(data.expert_domain, share.argmax(0))


def test_planted_partition_draws_each_domain_on_its_own_node():
    from minimoe.traces import planted_trace

    trace = planted_trace(num_domains=2, experts_per_domain=6, num_requests=16, tokens_per_request=16, top_k=3)
    data = locality_data(trace, "grouping+locality", "2x2", fit_mode="oracle", window=2, spare_slots_per_gpu=0)
    assert data.report.inter_node_bytes == 0
    assert np.count_nonzero(data.node_matrix - np.diag(np.diag(data.node_matrix))) == 0
    node_domains = data.expert_domain[data.gpu_experts].reshape(2, -1)  # (nodes, slots of the node)
    assert all(len(set(row)) == 1 for row in node_domains.tolist()) and node_domains[0, 0] != node_domains[1, 0]


def test_widget_recomputes_when_a_selector_changes():
    widget = LocalityWidget(TRACE, method="contiguous", topology="2x2", window=WINDOW)
    assert (widget.data.method, str(widget.data.topology), widget.data.layer) == ("contiguous", "2x2", 0)
    first = widget.data
    widget.controls["method"].value = "locality"
    assert widget.data.method == "locality"
    assert widget.data.placement == locality_data(TRACE, "locality", "2x2", window=WINDOW).placement
    assert widget.summary.value == widget.data.summary() and "locality on 2x2" in widget.summary.value
    widget.controls["topology"].value = "4x2"
    assert widget.data.topology == Topology(4, 2) and widget.data.node_matrix.shape == (4, 4)
    assert np.asarray(widget.figure.data[-1].z).shape == (4, 4)  # the drawn node matrix follows
    widget.controls["layer"].value = 1
    assert widget.data.layer == 1
    np.testing.assert_array_equal(widget.data.gpu_experts.ravel(), widget.data.placement.phy2log[1])
    widget.controls["fit"].value = "oracle"
    assert widget.data.fit == "oracle"
    colours = widget.figure.data[-4].colorscale
    widget.controls["color_by"].value = "load"
    assert widget.figure.data[-4].colorscale != colours
    assert widget.data is widget.cache[("locality", "4x2", "oracle", 1)]
    widget.controls["method"].value, widget.controls["topology"].value = "contiguous", "2x2"
    widget.controls["layer"].value, widget.controls["fit"].value = 0, "prefill"
    assert widget.data is first  # cached, not refitted


def test_static_figure_has_one_entry_per_result():
    methods, topologies = ("contiguous", "eplb", "grouping+locality"), ("2x2", "4x2")
    results = locality_results(TRACE, methods=methods, topologies=topologies, window=WINDOW)
    figure = locality_figure(results)
    menu = figure.layout.updatemenus[0]
    assert [b.label for b in menu.buttons] == [f"{m} · {t}" for t in topologies for m in methods]
    legend = len(results[0].domains)  # one always-visible legend entry per domain colour
    assert len(figure.data) == legend + TRACES_PER_RESULT * len(results)
    for index, (button, data) in enumerate(zip(menu.buttons, results)):
        visible = button.args[0]["visible"]
        shown = [i for i, on in enumerate(visible) if on]
        first = legend + index * TRACES_PER_RESULT
        assert shown == list(range(legend)) + list(range(first, first + TRACES_PER_RESULT))
        np.testing.assert_allclose(figure.data[first + 3].z, data.node_matrix / MB)
        assert data.label in button.label and data.summary().split(": ")[1] in button.args[1]["title.text"]
    assert [trace.visible is not False for trace in figure.data] == list(menu.buttons[0].args[0]["visible"])
    zmax = {figure.data[legend + i * TRACES_PER_RESULT + 3].zmax for i in range(len(results))}
    assert zmax == {max(r.node_matrix.max() for r in results) / MB}  # one colour scale for every entry
    assert len(locality_view(results[0], "load").data) == TRACES_PER_RESULT


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown method 'nearest'"):
        locality_data(TRACE, "nearest", "2x2", window=WINDOW)
    with pytest.raises(ValueError, match="unknown fit mode 'future'"):
        locality_data(TRACE, "contiguous", "2x2", fit_mode="future", window=WINDOW)
    with pytest.raises(ValueError, match="layer must be an int in \\[0, 2\\), got 2"):
        locality_data(TRACE, "contiguous", "2x2", layer=2, window=WINDOW)
    with pytest.raises(ValueError, match="'4 by 2'"):
        parse_topology("4 by 2")
    with pytest.raises(ValueError, match="color_by"):
        locality_view(locality_data(TRACE, "contiguous", "2x2", window=WINDOW), color_by="rainbow")
    with pytest.raises(ValueError, match="at least one"):
        locality_figure([])
