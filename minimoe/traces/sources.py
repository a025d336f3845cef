"""The sources ``minimoe import`` reads: their table, which flags each reads, telling them apart, reading them.

    SOURCES         format -> (the file, where it comes from, how its layers are numbered), the table
                    ``minimoe import --help`` prints
    FLAGS           format -> the ``minimoe import`` flags it reads; a flag given for a format that does not
                    read it is refused (``check_flags``, which ``minimoe export`` uses with its own table), never
                    ignored; ``given_flags`` says which flags a command line names
    guess_format    a format from the file name and, for .jsonl, .pt and .npz, the first record or the keys
    read_vllm       the arrays of a vLLM .npy/.npz capture; read_sglang: the payloads of an SGLang text file

Every error is a ValueError naming the file (and line) or the flag.
"""

from __future__ import annotations

import argparse
import re
import zipfile
from pathlib import Path

import numpy as np

from minimoe.traces import load_dumps
from minimoe.traces.inputs import parse_json, read_text

# format -> (the file, where it comes from, how its layers are numbered)
SOURCES = {
    "vllm": (".npy/.npz of routed_experts arrays (tokens, layers, top_k), one per request",
             "vLLM enable_return_routed_experts", "every decoder layer: dense ones arrive as expert 0 (--moe-layers)"),
    "sglang": ("text, one base64 routed_experts payload (or meta_info JSON) per request",
               "SGLang return_routed_experts", "every decoder layer: dense ones arrive as expert 0 (--moe-layers)"),
    "jsonl": ("JSONL routing log: one record per token, or a meta record + one per (token, layer)",
              "a profiler hooked into a serving engine",
              "the logged layers (layers_logged, else those of the records) in model order"),
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

# format -> the flags it reads (besides SOURCE, --out and --format)
_CAPTURE = ("--num-experts", "--moe-layers", "--keep-degenerate", "--prompt-lengths", "--domain", "--model")
_LOADS = ("--moe-layers", "--config", "--model")
FLAGS = {
    "vllm": _CAPTURE,
    "sglang": _CAPTURE + ("--top-k", "--num-layers", "--dtype"),
    "jsonl": ("--num-experts", "--top-k", "--domain", "--model", "--field", "--no-request-field", "--positions",
              "--ignore"),
    **{name: _LOADS for name in LOAD_FORMATS},
    "trace": (),
}


HINTS = {"--config": "--moe-layers names the layers of a capture"}


def check_flags(kind: str, given, flags: dict = FLAGS, hints: dict = HINTS) -> None:
    """Refuse the flags in ``given`` that ``--format kind`` does not read by the table ``flags`` (format -> the
    flags it reads; flags in no row of it, such as --out, are not checked): ValueError naming the flag, the format
    and what it reads, then ``hints[flag]`` if there is one."""
    known = {flag for reads in flags.values() for flag in reads}
    for flag in given:
        if flag in known and flag not in flags[kind]:
            reads = ", ".join(flags[kind]) or "no flag besides --out"
            hint = f"; {hints[flag]}" if flag in hints else ""
            raise ValueError(f"{flag} does not apply to --format {kind} (it reads {reads}){hint}")


def given_flags(parser: argparse.ArgumentParser, argv) -> list[str]:
    """The flags the command line ``argv`` names, whatever their values (``--positions field`` counts although
    it is the default): ``argv`` parsed again by ``parser`` (a fresh one: its defaults are changed) with every
    default suppressed, so that only the flags given are set. ``argv`` must already have parsed."""
    options = {}
    for action in parser._actions:
        if action.option_strings:
            options[action.dest], action.default = action.option_strings[-1], argparse.SUPPRESS
    return [options[dest] for dest in vars(parser.parse_args(argv)) if dest in options]


def parse_with_given(build_parser, argv) -> tuple[argparse.Namespace, list[str]]:
    """``(build_parser().parse_args(argv), given_flags(build_parser(), argv))``: the parsed command line and the
    flags it names; ``build_parser`` makes a fresh parser for each (``given_flags`` changes its defaults)."""
    args = build_parser().parse_args(argv)
    return args, given_flags(build_parser(), argv)


def source_table() -> str:
    """The formats' table ``minimoe import --help`` prints: file, origin, layer numbering, flags read."""
    lines = ["sources (--format; 'auto' guesses from the name and first record):"]
    for name, (file, origin, layers) in SOURCES.items():
        lines.append(f"  {name:16s} {file}\n  {'':16s}   from: {origin}; layers: {layers}\n"
                     f"  {'':16s}   flags: {', '.join(FLAGS[name]) or 'none'}")
    lines.append("per-token sources (vllm, sglang, jsonl) give a trace; the others give a load trace (counts "
                 "per expert), which minimoe report and minimoe export also read")
    return "\n".join(lines)


# ---- telling the sources apart --------------------------------------------------------------------------------
_TRACE_ARRAYS = {"experts", "request", "phase", "num_experts", "top_k"}  # a minimoe trace .npz
_LOAD_TRACE_ARRAYS = {"kind", "counts", "layer_ids"}                     # a minimoe load trace .npz


def guess_format(path: Path) -> str:
    """A key of ``SOURCES`` from the file name (and, for .jsonl, .pt and .npz, its first record or keys)."""
    suffix = path.suffix.lower()
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path} is empty: expected a capture or dump ({', '.join(SOURCES)})")
    if suffix == ".parquet" or (suffix == ".npz" and _is_minimoe_npz(path)):
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
        _check_numpy_file(path)
        return "vllm"
    if suffix in (".txt", ".b64"):
        return "sglang"
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _guess_jsonl(path)
    if suffix in (".gz", ".zst", ".bz2", ".xz"):
        raise ValueError(f"{path} is compressed: decompress it first and give the file inside")
    raise ValueError(f"{path}: cannot tell the format from the suffix {suffix!r}; pass --format "
                     f"({', '.join(SOURCES)})")


