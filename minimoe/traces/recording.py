"""Recording traces: run prompts through a model (prefill, then decode) and log every routing decision.

Serving a request has two phases. Prefill runs the whole prompt through the model in one pass (P tokens);
decode then produces one token per step, feeding each generated token back through the model with the KV
cache holding everything before it. A MoE router decides, for every token that passes through a MoE layer,
which k experts it goes to. `record` captures those decisions:

    prefill:  logits = model(prompt)              -> P rows, phase 0
    decode:   for g in 1..max_new_tokens:
                  token_g = pick(logits[-1])      argmax (greedy, temperature=0) or a seeded sample
                  logits = model(token_g, cache)  -> 1 row, phase 1

so a request yields P + max_new_tokens rows (fewer if `eos_token_id` stops it: the eos token is not fed).
(vLLM's routed-experts capture has one row less: it never feeds its last generated token.)

Two kinds of model are supported:
  * transformers MoE models: forward hooks on each MoE layer's router module, `mlp.gate` (Mixtral,
    Qwen3-MoE, OLMoE, DeepSeek-V3 — whose first `first_k_dense_replace` layers are dense and have no
    router) or `feed_forward.router` (Llama 4 — dense and MoE layers interleave). Most routers return
    `(logits, weights, expert_ids)`; Llama 4's returns `(scores, logits)` with scores = sigmoid of the
    chosen logits scattered into -inf elsewhere, so its ids are top-k of the logits (the same torch.topk
    call the router made) and its weights the scores at those ids.
  * minimoe `Transformer`s: every MoE layer's `ffn.last_routing` (`expert_ids`, `weights`, (B*T, k)) after
    each forward, with the model's own KV cache (`model.new_cache`). Pairs dropped by a capacity limit
    (`ffn.last_kept` False) are recorded as -1. Capacity is counted per forward call, so with a capacity
    factor the drops depend on batch_size (padding tokens compete for slots too).
Trace layer l is the l-th MoE layer of the model; dense layers have no column.

Prompts are processed `batch_size` at a time, left-padded; positions count real tokens only, so a padded
prompt sees the same positions as alone. Padding rows are dropped from the trace.
"""

from __future__ import annotations

import inspect
import re

import numpy as np
import torch

from minimoe.traces.format import Trace

ROUTER_PATHS = ("mlp.gate", "feed_forward.router", "block_sparse_moe.gate")


def _prompt_list(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
        prompts = list(prompts)
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of token id sequences, got {type(prompts).__name__}")
    out = []
    for index, prompt in enumerate(prompts):
        ids = torch.as_tensor(prompt)
        if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"prompts[{index}] must be a non-empty 1-d sequence of token ids, got {prompt!r}")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"prompts[{index}] has token ids outside [0, vocab_size={vocab_size})")
        out.append(ids.tolist())
    return out


