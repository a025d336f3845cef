"""Recording from tiny random transformers MoE models of five families matches their own router outputs.

Reference: transformers' `generate(do_sample=False)` gives the greedy continuation; one full forward of
prompt + continuation with `output_router_logits=True` gives every token's router logits (older
transformers, e.g. 5.17, return none for DeepSeek-V3 / Llama 4: there the logits are computed from the
routers' inputs and weights); the top-k rule of each family (as transformers' MoE blocks implement it) recomputed from those logits
gives the expected expert id sets.
"""

import numpy as np
import pytest
import torch
import transformers as tf
from packaging.version import Version

from minimoe.traces import Trace, record

VOCAB, NEW_TOKENS = 96, 5
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def build(family):
    torch.manual_seed(0)
    if family == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2))
    elif family == "qwen3_moe":
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=3, head_dim=8,
                                                         moe_intermediate_size=32, norm_topk_prob=False))
    elif family == "olmoe":
        model = tf.OlmoeForCausalLM(tf.OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, bos_token_id=1,
                                                   eos_token_id=2, pad_token_id=0))
    elif family == "deepseek_v3":  # layer 0 dense, layers 1-2 MoE: 16 experts in 4 groups, keep 2 groups, top-4
        config = tf.DeepseekV3Config(**dict(COMMON, num_hidden_layers=3, num_key_value_heads=4), n_routed_experts=16,
                                     num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
                                     moe_intermediate_size=32, n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16,
                                     qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
        model = tf.DeepseekV3ForCausalLM(config)
        for layer in model.model.layers[1:]:  # a real correction bias, negative enough to push scores below 0
            layer.mlp.gate.weight.data.normal_(0, 1.0)
            layer.mlp.gate.e_score_correction_bias.data = torch.linspace(-0.9, 0.3, 16)[torch.randperm(16)]
    elif family == "llama4":  # 4 layers, MoE every 2nd (layers 1 and 3), top-1 of 4 experts
        model = tf.Llama4ForCausalLM(tf.Llama4TextConfig(
            **dict(COMMON, num_hidden_layers=4), intermediate_size_mlp=64, num_local_experts=4, num_experts_per_tok=1,
            interleave_moe_layer_step=2, head_dim=8, attention_chunk_size=64))
    model.generation_config.eos_token_id = None  # pure greedy for NEW_TOKENS steps, like record()
    return model.eval()


def routers(model):
    return [layer.mlp.gate if hasattr(layer, "mlp") else layer.feed_forward.router for layer in model.model.layers
            if (hasattr(layer, "mlp") and hasattr(layer.mlp, "gate")) or
            (hasattr(layer, "feed_forward") and hasattr(layer.feed_forward, "router"))]


def reference_choice(family, router, logits):
    """Expert ids (T, k) and the margin between the k-th and (k+1)-th ranked value (to skip near-ties)."""
    logits = logits.float()
    if family in ("mixtral", "qwen3_moe", "olmoe"):
        ranked = torch.softmax(logits, dim=-1)
    elif family == "llama4":
        ranked = logits
    else:  # DeepSeek-V3: biased sigmoid scores, best topk_group groups by the sum of their top-2, top-k inside
        biased = torch.sigmoid(logits) + router.e_score_correction_bias
        groups = biased.view(len(biased), router.num_group, -1)  # (T, G, E/G)
        group_score = groups.topk(2, dim=-1).values.sum(-1)  # (T, G)
        kept = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, group_score.topk(router.topk_group).indices,
                                                                        True)
        ranked = torch.where(kept[:, :, None], groups, -torch.inf).reshape(len(biased), -1)
    k = router.top_k
    values, ids = ranked.topk(k + 1 if k < ranked.shape[1] else k, dim=-1)
    margin = values[:, k - 1] - values[:, k] if k < ranked.shape[1] else torch.full((len(ids),), torch.inf)
    return ids[:, :k], margin


