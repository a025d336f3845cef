"""The three runs of ``minimoe ep-demo`` (``minimoe.parallel.demo``), each on every rank torchrun starts:

* ``run_layer``   a random MoE layer expert-parallel in every wire format, against the single-process layer on the
                  whole batch, with the bytes ``TrafficCounters`` saw next to ``minimoe.placement.measure``'s;
* ``run_model``   a minimoe checkpoint expert-parallel: its logits against one process;
* ``run_replay``  a trace replayed through the exchange (``minimoe.parallel.replay``): measured bytes and time
                  next to the prediction.

Each returns one dict per wire format (the rows ``demo.format_rows`` prints); rank 0's rows hold the maxima
over ranks.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from minimoe.parallel.comm import all_reduce_sum, group_rank_size
from minimoe.parallel.counters import TrafficCounters
from minimoe.parallel.demo_setup import fit_placement, saved_deployment, topology
from minimoe.parallel.dispatch import WIRE_FORMATS
from minimoe.parallel.formats import choose_wire_format
from minimoe.parallel.layer import ExpertParallelMoE, expert_parallel

def _routing_trace(expert_ids: list[torch.Tensor], request: np.ndarray, num_experts: int, top_k: int):
    """A Trace of recorded routing: expert_ids[l] (N, k) per layer, request (N,) dense ids."""
    from minimoe.traces import Trace

    experts = np.stack([e.cpu().numpy() for e in expert_ids], axis=1)  # (N, L, k)
    return Trace(experts=experts, request=request, phase=np.zeros(len(request), dtype=np.int8), domain=None,
                 num_experts=num_experts, top_k=top_k, model="ep-demo")


def _max_over_ranks(value: float, device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor)


def _load(ep_layers, world, device) -> np.ndarray:
    pairs = torch.zeros(world, dtype=torch.int64, device=device)
    pairs[group_rank_size()[0]] = sum(int(layer.received_pairs) for layer in ep_layers)
    return all_reduce_sum(pairs).cpu().numpy()


def _row(fmt, error, ep_layers, world, device, times) -> dict:
    counters = TrafficCounters()
    for layer in ep_layers:
        counters.merge(layer.counters)
    counters = counters.summed()
    load = _load(ep_layers, world, device)
    row = dict(wire_format=fmt, max_abs_error=error, **counters.as_dict(), pairs_per_rank=load.tolist(),
               load_max_over_mean=float(load.max() / max(load.mean(), 1e-12)))
    row.update({f"{name}_ms": 1e3 * _max_over_ranks(t, device) for name, t in times.items()})
    return row


def run_layer(args, world, rank, device, dtype) -> list[dict]:
    """A random MoE layer, every wire format, against the single-process layer."""
    from minimoe.model import MoEConfig, MoELayer

    torch.manual_seed(args.seed)
    config = MoEConfig(num_experts=args.experts, top_k=args.top_k, intermediate_size=args.intermediate,
                       num_shared_experts=args.shared_experts, capacity_factor=args.capacity_factor)
    hidden, tokens = args.hidden or 64, args.tokens_per_rank
    moe = MoELayer(hidden, config).to(device=device, dtype=dtype)
    x_all = torch.randn(world * tokens, hidden, generator=torch.Generator().manual_seed(args.seed + 1))
    x_all = x_all.to(device=device, dtype=dtype)
    with torch.no_grad():
        reference = moe(x_all)  # (G·T, H) the single-process layer on the whole batch
    trace = _routing_trace([moe.last_routing.expert_ids], np.repeat(np.arange(world), tokens), args.experts,
                           args.top_k)
    shape = topology(args.gpus_per_node, world)
    placement, _, _ = fit_placement(args.placement, trace, shape, args.replicas, args.seed)
    kept = moe.last_routing.expert_ids if moe.last_kept is None else \
        moe.last_routing.expert_ids.masked_fill(~moe.last_kept, -1)
    report = _predict(_routing_trace([kept], trace.request, args.experts, args.top_k), placement, shape,
                      np.arange(world), hidden, dtype)
    mine = slice(rank * tokens, (rank + 1) * tokens)
    index = torch.arange(mine.start, mine.stop, device=device)  # global token index, as in the trace
    rows = []
    for fmt in _formats(args):
        layer = ExpertParallelMoE(moe, placement, 0, None, fmt)
        with torch.no_grad():
            out = layer(x_all[mine], token_index=index)
            error = _max_over_ranks(float((out.float() - reference[mine].float()).abs().max()), device)
            counters, layer.timed, times = layer.counters, True, {"dispatch": 0.0, "experts": 0.0, "combine": 0.0}
            layer.counters = TrafficCounters()  # time without counting
            for _ in range(args.iters):
                layer(x_all[mine], token_index=index)
                times = {k: v + layer.last_times[k] / args.iters for k, v in times.items()}
            layer.counters = counters
        rows.append(_row(layer.wire_format, error, [layer], world, device, times)
                    | _compare(layer.counters.summed(), report, layer.wire_format, shape)
                    | dict(format_rule=rule_line(args.experts, args.top_k, shape)))
    return rows


def _predict(trace, placement, topology, sources, hidden: int, dtype, tokens=None):
    from minimoe.placement import measure

    size = torch.finfo(dtype).bits // 8
    return measure(trace, placement, topology, sources=sources, hidden_size=hidden, bytes_per_element=size,
                   combine_bytes_per_element=size, tokens=tokens)


def _compare(counters, report, fmt, topology) -> dict:
    """measure's prediction for ``fmt`` next to what the counters saw."""
    from minimoe.parallel.replay import predicted_bytes

    predicted = predicted_bytes(report, fmt, topology)
    return dict(predicted_intra_bytes=predicted["intra"], predicted_inter_bytes=predicted["inter"],
                bytes_match=all(counters.link_bytes(link) == predicted[link] for link in ("intra", "inter")))


