"""Structured random routing traces, for tests, benchmarks and the book when no trained model is at hand.

Each request belongs to one of ``num_domains`` domains. Per layer, expert ``e`` gets a router score

    score[t, e] = popularity[e] + domain[d(t), e] + request[q(t), e] + noise[t, e]

with independent normal terms of standard deviations ``popularity_std``, ``domain_std``, ``request_std``
and 1, and the token takes the ``top_k`` highest scores. So load is skewed (popularity), domain
specific (domain) and persistent within a request (request): the three properties of the expert-activation paper
[bambhaniya2026expert], with
knobs to turn them off. The first ``prefill_fraction`` of each request's tokens are marked prefill.
"""
from __future__ import annotations

import numpy as np

from minimoe.traces.format import Trace


def _check_whole(minimum: int = 1, **values) -> None:
    """Raise ValueError naming the first of ``values`` that is not a whole number >= ``minimum``."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")


def synthetic_trace(num_requests: int = 64, tokens_per_request: int = 32, num_layers: int = 2,
                    num_experts: int = 32, top_k: int = 4, num_domains: int = 4, popularity_std: float = 0.5,
                    domain_std: float = 1.0, request_std: float = 0.5, prefill_fraction: float = 0.5,
                    seed: int = 0) -> Trace:
    """A Trace of ``num_requests * tokens_per_request`` tokens (see the module docstring). Raises ValueError
    naming an argument that is not a whole number >= 1 (sizes; seed >= 0), a top_k outside [1, num_experts], a
    spread that is not a finite number >= 0, or a prefill_fraction outside [0, 1]."""
    _check_whole(num_requests=num_requests, tokens_per_request=tokens_per_request, num_layers=num_layers,
                 num_experts=num_experts, top_k=top_k, num_domains=num_domains)
    _check_whole(0, seed=seed)
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    for name, value in (("popularity_std", popularity_std), ("domain_std", domain_std), ("request_std", request_std)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 <= value < float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if isinstance(prefill_fraction, bool) or not isinstance(prefill_fraction, (int, float, np.number)) or \
            not 0 <= prefill_fraction <= 1:
        raise ValueError(f"prefill_fraction must be a number in [0, 1], got {prefill_fraction!r}")
    rng = np.random.default_rng(seed)
    num_tokens = num_requests * tokens_per_request
    request = np.repeat(np.arange(num_requests), tokens_per_request)
    request_domain = rng.integers(num_domains, size=num_requests)
    experts = np.empty((num_tokens, num_layers, top_k), dtype=np.int16)
    for layer in range(num_layers):
        popularity = rng.normal(0, popularity_std, num_experts)
        domain = rng.normal(0, domain_std, (num_domains, num_experts))
        preference = rng.normal(0, request_std, (num_requests, num_experts)) + domain[request_domain] + popularity
        score = preference[request] + rng.normal(0, 1, (num_tokens, num_experts))  # (N, E)
        experts[:, layer] = np.argpartition(-score, top_k - 1, axis=1)[:, :top_k]
    position = np.tile(np.arange(tokens_per_request), num_requests)
    phase = (position >= int(round(prefill_fraction * tokens_per_request))).astype(np.int8)
    names = np.array([f"domain{d}" for d in range(num_domains)])
    return Trace(experts=experts, request=request, phase=phase, domain=names[request_domain[request]],
                 num_experts=num_experts, top_k=top_k, model="synthetic")


def planted_trace(num_domains: int = 4, experts_per_domain: int = 8, num_requests: int = 32,
                  tokens_per_request: int = 16, top_k: int = 4, seed: int = 0) -> Trace:
    """One layer with a hidden partition: each domain routes only to its own ``experts_per_domain``
    experts (a random subset), uniformly; requests are split evenly over domains (a multiple is
    expected); the second half of each request is decode. The ideal placement is known: one domain's
    experts and requests per node cost zero inter-node traffic."""
    _check_whole(num_domains=num_domains, experts_per_domain=experts_per_domain, num_requests=num_requests,
                 tokens_per_request=tokens_per_request, top_k=top_k)
    _check_whole(0, seed=seed)
    if top_k > experts_per_domain:
        raise ValueError(f"top_k={top_k} exceeds experts_per_domain={experts_per_domain}")
    if num_requests % num_domains:
        raise ValueError(f"num_requests={num_requests} is not a multiple of num_domains={num_domains}")
    rng = np.random.default_rng(seed)
    num_experts = num_domains * experts_per_domain
    owner = rng.permutation(num_experts).reshape(num_domains, experts_per_domain)
    domain = rng.permutation(np.repeat(np.arange(num_domains), num_requests // num_domains))
    token_domain = np.repeat(domain, tokens_per_request)
    choice = np.argsort(rng.random((len(token_domain), experts_per_domain)), axis=1)[:, :top_k]
    experts = owner[token_domain[:, None], choice][:, None, :]
    phase = np.tile((np.arange(tokens_per_request) >= tokens_per_request // 2).astype(np.int8), num_requests)
    return Trace(experts=experts, request=np.repeat(np.arange(num_requests), tokens_per_request), phase=phase,
                 domain=np.array([f"domain{d}" for d in token_domain]), num_experts=num_experts, top_k=top_k)


def synthetic_chunks(num_tokens: int, num_layers: int = 4, num_experts: int = 64, top_k: int = 8,
                     num_domains: int = 4, prefill_tokens: tuple[int, int] = (256, 1024),
                     decode_tokens: tuple[int, int] = (64, 256), popularity_std: float = 0.5,
                     domain_std: float = 1.0, request_std: float = 0.5, chunk_tokens: int = 1 << 18,
                     seed: int = 0):
    """Traces of whole requests, about ``chunk_tokens`` tokens each, until ``num_tokens`` tokens in all (the last
    request is cut short there): a trace of any size generated piece by piece, for writing batch by batch.

    The same three effects as ``synthetic_trace``, drawn faster: request ``q`` of domain ``d`` routes a token in
    layer ``l`` to ``top_k`` distinct experts by sampling without replacement with probabilities
    ``p[e] ∝ exp(popularity[l, e] + domain[l, d, e] + request[q, l, e])`` (normal terms with the given standard
    deviations): draw k experts from ``p`` with replacement, then redraw each one that repeats an earlier slot
    until it does not (successive sampling, the same law as Gumbel top-k on ``log p``). Every request has a
    uniform number of prefill tokens in ``prefill_tokens`` and of decode tokens in ``decode_tokens`` (both
    inclusive), prefill first. Chunks' request ids start at 0: ``ParquetTraceWriter.append`` renumbers them."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if num_tokens < 1 or min(num_layers, num_domains) < 1:
        raise ValueError("num_tokens, num_layers and num_domains must be >= 1")
    rng = np.random.default_rng(seed)
    popularity = rng.normal(0, popularity_std, (num_layers, num_experts))
    domain = rng.normal(0, domain_std, (num_layers, num_domains, num_experts))
    names = np.array([f"domain{d}" for d in range(num_domains)])
    made = 0
    while made < num_tokens:
        lengths = []  # (prefill, decode) of each request of the chunk
        while sum(p + d for p, d in lengths) < min(chunk_tokens, num_tokens - made):
            lengths.append((int(rng.integers(prefill_tokens[0], prefill_tokens[1] + 1)),
                            int(rng.integers(decode_tokens[0], decode_tokens[1] + 1))))
        total = np.array([p + d for p, d in lengths])
        request = np.repeat(np.arange(len(lengths)), total)[:num_tokens - made]  # (n,)
        phase = np.concatenate([np.r_[np.zeros(p), np.ones(d)] for p, d in lengths]).astype(np.int8)[:len(request)]
        request_domain = rng.integers(num_domains, size=len(lengths))
        experts = np.empty((len(request), num_layers, top_k), np.int16)
        for layer in range(num_layers):
            logits = popularity[layer] + domain[layer, request_domain] \
                + rng.normal(0, request_std, (len(lengths), num_experts))  # (r, E)
            p = np.exp(logits - logits.max(1, keepdims=True))
            cdf = np.cumsum(p / p.sum(1, keepdims=True), axis=1)
            experts[:, layer] = _successive_sample(cdf, request, top_k, rng)
        made += len(request)
        yield Trace(experts=experts, request=request, phase=phase, domain=names[request_domain[request]],
                    num_experts=num_experts, top_k=top_k, model="synthetic")


def _successive_sample(cdf, request, top_k, rng):
    """(n, k) distinct experts per token: token t draws from row ``request[t]`` of ``cdf`` (r, E) with
    replacement, and each slot that repeats an earlier one is redrawn until it does not."""
    num_rows, num_experts = cdf.shape
    offsets = (np.arange(num_rows)[:, None] + cdf).ravel()  # row q's cumulative weights shifted into (q, q+1]

    def draw(rows):
        flat = np.searchsorted(offsets, request[rows] + rng.random(len(rows)), side="right")
        return np.minimum(flat - request[rows] * num_experts, num_experts - 1)

    chosen = np.empty((len(request), top_k), np.int64)
    every = np.arange(len(request))
    for slot in range(top_k):
        chosen[:, slot] = draw(every)
        repeat = np.flatnonzero((chosen[:, :slot] == chosen[:, slot:slot + 1]).any(1))
        while repeat.size:
            chosen[repeat, slot] = draw(repeat)
            repeat = repeat[(chosen[repeat, :slot] == chosen[repeat, slot:slot + 1]).any(1)]
    return chosen