def greedy_tokens(model, prompt):
    """transformers' own greedy generation: prompt + NEW_TOKENS generated ids."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0].tolist()


FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "llama4"]


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_experts_equal_the_routers_own_choice(family):
    model = build(family)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (6, 3, 9)]
    trace = record(model, prompts, NEW_TOKENS, domains=["code", "math", "chat"])
    trace.validate()
    moe_routers = routers(model)
    assert trace.num_layers == len(moe_routers) == 2  # DeepSeek-V3 and Llama 4 also have dense layers
    # the model's layer number of each MoE layer: DeepSeek-V3's layer 0 is dense, Llama 4 interleaves every 2nd
    assert trace.layer_ids.tolist() == {"deepseek_v3": [1, 2], "llama4": [1, 3]}.get(family, [0, 1])
    assert trace.top_k == moe_routers[0].top_k and trace.num_experts == moe_routers[0].weight.shape[0]
    assert trace.request_domains().tolist() == ["code", "math", "chat"]
    starts, ends = trace.request_ranges()
    compared = 0
    for r, prompt in enumerate(prompts):
        rows = slice(starts[r], ends[r])
        assert ends[r] - starts[r] == len(prompt) + NEW_TOKENS
        np.testing.assert_array_equal(trace.phase[rows], [0] * len(prompt) + [1] * NEW_TOKENS)
        tokens = greedy_tokens(model, prompt)
        router_inputs = []
        hooks = [r.register_forward_hook(lambda m, args, out: router_inputs.append(args[0])) for r in moe_routers]
        with torch.no_grad():
            out = model(torch.tensor([tokens]), output_router_logits=True)
        for hook in hooks:
            hook.remove()
        # logits from the routers' inputs and weights; the model's own router_logits must agree where returned
        # (transformers 5.17's DeepSeek-V3 and Llama 4 causal-LM outputs have no router_logits)
        all_logits = [torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).float(), r.weight.float())
                      for x, r in zip(router_inputs, moe_routers)]
        if getattr(out, "router_logits", None) is not None:
            assert len(out.router_logits) == trace.num_layers
            for ours, theirs in zip(all_logits, out.router_logits):
                torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5)
            all_logits = out.router_logits
        else:
            assert Version(tf.__version__) < Version("5.24")
        for layer, (router, logits) in enumerate(zip(moe_routers, all_logits)):
            expected, margin = reference_choice(family, router, logits)
            clear = (margin > 1e-4).numpy()  # cached vs full-sequence numerics differ ~1e-7: skip near-ties
            got = np.sort(trace.experts[rows, layer], axis=1)[clear]
            np.testing.assert_array_equal(got, np.sort(expected.numpy(), axis=1)[clear])
            compared += int(clear.sum())
    assert compared >= 0.9 * trace.num_tokens * trace.num_layers


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "llama4"])
def test_recorded_weights_follow_the_family_rule(family):
    model = build(family)
    trace = record(model, [[5, 6, 7, 8]], 2)
    weights = trace.weights.astype(np.float32)
    if family == "mixtral":  # renormalised softmax: the k weights sum to 1
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=2e-3)
    elif family == "deepseek_v3":  # sigmoid scores, renormalised, times routed_scaling_factor
        np.testing.assert_allclose(weights.sum(-1), model.config.routed_scaling_factor, rtol=2e-3)
    else:  # Llama 4: sigmoid of the top logit, in (0, 1)
        assert ((weights > 0) & (weights < 1)).all()


def test_batched_recording_equals_one_prompt_at_a_time():
    model = build("qwen3_moe")
    prompts = [[4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    alone = record(model, prompts, 4)
    batched = record(model, prompts, 4, batch_size=3)
    np.testing.assert_array_equal(np.sort(batched.experts, -1), np.sort(alone.experts, -1))
    np.testing.assert_array_equal(batched.request, alone.request)
    np.testing.assert_allclose(batched.weights.astype(float), alone.weights.astype(float), atol=2e-3)


def test_eos_stops_a_request_and_is_not_recorded():
    model = build("mixtral")
    full = record(model, [[4, 5, 6]], 6)
    tokens = greedy_tokens(model, [4, 5, 6])[3:]  # the generated ids
    stop = tokens[2]
    first = tokens.index(stop)
    stopped = record(model, [[4, 5, 6]], 6, eos_token_id=stop)
    assert stopped.num_tokens == 3 + first
    assert stopped == full.select(np.arange(full.num_tokens) < 3 + first)


def test_record_rejects_bad_input_and_restores_training_mode():
    model = build("olmoe").train()
    with pytest.raises(ValueError, match="prompts\\[1\\]"):
        record(model, [[1, 2], [VOCAB]], 2)
    with pytest.raises(ValueError, match="prompts\\[0\\]"):
        record(model, [[]], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        record(model, [[1, 2]], -1)
    with pytest.raises(ValueError, match="domains"):
        record(model, [[1, 2]], 1, domains=["a", "b"])
    with pytest.raises(TypeError, match="record needs"):
        record(object(), [[1]], 1)
    assert model.training
    trace = record(model, [[1, 2]], 1)
    assert model.training and isinstance(trace, Trace) and trace.num_tokens == 3
    assert not any(r._forward_hooks for r in routers(model))  # hooks removed afterwards
