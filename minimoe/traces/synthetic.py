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


def synthetic_trace(num_requests: int = 64, tokens_per_request: int = 32, num_layers: int = 2,
                    num_experts: int = 32, top_k: int = 4, num_domains: int = 4, popularity_std: float = 0.5,
                    domain_std: float = 1.0, request_std: float = 0.5, prefill_fraction: float = 0.5,
                    seed: int = 0) -> Trace:
    """A Trace of ``num_requests * tokens_per_request`` tokens (see the module docstring)."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if min(num_requests, tokens_per_request, num_layers, num_domains) < 1:
        raise ValueError("num_requests, tokens_per_request, num_layers and num_domains must be >= 1")
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