def _guess_jsonl(path: Path) -> str:
    """sglang (a base64 line or payload objects), vllm-eplb-stats (record_type) or jsonl, by the first record."""
    numbered = enumerate(read_text(path, "JSON lines").splitlines(), 1)
    number, first = next(((n, line) for n, line in numbered if line.strip()), (0, ""))
    if not number:
        raise ValueError(f"{path} holds only blank lines: expected one JSON record (or base64 payload) per line")
    if first.strip()[:1] not in "{[\"":
        if re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", first.strip()):
            return "sglang"  # a bare base64 line
        raise ValueError(f"{path}: line {number} is neither a JSON record nor a base64 payload ({first.strip()[:40]!r}): "
                         "expected one JSON object per line (a routing log), or SGLang's base64 payloads")
    record = parse_json(first, f"{path}: line {number}")
    holds_payload = isinstance(record, dict) and bool({"routed_experts", "meta_info"} & set(record))
    if isinstance(record, dict) and "record_type" in record:
        return "vllm-eplb-stats"
    return "sglang" if isinstance(record, str) or holds_payload else "jsonl"


def _is_minimoe_npz(path: Path) -> bool:
    """Does this .npz hold a minimoe trace or load trace (its arrays by name) rather than vLLM captures?"""
    try:
        with zipfile.ZipFile(path) as archive:
            names = {name[:-4] for name in archive.namelist()}
    except (OSError, zipfile.BadZipFile):
        return False
    return _TRACE_ARRAYS <= names or _LOAD_TRACE_ARRAYS <= names


# ---- reading the per-token captures ---------------------------------------------------------------------------
def _check_numpy_file(path: Path) -> None:
    """Refuse a file named .npy/.npz that is not one (a .npz is a zip archive, a .npy starts with b'\\x93NUMPY'),
    before NumPy's own message about pickles can mislead."""
    if path.is_file() and path.suffix.lower() == ".npz" and not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a .npz archive (not a zip file): expected vLLM routed_experts arrays or a "
                         "minimoe trace")
    if path.is_file() and path.suffix.lower() == ".npy":
        with open(path, "rb") as file:
            if file.read(6) != b"\x93NUMPY":
                raise ValueError(f"{path} is not a .npy array (no NumPy header): expected a vLLM routed_experts array")


def read_vllm(path: Path) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The per-request arrays of a .npy/.npz file and its optional prompt_lengths (R,) ints (no pickles)."""
    _check_numpy_file(path)
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
    if prompt is not None and (prompt.dtype.kind not in "iu" or prompt.ndim != 1):
        raise ValueError(f"{path}: its prompt_lengths array has dtype {prompt.dtype} and shape {prompt.shape}: "
                         "expected one integer count per request")
    return list(arrays.values()), prompt


def read_sglang(path: Path) -> list:
    """One payload per non-blank line: a base64 string, or the dict holding routed_experts."""
    payloads = []
    for number, line in enumerate(read_text(path, "one base64 payload or JSON object per line").splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        if text[0] in "{\"":
            record = parse_json(text, f"{path}: line {number}")
            if isinstance(record, dict) and "meta_info" in record:
                record = record["meta_info"]
            if not isinstance(record, (dict, str)):
                raise ValueError(f"{path}: line {number}: expected a base64 string or an object with routed_experts")
            text = record
        payloads.append(text)
    if not payloads:
        raise ValueError(f"{path} holds no payloads")
    return payloads
