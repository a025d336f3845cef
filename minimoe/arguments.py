"""argparse types shared by the ``minimoe`` commands: a bad value fails while the arguments are parsed.

Each returns a function for ``add_argument(type=...)`` that raises ``argparse.ArgumentTypeError`` with the bad
value and what was expected; argparse then names the flag. ``OneLineParser`` prints such an error as one line
(the message and where to read more) instead of argparse's whole usage block. This module imports nothing from
minimoe when it loads, so every part's command (``minimoe.cli``, ``minimoe.parallel.demo``,
``minimoe.traces.convert``, ``minimoe.compress.experiment``, ...) can use it, and ``minimoe --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math


def whole_number(minimum: int):
    """An ``int`` >= ``minimum``: ``whole_number(1)("0")`` raises "expected a whole number >= 1, got 0"."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


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


def fit_tokens_argument(text: str):
    """--max-fit-tokens: a whole number >= 1, 'all' (None: no sampling) or 'auto' (65536 / top_k)."""
    if text in ("all", "auto"):
        return None if text == "all" else text
    try:
        return whole_number(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, 'all' or 'auto', got {text!r}") from None


def fit_processes_argument(text: str):
    """--fit-processes: a whole number >= 1 or 'auto' (minimoe.placement.parallel_fits.auto_processes)."""
    if text == "auto":
        return text
    try:
        return whole_number(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 or 'auto', got {text!r}") from None
