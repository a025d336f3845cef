"""MoE layer: loop path == grouped path (values and gradients), capacity, edge cases, config."""

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe.model.moe import MoEConfig, MoELayer, choose_backend, expert_capacity, grouped_matmul, grouped_mm_supported
from minimoe.model.aux_losses import (load_balancing_loss, moe_aux_loss, pooled_load_balancing_loss,
                                      router_probabilities, router_z_loss)


def _config(router="softmax", **kw):
    base = dict(num_experts=8, top_k=2, intermediate_size=16, router=router)
    if router == "deepseek_v3":
        base.update(n_group=4, topk_group=2, routed_scaling_factor=2.5)
    base.update(kw)
    return MoEConfig(**base)


def _layer(hidden=32, seed=0, **kw):
    torch.manual_seed(seed)
    layer = MoELayer(hidden, _config(**kw))
    layer.reset_parameters(std=0.2)  # spread the router so every family picks varied experts
    return layer


def _run(layer, x, impl, backend="auto", seed=1):
    """Output and gradients of (inputs, every parameter) for a fixed random cotangent."""
    layer.impl, layer.grouped_backend = impl, backend
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    loss = (out * cotangent).sum() + layer.aux_loss
    params = [p for p in layer.parameters()]
    if not loss.requires_grad:  # e.g. zero tokens and no shared expert: nothing depends on anything
        return out.detach(), [torch.zeros_like(t) for t in [x] + params], layer.dropped_tokens, layer.aux_loss
    grads = torch.autograd.grad(loss, [x] + params, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [x] + params)]
    return out.detach(), grads, layer.dropped_tokens, layer.aux_loss.detach()


def _brute_force(layer, x):
    """Per token, per chosen expert, with plain Python loops over the layer's own routing."""
    tokens = x.reshape(-1, layer.hidden_size)
    routing, kept = layer.last_routing, layer.last_kept
    Fe = layer.config.intermediate_size
    rows = []
    for t in range(tokens.shape[0]):
        acc = torch.zeros(layer.hidden_size)
        for j in range(routing.top_k):
            if kept is not None and not kept[t, j]:
                continue
            e, w = routing.expert_ids[t, j].item(), routing.weights[t, j].item()
            inp = tokens[t] * w if routing.scales_input else tokens[t]
            gu = inp @ layer.gate_up_proj[e]
            out = (F.silu(gu[:Fe]) * gu[Fe:]) @ layer.down_proj[e]
            acc = acc + (out if routing.scales_input else w * out)
        if layer.shared_expert is not None:
            acc = acc + layer.shared_expert(tokens[t])
        rows.append(acc)
    return torch.stack(rows).reshape(x.shape) if rows else torch.zeros_like(x)


@pytest.mark.parametrize("router", ["softmax", "deepseek_v3", "llama4"])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.75])
def test_layer_equals_brute_force(router, capacity_factor):
    layer = _layer(router=router, capacity_factor=capacity_factor, num_shared_experts=1)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        for impl in ("loop", "grouped"):
            layer.impl = impl
            out = layer(x)
            torch.testing.assert_close(out, _brute_force(layer, x), rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(0, 24),
    hidden=st.sampled_from([4, 6, 8, 16]),
    ffn=st.sampled_from([3, 4, 8]),
    num_experts=st.integers(1, 8),
    top_k_fraction=st.floats(0.0, 1.0),
    capacity_factor=st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.25, 2.0]),
    router=st.sampled_from(["softmax", "deepseek_v3", "llama4"]),
    shared=st.integers(0, 2),
    backend=st.sampled_from(["auto", "grouped_mm", "grouped_mm_t", "per_group"]),
    seed=st.integers(0, 2**16),
)
def test_loop_equals_grouped_values_and_gradients(
    tokens, hidden, ffn, num_experts, top_k_fraction, capacity_factor, router, shared, backend, seed
):
    top_k = 1 + int(top_k_fraction * (num_experts - 1))
    groups = {}
    if router == "deepseek_v3" and num_experts % 2 == 0 and num_experts >= 4:
        groups = dict(n_group=2, topk_group=1) if top_k <= num_experts // 2 else {}
    torch.manual_seed(seed)
    config = MoEConfig(
        num_experts=num_experts, top_k=top_k, intermediate_size=ffn, router=router, num_shared_experts=shared,
        capacity_factor=capacity_factor, aux_loss_coef=0.01, z_loss_coef=0.001, **groups,
    )  # fmt: skip
    layer = MoELayer(hidden, config)
    layer.reset_parameters(std=0.3)
    if router == "deepseek_v3":
        layer.router.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(tokens, hidden)
    out_loop, grads_loop, dropped_loop, aux_loop = _run(layer, x, "loop")
    if backend.startswith("grouped_mm") and (hidden % 4 or ffn % 4 or not hasattr(torch, "_grouped_mm")):
        backend = "auto"  # torch._grouped_mm needs rows of 16 bytes (4 floats); "auto" falls back
    out_grouped, grads_grouped, dropped_grouped, aux_grouped = _run(layer, x, "grouped", backend)
    torch.testing.assert_close(out_grouped, out_loop, rtol=1e-5, atol=1e-5)
    for g_grouped, g_loop in zip(grads_grouped, grads_loop):
        torch.testing.assert_close(g_grouped, g_loop, rtol=1e-5, atol=1e-5)
    assert dropped_loop == dropped_grouped
    torch.testing.assert_close(aux_grouped, aux_loop)


