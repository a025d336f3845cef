"""``minimoe export``: a placement (or a load file's totals) written in a serving engine's own file.

The forms themselves are ``minimoe.placement.export`` (its docstring has the table of files, contents and layer
numbering); this module is the command line: which flags each format reads (``FLAGS``; another is refused in one
line), the checks of the input file and ``--out``, and the model's MoE layers from ``--moe-layers`` or ``--config``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from minimoe.arguments import OneLineParser, check_not_the_input, check_output_file, whole_number
from minimoe.placement.decision import GROUPING, STEERING
from minimoe.placement.export import FORMATS, SUFFIXES, write, write_loads
from minimoe.placement.phy2log import Placement
from minimoe.traces.layers import MAX_LAYERS, model_layers, parse_layers
from minimoe.traces.sources import check_flags, parse_with_given

# format -> the flags it reads (besides FILE, --format and --out); another is refused (``check_flags``). vllm and
# eplb number the model's MoE layers 0..M-1: --config lists them (and checks the model's expert count); without it
# the placement's rows are MoE layers 0..L-1
FLAGS = {"sglang": ("--moe-layers", "--num-layers", "--config"), "trtllm": ("--moe-layers", "--config"),
         "vllm": ("--config",), "eplb": ("--config",)}
HINTS = {"--moe-layers": "it numbers the model's MoE layers 0..M-1: give --config to place a placement of some "
                         "of them",
         "--num-layers": "--num-layers sizes sglang's rows over every decoder layer"}


# ---- the command ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="minimoe export", formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Write a placement (a placement-NODESxGPUS.json from minimoe report, or a "
                                       "Placement.save file) in a serving engine's own file.\n\n" + _table())
    parser.add_argument("placement", metavar="FILE",
                        help="a placement file from minimoe report (placement-NODESxGPUS.json) or Placement.save; "
                             "or a load file from minimoe import (sglang and eplb formats write its loads)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the engine's file: " + ", ".join(FORMATS))
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="the file to write: sglang .json/.pt, trtllm .yaml, vllm .jsonl, eplb .pt")
    parser.add_argument("--moe-layers", metavar="LIST", type=_layers, default=None,
                        help="sglang, trtllm: model layer index of each of the placement's MoE layers, e.g. 3-60 or "
                             "1,3,5 (needed, or --config, when the placement does not record them; they must agree "
                             "with what it records)")
    parser.add_argument("--num-layers", metavar="N", type=whole_number(1, MAX_LAYERS), default=None,
                        help="sglang, without --config: the model's decoder layers (default: the last MoE layer + 1)")
    parser.add_argument("--config", metavar="CONFIG_JSON", default=None,
                        help="the model's transformers config.json (or its folder): every MoE layer of the model "
                             "(the placement's layers are written at their places, the others get slot s -> expert "
                             "s mod E) and the expert count, checked against the placement")
    return parser


def _layers(text: str) -> list[int]:
    """--moe-layers: ``minimoe.traces.layers.parse_layers``, the parser ``minimoe import`` uses too."""
    try:
        return parse_layers(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _table() -> str:
    return ("formats (slot s of a layer lives on rank s // (slots / ranks) in all of them):\n"
            "  sglang  --init-expert-location JSON/.pt: physical_to_logical_map over every decoder layer (dense "
            "rows: slot s -> expert s mod E)\n"
            "  trtllm  moe_load_balancer.yaml: num_slots, initial_global_assignments keyed by model layer index, "
            "layer_updates_per_iter: 0\n"
            "  vllm    eplb_initial_mapping JSONL record, MoE layers 0..M-1 (an interface under review upstream)\n"
            "  eplb    DeepSeek EPLB tensors phy2log, log2phy, logcnt (torch.save), MoE layers 0..M-1\n"
            "flags each format reads (another is refused):\n"
            + "\n".join(f"  {name:7s} {', '.join(flags)}" for name, flags in FLAGS.items())
            + "\n\nA placement from minimoe report records the model layers of its rows when the trace said "
            "which they are\n(a routing log's layers_logged, a capture's --moe-layers); sglang and trtllm then "
            "need no layer flag. vllm and\neplb number the model's MoE layers 0..M-1: a placement of other model "
            "layers needs --config, which also\nfills the MoE layers the placement does not cover with slot s -> "
            "expert s mod E.")


def main(argv: list[str] | None = None) -> int:
    from minimoe.traces.npz import read_npz
    from minimoe.traces.loads import LoadTrace

    args, given = parse_with_given(build_parser, argv)
    check_flags(args.format, given, FLAGS, HINTS)
    source, out = Path(args.placement), Path(args.out)
    expected = "a placement file from minimoe report (placement-NODESxGPUS.json) or a load file from minimoe import"
    if source.is_dir():
        raise ValueError(f"{source} is a folder: expected {expected}")
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file (expected {expected})")
    if out.suffix not in SUFFIXES[args.format]:
        raise ValueError(f"--out {out}: --format {args.format} writes {' or '.join(SUFFIXES[args.format])}")
    check_not_the_input("--out", out, source)
    check_output_file("--out", out)  # an unwritable place fails now, in one line naming the flag
    if args.num_layers is not None and args.config is not None:
        raise ValueError("--num-layers does not go with --config: the config gives the model's layers "
                         "(num_hidden_layers)")
    layers = model_layers(args.moe_layers, args.config, args.num_layers)  # errors name the config or --moe-layers
    if source.suffix == ".npz":
        arrays = read_npz(source)
        if "kind" not in arrays:
            raise ValueError(f"{source} is a per-token trace: run minimoe report --trace on it and export the "
                             "placement file it writes")
        print(write_loads(LoadTrace.load(source), args.format, out, layers, args.num_layers))
        return 0
    placement = Placement.load(source)  # errors name the file and the field
    print(write(placement, args.format, out, layers, args.num_layers))
    if placement.method in GROUPING:  # its saving was measured with requests steered to their GPUs
        print(f"note: {placement.method} was measured with request steering: {STEERING}; without it, deploy the "
              "report's placement-only file instead")
    return 0
