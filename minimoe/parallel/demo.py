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
Without torchrun it runs as one process. The runs themselves are ``minimoe.parallel.demo_runs``; this module
holds the command line and the printed table.

Several "nodes" on one host: ``--gpus-per-node 2`` with 4 ranks makes ranks {0,1} and {2,3} two nodes (the
default for 4 or more ranks; with 2 or 3 ranks each rank is a node), so the hierarchical format and the
intra/inter-node counters can be exercised on one machine (the link speeds are then those of the host, not
of a network). ``--placement`` takes every fit ``minimoe report`` measures, or a saved placement .json.
``--wire-format auto`` runs the format the rule of ``minimoe.parallel.formats`` picks; every run prints the
rule's choice and its reason. An error prints one line, once (rank 0), and the ranks exit with status 2
(torchrun may stop the other ranks first and report them as terminated). Across real nodes, start the same
command on each node with ``--nnodes`` and a rendezvous, e.g. on two nodes of 8 GPUs:

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=ep \\
        -m minimoe ep-demo --gpus-per-node 8
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from minimoe.arguments import (MAX_NEW_TOKENS, MAX_REQUESTS_PER_DOMAIN, OneLineParser, check_moe_model_dir,
                               check_output_file, number, seed_number, thread_count, whole_number)
from minimoe.parallel.comm import DEFAULT_TIMEOUT_S, destroy_process_group, group_rank_size, init_process_group
from minimoe.parallel.demo_runs import run_layer, run_model, run_replay
from minimoe.parallel.demo_setup import GROUPINGS, nodes_line, placement_arg
from minimoe.parallel.dispatch import WIRE_FORMATS
from minimoe.traces.format import MAX_EXPERTS


_positive = whole_number(1)
_non_negative_float = number(0)
MAX_WIDTH = 1 << 16  # --hidden, --intermediate
MAX_TOKENS_PER_RANK = 1 << 20
MAX_RANDOM_LAYER_GB = 8.0  # the random layer's weights and activations on one rank


def _timeout(text: str) -> float:
    """--timeout: seconds, at least 1 (a shorter one fails the ranks' rendezvous itself) and at most a day."""
    value = number(1)(text)
    if value > 86_400:
        raise argparse.ArgumentTypeError(f"expected a number of seconds from 1 to 86400, got {text}")
    return value


def random_layer_gb(args, world: int) -> float:
    """GB one rank holds for the random layer: every expert's three matrices and the whole batch's rows (each rank
    keeps the single-process reference), float32 or bfloat16."""
    size = 4 if args.dtype == "float32" else 2
    hidden = args.hidden or 64
    weights = (args.experts + args.shared_experts) * 3 * hidden * args.intermediate
    rows = world * args.tokens_per_rank * hidden * (2 * args.top_k + 4)  # inputs, outputs, dispatched rows
    return (weights + rows) * size / 1e9


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# Seconds a rank other than 0 waits before it exits on a bad flag or input. Every rank meets the same error, but
# torchrun stops the others as soon as one exits: rank 0 must exit first, or it may be stopped before it prints.
QUIET_EXIT_GRACE_S = 5.0


def _quiet_exit_code() -> int:
    """Exit status of a rank other than 0 that met the error rank 0 reports: 2, after the grace period."""
    time.sleep(QUIET_EXIT_GRACE_S)
    return 2