def _brute_force_kept(expert_ids, num_experts, capacity_factor):
    """Walk the tokens in order; an expert accepts a pair while it has room."""
    num_tokens, top_k = expert_ids.shape
    capacity = math.ceil(Fraction(num_tokens * top_k, num_experts) * Fraction(str(capacity_factor)))
    load = [0] * num_experts
    kept = []
    for row in expert_ids.tolist():
        kept_row = []
        for e in row:
            kept_row.append(load[e] < capacity)
            load[e] += 1
        kept.append(kept_row)
    return capacity, torch.tensor(kept, dtype=torch.bool).reshape(num_tokens, top_k)


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(1, 40),
    num_experts=st.integers(1, 8),
    top_k=st.integers(1, 8),
    capacity_hundredths=st.integers(1, 300),
    seed=st.integers(0, 2**16),
)
def test_dropped_tokens_match_brute_force(tokens, num_experts, top_k, capacity_hundredths, seed):
    top_k = min(top_k, num_experts)
    capacity_factor = capacity_hundredths / 100
    layer = _layer(hidden=8, seed=seed, num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor)
    with torch.no_grad():
        layer(torch.randn(tokens, 8))
    capacity, kept = _brute_force_kept(layer.last_routing.expert_ids, num_experts, capacity_factor)
    assert layer.capacity == capacity
    assert torch.equal(layer.last_kept, kept)
    assert layer.dropped_tokens == int((~kept).sum())


def test_capacity_formula_examples():
    assert expert_capacity(80, 1, 8, 1.1) == 11  # not 12 from float rounding of 80*1.1/8
    assert expert_capacity(10, 2, 4, 1.0) == 5
    assert expert_capacity(10, 2, 4, 0.0) is None
    assert expert_capacity(0, 2, 4, 1.0) == 0


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(0, 32), (2, 0, 32)])
def test_zero_token_batch(impl, capacity_factor, shape):
    layer = _layer(capacity_factor=capacity_factor, num_shared_experts=1, aux_loss_coef=0.1, z_loss_coef=0.1)
    out, grads, dropped, aux = _run(layer, torch.zeros(shape), impl)
    assert out.shape == shape and dropped == 0 and aux.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    assert layer.last_routing.expert_ids.shape == (0, 2)


@pytest.mark.parametrize("backend", ["grouped_mm", "grouped_mm_t", "per_group"])
def test_an_expert_that_receives_no_token(backend):
    layer = _layer(hidden=16, num_experts=4, top_k=2)
    with torch.no_grad():  # positive inputs, expert 3's router row negative: it never wins
        layer.router.weight.copy_(torch.rand(4, 16) + 0.5)
        layer.router.weight[3] = -1.0
    x = torch.rand(10, 16)
    out_loop, grads_loop, _, _ = _run(layer, x, "loop")
    out, grads, _, _ = _run(layer, x, "grouped", backend)
    assert not (layer.last_routing.expert_ids == 3).any()
    torch.testing.assert_close(out, out_loop, rtol=1e-5, atol=1e-5)
    names = [name for name, _ in layer.named_parameters()]
    for name, g, g_loop in zip(["x"] + names, grads, grads_loop):
        torch.testing.assert_close(g, g_loop, rtol=1e-5, atol=1e-5)
        if name in ("gate_up_proj", "down_proj"):
            assert torch.count_nonzero(g[3]) == 0 and torch.count_nonzero(g[:3]) > 0
    with torch.no_grad():
        torch.testing.assert_close(out, _brute_force(layer, x), rtol=1e-5, atol=1e-5)


def test_aux_loss_is_the_weighted_sum_of_the_router_losses():
    layer = _layer(aux_loss_coef=0.3, z_loss_coef=0.02)
    layer(torch.randn(3, 5, 32))
    r = layer.last_routing
    want = 0.3 * load_balancing_loss(router_probabilities(r), r.expert_ids, 8) + 0.02 * router_z_loss(r.logits)
    torch.testing.assert_close(layer.aux_loss, want)
    assert layer.aux_loss.requires_grad
    silent = _layer()
    silent(torch.randn(4, 32))
    assert silent.aux_loss.item() == 0.0 and silent.aux_loss.dtype == torch.float32


