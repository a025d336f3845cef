"""The ``minimoe`` command. Each subcommand is a thin wrapper over a function of the package.

    minimoe demo       build a tiny Llama 3, train it for a few seconds, prove it equals transformers, generate
    minimoe train      train a small multi-domain MoE language model offline (presets: tiny, shipped)
"""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(steps=args.steps, seed=args.seed, out=args.out)


def _train(args) -> int:
    from .train import preset, summarise, train

    model_config, train_config = preset(args.preset, out_dir=args.out, steps=args.steps, device=args.device,
                                        seed=args.seed, bf16=args.bf16 or None)
    log = train(model_config, train_config, resume=args.resume)
    print(summarise(log))
    print(f"checkpoint: {train_config.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minimoe",
        description="Mixture-of-Experts language models, small enough to read: Llama 3 block, MoE routing, "
                    "expert activation traces, expert placement.",
    )
    from . import __version__

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
