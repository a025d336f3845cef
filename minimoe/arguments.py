"""argparse types shared by the ``minimoe`` commands: a bad value fails while the arguments are parsed.

Each returns a function for ``add_argument(type=...)`` that raises ``argparse.ArgumentTypeError`` with the bad
value and what was expected; argparse then names the flag. ``OneLineParser`` prints such an error as one line
(the message and where to read more) instead of argparse's whole usage block. This module imports nothing from
minimoe when it loads, so every part's command (``minimoe.cli``, ``minimoe.parallel.demo``,
``minimoe.traces.convert``, ``minimoe.compress.experiment``, ...) can use it, and ``minimoe --help`` stays fast.

The path checks below run before the work starts, so a typo fails in a second, not after minutes: each raises
``ValueError`` naming the flag, the path and what was expected (``minimoe.cli.main`` prints it as one line and
exits with status 2); ``output_dir`` creates an output folder up front and removes it again if the work fails
before anything was written into it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
from pathlib import Path


MAX_REQUESTS_PER_DOMAIN = 100_000  # --requests-per-domain: 400,000 recorded requests, days of CPU recording
MAX_NEW_TOKENS = 1 << 16  # --new-tokens: above any model's context here (the model's own limit is checked later)
MAX_HIDDEN_SIZE = 1 << 16  # --hidden-size: above any model's hidden size (DeepSeek-V3: 7168, Llama 3.1 405B: 16384)


def whole_number(minimum: int, maximum: int | None = None):
    """An ``int`` >= ``minimum`` (and <= ``maximum`` when given): ``whole_number(1)("0")`` raises "expected a whole
    number >= 1, got 0"."""
    expected = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number {expected}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected a whole number {expected}, got {value}")
        return value

    parse.__name__ = f"integer {expected}"
    return parse


SEED_MAX = 2**32 - 1  # torch, numpy and the seed + 1 the commands derive all take it


def seed_number(text: str) -> int:
    """``--seed``: a whole number from 0 to ``SEED_MAX`` (a larger one overflows the generators' 64-bit seeds)."""
    return whole_number(0, SEED_MAX)(text)


def local_workers(text: str) -> int:
    """``--workers``: a whole number from 1 to 4x this machine's cores (a local cluster of more processes than
    that only makes them compete; more machines join through ``--scheduler``)."""
    value = whole_number(1)(text)
    limit = 4 * (os.cpu_count() or 1)
    if value > limit:
        raise argparse.ArgumentTypeError(f"expected at most {limit} local worker processes (4 x the {limit // 4} "
                                         f"cores here), got {value}; for more, start a cluster and pass --scheduler")
    return value


_SCHEDULER = re.compile(r"(?:(tcp|tls|ucx|ws|wss)://)?(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(\d{1,5})")


def scheduler_address(text: str) -> str:
    """``--scheduler``: a Dask scheduler address, [tcp|tls|ucx|ws|wss://]HOST:PORT, e.g. tcp://10.0.0.1:8786."""
    match = _SCHEDULER.fullmatch(text.strip())
    if not match or not 0 < int(match[3]) < 65536:
        raise argparse.ArgumentTypeError(f"expected a Dask scheduler address such as tcp://10.0.0.1:8786 "
                                         f"([tcp://]HOST:PORT), got {text!r}")
    return text.strip()


def number(minimum: float, strict: bool = False):
    """A finite ``float`` >= ``minimum`` (> ``minimum`` when ``strict``); NaN and infinity are refused."""
    relation = ">" if strict else ">="

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {relation} {minimum}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected a finite number {relation} {minimum}, got {text}")
        return value

    parse.__name__ = f"number {relation} {minimum}"
    return parse


def thread_count(cores: int | None = None):
    """An ``int`` in [1, cores] (default: this machine's CPU count): more torch threads than cores only slows."""
    import os

    limit = cores or os.cpu_count() or 1

    def parse(text: str) -> int:
        value = whole_number(1)(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"expected at most {limit} threads (the CPU cores of this machine), "
                                             f"got {value}")
        return value

    parse.__name__ = f"integer in [1, {limit}]"
    return parse


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr, exit code 2: ``PROG: error: MESSAGE (see 'PROG --help')``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ---- the report's flags ----------------------------------------------------------------------------------------
DEFAULT_TOPOLOGIES = "2x2,4x2,2x4,4x4"


