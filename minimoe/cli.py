"""The ``minimoe`` command (also ``python -m minimoe``). Each subcommand is a thin wrapper over the package.

    minimoe report     the main job: a trace -> the findings and every placement/grouping method -> report/
    minimoe findings   the paper's three observations on a trace, each with its baseline
    minimoe trace      record an expert-activation trace (prefill + decode) of a minimoe or transformers model
    minimoe train      train a small multi-domain MoE language model offline (presets: tiny, shipped)
    minimoe demo       build a tiny Llama 3, train it for a few seconds, prove it equals transformers, generate
    minimoe import     a serving engine's routing capture or expert-load dump -> a trace file (minimoe.traces.convert)
    minimoe export     a placement -> SGLang's, TensorRT-LLM's, vLLM's or EPLB's own file (minimoe.placement.export_command)
    minimoe ep-demo    expert parallelism on real processes (under torchrun): every wire format, checked and timed
    minimoe pic-experiment   PIC vs ICAE-global soft-prompt compression (minimoe.compress.experiment)

Errors a user can act on (a bad flag value, an unreadable or malformed file) print one line naming the flag or
file, the bad value and what was expected, and exit with status 2; ``minimoe --debug ...`` shows the traceback.
Commands that compute take ``--threads`` (default: half the CPU cores, at most 8 — two busy processes each
using every core slow each other down many times over; ``ep-demo`` takes threads per rank, default 1).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from minimoe.arguments import (DEFAULT_TOPOLOGIES, MAX_HIDDEN_SIZE, MAX_NEW_TOKENS, MAX_REQUESTS_PER_DOMAIN,
                               OneLineParser, fit_processes_argument, fit_tokens_argument, local_workers,
                               misplaced_option, number, output_dir, scheduler_address, seed_number, thread_count,
                               whole_number)

positive = whole_number(1)


# ---- argument types that need a part (imported only when the flag is given) -----------------------------------
def topologies_argument(text: str) -> list:
    """--topologies: comma-separated NODESxGPUS clusters (``Topology.parse``), each named once -> [Topology]."""
    from minimoe.placement.topology import Topology

    try:
        topologies = [Topology.parse(part) for part in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error}; give a comma-separated list such as {DEFAULT_TOPOLOGIES}")
    if len({str(t) for t in topologies}) != len(topologies):
        raise argparse.ArgumentTypeError(f"{text!r} lists a topology twice")
    return topologies


def default_threads() -> int:
    return max(1, min(8, (os.cpu_count() or 2) // 2))


# ---- the commands live with their parts: report and findings in minimoe.placement.commands, train in
# minimoe.data.train_command, trace in minimoe.traces.trace_command ----------------------------------------------
def _command(module: str, name: str):
    def run(args) -> int:
        import importlib

        return getattr(importlib.import_module(module), name)(args)

    return run


def _demo(args) -> int:
    from minimoe.demo import run_demo

    if not args.out:
        return run_demo(steps=args.steps, seed=args.seed, out=None)
    with output_dir("--out", args.out) as out:
        return run_demo(steps=args.steps, seed=args.seed, out=str(out))


# ---- the parser ----------------------------------------------------------------------------------------------------
# Commands whose module parses its own arguments: name -> (module with `main(argv) -> int`, help line).
# A module listed here raises ValueError (or OSError) with a message naming the flag or file, the bad value and
# what was expected; `main` below turns that into one line on stderr and exit code 2.
FORWARDED = {
    "ep-demo": ("minimoe.parallel.demo", "expert parallelism for real under torchrun: check, bytes, time, trace replay"),
    "import": ("minimoe.traces.convert", "convert a serving engine's routing capture or expert-load dump to a trace "
                                         "file"),
    "export": ("minimoe.placement.export_command", "write a placement in SGLang's, TensorRT-LLM's, vLLM's or EPLB's own file"),
    "pic-experiment": ("minimoe.compress.experiment", "PIC vs ICAE-global soft-prompt compression at 4x/16x/64x"),
}


def _forward(command):
    def run(args) -> int:
        import importlib

        return importlib.import_module(FORWARDED[command][0]).main(args.rest)

    return run


def _add_threads(parser) -> None:
    parser.add_argument("--threads", metavar="N", type=thread_count(), default=default_threads(),
                        help="CPU threads for torch when a model runs (default: half the cores, at most 8: "
                             "%(default)s here)")


def _add_source(parser) -> None:
    """--trace FILE or --model DIR: the trace a findings/report run works on."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--trace", metavar="FILE", help="a trace file (.npz, or .parquet for traces larger than "
                                                        "memory) to use instead of recording one")
    source.add_argument("--model", metavar="DIR", help="a minimoe run folder to record (default: the bundled checkpoint)")


