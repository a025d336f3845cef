"""``minimoe import``: convert a routing capture of a serving system to a trace file.

Sources (``--format``, by default guessed from the file):

    vllm     .npy: one request's ``routed_experts`` array (tokens, num_layers, top_k); .npz: one array per
             request in the archive's order (``numpy.savez(path, *arrays)``), and optionally a member
             ``prompt_lengths`` (R,) giving each request's prompt rows
    sglang   text, one request per non-blank line: the base64 ``routed_experts`` string, or a JSON object
             holding it (SGLang's ``meta_info``, or a response with a ``meta_info``), which may also carry
             ``routed_experts_dtype``
    jsonl    a routing log, one JSON object per token or per (token, layer) (``minimoe.traces.importers_jsonl``)
    trace    a minimoe trace file (.npz or .parquet): converted to the other format (``--out`` decides)

A .jsonl file whose first record holds ``routed_experts`` or ``meta_info`` (or is a bare string) is read as
SGLang output, any other .jsonl as a routing log. The trace keeps only what the source says: phases are
unknown unless the source gives them (``--prompt-lengths`` or a phase field), and the summary printed at the
end says what is unknown. Bad input raises ValueError / FileNotFoundError naming the flag or file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from minimoe.arguments import OneLineParser, whole_number
from minimoe.traces.format import Trace
from minimoe.traces.parquet import is_parquet, load_trace, save_trace
from minimoe.traces.importers import WIRE_DTYPES, from_sglang, from_vllm
from minimoe.traces.importers_jsonl import OUR_FIELDS, POSITIONS, from_jsonl

FORMATS = ("auto", "vllm", "sglang", "jsonl", "trace")
_TRACE_ARRAYS = {"experts", "request", "phase", "num_experts", "top_k"}


_positive_int = whole_number(1)


def _moe_layers(text: str):
    if text in ("auto", "all"):
        return "auto" if text == "auto" else None
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'all' or comma-separated layer indices like 3,5,7, "
                                         f"got {text!r}") from None
    if any(layer < 0 for layer in layers):
        raise argparse.ArgumentTypeError(f"layer indices must be >= 0, got {text!r}")
    return layers


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts like 5,3,8, got {text!r}") from None
    if any(count < 0 for count in counts):
        raise argparse.ArgumentTypeError(f"counts must be >= 0, got {text!r}")
    return counts


def _field(text: str) -> tuple[str, str]:
    ours, sep, theirs = text.partition("=")
    if not sep or ours not in OUR_FIELDS or not theirs:
        raise argparse.ArgumentTypeError(f"expected OURS=THEIRS with OURS one of {', '.join(OUR_FIELDS)}, got {text!r}")
    return ours, theirs


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="minimoe import", description="Convert a vLLM, SGLang or JSONL routing capture to a minimoe trace file.",
    )
    parser.add_argument("source", help="the capture: .npy/.npz (vLLM), a text file of SGLang payloads, or .jsonl")
    parser.add_argument("--out", required=True, metavar="TRACE",
                        help="the trace file to write: .npz, or .parquet for traces read in batches")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="the source's format (default: %(default)s, from the file name and first record)")
    parser.add_argument("--num-experts", type=_positive_int, metavar="E",
                        help="routed experts per MoE layer (JSONL: default from the meta record)")
    parser.add_argument("--top-k", type=_positive_int, metavar="K",
                        help="experts per token (SGLang: required; JSONL: default from the meta record, else the "
                             "widest list)")
    parser.add_argument("--num-layers", type=_positive_int, metavar="L",
                        help="layers per token in an SGLang payload (required for SGLang)")
    parser.add_argument("--moe-layers", type=_moe_layers, default=None, metavar="LAYERS",
                        help="vLLM/SGLang: which layers are MoE layers: comma-separated indices (the safe choice: "
                             "dense layers arrive as expert 0), 'auto' (drop layers holding only -1) or 'all' "
                             "(default: all for vLLM, auto for SGLang)")
    parser.add_argument("--keep-degenerate", action="store_true",
                        help="keep a layer where every token has the same expert ids (refused by default: usually "
                             "a dense layer)")
    parser.add_argument("--dtype", choices=WIRE_DTYPES, default=None,
                        help="SGLang: the wire dtype of base64 payloads (default: the payload's routed_experts_dtype, "
                             "else int32)")
    parser.add_argument("--prompt-lengths", type=_counts, default=None, metavar="P1,P2,...",
                        help="vLLM/SGLang: comma-separated prompt rows per request (rows after them are decode); "
                             "default: phases unknown (a vLLM .npz may hold them as 'prompt_lengths')")
    parser.add_argument("--domain", default=None, metavar="LABEL", help="one domain label for every token (e.g. code)")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="the model's name stored in the trace (JSONL: default from the meta record)")
    parser.add_argument("--field", type=_field, action="append", default=[], metavar="OURS=THEIRS",
                        help="JSONL: the log's name for one of our fields, e.g. --field request=rid (repeatable)")
    parser.add_argument("--no-request-field", action="store_true",
                        help="JSONL: the log names no requests; put every token in one request")
    parser.add_argument("--positions", choices=POSITIONS, default="field",
                        help="JSONL: 'per_pass' when token_idx restarts at every forward pass (default: %(default)s)")
    parser.add_argument("--ignore", action="append", default=[], metavar="KEY",
                        help="JSONL: a key of the log to skip, e.g. --ignore ts (repeatable)")
    return parser


def guess_format(path: Path) -> str:
    """'vllm', 'sglang' or 'jsonl' from the file name (and, for .jsonl, its first record)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "trace"
    if suffix == ".npz" and _is_trace_npz(path):
        return "trace"
    if suffix in (".npy", ".npz"):
        return "vllm"
    if suffix in (".txt", ".b64"):
        return "sglang"
    if suffix in (".jsonl", ".json", ".ndjson"):
        with open(path, encoding="utf-8") as file:
            first = next((line for line in file if line.strip()), "")
        try:
            record = json.loads(first)
        except json.JSONDecodeError:
            return "sglang"  # a bare base64 line
        holds_payload = isinstance(record, dict) and bool({"routed_experts", "meta_info"} & set(record))
        return "sglang" if isinstance(record, str) or holds_payload else "jsonl"
    raise ValueError(f"{path}: cannot tell the format from the suffix {suffix!r}; pass --format vllm, sglang or jsonl")