def fit_tokens_argument(text: str):
    """--max-fit-tokens: a whole number >= 1, 'all' (None: no sampling) or 'auto'
    (``minimoe.placement.fitdata.auto_fit_tokens``)."""
    if text in ("all", "auto"):
        return None if text == "all" else text
    try:
        return whole_number(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, 'all' or 'auto', got {text!r}") from None


def fit_processes_argument(text: str):
    """--fit-processes: a whole number from 1 to this machine's CPU count, or 'auto'
    (minimoe.placement.parallel_fits.auto_processes): more processes than cores only slows the fits."""
    if text == "auto":
        return text
    try:
        value = whole_number(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 or 'auto', got {text!r}") from None
    limit = os.cpu_count() or 1
    if value > limit:
        raise argparse.ArgumentTypeError(f"expected at most {limit} processes (the CPU cores of this machine) or "
                                         f"'auto', got {value}")
    return value


def check_output_file(flag: str, path: str, suffix: str | tuple[str, ...] | None = None) -> Path:
    """Check that ``path`` can be written (by writing to it and removing what did not exist before); ``suffix``:
    the file name ending expected, or a tuple of the endings accepted."""
    if not str(path).strip():
        raise ValueError(f"{flag}: expected a file name, got an empty one ({str(path)!r})")
    path = Path(path)
    suffixes = (suffix,) if isinstance(suffix, str) else suffix
    if suffixes and path.suffix not in suffixes:
        raise ValueError(f"{flag} {path}: expected a file name ending in {' or '.join(suffixes)}")
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder, expected a file name")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: {path.parent} is a file, not a folder")
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {path.parent} does not exist")
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot write there ({error.strerror or error})") from None
    if not existed:
        path.unlink()
    return path


def check_not_the_input(flag: str, path, source) -> None:
    """Refuse an output file that is the input file (the same file under any name): writing it would destroy the
    input before it is read in full, or replace it with something else."""
    if Path(path).exists() and Path(source).exists() and os.path.samefile(path, source):
        raise ValueError(f"{flag} {path}: is the input file {source}; writing there would destroy it: give another "
                         "file")


def _command_parsers(parser, forwarded: dict) -> dict:
    """{command: its parser}: the subcommands of ``parser`` and, for the ``forwarded`` ones ({command: module}),
    the module's own ``build_parser()``."""
    import importlib

    commands = dict(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)
    for name, module in forwarded.items():
        commands[name] = importlib.import_module(module).build_parser()
    return commands


def misplaced_option(argv: list[str], build_parser, forwarded: dict) -> str | None:
    """The error for an option of a command written before the command (``minimoe --threads 1 report``), which
    argparse would report as an invalid command; None when ``argv`` starts with a command (the usual case, no
    parser is built) or with an option of the program itself. ``build_parser()`` builds the program's parser;
    ``forwarded``: {command: module} of the commands that parse their own arguments."""
    option = argv[0].split("=")[0]
    if not option.startswith("-"):
        return None
    parser = build_parser()
    if option in parser._option_string_actions:
        return None
    commands = _command_parsers(parser, forwarded)
    having = [name for name, command in commands.items() if option in command._option_string_actions]
    if not having:
        return f"{option} is not an option of minimoe or of any of its commands (see 'minimoe --help')"
    given = next((i for i, token in enumerate(argv) if token in commands), None)
    if given is not None and argv[given] not in having:
        return f"{option} is not an option of minimoe {argv[given]}; it is one of {', '.join(having)}"
    command = having[0] if given is None else argv[given]
    rest = argv if given is None else argv[:given] + argv[given + 1:]
    return f"{option} is an option of {', '.join(having)} and goes after the command, e.g. minimoe {command} " \
           f"{' '.join(rest)}"


@contextlib.contextmanager
def output_dir(flag: str, path: str):
    """Create the folder ``path`` now (so an unwritable place fails before the work) and remove it again if
    the work fails before anything was written into it. Raises ValueError naming ``flag`` for an empty path, a
    file in the way or a place that cannot be written."""
    if not str(path).strip():
        raise ValueError(f"{flag}: expected a folder name, got an empty one ({str(path)!r}; use --out . for this "
                         "folder)")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a folder")
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".minimoe-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot write there ({error.strerror or error})") from None
    try:
        yield path
    except BaseException:
        for folder in created:  # innermost first; only folders this command made and left empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def check_input_file(flag: str, path: str | None) -> None:
    """A file to read: raises ValueError naming ``flag`` for a folder or a missing path (None passes)."""
    if path is not None and Path(path).is_dir():
        raise ValueError(f"{flag} {path}: is a folder, expected a file")
    if path is not None and not Path(path).is_file():
        raise ValueError(f"{flag} {path}: no such file")


def check_model_dir(flag: str, path: str | None) -> dict | None:
    """A model folder: its config.json exists and holds a JSON object (an empty, damaged or non-UTF-8 one is named).
    Returns that object (None without ``path``)."""
    if path is None:
        return None
    config = Path(path) / "config.json"
    if not config.is_file():
        raise ValueError(f"{flag} {path}: not a model folder (expected {config})")
    import json

    try:
        text = config.read_text(encoding="utf-8")
        data = json.loads(text) if text.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{flag} {path}: {config} is not valid JSON ({error})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{flag} {path}: {config} is {'empty' if not text.strip() else 'not a JSON object'}: "
                         "expected a model's config")
    return data


def check_moe_model_dir(flag: str, path: str) -> int:
    """A minimoe model folder with MoE layers (``check_model_dir`` first): returns its expert count; raises
    ValueError naming ``flag`` for a dense model (its config.json has no "moe" section) or a "moe" section without
    a whole num_experts >= 1."""
    config = check_model_dir(flag, path)
    moe = config.get("moe")
    if moe is None and ("model_type" in config or "architectures" in config):  # a transformers checkpoint
        raise ValueError(f"{flag} {path}: a transformers checkpoint (model_type {config.get('model_type')!r}), not a "
                         f"minimoe run: record it with minimoe trace --hf {path}, then minimoe report --trace")
    if moe is None:
        raise ValueError(f"{flag} {path}: a dense model (its config.json has no \"moe\" section) has no experts to "
                         "trace or place: expected a minimoe MoE checkpoint")
    experts = moe.get("num_experts") if isinstance(moe, dict) else None
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
        raise ValueError(f"{flag} {path}: its config.json's \"moe\" section must hold num_experts, a whole number >= 1, "
                         f"got {repr(experts if isinstance(moe, dict) else moe)[:80]}")
    return experts


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def check_tokenizer_files(flag: str, folder: str) -> None:
    """A transformers model folder holds its tokenizer: one of ``TOKENIZER_FILES`` (without one, AutoTokenizer
    quietly builds a tokenizer with an empty vocabulary). Raises ValueError naming ``flag``."""
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{flag} {folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}): save the model's "
                         "tokenizer beside it (tokenizer.save_pretrained)")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
