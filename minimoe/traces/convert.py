"""``minimoe import``: convert a serving system's routing capture or expert-load dump to a trace file.

Sources (``--format``, by default guessed from the file): the table ``SOURCES`` of ``minimoe.traces.sources``,
printed by ``minimoe import --help`` with the flags each source reads (a flag a source does not read is
refused). Per-token captures become a ``Trace`` (``minimoe.traces.format``); load dumps become a ``LoadTrace``
(``minimoe.traces.loads``), both written as .npz. A per-token trace can also be written as Parquet (``--out``
ending in .parquet, ``minimoe.traces.parquet_writer``), the format for traces read in batches, and a minimoe trace
file (.npz or .parquet) converts to the other format.

A .jsonl file whose first record holds ``routed_experts`` or ``meta_info`` (or is a bare string) is read as
SGLang output, one whose first record has ``record_type`` as vLLM's EPLB statistics, any other .jsonl as a
routing log; a .pt file is an SGLang expert-distribution dump (``stat`` if it holds ``logical_count``,
``per_pass`` if it holds ``records``); a folder with ``meta_info.json`` is TensorRT-LLM's statistics, a folder
of .pt files SGLang ``per_pass`` dumps. The trace keeps only what the source says: phases are unknown unless the
source gives them (``--prompt-lengths`` or a phase field), and the summary printed at the end says what is
unknown and lists the notes (fields the source had that no array holds). Bad input raises ValueError /
FileNotFoundError naming the flag or file; an empty capture (no token) is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from minimoe.arguments import OneLineParser, check_not_the_input, check_output_file, whole_number
from minimoe.traces import load_dumps, load_dumps_trtllm
from minimoe.traces.format import Trace
from minimoe.traces.importers import WIRE_DTYPES, from_sglang, from_vllm
from minimoe.traces.importers_jsonl import OUR_FIELDS, POSITIONS, from_jsonl
from minimoe.traces.inputs import plural
from minimoe.traces.layer_ids import known_layer_ids, layer_list
from minimoe.traces.layers import check_experts, model_layers, parse_layers
from minimoe.traces.loads import read_trace_file
from minimoe.traces.parquet import is_parquet, load_trace
from minimoe.traces.parquet_writer import save_trace
from minimoe.traces.sources import (LOAD_FORMATS, SOURCES, check_flags, guess_format, parse_with_given,
                                    read_sglang, read_vllm, source_table)

FORMATS = ("auto", *SOURCES)


_positive_int = whole_number(1)


def _moe_layers(text: str):
    """--moe-layers: 'auto', 'all' (None) or layer indices (``minimoe.traces.layers.parse_layers``)."""
    if text in ("auto", "all"):
        return "auto" if text == "auto" else None
    try:
        return parse_layers(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error}; or 'auto' or 'all'") from None


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts like 5,3,8, got {text!r}") from None
    if any(count < 0 for count in counts):
        raise argparse.ArgumentTypeError(f"counts must be >= 0, got {text!r}")
    return counts


def _fields(text: str) -> list[tuple[str, str]]:
    pairs = []
    for part in text.split(","):
        ours, sep, theirs = part.strip().partition("=")
        if not sep or ours not in OUR_FIELDS or not theirs:
            raise argparse.ArgumentTypeError(f"expected OURS=THEIRS[,OURS=THEIRS...] with OURS one of "
                                             f"{', '.join(OUR_FIELDS)}, got {text!r}")
        pairs.append((ours, theirs))
    return pairs


def _keys(text: str) -> list[str]:
    keys = [part.strip() for part in text.split(",")]
    if not all(keys):
        raise argparse.ArgumentTypeError(f"expected comma-separated keys like ts,step, got {text!r}")
    return keys


def _domain_label(text: str) -> str:
    """--domain: a non-empty label without surrounding spaces (tables print it as the domain's name)."""
    if not text.strip() or text != text.strip():
        raise argparse.ArgumentTypeError(f"expected a domain label such as code, without surrounding spaces, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="minimoe import", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a serving engine's routing capture or expert-load dump to a minimoe trace file.\n\n"
                    + source_table(),
    )
    parser.add_argument("source", help="the capture or dump: a file, or a folder (TensorRT-LLM statistics, SGLang "
                                       "per_pass dumps)")
    parser.add_argument("--out", required=True, metavar="TRACE",
                        help="the trace file to write: .npz, or .parquet (per-token traces) for traces read in batches")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="the source's format (default: %(default)s, from the file name and first record)")
    parser.add_argument("--num-experts", type=_positive_int, metavar="E",
                        help="routed experts per MoE layer (vllm and sglang captures: required; JSONL: default from "
                             "the meta record)")
    parser.add_argument("--top-k", type=_positive_int, metavar="K",
                        help="experts per token (SGLang: required; JSONL: default from the meta record, else the "
                             "first record's list; every record lists that many)")
    parser.add_argument("--num-layers", type=_positive_int, metavar="L",
                        help="layers per token in an SGLang payload (required for SGLang)")
    parser.add_argument("--moe-layers", type=_moe_layers, default=None, metavar="LAYERS",
                        help="which layers are MoE layers: increasing indices such as 1,2,3 or 1-3 (the safe choice: "
                             "dense layers arrive as expert 0), 'auto' (drop layers holding only -1) or 'all' "
                             "(default: all for vLLM, auto for SGLang); for load dumps the model index of each MoE "
                             "layer (default: SGLang's rows holding counts)")
    parser.add_argument("--config", metavar="CONFIG_JSON", default=None,
                        help="load dumps: the model's transformers config.json (or its folder), naming the MoE "
                             "layers instead of --moe-layers")
    parser.add_argument("--keep-degenerate", action="store_true",
                        help="keep a layer where every token has the same expert ids (refused by default: usually "
                             "a dense layer)")
    parser.add_argument("--dtype", choices=WIRE_DTYPES, default=None,
                        help="SGLang: the wire dtype of base64 payloads (default: the payload's routed_experts_dtype, "
                             "else int32)")
    parser.add_argument("--prompt-lengths", type=_counts, default=None, metavar="P1,P2,...",
                        help="vLLM/SGLang: comma-separated prompt rows per request (rows after them are decode); "
                             "default: phases unknown (a vLLM .npz may hold them as 'prompt_lengths')")
    parser.add_argument("--domain", default=None, type=_domain_label, metavar="LABEL",
                        help="one domain label for every token (e.g. code)")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="the model's name stored in the trace (JSONL: default from the meta record)")
    parser.add_argument("--field", type=_fields, action="append", default=[], metavar="OURS=THEIRS[,...]",
                        help="JSONL: the log's name for our fields, e.g. --field request=rid,position=pos")
    parser.add_argument("--no-request-field", action="store_true",
                        help="JSONL: the log names no requests; put every token in one request")
    parser.add_argument("--positions", choices=POSITIONS, default="field",
                        help="JSONL: 'per_pass' when token_idx restarts at every forward pass (default: %(default)s)")
    parser.add_argument("--ignore", type=_keys, action="append", default=[], metavar="KEY[,KEY...]",
                        help="JSONL: keys to drop before reading, e.g. --ignore ts,step (keys no field reads are "
                             "kept as notes anyway; drop one that holds something else under one of our names)")
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line, with ``given``: the flags it names (an explicit default included), which
    ``convert`` checks against the flags the source's format reads."""
    args, given = parse_with_given(build_parser, argv)
    args.given = given
    return args


