"""Routers and auxiliary losses against brute-force Python computations (and transformers)."""

import math

import pytest
import torch

from minimoe.model.aux_losses import load_balancing_loss, pooled_load_balancing_loss, router_probabilities, router_z_loss
from minimoe.model.router import Router, deepseek_v3_topk, llama4_topk, softmax_topk


def _logits(seed, tokens=7, experts=8, scale=2.0):
    return torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)) * scale


def _top(values, k):
    """Indices of the k largest values of a Python list (ties: lowest index first)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def _as_sets(expert_ids):
    return [set(row) for row in expert_ids.tolist()]


def _weights_by_expert(result):
    return [dict(zip(ids, ws)) for ids, ws in zip(result.expert_ids.tolist(), result.weights.tolist())]


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_softmax_topk_matches_brute_force(norm, top_k):
    logits = _logits(top_k)
    result = softmax_topk(logits, top_k, norm_topk_prob=norm)
    for t, row in enumerate(logits.tolist()):
        exps = [math.exp(v) for v in row]
        probs = [v / sum(exps) for v in exps]
        chosen = _top(probs, top_k)
        total = sum(probs[i] for i in chosen) if norm else 1.0
        assert set(result.expert_ids[t].tolist()) == set(chosen)
        got = _weights_by_expert(result)[t]
        for i in chosen:
            assert got[i] == pytest.approx(probs[i] / total, rel=1e-6)
    assert torch.allclose(result.scores, torch.softmax(logits, -1))


def _deepseek_choice_values(logits, bias, n_group, topk_group, fill):
    """Per token: sigmoid scores s and the values the top-k ranks (biased, dropped groups = fill)."""
    per_group = logits.shape[1] // n_group
    out = []
    for row in logits.tolist():
        s = [1 / (1 + math.exp(-v)) for v in row]
        biased = [a + b for a, b in zip(s, bias.tolist())]
        group_score = [sum(sorted(biased[g * per_group:(g + 1) * per_group])[-2:]) for g in range(n_group)]
        kept = set(_top(group_score, topk_group))
        out.append((s, [biased[i] if i // per_group in kept else fill for i in range(len(s))]))
    return out


@pytest.mark.parametrize("fill_name,fill", [("-inf", -math.inf), ("zero", 0.0)])
@pytest.mark.parametrize("norm,scale", [(True, 2.5), (False, 1.0)])
@pytest.mark.parametrize("bias_shift", [0.0, -0.7])  # -0.7 pushes many biased scores below 0
def test_deepseek_v3_matches_brute_force(fill_name, fill, norm, scale, bias_shift):
    logits = _logits(3, tokens=20, experts=16)
    bias = torch.randn(16, generator=torch.Generator().manual_seed(9)) * 0.2 + bias_shift
    result = deepseek_v3_topk(logits, 4, bias, n_group=4, topk_group=2, norm_topk_prob=norm,
                              routed_scaling_factor=scale, dropped_group_value=fill_name)  # fmt: skip
    brute = _deepseek_choice_values(logits, bias, 4, 2, fill)
    for ids, weights, (s, choice) in zip(result.expert_ids.tolist(), result.weights.tolist(), brute):
        # the chosen values are the k largest (with "zero", dropped experts tie at 0: any of them will do)
        assert sorted(choice[i] for i in ids) == sorted(choice)[-4:]
        total = sum(s[i] for i in ids) if norm else 1.0
        assert weights == pytest.approx([s[i] / total * scale for i in ids], rel=1e-5)
    assert torch.allclose(result.scores, torch.sigmoid(logits) + bias)


def test_deepseek_conventions_differ_exactly_when_kept_groups_lack_positive_scores():
    logits = _logits(5, tokens=200, experts=16)
    bias = torch.full((16,), -0.75)
    ninf = deepseek_v3_topk(logits, 4, bias, n_group=4, topk_group=2, dropped_group_value="-inf")
    zero = deepseek_v3_topk(logits, 4, bias, n_group=4, topk_group=2, dropped_group_value="zero")
    differs = [a != b for a, b in zip(_as_sets(ninf.expert_ids), _as_sets(zero.expert_ids))]
    # brute force: 0.0 lets dropped experts in iff fewer than k experts of kept groups score above 0
    predicted = []
    for row in (torch.sigmoid(logits) + bias).tolist():
        group_score = [sum(sorted(row[g * 4:(g + 1) * 4])[-2:]) for g in range(4)]
        positives = sum(row[i] > 0 for g in _top(group_score, 2) for i in range(g * 4, (g + 1) * 4))
        predicted.append(positives < 4)
    assert differs == predicted
    assert 0 < sum(differs) < 200


def test_deepseek_without_groups_is_plain_biased_topk():
    logits, bias = _logits(1, experts=8), torch.linspace(-0.2, 0.2, 8)
    result = deepseek_v3_topk(logits, 3, bias, n_group=1, topk_group=1)
    want = [set(_top(row, 3)) for row in (torch.sigmoid(logits) + bias).tolist()]
    assert _as_sets(result.expert_ids) == want


@pytest.mark.parametrize("top_k", [1, 2])
def test_llama4_topk_matches_brute_force(top_k):
    logits = _logits(11)
    result = llama4_topk(logits, top_k)
    assert result.scales_input and result.family == "llama4"
    for t, row in enumerate(logits.tolist()):
        chosen = _top(row, top_k)
        assert set(result.expert_ids[t].tolist()) == set(chosen)
        got = _weights_by_expert(result)[t]
        for i in chosen:
            assert got[i] == pytest.approx(1 / (1 + math.exp(-row[i])), rel=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_load_balancing_loss_matches_brute_force_and_transformers(top_k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = _logits(top_k, tokens=13, experts=6)
    result = softmax_topk(logits, top_k)
    probs = router_probabilities(result)
    loss = load_balancing_loss(probs, result.expert_ids, 6)
    num_tokens, num_experts = 13, 6
    brute = 0.0
    for e in range(num_experts):
        routed = sum(e in row for row in result.expert_ids.tolist()) / num_tokens
        mean_prob = sum(probs[t, e].item() for t in range(num_tokens)) / num_tokens
        brute += routed * mean_prob
    assert loss.item() == pytest.approx(num_experts * brute, rel=1e-6)
    theirs = load_balancing_loss_func((logits,), num_experts=num_experts, top_k=top_k)
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-6)


@pytest.mark.parametrize("num_layers, top_k", [(2, 1), (3, 2), (4, 3)])
def test_pooled_loss_over_several_layers_is_transformers_load_balancing_loss_func(num_layers, top_k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = [_logits(10 + layer, tokens=12, experts=6) for layer in range(num_layers)]  # (T, E) per layer
    results = [softmax_topk(x, top_k) for x in logits]
    probs, ids = [router_probabilities(r) for r in results], [r.expert_ids for r in results]
    pooled = pooled_load_balancing_loss(probs, ids, 6)
    theirs = load_balancing_loss_func(tuple(logits), num_experts=6, top_k=top_k)
    assert pooled.item() == pytest.approx(theirs.item(), rel=1e-6)
    # the per-layer convention is the sum of one-layer losses: a different number, not a rescaled one
    per_layer = sum(load_balancing_loss(p, i, 6) for p, i in zip(probs, ids))
    assert per_layer.item() == pytest.approx(
        sum(load_balancing_loss_func((x,), num_experts=6, top_k=top_k).item() for x in logits), rel=1e-6)
    assert per_layer.item() > 1.5 * pooled.item()
    # transformers' attention_mask leaves padding out of every layer's statistics
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    keep = mask.reshape(-1).bool()
    masked = pooled_load_balancing_loss([p[keep] for p in probs], [i[keep] for i in ids], 6)
    theirs = load_balancing_loss_func(tuple(logits), num_experts=6, top_k=top_k, attention_mask=mask)
    assert masked.item() == pytest.approx(theirs.item(), rel=1e-6)
    with pytest.raises(ValueError, match="one router_probs and one expert_ids tensor per layer"):
        pooled_load_balancing_loss(probs, ids[:1], 6)


def test_load_balancing_loss_is_top_k_for_a_uniform_router():
    logits = torch.zeros(8, 4)
    expert_ids = torch.tensor([[0, 1], [2, 3]] * 4)
    assert load_balancing_loss(torch.softmax(logits, -1), expert_ids, 4).item() == pytest.approx(2.0)


def test_router_probabilities_per_family():
    logits = _logits(2)
    dsv3 = deepseek_v3_topk(logits, 2)
    s = torch.sigmoid(logits)
    assert torch.allclose(router_probabilities(dsv3), s / s.sum(-1, keepdim=True))
    assert torch.allclose(router_probabilities(llama4_topk(logits)), torch.softmax(logits, -1))


def test_router_z_loss_matches_brute_force():
    logits = _logits(4, tokens=9, experts=5, scale=3.0)
    brute = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 9
    assert router_z_loss(logits).item() == pytest.approx(brute, rel=1e-6)


def test_losses_are_zero_for_an_empty_batch():
    logits = torch.zeros(0, 4)
    assert router_z_loss(logits).item() == 0.0
    assert load_balancing_loss(logits, torch.zeros(0, 2, dtype=torch.long), 4).item() == 0.0


@pytest.mark.parametrize("family", ["softmax", "deepseek_v3", "llama4"])
def test_router_module_equals_functions_and_handles_empty_input(family):
    kw = dict(n_group=2, topk_group=1) if family == "deepseek_v3" else {}
    router = Router(12, 6, 2, family=family, **kw)
    x = torch.randn(5, 12)
    result = router(x)
    logits = x @ router.weight.T
    assert torch.allclose(result.logits, logits, atol=1e-6)
    assert result.expert_ids.shape == (5, 2) and result.expert_ids.dtype == torch.long
    empty = router(torch.zeros(0, 12))
    assert empty.expert_ids.shape == (0, 2) and empty.weights.shape == (0, 2) and empty.logits.shape == (0, 6)


def test_jitter_only_in_training_and_multiplies_the_router_input():
    router = Router(8, 4, 2, jitter=0.1)
    x = torch.randn(6, 8)
    router.eval()
    assert torch.equal(router(x).logits, x @ router.weight.T)
    router.train()
    torch.manual_seed(123)
    noisy = router(x).logits
    torch.manual_seed(123)
    noise = torch.empty_like(x).uniform_(0.9, 1.1)
    assert torch.allclose(noisy, (x * noise) @ router.weight.T, atol=1e-6)
    assert not torch.allclose(noisy, x @ router.weight.T)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Router(8, 4, 5), "top_k=5"),
        (lambda: Router(8, 4, 0), "top_k=0"),
        (lambda: Router(8, 4, 2, family="switch"), "switch"),
        (lambda: Router(8, 4, 2, jitter=1.5), "jitter=1.5"),
        (lambda: Router(8, 4, 2)(torch.zeros(3, 7)), r"\(3, 7\)"),
        (lambda: softmax_topk(torch.zeros(3, 4), 5), "top_k=5"),
        (lambda: softmax_topk(torch.zeros(3, 4, 1), 1), "2-D"),
        (lambda: deepseek_v3_topk(torch.zeros(3, 6), 2, n_group=4), "n_group=4"),
        (lambda: deepseek_v3_topk(torch.zeros(3, 8), 2, n_group=2, topk_group=3), "topk_group=3"),
        (lambda: deepseek_v3_topk(torch.zeros(3, 8), 2, dropped_group_value="nan"), "nan"),
        (lambda: load_balancing_loss(torch.zeros(3, 4), torch.zeros(3, 2, dtype=torch.long), 5), r"\(T, 5\)"),
    ],
)
def test_bad_input_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_row_layout_describes_only_the_ids_it_was_built_for():
    from minimoe.model.route_layout_triton import RowLayout, ids_version

    ids = torch.tensor([[0, 1], [1, 2]])
    layout = RowLayout(torch.arange(4), torch.tensor([1, 3, 4], dtype=torch.int32), torch.tensor([0, 0, 1, 1]), ids,
                       ids_version(ids))
    assert layout.matches(ids)
    assert not layout.matches(ids.clone())  # another tensor: a forward hook returned new routing
    ids[0, 0] = 2  # edited in place after the layout was built
    assert not layout.matches(ids)
    with torch.inference_mode():  # inference tensors keep no version counter: only a replaced tensor is seen
        ids = torch.tensor([[0, 1], [1, 2]])
        layout = RowLayout(layout.place, layout.group_ends, layout.source, ids, ids_version(ids))
        assert layout.ids_version is None and layout.matches(ids) and not layout.matches(ids.clone())


@pytest.mark.parametrize("align, size", [(0, 100), (8, 4 * 2 + 7 * 3 - 1), (1, 7)])
def test_the_fused_router_layout_refuses_a_size_it_would_overrun(align, size):
    from minimoe.model.route_layout_triton import softmax_topk_layout

    with pytest.raises(ValueError, match="size >= T·k"):
        softmax_topk_layout(torch.zeros(4, 3), 2, True, align, size)
