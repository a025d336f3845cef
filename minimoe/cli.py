"""The ``minimoe`` command. Each subcommand is a thin wrapper over a function of the package.

    minimoe demo       build a tiny Llama 3, train it for a few seconds, prove it equals transformers, generate
    minimoe train      train a small multi-domain MoE language model offline (presets: tiny, shipped)
    minimoe trace      record an expert-activation trace (prefill + decode) of a minimoe or transformers model
    minimoe findings   the paper's three observations on a trace, each with its baseline
    minimoe report     the main job: traces -> every placement/grouping method -> table + HTML report
"""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from minimoe.demo import run_demo

    return run_demo(steps=args.steps, seed=args.seed, out=args.out)


def _train(args) -> int:
    from minimoe.data.train import preset, summarise, train

    model_config, train_config = preset(args.preset, out_dir=args.out, steps=args.steps, device=args.device,
                                        seed=args.seed, bf16=args.bf16 or None)
    log = train(model_config, train_config, resume=args.resume)
    print(summarise(log))
    print(f"checkpoint: {train_config.out_dir}")
    return 0


def _trace(args) -> int:
    from minimoe.traces.workload import BUNDLED_MODEL, corpus_prompts, minimoe_tokenize, record_workload, run_prompts

    if args.hf:
        texts, domains = corpus_prompts(args.requests_per_domain, seed=args.seed)
        from transformers import AutoTokenizer

        from minimoe.hf.convert import load_hf

        model = load_hf(args.hf).eval()
        hf_tokenizer = AutoTokenizer.from_pretrained(args.hf, local_files_only=True)
        tokenize = lambda text: hf_tokenizer(text)["input_ids"]  # noqa: E731
        name = f"hf:{args.hf}"
    else:
        from minimoe.model.transformer import Transformer

        model_dir = args.model or BUNDLED_MODEL
        texts, domains = run_prompts(model_dir, args.requests_per_domain, args.seed)
        model, tokenize, name = Transformer.load(model_dir).eval(), minimoe_tokenize(model_dir), None
    trace = record_workload(model, tokenize, texts, domains, args.new_tokens, args.batch_size, name=name,
                            temperature=args.temperature, seed=args.seed)
    trace.save(args.out)
    print(f"{trace.num_requests} requests, {trace.num_tokens} tokens, {trace.num_layers} MoE layers -> {args.out}")
    return 0


# Commands whose module parses its own arguments: name -> (module with `main(argv) -> int`, help line).
# A module listed here raises ValueError (or OSError) with a message naming the flag or file, the bad value and
# what was expected; `main` below turns that into one line on stderr and exit code 2.
FORWARDED = {
    "findings": ("minimoe.traces.findings", "the paper's three observations on a trace, with baselines"),
    "report": ("minimoe.placement.report", "the main job: record traces, fit every placement and grouping "
                                           "method, print the comparison and write an HTML report"),
}


def _forward(command):
    def run(args) -> int:
        import importlib

        return importlib.import_module(FORWARDED[command][0]).main(args.rest)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minimoe",
        description="Mixture-of-Experts language models, small enough to read: Llama 3 block, MoE routing, "
                    "expert activation traces, expert placement.",
    )
    from minimoe import __version__

    parser.add_argument("--version", action="version", version=f"minimoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="train a tiny Llama 3 for a few seconds, check it against transformers, "
                                       "generate text")
    demo.add_argument("--steps", type=int, default=150, help="training steps (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--out", default=None, help="directory to save the trained checkpoint to (optional)")
    demo.set_defaults(func=_demo)

    train = sub.add_parser("train", help="train a small multi-domain MoE language model offline")
    train.add_argument("--preset", default="tiny", help="model and training sizes: tiny or shipped (default: %(default)s)")
    train.add_argument("--out", default="runs/tiny-moe", help="run directory (default: %(default)s)")
    train.add_argument("--steps", type=int, default=None, help="override the preset's number of steps")
    train.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    train.add_argument("--seed", type=int, default=None, help="override the seed (default: the preset's, 0)")
    train.add_argument("--bf16", action="store_true", help="autocast matmuls to bfloat16")
    train.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    train.set_defaults(func=_train)

    trace = sub.add_parser("trace", help="record an expert-activation trace of a minimoe or transformers MoE model "
                                         "on held-out prompts of the four domains")
    source = trace.add_mutually_exclusive_group()
    source.add_argument("--model", help="minimoe run directory (default: the bundled checkpoint)")
    source.add_argument("--hf", help="local transformers model directory (with its tokenizer), e.g. a Mixtral")
    trace.add_argument("--out", default="trace.npz")
    trace.add_argument("--requests-per-domain", type=int, default=100)
    trace.add_argument("--new-tokens", type=int, default=32)
    trace.add_argument("--temperature", type=float, default=0.7, help="decode sampling temperature (0 = greedy)")
    trace.add_argument("--batch-size", type=int, default=64)
    trace.add_argument("--seed", type=int, default=0)
    trace.set_defaults(func=_trace)

    for name, (_, text) in FORWARDED.items():
        command = sub.add_parser(name, help=text, add_help=False)
        command.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        command.set_defaults(func=_forward(name))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in FORWARDED:
        return _forward(argv[0])(argparse.Namespace(rest=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
