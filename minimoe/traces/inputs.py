"""Small helpers the importers and ``minimoe export`` share, so that every bad input file is named in one line.

    read_text(path, expected)   the file's text as UTF-8 (a leading byte-order mark dropped); ValueError naming the
                                file (and the byte) when it is not, and saying so when it is gzip-compressed
    parse_json(text, where)     one JSON value; ValueError naming ``where`` (a file, or "FILE: line N") when the
                                text is not JSON or nests too deeply for the parser (Python's recursion limit)
    plural(count, word)         "1 request", "3 requests" for the summaries the commands print

``minimoe.cli.main`` prints a ValueError as one line (``minimoe import: error: ...``) and exits with status 2.
"""

from __future__ import annotations

import json
import os


def read_text(path, expected: str = "a text file") -> str:
    """The text of ``path`` decoded as UTF-8 (a byte-order mark, as some Windows editors write, is dropped); raises
    ValueError naming the file when it is not UTF-8, or is gzip-compressed."""
    with open(path, "rb") as file:
        data = file.read()
    if data[:2] == b"\x1f\x8b":
        raise ValueError(f"{os.fspath(path)} is gzip-compressed: decompress it first (gunzip -k FILE), then give the "
                         f"text file: expected {expected}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{os.fspath(path)}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
                         f"{error.start}): expected {expected}") from None


def parse_json(text: str, where: str):
    """``json.loads(text)``; raises ValueError starting with ``where`` for invalid or too deeply nested JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from None
    except RecursionError:
        raise ValueError(f"{where}: not valid JSON here (nested more deeply than Python's recursion limit)") \
            from None


def plural(count: int, word: str, words: str | None = None) -> str:
    """``plural(1, "request")`` -> "1 request"; ``plural(2, "pass", "passes")`` -> "2 passes"."""
    return f"{count} {word if count == 1 else words or word + 's'}"
