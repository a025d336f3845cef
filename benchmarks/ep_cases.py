"""Shared pieces of the expert-parallel benchmarks (bench_ep.py, ep_host_overhead.py): the routing, one case of
dispatch + combine next to the raw collectives that move the same rows, and the timers.

A **case** is one wire format at one size on this rank. ``ours()`` is dispatch + combine with no expert compute
(the combine input is a fresh buffer of the received shape), in the package's current code (``impl="after"``)
or in the frozen copy of the code before the sync-free rewrite (``impl="before"``, ``ep_before.py``).
``raw()`` runs the bare collectives with the same sizes on ready buffers: for an all-to-all format, one
``all_to_all_single`` per leg and its reverse (two calls; hierarchical: four); for replicate,
``all_gather_into_tensor`` and ``reduce_scatter_tensor``.

Column legend used by every table:
  MiB/rank   rows this rank dispatches (all legs, rows it keeps for itself included) x hidden x 2 bytes
  GB/s       bytes this rank sends to OTHER ranks, dispatch + combine (self-copies excluded), per second
  raw/ours   time of the raw collectives / time of ours: 1.0 = as fast as the bare exchange
  host µs    time until the call returns to Python (the GPU may still be working), median
  total µs   time until the GPU has finished (synchronised), median; slowest rank
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import ep_before  # noqa: E402
from minimoe.parallel import RouteTable, combine, dispatch  # noqa: E402
from minimoe.placement import Placement  # noqa: E402

HIDDEN, EXPERTS, TOP_K = 7168, 256, 8
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def uniform_routing(tokens: int, rank: int, device, experts: int = EXPERTS, top_k: int = TOP_K, seed: int = 0):
    """(T, k) distinct experts uniform over ``experts`` and their normalised weights, per rank."""
    generator = torch.Generator(device=device).manual_seed(seed * 1000 + rank)
    scores = torch.rand(tokens, experts, generator=generator, device=device)
    weights, ids = scores.topk(top_k, dim=1)
    return ids, (weights / weights.sum(1, keepdim=True)).float()


def contiguous(world: int, gpus_per_node: int, experts: int = EXPERTS) -> Placement:
    return Placement(np.arange(experts)[None], experts, world // gpus_per_node, gpus_per_node, "contiguous")


class Case:
    """One wire format at one size: ours (after or before) and the raw collectives with the same sizes."""

    def __init__(self, tokens, fmt, placement, rank, world, device, impl="after", static=False, hidden=HIDDEN,
                 dtype=torch.bfloat16, top_k=TOP_K):
        self.table = RouteTable(placement, 0, device)
        ids, self.weights = uniform_routing(tokens, rank, device, placement.num_experts, top_k)
        self.slots = self.table.route(ids, rank, torch.arange(tokens, device=device))
        self.x = torch.randn(tokens, hidden, device=device, dtype=dtype)
        self.fmt, self.rank, self.world, self.device, self.static, self.impl = fmt, rank, world, device, static, impl
        if impl == "before" and fmt not in ep_before.WIRE_FORMATS:
            raise ValueError(f"the code before the rewrite has no {fmt!r} format")
        sent = self.dispatch_only()
        row = hidden * self.x.element_size()
        if fmt == "replicate":
            block = tokens  # every rank brings the same T here
            self.raw_buffers = (torch.empty(world * block, hidden, device=device, dtype=dtype),
                                torch.empty(block, hidden, device=device, dtype=dtype))
            self.sent_bytes = world * block * row
            self.remote_bytes = 2 * (world - 1) * block * row
            self.legs = []
        else:
            self.legs = [(leg.send_splits, leg.recv_splits) for leg in sent.handle.legs]
            self.raw_buffers = [(torch.empty(sum(s), hidden, device=device, dtype=dtype),
                                 torch.empty(sum(r), hidden, device=device, dtype=dtype)) for s, r in self.legs]
            self.sent_bytes = sum(sum(s) for s, _ in self.legs) * row
            self.remote_bytes = 2 * sum(sum(c for d, c in enumerate(s) if d != rank) for s, _ in self.legs) * row
        self.received_rows = sent.rows.shape[0]

    def dispatch_only(self):
        if self.impl == "before":
            return ep_before.dispatch(self.x, self.slots, self.weights, self.table, self.fmt, requires_grad=False,
                                      static=self.static)
        return dispatch(self.x, self.slots, self.weights, self.table, self.fmt, requires_grad=False,
                        static=self.static)

    def ours(self):
        sent = self.dispatch_only()
        back = ep_before.combine if self.impl == "before" else combine
        return back(torch.empty(sent.rows.shape, device=self.device, dtype=self.x.dtype), sent.handle)

    def raw(self):
        if self.fmt == "replicate":
            gathered, mine = self.raw_buffers
            _all_gather(gathered, self.x)
            _reduce_scatter(mine, gathered)
            return
        for (send, recv), (out_buf, in_buf) in zip(self.legs, self.raw_buffers):
            dist.all_to_all_single(in_buf, out_buf, recv, send)
        for (send, recv), (out_buf, in_buf) in zip(reversed(self.legs), reversed(self.raw_buffers)):
            dist.all_to_all_single(out_buf, in_buf, send, recv)


def _slowest(values: list[float], device) -> float:
    value = torch.tensor([statistics.median(values)], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def time_eager(fn, device, iters: int, warmup: int = 3) -> dict:
    """Median host µs (until fn returns) and total µs (until the device is done), slowest rank."""
    for _ in range(warmup):
        fn()
    host, total = [], []
    for _ in range(iters):
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        sync(device)
        start = time.perf_counter()
        fn()
        returned = time.perf_counter()
        sync(device)
        host.append(returned - start)
        total.append(time.perf_counter() - start)
    return dict(host_us=1e6 * _slowest(host, device), total_us=1e6 * _slowest(total, device))


def graphed(fn, device):
    """fn captured in a CUDA graph (after warm-up on a side stream); returns the replay function."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_graph(fn, device, iters: int) -> dict:
    """fn captured once and replayed: total µs per replay, or the reason capture failed."""
    if device.type != "cuda":
        return dict(error="CUDA graphs need a CUDA device")
    try:
        replay = graphed(fn, device)
    except Exception as error:  # noqa: BLE001 - recorded, not hidden
        torch.cuda.synchronize(device)
        return dict(error=repr(error)[:300])
    return time_eager(replay, device, iters)