class _HFRouting:
    """Hooks on the routers of a transformers MoE model; `take()` returns what they saw since the last call."""

    def __init__(self, model):
        # decoder layer i's router is the module named "...layers.{i}.<path>" (named_modules keeps layer order)
        found = [(name, module) for name, module in model.named_modules()
                 if any(name.endswith(f".{path}") for path in ROUTER_PATHS) and ".layers." in name
                 and hasattr(module, "weight") and hasattr(module, "top_k")]
        self.routers = [module for _, module in found]
        numbers = [re.search(r"\.layers\.(\d+)\.", name) for name, _ in found]  # "model.layers.3.mlp.gate" -> 3
        self.layer_ids = [int(n.group(1)) if n else -1 for n in numbers]  # the model's layer of each MoE layer
        if not self.routers:
            raise ValueError(f"found no MoE router ({' / '.join(ROUTER_PATHS)}) in the layers of "
                             f"{type(model).__name__}")
        counts = {int(getattr(r, "num_experts", r.weight.shape[0])) for r in self.routers}
        top_ks = {int(r.top_k) for r in self.routers}
        if len(counts) != 1 or len(top_ks) != 1:
            raise ValueError(f"routers disagree on num_experts {counts} or top_k {top_ks}")
        self.num_experts, self.top_k = counts.pop(), top_ks.pop()
        self.seen = [[] for _ in self.routers]
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, index):
        def hook(module, inputs, output):
            if isinstance(output, tuple) and len(output) == 3 and not output[2].is_floating_point():
                _, weights, ids = output  # (T, k) each
            elif isinstance(output, tuple) and len(output) == 2:  # Llama 4: (scores (T, E), logits (T, E))
                scores, logits = output
                ids = torch.topk(logits, module.top_k, dim=-1).indices  # (T, k)
                weights = scores.gather(1, ids)
            else:
                raise ValueError(f"unsupported router output from {type(module).__name__}: expected "
                                 "(logits, weights, ids) or Llama 4's (scores, logits)")
            self.seen[index].append((ids.detach().cpu(), weights.detach().float().cpu()))
        return hook

    def take(self):
        if any(len(s) != 1 for s in self.seen):
            raise RuntimeError(f"expected one call per router per forward, got {[len(s) for s in self.seen]}")
        out = [s[0] for s in self.seen]
        self.seen = [[] for _ in self.routers]
        return out

    def close(self):
        for handle in self.handles:
            handle.remove()


class _HFModel:
    def __init__(self, model):
        self.model, self.routing = model, _HFRouting(model)
        self.num_experts, self.top_k = self.routing.num_experts, self.routing.top_k
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.name = getattr(model.config, "name_or_path", "") or model.config.model_type
        # transformers renamed `past_key_values` to `cache` (5.2x); use whichever this version takes
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def start(self, batch_size, max_len):
        self.cache = None

    def forward(self, ids, attention_mask, positions):
        out = self.model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                         **{self.cache_arg: self.cache})
        self.cache = getattr(out, self.cache_arg, None)
        return out.logits[:, -1]  # (B, V)


class _MinimoeModel:
    def __init__(self, model):
        self.model = model
        self.layer_ids = [i for i in range(len(model.layers)) if model.config.is_moe_layer(i)]
        self.moe = [model.layers[i].ffn for i in self.layer_ids]
        if not self.moe:
            raise ValueError("this minimoe model has no MoE layers (config.moe is None): nothing to record")
        self.num_experts, self.top_k = int(model.config.moe.num_experts), int(model.config.moe.top_k)
        self.vocab_size, self.name = model.config.vocab_size, model.config.extra.get("name", "minimoe")
        self.routing = self

    def start(self, batch_size, max_len):
        self.cache = self.model.new_cache(batch_size, max_len)

    def forward(self, ids, attention_mask, positions):
        logits = self.model(ids, attention_mask=attention_mask, position_ids=positions, cache=self.cache,
                            last_only=True)
        return logits[:, -1]  # (B, V)

    def take(self):
        out = []
        for ffn in self.moe:
            ids, weights = ffn.last_routing.expert_ids.detach().cpu(), ffn.last_routing.weights.detach().float().cpu()
            kept = getattr(ffn, "last_kept", None)  # (T, k) bool when capacity drops pairs, else None
            if kept is not None:  # a dropped (token, expert) pair never reached the expert: record -1
                kept = kept.detach().cpu()
                ids, weights = ids.masked_fill(~kept, -1), weights.masked_fill(~kept, 0.0)
            out.append((ids, weights))
        return out

    def close(self):
        pass


def _adapter(model):
    if hasattr(model, "new_cache") and hasattr(model, "layers"):
        return _MinimoeModel(model)
    if hasattr(model, "config") and hasattr(model, "get_input_embeddings"):
        return _HFModel(model)
    raise TypeError(f"record needs a minimoe Transformer or a transformers MoE model, got {type(model).__name__}")