def run_model(args, world, rank, device, dtype) -> list[dict]:
    """A minimoe checkpoint expert-parallel: logits against one process."""
    import copy

    from minimoe.model import MoELayer, Transformer
    from minimoe.traces import BUNDLED_MODEL

    model = Transformer.load(BUNDLED_MODEL if args.model == "bundled" else args.model).to(device=device, dtype=dtype)
    model.eval()
    seqs, length = args.tokens_per_rank, 16
    ids = torch.randint(0, model.config.vocab_size, (world * seqs, length),
                        generator=torch.Generator().manual_seed(args.seed)).to(device)
    with torch.no_grad():
        reference = model(ids)  # (G·B, T, V)
    moes = [b.ffn for b in model.layers if isinstance(b.ffn, MoELayer)]
    trace = _routing_trace([m.last_routing.expert_ids for m in moes], np.repeat(np.arange(world), seqs * length),
                           moes[0].config.num_experts, moes[0].config.top_k)
    placement, _, _ = fit_placement(args.placement, trace, topology(args.gpus_per_node, world), args.replicas,
                                    args.seed)
    mine = slice(rank * seqs, (rank + 1) * seqs)
    rows = []
    for fmt in _formats(args):
        parallel = expert_parallel(copy.deepcopy(model), placement, None, fmt)
        layers = [b.ffn for b in parallel.layers if isinstance(b.ffn, ExpertParallelMoE)]
        with torch.no_grad():
            logits = parallel(ids[mine])
        error = _max_over_ranks(float((logits.float() - reference[mine].float()).abs().max()), device)
        rows.append(_row(layers[0].wire_format, error, layers, world, device, {})
                    | dict(format_rule=rule_line(trace.num_experts, trace.top_k, placement.topology)))
    return rows


