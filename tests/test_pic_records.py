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
