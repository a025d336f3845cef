"""The routing widget: its data equal minimoe's MoELayer and a brute-force capacity count; the live
widget redraws when a control changes; the static figure holds one trace group per precomputed setting."""

import math
from fractions import Fraction

import plotly.graph_objects as go
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe.model import MoEConfig, MoELayer
from minimoe.model.aux_losses import router_probabilities
from minimoe.model.router import deepseek_v3_topk, llama4_topk, softmax_topk
from minimoe.widgets.routing import (
    TRACES_PER_SETTING,
    RoutingWidget,
    example_logits,
    feasible_topk_group,
    routing_data,
    routing_figure,
    routing_heatmap,
    setting_label,
)

SETTINGS = [
    dict(family="softmax", top_k=2),
    dict(family="softmax", top_k=3, norm_topk_prob=False),
    dict(family="deepseek_v3", top_k=3, n_group=4, topk_group=2, routed_scaling_factor=2.5),
    dict(family="llama4", top_k=1),
]


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5, 1.0, 1.25])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: setting_label(s))
def test_data_equal_the_moe_layer_on_real_hidden_states(setting, capacity_factor):
    """A MoELayer routes hidden states; routing_data gets only its router logits and must agree."""
    torch.manual_seed(0)
    hidden_size, num_experts = 16, 8
    options = {key: value for key, value in setting.items() if key not in ("family", "top_k")}
    config = MoEConfig(num_experts=num_experts, top_k=setting["top_k"], intermediate_size=4, router=setting["family"],
                       capacity_factor=capacity_factor, **options)
    layer = MoELayer(hidden_size, config).eval()
    bias = None
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
        if setting["family"] == "deepseek_v3":
            bias = torch.randn(num_experts) * 0.3
            layer.router.e_score_correction_bias.copy_(bias)
    x = torch.randn(40, hidden_size)  # (T, H)
    with torch.no_grad():
        layer(x)
        logits = F.linear(x, layer.router.weight)  # (T, E), what the layer's router computed
    data = routing_data(logits, capacity_factor=capacity_factor, bias=bias, **setting)
    routing = layer.last_routing
    assert torch.equal(data.routing.expert_ids, routing.expert_ids)
    torch.testing.assert_close(data.routing.weights, routing.weights, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(data.probabilities, router_probabilities(routing), rtol=1e-6, atol=1e-6)
    assert data.capacity == layer.capacity
    assert data.dropped_pairs == layer.dropped_tokens
    if layer.last_kept is None:
        assert capacity_factor == 0 and data.kept.all() and data.dropped_pairs == 0
    else:
        assert torch.equal(data.kept, layer.last_kept)
        assert capacity_factor < 1.25 or data.dropped_pairs < data.num_tokens  # sanity: not all dropped
    dense = torch.zeros(40, num_experts).scatter_(1, routing.expert_ids, routing.weights)
    torch.testing.assert_close(data.weights, dense, rtol=1e-6, atol=1e-6)


def test_routing_equals_the_router_functions():
    logits = example_logits(num_tokens=30, num_experts=8, seed=3)
    bias = torch.linspace(-0.4, 0.4, 8)
    cases = [
        (routing_data(logits, "softmax", 2), softmax_topk(logits, 2)),
        (routing_data(logits, "softmax", 4, norm_topk_prob=False), softmax_topk(logits, 4, norm_topk_prob=False)),
        (routing_data(logits, "deepseek_v3", 2, bias=bias, n_group=4, topk_group=2, routed_scaling_factor=2.5),
         deepseek_v3_topk(logits, 2, bias, n_group=4, topk_group=2, routed_scaling_factor=2.5)),
        (routing_data(logits, "llama4", 1), llama4_topk(logits, 1)),
    ]
    for data, direct in cases:
        assert torch.equal(data.routing.expert_ids, direct.expert_ids)
        torch.testing.assert_close(data.routing.weights, direct.weights, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(data.routing.scores, direct.scores, rtol=1e-6, atol=1e-6)


def brute_force_kept(expert_ids: list[list[int]], capacity: int) -> list[list[bool]]:
    """Walk the tokens in order; an expert accepts choices until it holds `capacity` of them."""
    held, kept = {}, []
    for row in expert_ids:
        kept_row = []
        for expert in row:
            kept_row.append(held.get(expert, 0) < capacity)
            held[expert] = held.get(expert, 0) + 1
        kept.append(kept_row)
    return kept


@settings(max_examples=25, deadline=None)
@given(num_tokens=st.integers(1, 40), num_experts=st.sampled_from([4, 8]), top_k=st.integers(1, 4),
       family=st.sampled_from(["softmax", "deepseek_v3", "llama4"]),
       capacity_factor=st.sampled_from([0.25, 0.5, 0.75, 1.0, 1.5, 2.0]), seed=st.integers(0, 10_000))
def test_capacity_and_drops_equal_a_brute_force_count(num_tokens, num_experts, top_k, family, capacity_factor, seed):
    logits = example_logits(num_tokens, num_experts, skew=2.0, seed=seed)
    data = routing_data(logits, family, top_k, capacity_factor)
    capacity = math.ceil(Fraction(num_tokens * top_k) * Fraction(capacity_factor) / num_experts)  # exact
    assert data.capacity == capacity
    ids = data.routing.expert_ids.tolist()
    assert data.kept.tolist() == brute_force_kept(ids, capacity)
    counts = [sum(row.count(e) for row in ids) for e in range(num_experts)]
    assert data.tokens_per_expert.tolist() == counts
    assert data.dropped_pairs == sum(max(0, n - capacity) for n in counts)
    assert data.kept_per_expert.tolist() == [min(n, capacity) for n in counts]
    assert data.dropped_per_token.sum() == data.dropped_pairs


def test_bad_input_is_rejected_with_the_value_named():
    logits = example_logits()
    with pytest.raises(ValueError, match=r"2-D float tensor.*\(8,\)"):
        routing_data(logits[0])
    with pytest.raises(ValueError, match="'topk'"):
        routing_data(logits, family="topk")
    with pytest.raises(ValueError, match="top_k=9"):
        routing_data(logits, top_k=9)
    with pytest.raises(ValueError, match="family='softmax'"):
        routing_data(logits, bias=torch.zeros(8))
    with pytest.raises(ValueError, match="n_group=3"):
        routing_data(logits, "deepseek_v3", n_group=3)
    with pytest.raises(ValueError, match="'scores'"):
        routing_heatmap(routing_data(logits), show="scores")


def markers(figure: go.Figure, name: str, indices=None) -> set[tuple[int, int]]:
    """(expert, token) of the marker trace called `name` among the traces `indices` (default: all)."""
    traces = [figure.data[i] for i in (indices if indices is not None else range(len(figure.data)))]
    (trace,) = [t for t in traces if isinstance(t, go.Scatter) and t.name == name and t.mode == "markers"]
    return set(zip(trace.x, trace.y))


def chosen(data, kept: bool) -> set[tuple[int, int]]:
    ids, mask = data.routing.expert_ids, data.kept if kept else ~data.kept
    tokens = torch.arange(data.num_tokens).unsqueeze(1).expand_as(ids)
    return set(zip(ids[mask].tolist(), tokens[mask].tolist()))


def test_widget_redraws_when_a_control_changes():
    logits = example_logits(num_tokens=24, num_experts=8, seed=0)
    widget = RoutingWidget(logits, family="softmax", top_k=2, capacity_factor=1.0)
    assert widget.data.capacity == 6 and widget.summary.value == widget.data.summary()
    assert markers(widget.figure, "dropped choice") == chosen(widget.data, kept=False)

    widget.controls["capacity_factor"].value = 0.5  # C = ceil(24 * 2 / 8 * 0.5) = 3
    assert widget.data.capacity == 3
    assert widget.data.dropped_pairs == sum(max(0, n - 3) for n in widget.data.tokens_per_expert.tolist()) > 0
    assert markers(widget.figure, "dropped choice") == chosen(widget.data, kept=False)
    assert markers(widget.figure, "kept choice") == chosen(widget.data, kept=True)
    assert "C=3" in widget.figure.layout.title.text and "C=3" in widget.summary.value

    widget.controls["capacity_factor"].value = 0.0
    assert widget.data.capacity is None and markers(widget.figure, "dropped choice") == set()

    widget.controls["family"].value = "deepseek_v3"
    (heatmap,) = [t for t in widget.figure.data if isinstance(t, go.Heatmap)]
    sigmoid = torch.sigmoid(logits)
    torch.testing.assert_close(torch.tensor(heatmap.z), sigmoid / sigmoid.sum(-1, keepdim=True))
    assert widget.data.family == "deepseek_v3" and widget.settings()["n_group"] == 4

    widget.controls["top_k"].value = 6  # needs 3 of the 4 groups of 2 experts: topk_group grows from 2
    assert widget.settings()["topk_group"] == 3 == feasible_topk_group(8, 6, 4, 2)
    assert widget.data.routing.expert_ids.shape == (24, 6)

    widget.controls["show"].value = "weights"
    (heatmap,) = [t for t in widget.figure.data if isinstance(t, go.Heatmap)]
    assert torch.equal(torch.tensor(heatmap.z), widget.data.weights)
    assert ((torch.tensor(heatmap.z) > 0).sum(-1) == 6).all()


def test_static_figure_has_one_trace_group_per_setting_and_capacity():
    logits = example_logits(num_tokens=16, num_experts=8, seed=1)
    settings_ = [dict(family="softmax", top_k=2), dict(family="deepseek_v3", top_k=2, n_group=4, topk_group=2),
                 dict(family="llama4", top_k=1)]
    capacity_factors = (0.0, 0.5, 1.0, 2.0)
    figure = routing_figure(logits, settings_, capacity_factors, active_capacity=2)
    assert len(figure.data) == len(settings_) * len(capacity_factors) * TRACES_PER_SETTING
    (menu,) = figure.layout.updatemenus
    assert [button.label for button in menu.buttons] == [setting_label(s) for s in settings_]
    (slider,) = figure.layout.sliders
    assert [step.label for step in slider.steps] == ["dropless", "0.5", "1", "2"] and slider.active == 2
    assert figure.layout.xaxis3.range[1] > 2  # the "lost" axis holds the largest top-k (2)
    initially = [i for i, trace in enumerate(figure.data) if trace.visible]
    assert initially == list(range(2 * TRACES_PER_SETTING, 3 * TRACES_PER_SETTING))  # setting 0, capacity 1.0
    for s, (setting, button) in enumerate(zip(settings_, menu.buttons)):
        setting_slider = button.args[1]["sliders"][0]
        assert len(setting_slider["steps"]) == len(capacity_factors)
        for c, (capacity_factor, step) in enumerate(zip(capacity_factors, setting_slider["steps"])):
            shown = [i for i, on in enumerate(step["args"][0]["visible"]) if on]
            assert len(shown) == TRACES_PER_SETTING
            data = routing_data(logits, capacity_factor=capacity_factor, **setting)
            assert markers(figure, "dropped choice", shown) == chosen(data, kept=False)
            assert markers(figure, "kept choice", shown) == chosen(data, kept=True)
            assert data.summary().split(": ")[1] in step["args"][1]["title.text"]
        assert button.args[0]["visible"] == setting_slider["steps"][2]["args"][0]["visible"]
    assert routing_figure(logits).layout.updatemenus[0].buttons[2].label == "deepseek_v3 top-2, 4 groups keep 2"