class _RankZeroParser(OneLineParser):
    """Under torchrun every rank parses the same flags: only rank 0 prints the error line."""

    def error(self, message: str):
        if _rank() != 0:
            self.exit(_quiet_exit_code())
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    p = _RankZeroParser(prog="minimoe ep-demo", description=__doc__.replace("``", "'"),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR|bundled", help="a minimoe checkpoint directory, or 'bundled': run the whole model "
                                   "expert-parallel and compare its logits with one process")
    p.add_argument("--trace", metavar="FILE|bundled", help="a trace .npz or .parquet, or 'bundled' (record the bundled model's workload, "
                                   "small): replay it through the exchange")
    p.add_argument("--wire-format", default="all", choices=(*WIRE_FORMATS, "all", "auto"),
                   help="default: all four; auto: the one minimoe.parallel.formats picks")
    p.add_argument("--placement", default="contiguous", type=placement_arg, metavar="METHOD|FILE.json",
                   help="expert placement: contiguous, round_robin, eplb, locality, grouping, grouping+locality "
                        "(fitted on the routing at hand), or a placement file (default: %(default)s)")
    p.add_argument("--replicas", metavar="N", type=_positive, default=None,
                   help="physical slots per layer (default: num_experts rounded up to a multiple of the ranks)")
    p.add_argument("--gpus-per-node", metavar="N", type=_positive, default=None,
                   help="ranks per 'node' (default: half the ranks for 4 or more, else 1); must divide the ranks")
    p.add_argument("--grouping", default=None, choices=GROUPINGS,
                   help="--trace: which rank each request runs on (default: round_robin = request %% ranks)")
    p.add_argument("--experts", metavar="N", type=whole_number(1, MAX_EXPERTS), default=16,
                   help="random layer: num_experts (default: %(default)s)")
    p.add_argument("--top-k", metavar="K", type=_positive, default=4, help="random layer: top_k (default: %(default)s)")
    p.add_argument("--hidden", metavar="N", type=whole_number(1, MAX_WIDTH), default=None,
                   help="hidden size (default: 64 for the random layer, 7168 for --trace, as DeepSeek-V3)")
    p.add_argument("--intermediate", metavar="N", type=whole_number(1, MAX_WIDTH), default=32,
                   help="random layer: expert width (default: 32)")
    p.add_argument("--shared-experts", type=int, default=0, choices=(0, 1, 2), help="random layer (default: 0)")
    p.add_argument("--capacity-factor", metavar="FACTOR", type=_non_negative_float, default=0.0,
                   help="random layer: 0 = dropless (default), else capacity C = ceil(T·k/E · factor)")
    p.add_argument("--tokens-per-rank", metavar="N", type=whole_number(1, MAX_TOKENS_PER_RANK), default=32,
                   help="random layer: tokens per rank; --model: sequences of 16 tokens per rank (default: 32)")
    p.add_argument("--requests-per-domain", metavar="N", type=whole_number(1, MAX_REQUESTS_PER_DOMAIN), default=8,
                   help="--trace bundled (default: 8)")
    p.add_argument("--new-tokens", metavar="N", type=whole_number(1, MAX_NEW_TOKENS), default=16,
                   help="--trace bundled: decode tokens (default: 16)")
    p.add_argument("--iters", metavar="N", type=whole_number(1, 10_000), default=3,
                   help="timed repetitions (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="(default: %(default)s)")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto", help="(default: %(default)s)")
    p.add_argument("--timeout", metavar="SECONDS", type=_timeout, default=DEFAULT_TIMEOUT_S,
                   help="seconds before a collective gives up (default: %(default)s)")
    p.add_argument("--threads", metavar="N", type=thread_count(), default=1,
                   help="CPU threads per rank (default: %(default)s; the ranks share the machine's cores)")
    p.add_argument("--seed", metavar="N", type=seed_number, default=0, help="(default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help="rank 0 writes the results here as JSON")
    return p


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
    as one line) and the other ranks return 2 quietly, after rank 0 has had time to print it."""
    try:
        return _main(argv)
    except (ValueError, OSError):
        if "WORLD_SIZE" in os.environ and _rank() != 0:
            return _quiet_exit_code()
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
    size_gb = random_layer_gb(args, int(os.environ.get("WORLD_SIZE", "1")))
    if not (args.model or args.trace) and size_gb > MAX_RANDOM_LAYER_GB:
        raise ValueError(f"--experts {args.experts} x --hidden {args.hidden or 64} x --intermediate {args.intermediate} "
                         f"(and --tokens-per-rank {args.tokens_per_rank}): the random layer would take "
                         f"{size_gb:,.1f} GB per rank; expected at most {MAX_RANDOM_LAYER_GB:g} GB")
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
            if "trace_line" in rows[0]:
                print(rows[0]["trace_line"])
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
