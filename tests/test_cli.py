"""The `minimoe` command end to end, the way a user types it (small sizes)."""

import json

import numpy as np
import pytest

from minimoe.cli import main
from minimoe.traces import Trace


def test_trace_then_findings_then_report_on_the_bundled_model(tmp_path, capsys):
    trace_path = tmp_path / "trace.npz"
    assert main(["trace", "--requests-per-domain", "6", "--new-tokens", "12", "--out", str(trace_path)]) == 0
    trace = Trace.load(trace_path)
    assert trace.num_requests == 24 and trace.num_experts == 32 and trace.top_k == 2
    assert sorted(set(trace.request_domains())) == ["chat", "code", "general", "math"]
    assert (trace.phase == 1).sum() == 24 * 12  # every request decodes its 12 tokens (no eos is given)

    again = tmp_path / "again.npz"
    main(["trace", "--requests-per-domain", "6", "--new-tokens", "12", "--out", str(again)])
    assert Trace.load(again) == trace  # same seed, same corpus split, same trace

    capsys.readouterr()
    assert main(["findings", "--trace", str(trace_path), "--out", str(tmp_path / "f.json")]) == 0
    assert "(c) Prefill predicts decode" in capsys.readouterr().out
    assert json.loads((tmp_path / "f.json").read_text())

    assert main(["report", "--trace", str(trace_path), "--topologies", "2x2", "--window", "4",
                 "--out", str(tmp_path / "report")]) == 0
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["rows"]
    assert {r["method"] for r in rows} >= {"contiguous", "eplb", "grouping+locality"}
    assert all(np.isfinite(r["inter_node_bytes"]) for r in rows)


def test_unknown_command_and_bad_arguments_fail_clearly(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["frobnicate"])
    assert stop.value.code == 2 and "invalid choice: 'frobnicate'" in capsys.readouterr().err