def _is_trace_npz(path: Path) -> bool:
    """Does this .npz hold a minimoe trace (its arrays by name) rather than vLLM captures?"""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return _TRACE_ARRAYS <= {name[:-4] for name in archive.namelist()}
    except (OSError, zipfile.BadZipFile):
        return False


def read_vllm(path: Path) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The per-request arrays of a .npy/.npz file and its optional prompt_lengths (no pickles)."""
    try:
        if path.suffix.lower() == ".npy":
            return [np.load(path, allow_pickle=False)], None
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{path} is not a readable numpy file ({error})") from None
    prompt = arrays.pop("prompt_lengths", None)
    if not arrays:
        raise ValueError(f"{path} holds no routed_experts arrays")
    return list(arrays.values()), prompt


def read_sglang(path: Path) -> list:
    """One payload per non-blank line: a base64 string, or the dict holding routed_experts."""
    payloads = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        if text[0] in "{\"":
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number}: not valid JSON ({error})") from None
            if isinstance(record, dict) and "meta_info" in record:
                record = record["meta_info"]
            if not isinstance(record, (dict, str)):
                raise ValueError(f"{path}: line {number}: expected a base64 string or an object with routed_experts")
            text = record
        payloads.append(text)
    if not payloads:
        raise ValueError(f"{path} holds no payloads")
    return payloads


def convert(args) -> Trace:
    """The trace the parsed arguments describe."""
    source = Path(args.source)
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: SOURCE must be a capture file (.npy/.npz, SGLang text, .jsonl)")
    if not Path(args.out).parent.is_dir():
        raise FileNotFoundError(f"--out {args.out}: the directory {Path(args.out).parent} does not exist")
    kind = guess_format(source) if args.format == "auto" else args.format
    if kind == "trace":
        return load_trace(source)
    model = args.model if args.model is not None else ""
    if kind == "jsonl":
        fields = dict(args.field)
        if args.no_request_field:
            fields["request"] = None
        trace = from_jsonl(source, args.num_experts, args.top_k, args.model, fields, args.positions, args.ignore)
        return trace if args.domain is None else dataclasses.replace(trace, domain=args.domain)
    for flag, value in (("--num-experts", args.num_experts),) + (
            (("--num-layers", args.num_layers), ("--top-k", args.top_k)) if kind == "sglang" else ()):
        if value is None:
            raise ValueError(f"{flag} is required to read {source} as {kind}")
    try:
        if kind == "vllm":
            arrays, prompt = read_vllm(source)
            prompt = args.prompt_lengths if args.prompt_lengths is not None else prompt
            return from_vllm(arrays, args.num_experts, prompt, args.domain, args.moe_layers, args.keep_degenerate,
                             model)
        moe_layers = "auto" if args.moe_layers is None else args.moe_layers
        return from_sglang(read_sglang(source), args.num_layers, args.top_k, args.num_experts, args.prompt_lengths,
                           args.domain, moe_layers, args.keep_degenerate, args.dtype, model)
    except ValueError as error:
        raise ValueError(f"{source} ({kind}): {error}") from None


def summary(trace: Trace, source: str, out: str) -> str:
    """What the trace holds and what the source could not tell."""
    known = int((trace.phase >= 0).sum())
    lines = [f"{trace.num_tokens} tokens, {trace.num_requests} requests, {trace.num_layers} MoE layers, "
             f"top-{trace.top_k} of {trace.num_experts} experts, model {trace.model!r}"]
    if known == trace.num_tokens:
        lines.append(f"phases: {int((trace.phase == 0).sum())} prefill, {int((trace.phase == 1).sum())} decode")
    else:
        lines.append(f"phases: unknown for {trace.num_tokens - known} of {trace.num_tokens} tokens (the source does "
                     "not say; prefill/decode findings need them)")
    lines.append(f"domains: {', '.join(sorted(set(trace.domain.tolist())))}" if trace.has_domain else
                 "domains: none (per-domain findings need them: --domain labels a one-workload file)")
    if trace.weights is None:
        lines.append("routing weights: none")
    lines.append(f"{source} -> {out}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (is_parquet(args.out) or args.out.lower().endswith(".npz")):
        raise ValueError(f"--out {args.out}: expected a file name ending in .npz or .parquet")
    trace = convert(args)
    save_trace(trace, args.out)
    print(summary(trace, args.source, args.out))
    return 0
