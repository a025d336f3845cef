"""A deployment file: the placement ``minimoe report`` recommends, with everything needed to use it and replay it.

``minimoe report`` writes one ``placement-NODESxGPUS.json`` per topology; ``minimoe export`` turns it into a
serving engine's file, and ``Placement.load`` reads its placement. The JSON object holds:

    format       "minimoe.deployment/1"
    placement    the placement (``Placement.to_dict``: phy2log [L, R], num_experts, num_nodes, gpus_per_node)
    method       the method that fitted it (``minimoe.placement.experiments.METHODS``)
    sources      the GPU rank of each request of the fitted trace (R,): the grouping the numbers were measured
                 with (a random balanced spread for the placement-only methods)
    steering     null, or what the serving system must do to get the measured saving (grouping methods)
    split        {"kind", "window"}: how tokens were divided into fitted and measured (``minimoe.placement.splits``)
    seed         the seed of the fit
    measured     the report's numbers for it (saving vs contiguous and EPLB, load max/mean, inter-node bytes)
    trace        the fitted trace's size (tokens, requests, layers, num_experts, top_k, model), checked on replay

Replaying exactly what the report measured, on the trace it was fitted on (an expert-parallel replay needs the
three): ``Deployment.load(path).replay_inputs(trace)`` -> (placement, sources, held-out token mask).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from minimoe.placement.phy2log import Placement

FORMAT = "minimoe.deployment/1"
_KEYS = {"format", "placement", "method", "sources", "steering", "split", "seed", "measured", "trace"}


def trace_fingerprint(trace) -> dict:
    return dict(tokens=int(trace.num_tokens), requests=int(trace.num_requests), layers=int(trace.num_layers),
                num_experts=int(trace.num_experts), top_k=int(trace.top_k), model=str(trace.model))


@dataclass
class Deployment:
    placement: Placement
    method: str
    sources: np.ndarray | None = None   # int64 (R,)
    steering: str | None = None
    split: dict = field(default_factory=dict)
    seed: int = 0
    measured: dict = field(default_factory=dict)
    trace: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(format=FORMAT, placement=self.placement.to_dict(), method=self.method,
                    sources=None if self.sources is None else [int(s) for s in self.sources], steering=self.steering,
                    split=dict(self.split), seed=int(self.seed), measured=dict(self.measured), trace=dict(self.trace))

    def save(self, path) -> None:
        with open(path, "w") as file:
            json.dump(self.to_dict(), file, indent=1)
            file.write("\n")

    @classmethod
    def load(cls, path) -> "Deployment":
        """Read a deployment file; ValueError naming the file and the key for anything malformed."""
        where = f"deployment file {os.fspath(path)!r}"
        try:
            with open(path) as file:
                data = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not JSON: {error}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or set(data) != _KEYS:
            raise ValueError(f"{where} must be a {FORMAT} object with keys {sorted(_KEYS)}")
        try:
            placement = Placement.from_dict(data["placement"])
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{where}: placement: {error}") from None
        sources = data["sources"]
        if sources is not None:
            sources = np.asarray(sources)
            if sources.ndim != 1 or sources.dtype.kind not in "iu" or (sources.size and (
                    sources.min() < 0 or sources.max() >= placement.num_gpus)):
                raise ValueError(f"{where}: sources must be a list of GPU ranks in [0, {placement.num_gpus})")
        for key in ("split", "measured", "trace"):
            if not isinstance(data[key], dict):
                raise ValueError(f"{where}: {key} must be an object")
        return cls(placement=placement, method=str(data["method"]), sources=sources, steering=data["steering"],
                   split=data["split"], seed=int(data["seed"]), measured=data["measured"], trace=data["trace"])

    # ---- replay ----------------------------------------------------------------------------------------------
    def check_trace(self, trace) -> None:
        """Raise ValueError unless ``trace`` is the one this deployment was fitted on (same sizes and model)."""
        seen = trace_fingerprint(trace)
        differ = {k: (v, seen.get(k)) for k, v in self.trace.items() if seen.get(k) != v}
        if differ:
            raise ValueError("the trace differs from the one the placement was fitted on: "
                             + ", ".join(f"{k} {a!r} in the file, {b!r} in the trace" for k, (a, b) in differ.items()))

    def eval_tokens(self, trace) -> np.ndarray:
        """bool (N,): the tokens the report measured this placement on (its held-out set)."""
        from minimoe.placement.splits import split

        self.check_trace(trace)
        return split(trace, self.split.get("window"), self.split.get("kind")).masks["eval"]

    def replay_inputs(self, trace):
        """(placement, sources, held-out mask): ``measure(trace, placement, topology, sources=sources,
        tokens=mask)`` gives back the report's numbers for this placement."""
        return self.placement, self.sources, self.eval_tokens(trace)