def run_replay(args, world, rank, device, dtype) -> list[dict]:
    """Replay a trace: measured bytes and time next to minimoe.placement.measure."""
    from minimoe.placement import group
    from minimoe.parallel.replay import replay
    from minimoe.traces import bundled_trace
    from minimoe.traces.parquet import load_trace

    if args.trace == "bundled":
        trace = bundled_trace(num_per_domain=args.requests_per_domain, max_new_tokens=args.new_tokens,
                              seed=args.seed)
    else:
        if not os.path.isfile(args.trace):
            raise FileNotFoundError(f"--trace {args.trace!r}: no such file (expected a trace .npz or .parquet, "
                                    "or 'bundled')")
        trace = load_trace(args.trace)
    shape = topology(args.gpus_per_node, world)
    fit = trace.phase == 0 if (trace.phase == 0).any() and (trace.phase == 1).any() else None
    held_out = None if fit is None else ~fit  # fit on prefill, replay decode (held out)
    grouping = args.grouping or "round_robin"
    sources = None if grouping == "round_robin" else group(trace, shape, grouping, seed=args.seed, tokens=fit)
    deployment = saved_deployment(args.placement)
    if deployment is not None:  # the report's own fit: its placement, its sources, its held-out tokens
        if args.grouping is not None:
            raise ValueError(f"--placement {args.placement} brings the grouping it was fitted with: leave --grouping "
                             "unset")
        placement, sources, held_out = deployment.replay_inputs(trace)
        fit_placement(args.placement, trace, shape, args.replicas)  # the same checks of ranks and nodes
        grouping = deployment.method if deployment.sources is not None else "round_robin"
    else:
        placement, sources, _ = fit_placement(args.placement, trace, shape, args.replicas, args.seed, fit, sources,
                                              grouping_given=args.grouping is not None)
    hidden = args.hidden or 7168
    report = _predict(trace, placement, shape, sources, hidden, dtype, held_out)
    replayed = trace.num_tokens if held_out is None else int(held_out.sum())
    which = "every token" if held_out is None else "its held-out tokens" if deployment is not None else \
        "its decode tokens (the placement fitted on prefill)"
    trace_line = (f"trace: {trace.num_tokens:,} tokens, {trace.num_requests:,} requests, {trace.num_layers} MoE "
                  f"layers, top-{trace.top_k} of {trace.num_experts}; replaying {which}: {replayed:,} tokens")
    rows = []
    for fmt in _formats(args, trace.num_experts, trace.top_k, shape):
        result = replay(trace, placement, sources, fmt, None, hidden, dtype, device, held_out, seed=args.seed)
        rows.append(dict(wire_format=fmt, placement=args.placement, grouping=grouping, steps=result.steps,
                         tokens=result.tokens, **result.counters.as_dict(),
                         **_compare(result.counters, report, fmt, shape),
                         dispatch_ms=1e3 * result.dispatch_s, combine_ms=1e3 * result.combine_s,
                         pairs_per_rank=result.received_pairs.tolist(),
                         load_max_over_mean=result.load_max_over_mean,
                         format_rule=rule_line(trace.num_experts, trace.top_k, shape), trace_line=trace_line))
    return rows


def _formats(args, num_experts=None, top_k=None, shape=None) -> tuple[str, ...]:
    """The formats to run: all, one, or "auto" (the layer decides; a replay asks the rule here)."""
    if args.wire_format == "all":
        return WIRE_FORMATS
    if args.wire_format == "auto" and shape is not None:
        return (choose_wire_format(num_experts, top_k, shape.num_gpus, shape.gpus_per_node).wire_format,)
    return (args.wire_format,)


def rule_line(num_experts: int, top_k: int, shape) -> str:
    """What the format rule picks for this run's sizes, and why (every run prints it)."""
    choice = choose_wire_format(num_experts, top_k, shape.num_gpus, shape.gpus_per_node)
    return f"format rule (eager) picks {choice.wire_format}: {choice.reason}"