def convert(args):
    """The trace (a ``Trace`` or, for load dumps, a ``LoadTrace``) the arguments of ``parse`` describe; sets
    ``args.format`` to the format read (``auto`` resolved).
    Raises ValueError / FileNotFoundError naming the flag or file (a flag the format does not read included)."""
    source = Path(args.source)
    if not (source.is_file() or source.is_dir()):
        raise FileNotFoundError(f"{source} not found: SOURCE must be a capture or dump file (or a folder of them)")
    if Path(args.out).suffix != ".npz" and not is_parquet(args.out):
        raise ValueError(f"--out {args.out}: a trace file ends in .npz (or .parquet for a per-token trace)")
    parent = Path(args.out).parent
    if parent.exists() and not parent.is_dir():
        raise FileNotFoundError(f"--out {args.out}: {parent} is a file, not a folder")
    if not parent.is_dir():
        raise FileNotFoundError(f"--out {args.out}: the directory {parent} does not exist")
    check_not_the_input("--out", args.out, source)
    check_output_file("--out", args.out)  # an unwritable place fails now, in one line naming the flag
    kind = args.format = guess_format(source) if args.format == "auto" else args.format  # 'auto' resolved, once
    if source.is_dir() and kind not in ("trtllm-stats", "sglang-per-pass"):
        raise ValueError(f"{source} is a folder; --format {kind} reads a file")
    check_flags(kind, args.given)
    if kind == "trace":
        return load_trace(source) if is_parquet(source) else read_trace_file(source)
    model = args.model if args.model is not None else ""
    if kind in LOAD_FORMATS:
        return _load_dump(kind, source, args, model)
    if kind == "jsonl":
        fields = dict(pair for group in args.field for pair in group)
        if args.no_request_field:
            fields["request"] = None
        ignore = [key for group in args.ignore for key in group]
        trace = from_jsonl(source, args.num_experts, args.top_k, args.model, fields, args.positions, ignore)
        return trace if args.domain is None else dataclasses.replace(trace, domain=args.domain)
    for flag, value in (("--num-experts", args.num_experts),) + (
            (("--num-layers", args.num_layers), ("--top-k", args.top_k)) if kind == "sglang" else ()):
        if value is None:
            raise ValueError(f"{flag} is required to read {source} as {kind}")
    arrays, prompt = read_vllm(source) if kind == "vllm" else (read_sglang(source), None)  # errors name the file
    try:
        if kind == "vllm":
            prompt = args.prompt_lengths if args.prompt_lengths is not None else prompt
            return from_vllm(arrays, args.num_experts, prompt, args.domain, args.moe_layers, args.keep_degenerate,
                             model)
        moe_layers = "auto" if args.moe_layers is None else args.moe_layers
        return from_sglang(arrays, args.num_layers, args.top_k, args.num_experts, args.prompt_lengths,
                           args.domain, moe_layers, args.keep_degenerate, args.dtype, model)
    except ValueError as error:
        raise ValueError(f"{source} ({kind}): {error}") from None