def _rows(routes, batch, steps) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer (B*T, k) ids and weights -> (B, T, L, k) arrays."""
    ids = torch.stack([r[0] for r in routes], dim=1).reshape(batch, steps, len(routes), -1)
    weights = torch.stack([r[1] for r in routes], dim=1).reshape(batch, steps, len(routes), -1)
    return ids.numpy(), weights.numpy()


@torch.no_grad()
def record(model, prompts, max_new_tokens: int, domains=None, *, batch_size: int = 1,
           eos_token_id: int | None = None, name: str | None = None, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0, progress: bool = False) -> Trace:
    """Prefill + decode of every prompt; the routing of every processed token, as a Trace.

    Decoding is greedy by default; ``temperature > 0`` samples (nucleus ``top_p``) from a generator seeded
    with ``seed``, as serving systems usually do — greedy decoding of a small model tends to loop on a few
    tokens, which makes decode routing far narrower than real traffic. ``progress=True`` shows a progress bar
    over the batches (on stderr).
    """
    from minimoe.model.generate import sample_next

    generator = torch.Generator().manual_seed(seed)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    adapter = _adapter(model)
    was_training = model.training
    try:
        prompts = _prompt_list(prompts, adapter.vocab_size)
        if domains is not None and (len(domains) != len(prompts) or not all(isinstance(d, str) for d in domains)):
            raise ValueError(f"domains must be one str per prompt ({len(prompts)}), got {domains!r}")
        device = next(model.parameters()).device
        model.eval()
        experts, weights, phases, requests = [], [], [], []
        from tqdm.auto import tqdm

        for first in tqdm(range(0, len(prompts), batch_size), desc="recording", unit="batch", disable=not progress,
                          total=-(-len(prompts) // batch_size)):
            batch = prompts[first:first + batch_size]
            b, width = len(batch), max(len(p) for p in batch)
            ids = torch.zeros(b, width, dtype=torch.long, device=device)
            mask = torch.zeros(b, width, dtype=torch.long, device=device)
            for row, prompt in enumerate(batch):  # left padding
                ids[row, width - len(prompt):] = torch.tensor(prompt, device=device)
                mask[row, width - len(prompt):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
            adapter.start(b, width + max_new_tokens)
            logits = adapter.forward(ids, mask, positions)
            prefill_ids, prefill_w = _rows(adapter.routing.take(), b, width)  # (B, T, L, k)
            decode_ids, decode_w, alive = [], [], []
            running = torch.ones(b, dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                next_ids = sample_next(logits.float().cpu(), temperature, top_p, generator).to(device)  # (B,)
                if eos_token_id is not None:
                    running &= next_ids != eos_token_id
                    if not running.any():
                        break
                alive.append(running.cpu().numpy().copy())  # a copy: `running` changes in place
                mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
                positions = positions[:, -1:] + 1
                logits = adapter.forward(next_ids[:, None], mask, positions)
                step_ids, step_w = _rows(adapter.routing.take(), b, 1)
                decode_ids.append(step_ids[:, 0])
                decode_w.append(step_w[:, 0])
            for row, prompt in enumerate(batch):
                keep = [t for t, a in enumerate(alive) if a[row]]
                experts += [prefill_ids[row, width - len(prompt):]] + [decode_ids[t][row][None] for t in keep]
                weights += [prefill_w[row, width - len(prompt):]] + [decode_w[t][row][None] for t in keep]
                phases += [np.zeros(len(prompt), np.int8), np.ones(len(keep), np.int8)]
                requests.append(np.full(len(prompt) + len(keep), first + row, np.int32))
    finally:
        adapter.routing.close()
        model.train(was_training)
    request = np.concatenate(requests)
    return Trace(experts=np.concatenate(experts), request=request, phase=np.concatenate(phases),
                 domain=None if domains is None else np.asarray(domains, dtype=str)[request],
                 num_experts=adapter.num_experts, top_k=adapter.top_k,
                 model=adapter.name if name is None else name, weights=np.concatenate(weights),
                 layer_ids=adapter.routing.layer_ids)