@pytest.mark.parametrize("router", ["softmax", "deepseek_v3", "llama4"])
def test_moe_aux_loss_conventions_over_layers(router):
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    layers = {}
    for convention in ("per_layer", "pooled"):
        kw = dict(router=router, aux_loss_coef=0.3, z_loss_coef=0.02, aux_loss_convention=convention)
        if router == "llama4":
            kw.update(top_k=1)
        layers[convention] = [_layer(seed=seed, **kw) for seed in range(3)]
        h = x
        for layer in layers[convention]:
            h = layer(h)
    per_layer, pooled = layers["per_layer"], layers["pooled"]
    torch.testing.assert_close(moe_aux_loss(per_layer), sum(layer.aux_loss for layer in per_layer))
    routings = [layer.last_routing for layer in pooled]
    want = 0.3 * pooled_load_balancing_loss([router_probabilities(r) for r in routings],
                                            [r.expert_ids for r in routings], 8)
    want = want + sum(0.02 * router_z_loss(r.logits) for r in routings)
    torch.testing.assert_close(moe_aux_loss(pooled), want)
    assert moe_aux_loss(pooled).requires_grad
    # one layer: the two conventions agree
    torch.testing.assert_close(moe_aux_loss(pooled[:1]), pooled[0].aux_loss)
    # padding left out: the same as running only the real tokens
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, :3] = False
    for group in (per_layer, pooled):
        masked = moe_aux_loss(group, mask)
        h = x[mask]
        for layer in group:
            h = layer(h)
        torch.testing.assert_close(masked, moe_aux_loss(group))
    with pytest.raises(ValueError, match="different aux_loss_convention"):
        moe_aux_loss([per_layer[0], pooled[1]])
    with pytest.raises(ValueError, match="token_mask has 4 entries"):
        moe_aux_loss(pooled, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="forward pass first"):
        moe_aux_loss([_layer(aux_loss_convention="pooled")])


def test_config_files_written_before_the_loss_convention_existed_mean_per_layer():
    d = _config(aux_loss_coef=0.01).to_dict()
    assert d.pop("aux_loss_convention") == "per_layer"
    assert MoEConfig.from_dict(d).aux_loss_convention == "per_layer"
    with pytest.raises(ValueError, match="aux_loss_convention='mean' must be one of"):
        _config(aux_loss_convention="mean")


def test_shared_experts_are_one_wide_swiglu():
    layer = _layer(num_shared_experts=2, shared_intermediate_size=6)
    assert layer.shared_expert.gate_proj.weight.shape == (12, 32)
    x = torch.randn(5, 32)
    s = layer.shared_expert
    halves = [
        F.linear(F.silu(F.linear(x, s.gate_proj.weight[i:i + 6])) * F.linear(x, s.up_proj.weight[i:i + 6]),
                 s.down_proj.weight[:, i:i + 6])
        for i in (0, 6)
    ]  # fmt: skip
    torch.testing.assert_close(s(x), halves[0] + halves[1], rtol=1e-5, atol=1e-6)


def test_batched_and_flat_inputs_agree():
    layer = _layer()
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(layer(x).reshape(10, 32), layer(x.reshape(10, 32)))


def test_grouped_matmul_backends_and_support_rules():
    x, w = torch.randn(10, 8), torch.randn(3, 8, 4)
    ends = torch.tensor([3, 3, 10], dtype=torch.int32)
    want = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
    for backend in ("grouped_mm", "grouped_mm_t", "per_group"):  # grouped_mm_t pads 10 rows to 12 inside
        torch.testing.assert_close(grouped_matmul(x, w, ends, backend), want)
        torch.testing.assert_close(grouped_matmul(x, w, [3, 3, 10], backend), want)
    short = grouped_matmul(x, w, [3, 3, 7], "per_group")  # rows past the last end come back as zeros
    assert torch.count_nonzero(short[7:]) == 0
    assert grouped_mm_supported(x, w) == hasattr(torch, "_grouped_mm")
    assert not grouped_mm_supported(x.double(), w.double())
    assert not grouped_mm_supported(torch.randn(10, 5), torch.randn(3, 5, 4))  # 20-byte rows
    assert choose_backend("auto", x.double(), [w.double()]) == "per_group"
    assert choose_backend("auto", x, [w]) == ("grouped_mm" if hasattr(torch, "_grouped_mm") else "per_group")
    with pytest.raises(ValueError, match="cuda"):
        choose_backend("cuda", x, [w])
    with pytest.raises(ValueError, match="auto"):
        grouped_matmul(x, w, ends, backend="auto")


