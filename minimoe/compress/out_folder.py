"""The ``--out`` folder of ``minimoe pic-experiment``: one experiment, its settings and its results.

``experiment_config.json`` records the settings that made the folder's results. A later command with the same
``--out`` resumes that experiment (the reader in ``base/``, the pilot and every finished setting are kept) only
when the settings that determine results are the same; otherwise it is refused, so a report never mixes two
experiments or describes results under settings they were not made with.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

CONFIG_FILE = "experiment_config.json"
RESULT_FILES = ("prepare.json", "protocol.json")  # a folder holding one of these (or runs/*.json) has results
SPEED_ONLY = ("compile",)  # settings that change how fast a run goes, not what it computes
FLAGS = {"base": "--base", "gguf": "--gguf", "steps": "--steps", "ae_steps": "--ae-steps", "handoff": "--handoff",
         "lr": "--lr", "pilot_lrs": "--lr", "pretrain_steps": "--pretrain-steps",
         "pretrain_max_seconds": "--pretrain-seconds", "device": "--device", "ratios": "--ratios", "seeds": "--seeds",
         "ablations": "--no-ablations", "controls": "--no-controls"}  # the flag that sets each; the rest: --preset


def saved_settings(out: Path) -> dict | None:
    """The settings recorded in ``out``, or None when it records none and holds no results.

    Raises ValueError when ``out`` is a file, when its record is not a JSON object, or when it holds results
    (``prepare.json``, ``protocol.json``, ``runs/*.json``) without a record of the settings that made them.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; expected a folder (a new one, or an earlier run's to resume)")
    path = out / CONFIG_FILE
    if not path.is_file():
        results = [name for name in RESULT_FILES if (out / name).is_file()] + sorted(
            f"runs/{p.name}" for p in (out / "runs").glob("*.json"))
        if results:
            raise ValueError(f"--out {out} holds results ({results[0]}) but no {CONFIG_FILE} saying which settings "
                             "made them; pass another --out")
        return None
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"--out {out}: {CONFIG_FILE} is not valid JSON ({error}); expected the record of an "
                         "earlier run") from None
    if not isinstance(saved, dict):
        raise ValueError(f"--out {out}: {CONFIG_FILE} holds {type(saved).__name__}; expected the JSON object of an "
                         "earlier run's settings")
    return saved


def first_difference(saved: dict, current: dict) -> tuple | None:
    """(setting, saved value, current value) of the first setting that differs, skipping ``SPEED_ONLY``; None
    when all match. A setting one side lacks reads as "unset"."""
    for key in list(current) + [k for k in saved if k not in current]:
        if key in SPEED_ONLY:
            continue
        old, new = saved.get(key, "unset"), current.get(key, "unset")
        if old != new:
            return key, old, new
    return None


def check_same_settings(cfg, out: Path) -> None:
    """Refuse an ``out`` whose recorded settings differ from ``cfg``'s in one that determines results.

    Raises ValueError naming --out, the first differing setting with both values and what to do (see also
    ``saved_settings``).
    """
    saved = saved_settings(out)
    if saved is None:
        return
    current = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists, as the record has them
    difference = first_difference(saved, current)
    if difference is not None:
        key, old, new = difference
        raise ValueError(f"--out {out} holds a run made with other settings ({key}: {json.dumps(old)} there, "
                         f"{json.dumps(new)} now; set by {FLAGS.get(key, '--preset')}); pass another --out, or "
                         "that run's settings to resume it")


def claim(cfg, out: Path) -> None:
    """Make ``out`` the folder of the experiment ``cfg``: check it (``check_same_settings``), create it and record
    ``cfg``'s settings in it. Raises ValueError as ``check_same_settings`` does, or when ``out`` cannot be
    written."""
    check_same_settings(cfg, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    except OSError as error:
        raise ValueError(f"--out {out}: cannot write there ({error.strerror or error}); expected a folder this "
                         "user can write to") from None
