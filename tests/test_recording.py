"""Recording from minimoe Transformers: the trace equals the routing of a full forward over the greedy text."""

import numpy as np
import pytest
import torch

from minimoe.model import generate
from minimoe.model import ModelConfig, Transformer
from minimoe.model import MoEConfig
from minimoe.traces import record

NEW_TOKENS = 4


def tiny(router="softmax", capacity_factor=0.0):
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=8, top_k=2, intermediate_size=16, router=router, capacity_factor=capacity_factor,
                    n_group=4 if router == "deepseek_v3" else 1, topk_group=2 if router == "deepseek_v3" else 1)
    if router == "llama4":
        moe = MoEConfig(num_experts=8, top_k=1, intermediate_size=16, router="llama4", num_shared_experts=1)
    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, moe=moe,
                         moe_layers=[0, 2], max_seq_len=64)
    return Transformer(config).eval()


@pytest.mark.parametrize("router", ["softmax", "deepseek_v3", "llama4"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_minimoe_recording_matches_a_full_forward(router, batch_size):
    model = tiny(router)
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    trace = record(model, prompts, NEW_TOKENS, domains=["code", "math", "chat"], batch_size=batch_size)
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (2, 8, model.config.moe.top_k)
    assert trace.layer_ids.tolist() == [0, 2]  # the model's MoE layers (moe_layers=[0, 2]), by their layer number
    starts, ends = trace.request_ranges()
    compared = 0
    for r, prompt in enumerate(prompts):
        tokens = generate(model, torch.tensor([prompt]), NEW_TOKENS)  # (1, P + NEW_TOKENS), greedy
        with torch.no_grad():
            model(tokens)
        rows = slice(starts[r], ends[r])
        np.testing.assert_array_equal(trace.phase[rows], [0] * len(prompt) + [1] * NEW_TOKENS)
        for layer, block in enumerate([model.layers[0], model.layers[2]]):
            routing = block.ffn.last_routing
            k = routing.expert_ids.shape[1]
            ranked = routing.scores.topk(k + 1, dim=-1).values
            clear = (ranked[:, k - 1] - ranked[:, k] > 1e-5).numpy()  # skip near-ties (cache vs full numerics)
            got = np.sort(trace.experts[rows, layer], -1)[clear]
            np.testing.assert_array_equal(got, np.sort(routing.expert_ids.numpy(), -1)[clear])
            np.testing.assert_allclose(trace.weights[rows, layer].astype(float)[clear].sum(-1),
                                       routing.weights.numpy()[clear].sum(-1), rtol=2e-3)
            compared += int(clear.sum())
    assert compared >= 0.9 * trace.num_tokens * trace.num_layers


def test_pairs_dropped_by_capacity_are_recorded_as_minus_one():
    model = tiny(capacity_factor=0.5)
    prompt = list(range(3, 15))
    trace = record(model, [prompt], 0)
    with torch.no_grad():
        model(torch.tensor([prompt]))
    for layer, block in enumerate([model.layers[0], model.layers[2]]):
        kept = block.ffn.last_kept.numpy()
        assert (~kept).any()
        np.testing.assert_array_equal(trace.experts[:, layer] == -1, ~kept)
        np.testing.assert_array_equal(trace.experts[:, layer][kept], block.ffn.last_routing.expert_ids.numpy()[kept])
