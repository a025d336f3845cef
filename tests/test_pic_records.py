"""The recorded first run of the mechanism experiment: its JSON says exactly what the run printed."""

import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_the_first_mechanism_record_matches_the_printed_log():
    record = json.loads((RESULTS / "pic_mech_h100_first.json").read_text())
    log = (RESULTS / "pic_mech_h100_log.txt").read_text()
    printed = re.findall(r"pilot_(\w+)_64x_seed100_lr([\d.]+): dev answer EM ([\d.]+), value accuracy ([\d.]+) "
                         r"\((\d+) s training", log)
    assert [(r["method"], r["lr"], r["em"], r["value_accuracy"], r["train_seconds"])
            for r in record["pilot"]["final_dev"]] == [(m, float(lr), float(em), float(v), int(s))
                                                       for m, lr, em, v, s in printed]
    protocol = json.loads(log[log.index("{"):log.index("\n}\n") + 2])
    assert protocol["bounds"] == record["bounds"] and protocol["gate"] == record["gate"]
    floor, ceiling = record["bounds"]["dev"]["none"]["em"], record["bounds"]["dev"]["full"]["em"]
    assert all(r["em"] < floor + 0.1 * (ceiling - floor) for r in record["pilot"]["final_dev"])  # near the floor


def test_the_full_mechanism_record_is_complete_and_the_readme_repeats_the_chapters_conclusion():
    record = json.loads((RESULTS / "pic_mech_h100_full.json").read_text())
    finished = {(r["stage"], r["method"], r["ratio"], r["seed"]) for r in record["runs"]
                if r["stage"] in ("grid", "control")}
    grid = {("grid", m, r, s) for m in ("global", "pic") for r in (4, 16, 64) for s in (0, 1, 2)}
    controls = {("control", m, 64, s) for m in ("pic-continue", "global-spread") for s in (0, 1, 2)}
    assert finished == grid | controls
    assert all(len(r["curve"]) == 16 and r["test"]["count"] == 2048 for r in record["runs"]
               if r["stage"] in ("grid", "control"))
    chapter = json.loads((RESULTS.parents[1] / "book" / "08_soft_prompt_compression.ipynb").read_text())
    text = "".join("".join(c["source"]) for c in chapter["cells"] if c["cell_type"] == "markdown")
    conclusion = re.search(r"\*\*Conclusion\.\*\* (.+?\.)\n", text).group(1)
    readme = " ".join((RESULTS.parents[1] / "README.md").read_text().split())
    assert len(conclusion) > 80 and " ".join(conclusion.split()) in readme