def test_the_triton_backend_on_cpu_is_a_clear_error():
    layer = _layer(hidden=32, intermediate_size=16)
    layer.grouped_backend = "triton"  # Triton's kernels run on CUDA only
    with torch.no_grad(), pytest.raises(ValueError, match="grouped backend 'triton' cannot run here: "):
        layer(torch.randn(5, 32))


def test_bfloat16_grouped_path_close_to_float32():
    layer = _layer(hidden=64, intermediate_size=32)
    x = torch.randn(40, 64)
    with torch.no_grad():
        want = layer(x)
        ids32 = layer.last_routing.expert_ids.sort(-1).values
        layer.to(torch.bfloat16)
        got = layer(x.bfloat16()).float()
        same_routing = (layer.last_routing.expert_ids.sort(-1).values == ids32).all(-1)  # bf16 may flip near-ties
        layer.impl = "loop"
        loop = layer(x.bfloat16()).float()
    assert same_routing.sum() > 30
    err = (got - want)[same_routing].norm() / want[same_routing].norm()
    assert err < 1e-2, err
    assert (got - loop).norm() / loop.norm() < 1e-2


def test_config_round_trip_and_strict_keys():
    config = _config("deepseek_v3", num_shared_experts=1, capacity_factor=1.25, aux_loss_coef=0.01)
    assert MoEConfig.from_dict(config.to_dict()) == config
    d = config.to_dict()
    with pytest.raises(ValueError, match="unknown keys \\['experts'\\]"):
        MoEConfig.from_dict({**d, "experts": 3})
    d.pop("top_k")
    with pytest.raises(ValueError, match="missing keys \\['top_k'\\]"):
        MoEConfig.from_dict(d)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(top_k=9), "top_k=9 must be between 1 and num_experts=8"),
        (dict(top_k=0), "top_k=0"),
        (dict(router="deepseek_v3", n_group=3), "n_group=3 must be >= 1 and divide num_experts=8"),
        (dict(router="deepseek_v3", n_group=4, topk_group=5), "topk_group=5 must be between 1 and n_group=4"),
        (dict(router="deepseek_v3", n_group=4, topk_group=1, top_k=3), "top_k=3 exceeds the 2 experts"),
        (dict(capacity_factor=-0.5), "capacity_factor=-0.5 must be >= 0"),
        (dict(router="switch"), "router='switch'"),
        (dict(n_group=2), "DeepSeek-V3 options"),
        (dict(router="deepseek_v3", dropped_group_value="nan"), "dropped_group_value='nan'"),
        (dict(aux_loss_coef=-1.0), "aux_loss_coef=-1.0"),
        (dict(router_jitter=1.0), "router_jitter=1.0"),
        (dict(num_shared_experts=-1), "num_shared_experts=-1"),
        (dict(intermediate_size=0), "intermediate_size=0"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _config(**kw)


@pytest.mark.parametrize("kw", [dict(top_k=2.0), dict(num_experts=True), dict(norm_topk_prob=1), dict(z_loss_coef="0")])
def test_config_type_errors(kw):
    with pytest.raises(TypeError, match="MoEConfig"):
        _config(**kw)


def test_layer_input_errors():
    layer = _layer()
    with pytest.raises(ValueError, match=r"got \(2, 3, 31\)"):
        layer(torch.zeros(2, 3, 31))
    with pytest.raises(ValueError, match=r"got \(1, 2, 3, 32\)"):
        layer(torch.zeros(1, 2, 3, 32))
    with pytest.raises(TypeError, match="torch.float64"):
        layer(torch.zeros(2, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="impl must be"):
        layer.impl = "fast"
    with pytest.raises(TypeError, match="MoEConfig"):
        MoELayer(32, {"num_experts": 8})
    with pytest.raises(ValueError, match="hidden_size"):
        MoELayer(0, _config())


@pytest.mark.parametrize("router, capacity_factor, dtype", [("softmax", 0.0, torch.float32), ("llama4", 1.0, torch.float32),
                                                            ("softmax", 0.75, torch.float32),
                                                            ("softmax", 0.0, torch.bfloat16)])
def test_transposed_grouped_products_equal_the_loop(router, capacity_factor, dtype):
    """grouped_mm_t (weights as the left operand, 37 tokens x 2 = 74 rows padded to a multiple of 16 bytes)."""
    layer = _layer(router=router, capacity_factor=capacity_factor, num_shared_experts=1).to(dtype)
    x = torch.randn(37, 32).to(dtype)
    out_loop, grads_loop, _, _ = _run(layer, x, "loop")
    out_t, grads_t, _, _ = _run(layer, x, "grouped", "grouped_mm_t")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out_t, out_loop, **tol)
    for got, want in zip(grads_t, grads_loop):
        torch.testing.assert_close(got, want, **tol)
