"""Paths a command reads or writes, checked before the work starts, so a typo fails in a second, not after minutes.

Each check raises ``ValueError`` with a message naming the flag, the path and what was expected; the command
line (``minimoe.cli.main``) prints it as one line and exits with status 2. ``output_dir`` creates an output
folder up front and removes it again if the work fails before anything was written into it.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path


def check_output_file(flag: str, path: str, suffix: str | None = None) -> Path:
    """Check that ``path`` can be written (by writing to it and removing what did not exist before)."""
    path = Path(path)
    if suffix and path.suffix != suffix:
        raise ValueError(f"{flag} {path}: expected a file name ending in {suffix}")
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder, expected a file name")
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


@contextlib.contextmanager
def output_dir(flag: str, path: str):
    """Create the folder ``path`` now (so an unwritable place fails before the work) and remove it again if
    the work fails before anything was written into it."""
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
    if path is not None and not Path(path).is_file():
        raise ValueError(f"{flag} {path}: no such file")


def check_model_dir(flag: str, path: str | None) -> None:
    """A model folder: its config.json exists and holds a JSON object (an empty or damaged one is named)."""
    if path is None:
        return
    config = Path(path) / "config.json"
    if not config.is_file():
        raise ValueError(f"{flag} {path}: not a model folder (expected {config})")
    import json

    text = config.read_text(errors="replace")
    try:
        data = json.loads(text) if text.strip() else None
    except json.JSONDecodeError as error:
        raise ValueError(f"{flag} {path}: {config} is not valid JSON ({error})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{flag} {path}: {config} is {'empty' if not text.strip() else 'not a JSON object'}: "
                         "expected a model's config")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