def _load_dump(kind: str, source: Path, args, model: str):
    """A load dump as a LoadTrace, its layers named by --moe-layers or --config (checked against the dump)."""
    named = None if isinstance(args.moe_layers, str) else args.moe_layers  # 'auto'/'all': the reader's own rule
    layers = model_layers(named, args.config)
    reader = {"sglang-stat": load_dumps.from_sglang_stat, "sglang-per-pass": load_dumps.from_sglang_per_pass,
              "trtllm-stats": load_dumps_trtllm.from_trtllm, "vllm-eplb-stats": load_dumps.from_vllm_eplb}[kind]
    loads = reader(source, None if layers is None else list(layers.moe_layers), model)
    if layers is not None:
        check_experts(layers, "the dump", loads.num_experts)
    return loads


def _numbered(trace) -> str:
    """" (model layers [1, 3])" when the source named the model layer of every MoE layer, else ""."""
    known = known_layer_ids(trace.layer_ids)
    return f" (model layers {layer_list(known)})" if known else ""


def summary(trace, source: str, out: str, converted: bool = False) -> str:
    """What the trace holds and what the source could not tell (``converted``: a minimoe trace in the other format,
    whose notes were said when it was imported and stay in the file)."""
    if not isinstance(trace, Trace):  # a LoadTrace
        return f"{trace.summary()}\n{source} -> {out}"
    known = int((trace.phase >= 0).sum())
    lines = [f"{plural(trace.num_tokens, 'token')}, {plural(trace.num_requests, 'request')}, "
             f"{plural(trace.num_layers, 'MoE layer')}{_numbered(trace)}, "
             f"top-{trace.top_k} of {trace.num_experts} experts, "
             + (f"model {trace.model!r}" if trace.model else "model unnamed (--model NAME names it)")]
    if known == trace.num_tokens:
        lines.append(f"phases: {int((trace.phase == 0).sum())} prefill, {int((trace.phase == 1).sum())} decode")
    else:
        lines.append(f"phases: unknown for {trace.num_tokens - known} of {trace.num_tokens} tokens (the source does "
                     "not say; prefill/decode findings need them)")
    lines.append(f"domains: {', '.join(sorted(set(trace.domain.tolist())))}" if trace.has_domain else
                 "domains: none (per-domain findings need them: --domain labels a one-workload file)")
    if trace.weights is None:
        lines.append("routing weights: none")
    if converted and trace.notes:
        lines.append(f"notes: {len(trace.notes)} kept from the import ({', '.join(trace.notes)})")
    else:
        lines += [f"note: {key}: {value}" for key, value in trace.notes.items()]
    lines.append(f"{source} -> {out}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    trace = convert(args)
    if isinstance(trace, Trace):
        save_trace(trace, args.out)
    elif is_parquet(args.out):
        raise ValueError(f"--out {args.out}: a load dump (counts per expert) is written as .npz; Parquet holds "
                         "per-token traces")
    else:
        trace.save(args.out)
    print(summary(trace, args.source, args.out, converted=args.format == "trace"))
    return 0
