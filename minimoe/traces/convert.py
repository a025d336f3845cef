"""``minimoe import``: convert a serving system's routing capture or expert-load dump to a trace file.

Sources (``--format``, by default guessed from the file): the table ``SOURCES`` below, printed by
``minimoe import --help``. Per-token captures become a ``Trace`` (``minimoe.traces.format``); load dumps become
a ``LoadTrace`` (``minimoe.traces.loads``), both written as .npz. A per-token trace can also be written as
Parquet (``--out`` ending in .parquet, ``minimoe.traces.parquet``), the format for traces read in batches, and a
minimoe trace file (.npz or .parquet) converts to the other format.

A .jsonl file whose first record holds ``routed_experts`` or ``meta_info`` (or is a bare string) is read as
SGLang output, one whose first record has ``record_type`` as vLLM's EPLB statistics, any other .jsonl as a
routing log; a .pt file is an SGLang expert-distribution dump (``stat`` if it holds ``logical_count``,
``per_pass`` if it holds ``records``); a folder with ``meta_info.json`` is TensorRT-LLM's statistics, a folder
of .pt files SGLang ``per_pass`` dumps. The trace keeps only what the source says: phases are unknown unless the
source gives them (``--prompt-lengths`` or a phase field), and the summary printed at the end says what is
unknown and lists the notes (fields the source had that no array holds). Bad input raises ValueError /
FileNotFoundError naming the flag or file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from minimoe.arguments import OneLineParser, whole_number
from minimoe.traces import load_dumps
from minimoe.traces.format import Trace
from minimoe.traces.parquet import is_parquet, load_trace, save_trace
from minimoe.traces.importers import WIRE_DTYPES, from_sglang, from_vllm
from minimoe.traces.importers_jsonl import OUR_FIELDS, POSITIONS, from_jsonl
from minimoe.traces.layers import model_layers

# format -> (the file, where it comes from, how its layers are numbered)
SOURCES = {
    "vllm": (".npy/.npz of routed_experts arrays (tokens, layers, top_k), one per request",
             "vLLM enable_return_routed_experts", "every decoder layer: dense ones arrive as expert 0 (--moe-layers)"),
    "sglang": ("text, one base64 routed_experts payload (or meta_info JSON) per request",
               "SGLang return_routed_experts", "every decoder layer: dense ones arrive as expert 0 (--moe-layers)"),
    "jsonl": ("JSONL routing log: one record per token, or a meta record + one per (token, layer)",
              "a profiler hooked into a serving engine", "as logged (layers_logged, else sorted layer numbers)"),
    "sglang-stat": (".pt: torch.save {'logical_count': (steps, layers, experts)}, a ring buffer (totals used)",
                    "SGLang --expert-distribution-recorder-mode stat", "every decoder layer (dense rows zero)"),
    "sglang-per-pass": (".pt per rank (or their folder): records of global_physical_count + the slot map",
                        "SGLang --expert-distribution-recorder-mode per_pass", "every decoder layer (dense rows zero)"),
    "trtllm-stats": ("folder: meta_info.json + rank{r}.safetensors ('{iter}_{layer}' -> counts), optional "
                     "cooccurrence_rank{r}", "TensorRT-LLM EXPERT_STATISTIC_PATH",
                     "model layer index of each MoE layer"),
    "vllm-eplb-stats": ("JSONL of eplb_load_stats records (expert_load and p2l_map, layers x slots)",
                        "vLLM offline EPLB (interface under review upstream)", "MoE layers only, 0..L-1"),
    "trace": ("a minimoe trace file, .npz or .parquet (converted to the other format)",
              "minimoe trace / minimoe import", "MoE layers only, as stored"),
}
LOAD_FORMATS = ("sglang-stat", "sglang-per-pass", "trtllm-stats", "vllm-eplb-stats")
FORMATS = ("auto", *SOURCES)
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


def _source_table() -> str:
    lines = ["sources (--format; 'auto' guesses from the name and first record):"]
    for name, (file, origin, layers) in SOURCES.items():
        lines.append(f"  {name:16s} {file}\n  {'':16s}   from: {origin}; layers: {layers}")
    lines.append("per-token sources (vllm, sglang, jsonl) give a trace; the others give a load trace (counts "
                 "per expert), which minimoe report and minimoe export also read")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="minimoe import", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a serving engine's routing capture or expert-load dump to a minimoe trace file.\n\n"
                    + _source_table(),
    )
    parser.add_argument("source", help="the capture or dump: a file, or a folder (TensorRT-LLM statistics, SGLang "
                                       "per_pass dumps)")
    parser.add_argument("--out", required=True, metavar="TRACE",
                        help="the trace file to write: .npz, or .parquet (per-token traces) for traces read in batches")
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
                        help="which layers are MoE layers: comma-separated indices (the safe choice: "
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
    parser.add_argument("--domain", default=None, metavar="LABEL", help="one domain label for every token (e.g. code)")
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


def guess_format(path: Path) -> str:
    """A key of ``SOURCES`` from the file name (and, for .jsonl and .pt, its first record or keys)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "trace"
    if suffix == ".npz" and _is_trace_npz(path):
        return "trace"
    if path.is_dir():
        if (path / "meta_info.json").is_file():
            return "trtllm-stats"
        if any(path.glob("*.pt")):
            return "sglang-per-pass"
        raise ValueError(f"{path}: a folder without meta_info.json (TensorRT-LLM) or .pt files (SGLang per_pass); "
                         "pass --format")
    if suffix == ".pt":
        data = load_dumps.torch_file(path)
        if isinstance(data, dict) and "logical_count" in data:
            return "sglang-stat"
        if isinstance(data, dict) and "records" in data:
            return "sglang-per-pass"
        raise ValueError(f"{path}: a .pt file without 'logical_count' (SGLang stat) or 'records' (SGLang per_pass); "
                         "pass --format")
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
        if isinstance(record, dict) and "record_type" in record:
            return "vllm-eplb-stats"
        return "sglang" if isinstance(record, str) or holds_payload else "jsonl"
    raise ValueError(f"{path}: cannot tell the format from the suffix {suffix!r}; pass --format "
                     f"({', '.join(SOURCES)})")


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


