"""``minimoe ep-demo``: expert parallelism for real, on the ranks ``torchrun`` starts.

    torchrun --standalone --nproc_per_node=4 -m minimoe ep-demo
        a random MoE layer, every wire format, against one process (2 "nodes" of 2 ranks by default)
    torchrun --standalone --nproc_per_node=4 -m minimoe ep-demo --model bundled
        the bundled model expert-parallel: logits against one process
    torchrun --standalone --nproc_per_node=4 -m minimoe ep-demo --trace bundled --placement grouping+locality
        replay a trace through the exchange: measured bytes and time next to minimoe.placement.measure

Every rank builds the same model from ``--seed``, takes its share of the batch (rank r holds tokens
[r·T, (r+1)·T)), runs the layer expert-parallel and compares its outputs with the single-process layer on
the whole batch. Rank 0 prints, per wire format, the largest difference, the bytes sent per link class
and direction (summed over ranks), the time of dispatch, experts and combine (slowest rank), the pairs
each rank computed and their max/mean. gloo on CPUs, NCCL when CUDA is available (``--backend``).
Without torchrun it runs as one process.

Several "nodes" on one host: ``--gpus-per-node 2`` with 4 ranks makes ranks {0,1} and {2,3} two nodes (the
default for 4 or more ranks; with 2 or 3 ranks each rank is a node), so the hierarchical format and the
intra/inter-node counters can be exercised on one machine (the link speeds are then those of the host, not
of a network). ``--placement`` takes every fit ``minimoe report`` measures, or a saved placement .json.
``--wire-format auto`` runs the format the rule of ``minimoe.parallel.formats`` picks; every run prints the
rule's choice and its reason. An error prints one line, once (rank 0), and every rank exits with status 2. Across real nodes, start the same command on each node with
``--nnodes`` and a rendezvous, e.g. on two nodes of 8 GPUs:

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=ep \\
        -m minimoe ep-demo --gpus-per-node 8
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from minimoe.arguments import OneLineParser, check_moe_model_dir, check_output_file, number, seed_number, whole_number
from minimoe.parallel.comm import DEFAULT_TIMEOUT_S, all_reduce_sum, destroy_process_group, group_rank_size, \
    init_process_group
from minimoe.parallel.counters import TrafficCounters
from minimoe.parallel.demo_setup import (GROUPINGS, fit_placement, nodes_line, placement_arg, saved_deployment,
                                         topology)
from minimoe.parallel.dispatch import WIRE_FORMATS
from minimoe.parallel.formats import choose_wire_format
from minimoe.parallel.layer import ExpertParallelMoE, expert_parallel


_positive = whole_number(1)
_positive_float = number(0, strict=True)
_non_negative_float = number(0)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _RankZeroParser(OneLineParser):
    """Under torchrun every rank parses the same flags: only rank 0 prints the error line."""

    def error(self, message: str):
        if _rank() != 0:
            self.exit(2)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    p = _RankZeroParser(prog="minimoe ep-demo", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a minimoe checkpoint directory, or 'bundled': run the whole model "
                                   "expert-parallel and compare its logits with one process")
    p.add_argument("--trace", help="a trace .npz or .parquet, or 'bundled' (record the bundled model's workload, "
                                   "small): replay it through the exchange")
    p.add_argument("--wire-format", default="all", choices=(*WIRE_FORMATS, "all", "auto"),
                   help="default: all four; auto: the one minimoe.parallel.formats picks")
    p.add_argument("--placement", default="contiguous", type=placement_arg, metavar="METHOD|FILE.json",
                   help="expert placement: contiguous, round_robin, eplb, locality, grouping, grouping+locality "
                        "(fitted on the routing at hand), or a placement file (default: %(default)s)")
    p.add_argument("--replicas", type=_positive, default=None,
                   help="physical slots per layer (default: num_experts rounded up to a multiple of the ranks)")
    p.add_argument("--gpus-per-node", type=_positive, default=None,
                   help="ranks per 'node' (default: half the ranks for 4 or more, else 1); must divide the ranks")
    p.add_argument("--grouping", default=None, choices=GROUPINGS,
                   help="--trace: which rank each request runs on (default: round_robin = request %% ranks)")
    p.add_argument("--experts", type=_positive, default=16, help="random layer: num_experts (default: %(default)s)")
    p.add_argument("--top-k", type=_positive, default=4, help="random layer: top_k (default: %(default)s)")
    p.add_argument("--hidden", type=_positive, default=None,
                   help="hidden size (default: 64 for the random layer, 7168 for --trace, as DeepSeek-V3)")
    p.add_argument("--intermediate", type=_positive, default=32, help="random layer: expert width (default: 32)")
    p.add_argument("--shared-experts", type=int, default=0, choices=(0, 1, 2), help="random layer (default: 0)")
    p.add_argument("--capacity-factor", type=_non_negative_float, default=0.0,
                   help="random layer: 0 = dropless (default), else capacity C = ceil(T·k/E · factor)")
    p.add_argument("--tokens-per-rank", type=_positive, default=32,
                   help="random layer: tokens per rank; --model: sequences of 16 tokens per rank (default: 32)")
    p.add_argument("--requests-per-domain", type=_positive, default=8, help="--trace bundled (default: 8)")
    p.add_argument("--new-tokens", type=_positive, default=16, help="--trace bundled: decode tokens (default: 16)")
    p.add_argument("--iters", type=_positive, default=3, help="timed repetitions (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="(default: %(default)s)")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto", help="(default: %(default)s)")
    p.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT_S,
                   help="seconds before a collective gives up (default: %(default)s)")
    p.add_argument("--threads", type=_positive, default=1,
                   help="CPU threads per rank (default: %(default)s; the ranks share the machine's cores)")
    p.add_argument("--seed", type=seed_number, default=0, help="(default: %(default)s)")
    p.add_argument("--json", help="rank 0 writes the results here as JSON")
    return p


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
    rows = []
    for fmt in _formats(args, trace.num_experts, trace.top_k, shape):
        result = replay(trace, placement, sources, fmt, None, hidden, dtype, device, held_out, seed=args.seed)
        rows.append(dict(wire_format=fmt, placement=args.placement, grouping=grouping, steps=result.steps,
                         tokens=result.tokens, **result.counters.as_dict(),
                         **_compare(result.counters, report, fmt, shape),
                         dispatch_ms=1e3 * result.dispatch_s, combine_ms=1e3 * result.combine_s,
                         pairs_per_rank=result.received_pairs.tolist(),
                         load_max_over_mean=result.load_max_over_mean,
                         format_rule=rule_line(trace.num_experts, trace.top_k, shape)))
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


def format_rows(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        head = f"{r['wire_format']:>13s}"
        if "max_abs_error" in r:
            head += f"  max |EP - one process| {r['max_abs_error']:.2e}"
        if "bytes_match" in r:
            head += (f"  predicted intra {r['predicted_intra_bytes'] / 1e6:.3f} MB inter "
                     f"{r['predicted_inter_bytes'] / 1e6:.3f} MB: {'equal' if r['bytes_match'] else 'DIFFERENT'}")
        lines.append(head)
        for d in ("dispatch", "combine"):
            timing = f", {r[d + '_ms']:.3f} ms" if f"{d}_ms" in r else ""
            lines.append(f"{'':15s}{d:8s} intra {r[f'{d}_intra_bytes'] / 1e6:9.3f} MB  inter "
                         f"{r[f'{d}_inter_bytes'] / 1e6:9.3f} MB  local rows {r[f'{d}_local_rows']}{timing}")
        if "experts_ms" in r:
            lines.append(f"{'':15s}experts  {r['experts_ms']:.3f} ms")
        lines.append(f"{'':15s}pairs per rank {r['pairs_per_rank']}, max/mean {r['load_max_over_mean']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; under torchrun a ValueError or OSError is raised on rank 0 only (the command line prints it
    as one line) and the other ranks return 2 quietly."""
    try:
        return _main(argv)
    except (ValueError, OSError):
        if "WORLD_SIZE" in os.environ and _rank() != 0:
            return 2
        raise


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model and args.trace:
        raise ValueError("--model and --trace are two different runs: give one of them")
    if args.model and args.model != "bundled":
        if not os.path.isdir(args.model):
            raise FileNotFoundError(f"--model {args.model!r}: no such directory (expected a minimoe checkpoint "
                                    "or 'bundled')")
        check_moe_model_dir("--model", args.model)
    if not (args.model or args.trace) and args.top_k > args.experts:
        raise ValueError(f"--top-k {args.top_k}: a token picks top_k of the --experts {args.experts}: expected at most "
                         f"{args.experts}")
    if args.backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("--backend nccl: NCCL needs CUDA GPUs and none is visible here; use --backend gloo "
                         "(CPU) or auto")
    if args.json and ("WORLD_SIZE" not in os.environ or _rank() == 0):
        check_output_file("--json", args.json)
    torch.set_num_threads(args.threads)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        device = init_process_group(None if args.backend == "auto" else args.backend, args.timeout)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() and args.backend != "gloo" else "cpu")
    try:
        rank, world = group_rank_size()
        dtype = getattr(torch, args.dtype)
        run = run_model if args.model else run_replay if args.trace else run_layer
        rows = run(args, world, rank, device, dtype)
        if rank == 0:
            backend = torch.distributed.get_backend() if distributed else "one process"
            print(f"ep-demo: {world} ranks ({backend}, {device.type}), {args.dtype}, placement {args.placement}, "
                  f"{nodes_line(args.gpus_per_node, world)}")
            print(rows[0]["format_rule"])
            print(format_rows(rows))
            if args.json:
                with open(args.json, "w") as file:
                    json.dump(dict(world_size=world, args=vars(args), rows=rows), file, indent=1)
    finally:
        if distributed:
            destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
