"""Replay a recorded trace through the real exchange: measured bytes and time per placement, next to the
prediction of ``minimoe.placement.measure``.

Every request runs on its source rank (``sources``, e.g. from ``minimoe.placement.group``; default
round-robin). The trace is cut into serving **steps**: prefill tokens in chunks of at most
``max_step_tokens`` rows (in trace order), then decode step j = the j-th decode token of every request
(tokens of unknown phase: chunks, like prefill). For each step and MoE layer, rank r takes its rows, routes
the recorded experts with ``Placement.route`` (token index = the row in the trace, as ``measure`` does),
dispatches rows of ``hidden_size`` random values, applies identity experts (row n returns
``Σ_j w_nj · x_n``) and combines; combine must return ``x_t · Σ_j w_tj`` (checked). Only dispatch and
combine are timed. The byte counters, summed over ranks, equal ``measure``'s numbers on the same rows
with ``hidden_size`` and the dtype's bytes per element (:func:`predicted_bytes` picks the matching ones).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from minimoe.parallel.comm import all_reduce_sum, group_rank_size
from minimoe.parallel.counters import TrafficCounters
from minimoe.parallel.dispatch import WIRE_FORMATS, combine, dispatch
from minimoe.parallel.routing import RouteTable


def replay_steps(trace, tokens=None, max_step_tokens: int = 4096) -> list[np.ndarray]:
    """Row indices of each serving step (see the module docstring); ``tokens`` (N,) bool selects rows."""
    if isinstance(max_step_tokens, bool) or not isinstance(max_step_tokens, int) or max_step_tokens < 1:
        raise ValueError(f"max_step_tokens must be a positive int, got {max_step_tokens!r}")
    rows = np.arange(trace.num_tokens) if tokens is None else np.flatnonzero(np.asarray(tokens, dtype=bool))
    decode = rows[trace.phase[rows] == 1]
    other = rows[trace.phase[rows] != 1]
    steps = [other[i:i + max_step_tokens] for i in range(0, len(other), max_step_tokens)]
    if len(decode):
        request = trace.request[decode]
        first = np.searchsorted(request, request)  # index of each request's first decode row in `decode`
        position = np.arange(len(decode)) - first  # j-th decode token of its request
        order = np.lexsort((decode, position))
        bounds = np.flatnonzero(np.diff(position[order])) + 1
        steps += np.split(decode[order], bounds)
    return steps


def predicted_bytes(report, wire_format: str, topology) -> dict[str, float]:
    """``measure``'s dispatch + combine bytes for what ``wire_format`` sends: {"intra": ..., "inter": ...}."""
    if wire_format == "token_expert":
        return {"intra": report.pair_bytes_intra, "inter": report.pair_bytes_inter}
    if wire_format == "hierarchical":
        return {"intra": report.intra_node_bytes, "inter": report.inter_node_bytes}
    if wire_format == "replicate":
        return {"intra": report.replicate_bytes_intra, "inter": report.replicate_bytes_inter}
    if wire_format != "token_rank":
        raise ValueError(f"wire_format must be one of {WIRE_FORMATS}, got {wire_format!r}")
    node = np.arange(topology.num_gpus) // topology.gpus_per_node
    same = node[:, None] == node[None, :]
    return {"intra": float(report.rank_matrix[same].sum()), "inter": float(report.rank_matrix[~same].sum())}