def convert(args):
    """The trace (a ``Trace`` or, for load dumps, a ``LoadTrace``) the parsed arguments describe."""
    source = Path(args.source)
    if not (source.is_file() or source.is_dir()):
        raise FileNotFoundError(f"{source} not found: SOURCE must be a capture or dump file (or a folder of them)")
    if Path(args.out).suffix != ".npz" and not is_parquet(args.out):
        raise ValueError(f"--out {args.out}: a trace file ends in .npz (or .parquet for a per-token trace)")
    if not Path(args.out).parent.is_dir():
        raise FileNotFoundError(f"--out {args.out}: the directory {Path(args.out).parent} does not exist")
    kind = guess_format(source) if args.format == "auto" else args.format
    if source.is_dir() and kind not in ("trtllm-stats", "sglang-per-pass"):
        raise ValueError(f"{source} is a folder; --format {kind} reads a file")
    if kind == "trace":
        return load_trace(source)
    model = args.model if args.model is not None else ""
    if kind in LOAD_FORMATS:
        if isinstance(args.moe_layers, str) or args.moe_layers is None:
            named = None  # 'auto'/'all' or nothing: the reader's own rule
        else:
            named = args.moe_layers
        layers = model_layers(named, args.config)
        reader = {"sglang-stat": load_dumps.from_sglang_stat, "sglang-per-pass": load_dumps.from_sglang_per_pass,
                  "trtllm-stats": load_dumps.from_trtllm, "vllm-eplb-stats": load_dumps.from_vllm_eplb}[kind]
        loads = reader(source, None if layers is None else list(layers.moe_layers), model)
        if layers is not None and layers.num_experts is not None and layers.num_experts != loads.num_experts:
            raise ValueError(f"{args.config}: the config has {layers.num_experts} experts per layer, the dump "
                             f"{loads.num_experts}")
        return loads
    if args.config is not None:
        raise ValueError(f"--config names the MoE layers of a load dump; for --format {kind} use --moe-layers")
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


def summary(trace, source: str, out: str) -> str:
    """What the trace holds and what the source could not tell."""
    if not isinstance(trace, Trace):  # a LoadTrace
        return f"{trace.summary()}\n{source} -> {out}"
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
    lines += [f"note: {key}: {value}" for key, value in trace.notes.items()]
    lines.append(f"{source} -> {out}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    trace = convert(args)
    if isinstance(trace, Trace):
        save_trace(trace, args.out)
    elif is_parquet(args.out):
        raise ValueError(f"--out {args.out}: a load dump (counts per expert) is written as .npz; Parquet holds "
                         "per-token traces")
    else:
        trace.save(args.out)
    print(summary(trace, args.source, args.out))
    return 0