def _add_workload(parser, requests_default: int) -> None:
    """The flags that describe a recording of the bundled (or another minimoe) model."""
    parser.add_argument("--requests-per-domain", metavar="N", type=whole_number(2, MAX_REQUESTS_PER_DOMAIN),
                        default=requests_default,
                        help="held-out prompts recorded per domain (4 domains; default: %(default)s)")
    parser.add_argument("--new-tokens", metavar="N", type=whole_number(1, MAX_NEW_TOKENS), default=32,
                        help="decode tokens recorded per request (default: %(default)s)")
    parser.add_argument("--temperature", metavar="T", type=number(0.0), default=0.7,
                        help="decode sampling temperature, 0 = greedy (default: %(default)s)")
    parser.add_argument("--seed", metavar="N", type=seed_number, default=0,
                        help="seed of the prompts, sampling and baselines "
                                                             "(default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    from minimoe import __version__

    parser = OneLineParser(  # one-line errors: the message and where to read more, not the usage block
        prog="minimoe",
        description="Mixture-of-Experts language models, small enough to read: Llama 3 block, MoE routing, "
                    "expert activation traces, expert placement.")
    parser.add_argument("--version", action="version", version=f"minimoe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = sub.choices  # name -> its parser, so an unknown option is reported by its command

    report = sub.add_parser(
        "report", help="the main job: findings and every placement/grouping method on a trace, as text and HTML",
        description="Record the bundled 4-domain MoE model's routing on held-out prompts (or read --trace), print "
                    "the three findings with their baselines, fit every placement and grouping method on prefill, "
                    "on an online decode window and as an oracle, measure each on held-out decode tokens for "
                    "every topology, and write report.html, report.txt, report.json (and the recorded trace.npz) "
                    "to --out.")
    _add_source(report)
    _add_workload(report, 500)
    report.add_argument("--window", metavar="N", type=positive, default=None,
                        help="decode tokens per request in the online fitting window; the tokens after it are "
                             "the held-out set (default: a quarter of the decode length, at most 8)")
    report.add_argument("--topologies", metavar="LIST", type=topologies_argument, default=None,
                        help=f"comma-separated NODESxGPUS clusters to compare (default: those of {DEFAULT_TOPOLOGIES} "
                             "whose GPUs hold the trace's experts evenly)")
    report.add_argument("--hidden-size", metavar="N", type=whole_number(1, MAX_HIDDEN_SIZE), default=7168,
                        help="hidden size for byte counts, bf16 (default: %(default)s, DeepSeek-V3's)")
    report.add_argument("--max-fit-tokens", metavar="N|all|auto", type=fit_tokens_argument, default="auto",
                        help="fit each placement's co-activation on a uniform sample of at most N tokens per fitting "
                             "set; 'all' fits on every token; 'auto' fits on every token while the trace holds at "
                             "most 2**20 (token, expert) pairs, else samples 65536 pairs, i.e. 65536 / top_k tokens "
                             "(default: %(default)s)")
    report.add_argument("--fit-processes", metavar="N|auto", type=fit_processes_argument, default="auto",
                        help="worker processes for the placement fits (the same placements as one process); 'auto' "
                             "uses every core up to 4 when a fitting set holds at least 32,768 (token, expert) pairs "
                             "(16,384 tokens of a top-2 model), else 1 (default: %(default)s)")
    report.add_argument("--compare-partitioners", action="store_true",
                        help="also fit the locality placement with each node partitioner (FM, Mt-KaHyPar) side by side")
    engine = report.add_mutually_exclusive_group()
    engine.add_argument("--workers", metavar="N", type=local_workers, default=None,
                        help="run both passes over a Parquet --trace on a local Dask cluster of N worker processes "
                             "(pip install 'minimoe[dask]')")
    engine.add_argument("--scheduler", metavar="ADDRESS", type=scheduler_address, default=None,
                        help="run both passes on a running Dask cluster, e.g. tcp://10.0.0.1:8786; every worker must "
                             "be able to read the --trace path")
    report.add_argument("--out", metavar="DIR", default="report", help="output folder (default: %(default)s)")
    _add_threads(report)
    report.set_defaults(func=_command("minimoe.placement.commands", "report_command"))

    findings = sub.add_parser("findings", help="the paper's three observations on a trace, with baselines",
                              description="Imbalance by layer, domain-specific experts and prefill predicting "
                                          "decode, each next to what chance alone gives, on --trace or on a "
                                          "fresh recording of the bundled model.")
    _add_source(findings)
    _add_workload(findings, 500)
    findings.add_argument("--save-trace", metavar="FILE", help="also save the recorded trace to this .npz file "
                                                                "(not with --trace, which is a saved trace already)")
    findings.add_argument("--out", metavar="FILE", help="write the findings as JSON to this file")
    _add_threads(findings)
    findings.set_defaults(func=_command("minimoe.placement.commands", "findings_command"))

    trace = sub.add_parser("trace", help="record an expert-activation trace of a minimoe or transformers MoE model "
                                         "on held-out prompts of the four domains",
                           description="Run held-out prompts of the four domains (code, math, chat, general) through "
                                       "a minimoe MoE run (--model, default: the bundled checkpoint) or a local "
                                       "transformers MoE checkpoint (--hf), prefill then --new-tokens of sampled "
                                       "decode, and save every token's routed experts and weights per MoE layer to "
                                       "--out (.npz, or .parquet for the columnar format).")
    source = trace.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR", help="minimoe run folder (default: the bundled checkpoint)")
    source.add_argument("--hf", metavar="DIR", help="local transformers model folder (with its tokenizer), e.g. a Mixtral")
    _add_workload(trace, 100)
    trace.add_argument("--batch-size", metavar="N", type=positive, default=64, help="prompts per forward pass "
                                                                        "(default: %(default)s)")
    trace.add_argument("--out", metavar="FILE", default="trace.npz",
                       help="trace file to write, .npz or .parquet (default: %(default)s)")
    _add_threads(trace)
    trace.set_defaults(func=_command("minimoe.traces.trace_command", "trace_command"))

    train = sub.add_parser("train", help="train a small multi-domain MoE language model offline",
                           description="Train a MoE language model on the four offline corpora (code, math, chat, "
                                       "general) with per-domain validation, into a new or empty run folder --out; "
                                       "--resume continues the run there with its own settings.")
    train.add_argument("--preset", default=None, choices=("tiny", "shipped"),
                       help="model and training sizes (default: tiny; with --resume, the run's own)")
    train.add_argument("--out", metavar="DIR", default="runs/tiny-moe", help="run folder (default: %(default)s)")
    train.add_argument("--steps", metavar="N", type=positive, default=None, help="override the preset's number of steps")
    train.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="(default: %(default)s)")
    train.add_argument("--seed", metavar="N", type=seed_number, default=None,
                       help="override the preset's seed (0; with --resume, the run's own)")
    train.add_argument("--bf16", action="store_true", help="autocast matmuls to bfloat16")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out where it stopped, with its own --preset, --seed and --bf16 "
                            "(only --steps and --device may change; default --steps: the run's)")
    _add_threads(train)
    train.set_defaults(func=_command("minimoe.data.train_command", "train_command"))

    demo = sub.add_parser("demo", help="train a tiny Llama 3 for a few seconds, check it against transformers, "
                                       "generate text",
                          description="Build a tiny byte-level Llama 3, train it for --steps on the Zen of Python, "
                                      "convert it to transformers' LlamaForCausalLM and check that both give the same "
                                      "logits and greedy tokens (KV cache on our side, generate on theirs), then "
                                      "print a generation (and save the checkpoint with --out).")
    demo.add_argument("--steps", metavar="N", type=positive, default=150, help="training steps (default: %(default)s)")
    demo.add_argument("--seed", metavar="N", type=seed_number, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--out", metavar="DIR", default=None, help="folder to save the trained checkpoint to (optional)")
    _add_threads(demo)
    demo.set_defaults(func=_demo)

    for name, (_, text) in FORWARDED.items():
        command = sub.add_parser(name, help=text, add_help=False)
        command.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        command.set_defaults(func=_forward(name))
    return parser


def _join_dash_values(argv: list[str]) -> list[str]:
    """``--steps -3`` -> ``--steps=-3``: argparse would take ``-3``/``-2x2`` for an option and say only
    "expected one argument"; joined, the value reaches its type check, which names what is wrong."""
    out = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.match(r"-\d", token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for an error the user can act on)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv[:1] or os.environ.get("MINIMOE_DEBUG") == "1"
    if argv[:1] == ["--debug"]:
        argv = argv[1:]
    argv = _join_dash_values(argv)
    if "--debug" in argv:  # after the command: its parser would call it unrecognized
        rest = [token for token in argv if token != "--debug"]
        print(f"minimoe: error: --debug goes before the command, e.g. minimoe --debug {' '.join(rest)}",
              file=sys.stderr)
        return 2
    misplaced = misplaced_option(argv, build_parser, {name: module for name, (module, _) in FORWARDED.items()}) \
        if argv else None
    if misplaced:  # argparse would take its value for the command and call that an invalid choice
        print(f"minimoe: error: {misplaced}", file=sys.stderr)
        return 2
    if argv and argv[0] in FORWARDED:  # these parse their own arguments
        args = argparse.Namespace(command=argv[0], func=_forward(argv[0]), rest=argv[1:])
    else:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # named by the command it was given to, as its other errors are
            (parser.commands.get(args.command) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
        if args.command is None:  # argparse's convention for a missing subcommand: the usage, status 2
            build_parser().print_usage(sys.stderr)
            print("minimoe: error: give a command, e.g. minimoe report (see 'minimoe --help')", file=sys.stderr)
            return 2
        args.given = {token.split("=")[0] for token in argv[1:] if token.startswith("--")}  # the options given
        if getattr(args, "threads", None) and ("torch" in sys.modules or not getattr(args, "trace", None)):
            import torch  # report and findings on a saved --trace run no model and never load torch (1.5-2.5 s)

            torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, OSError) as error:
        if debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"minimoe {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minimoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
