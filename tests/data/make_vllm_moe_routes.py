"""Write ``vllm_moe_routes.jsonl``: a small routing log in the shape public vLLM MoE loggers write.

The shape follows the "vLLM MoE expert logger" patches published on GitHub (a ``VLLM_LOG_MOE``-gated hook in
``FusedMoE.select_experts``): a meta record (``model_id``, ``vllm_version``, ``torch_version``, ``device``,
``seed``, ``layers_logged``, ``top_k``; no ``num_experts``), then one ``route`` record per (token, logged layer)
with ``req_id``, ``token_idx``, ``layer``, ``topk_ids``, ``topk_weights``, plus the ``timestamp`` and engine
``step`` such loggers add. Records come in time order, as a server writes them: each request's prompt in one
forward pass, then decode steps of all unfinished requests batched together. Phases are not recorded.

The routing itself is synthetic with the structure real traces show (OLMoE-1B-7B's 64 experts, top-8): each
request belongs to one of four workloads whose experts it prefers, in prompt and decode alike. Run from the
repository root: ``python tests/data/make_vllm_moe_routes.py``; ``tests/test_report_decision.py`` checks that
the shipped file is exactly what this script writes.
"""

import json
from pathlib import Path

import numpy as np

NUM_EXPERTS, TOP_K, LAYERS = 64, 8, (0, 15)
REQUESTS, PROMPT, DECODE = 12, (10, 16), (8, 12)
META = {"type": "meta", "model_id": "allenai/OLMoE-1B-7B-0924", "vllm_version": "0.6.6.post1",
        "torch_version": "2.5.1+cu124", "device": "NVIDIA L4", "seed": 1234, "layers_logged": list(LAYERS),
        "top_k": TOP_K}


def route(rng, preferred):
    """One token's top-8 ids and weights at one layer: preferred experts score higher."""
    scores = rng.gumbel(size=NUM_EXPERTS) + 2.5 * preferred
    ids = np.argsort(-scores)[:TOP_K]
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    return ids.tolist(), [round(float(p), 4) for p in probs[ids]]


def lines() -> list[str]:
    rng = np.random.default_rng(1234)
    topics = rng.integers(0, 4, REQUESTS)
    preferred = np.zeros((4, len(LAYERS), NUM_EXPERTS))
    for topic in range(4):
        for layer in range(len(LAYERS)):
            preferred[topic, layer, rng.choice(NUM_EXPERTS, 16, replace=False)] = 1.0
    prompt = rng.integers(*PROMPT, REQUESTS)
    decode = rng.integers(*DECODE, REQUESTS)
    out, step, clock = [json.dumps(META)], 0, 1733312000.0
    passes = [[(r, range(int(prompt[r])))] for r in range(REQUESTS)]  # one prefill pass per request
    for t in range(int(decode.max())):  # then decode steps, every unfinished request together
        passes.append([(r, [int(prompt[r]) + t]) for r in range(REQUESTS) if t < decode[r]])
    for batch in passes:
        clock += 0.02 + 0.001 * sum(len(tokens) for _, tokens in batch)
        for layer_index, layer in enumerate(LAYERS):
            for r, tokens in batch:
                for token in tokens:
                    ids, weights = route(rng, preferred[topics[r], layer_index])
                    out.append(json.dumps({"type": "route", "req_id": f"cmpl-{r:04d}", "token_idx": token,
                                           "layer": layer, "topk_ids": ids, "topk_weights": weights,
                                           "timestamp": round(clock, 6), "step": step}))
        step += 1
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("vllm_moe_routes.jsonl")
    path.write_text("\n".join(lines()) + "\n")
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