@dataclass
class ReplayResult:
    """Summed over ranks: ``counters``; max over ranks: ``dispatch_s``, ``combine_s`` (all steps and layers);
    ``steps``, ``layers``, ``tokens`` replayed; ``received_pairs`` (G,) pairs each rank computed."""

    counters: TrafficCounters
    dispatch_s: float
    combine_s: float
    steps: int
    layers: int
    tokens: int
    received_pairs: np.ndarray = field(repr=False)

    @property
    def load_max_over_mean(self) -> float:
        mean = self.received_pairs.mean()
        return float(self.received_pairs.max() / mean) if mean > 0 else float("nan")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def replay(trace, placement, sources=None, wire_format: str = "token_rank", group=None, hidden_size: int = 128,
           dtype=torch.bfloat16, device=None, tokens=None, max_step_tokens: int = 4096, seed: int = 0,
           check: bool = True) -> ReplayResult:
    """Replay ``trace`` under ``placement`` on the ranks of ``group`` (a collective; see the module docstring).

    sources: (R,) source rank of every request (None: ``request % G``). tokens: (N,) bool rows to replay.
    Raises ValueError when the trace and placement disagree, RuntimeError when combine returns wrong rows.
    """
    rank, size = group_rank_size(group)
    device = torch.device(device or "cpu")
    if (trace.num_layers, trace.num_experts) != (placement.num_layers, placement.num_experts):
        raise ValueError(f"trace has {trace.num_layers} layers x {trace.num_experts} experts, placement "
                         f"{placement.num_layers} x {placement.num_experts}")
    request_rank = placement.topology.request_ranks(int(trace.request.max()) + 1 if trace.num_tokens else 0,
                                                    sources)
    source_of_row = request_rank[trace.request]
    steps = replay_steps(trace, tokens, max_step_tokens)
    tables = [RouteTable(placement, layer, device) for layer in range(trace.num_layers)]
    widest = max((int((source_of_row[s] == rank).sum()) for s in steps), default=0)
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    x_all = torch.randn(widest, hidden_size, generator=generator).to(device=device, dtype=dtype)  # reused buffer
    counters, times = TrafficCounters(), np.zeros(2)
    received = torch.zeros((), dtype=torch.int64, device=device)
    for step in steps:
        mine = step[source_of_row[step] == rank]
        per_rank = np.bincount(source_of_row[step], minlength=size).tolist()  # every rank's tokens, known here
        token_index = torch.as_tensor(mine, device=device)
        x = x_all[:len(mine)]
        for layer, table in enumerate(tables):
            experts = torch.as_tensor(trace.experts[mine, layer].astype(np.int64), device=device)  # (n, k)
            if trace.weights is not None:
                weights = torch.as_tensor(trace.weights[mine, layer].astype(np.float32), device=device)
            else:
                weights = torch.full(experts.shape, 1.0 / trace.top_k, device=device)
            weights = weights.masked_fill(experts < 0, 0.0)
            slots = table.route(experts, rank, token_index)
            _sync(device)
            start = time.perf_counter()
            sent = dispatch(x, slots, weights, table, wire_format, group, counters, requires_grad=False,
                            tokens_per_rank=per_rank if wire_format == "replicate" else None)
            _sync(device)
            middle = time.perf_counter()
            valid = sent.slots >= 0
            expert_out = sent.rows * (sent.weights * valid).sum(1, keepdim=True).to(dtype)  # identity experts
            received += valid.sum()
            _sync(device)
            middle_end = time.perf_counter()
            out = combine(expert_out, sent.handle)
            _sync(device)
            times += (middle - start, time.perf_counter() - middle_end)
            if check:
                expected = x * weights.sum(1, keepdim=True).to(dtype)
                tolerance = 1e-5 if dtype == torch.float32 else 2e-2
                if not torch.allclose(out.float(), expected.float(), rtol=tolerance, atol=tolerance):
                    raise RuntimeError(f"replay: combine returned wrong rows on rank {rank} (layer {layer}, "
                                       f"max error {(out.float() - expected.float()).abs().max():.3g})")
    summed = counters.summed(group)
    timing = torch.tensor(times, dtype=torch.float64, device=device)
    if dist.is_initialized() and size > 1:
        dist.all_reduce(timing, op=dist.ReduceOp.MAX, group=group)
    pairs = torch.zeros(size, dtype=torch.int64, device=device)
    pairs[rank] = received
    pairs = all_reduce_sum(pairs, group, "replay load").cpu().numpy()
    replayed = sum(len(s) for s in steps)
    return ReplayResult(summed, float(timing[0]), float(timing[1]), len(steps), trace.num_layers, replayed, pairs)
