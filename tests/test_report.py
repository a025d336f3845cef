"""`minimoe report` and `minimoe findings` on the traces users actually have, and on bad input.

Every test runs the command line the way a user types it (in process through `minimoe.cli.main`, or as a
subprocess where the exit status and the absence of a traceback are the point) on small synthetic traces.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimoe.cli import build_parser, main
from minimoe.placement import Placement, Topology
from minimoe.placement.experiments import METHODS, compare, cut, default_window
from minimoe.placement.report import run_report
from minimoe.traces import Trace, planted_trace, synthetic_trace

ROOT = Path(__file__).resolve().parents[1]


def base_trace(**options) -> Trace:
    defaults = dict(num_requests=16, tokens_per_request=24, num_layers=2, num_experts=16, top_k=2, seed=1)
    return synthetic_trace(**{**defaults, **options})


def relabel(trace: Trace, rows=None, **changes) -> Trace:
    rows = np.arange(trace.num_tokens) if rows is None else rows
    fields = dict(experts=trace.experts[rows], request=trace.request[rows], phase=trace.phase[rows],
                  domain=trace.domain[rows] if trace.has_domain else None, num_experts=trace.num_experts,
                  top_k=trace.top_k, model=trace.model)
    return Trace(**{**fields, **changes})


def edge_traces() -> dict[str, Trace]:
    base = base_trace()
    first = np.flatnonzero(base.request == 0)
    idle = base.experts % 12  # experts 12..15 never fire; keep each token's two ids distinct
    idle[:, :, 1] = np.where(idle[:, :, 1] == idle[:, :, 0], (idle[:, :, 0] + 1) % 12, idle[:, :, 1])
    return {
        "one domain": relabel(base, domain=np.full(base.num_tokens, "code")),
        "no domain": relabel(base, domain=None),
        "one request": relabel(base, first),
        "one layer": relabel(base, experts=base.experts[:, :1]),
        "top-1": relabel(base, experts=base.experts[:, :, :1], top_k=1),
        "no decode": relabel(base, phase=np.zeros(base.num_tokens, np.int8)),
        "idle experts": relabel(base, experts=idle),
    }


def run(capsys, *argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---- traces with one domain, one request, one layer, top-1, no decode, idle experts ------------------------------
@pytest.mark.parametrize("name", list(edge_traces()))
def test_report_and_findings_run_on_every_edge_trace_and_say_what_they_skip(name, tmp_path, capsys):
    trace = edge_traces()[name]
    path = tmp_path / "t.npz"
    trace.save(path)
    status, out, err = run(capsys, "findings", "--trace", path, "--out", tmp_path / "f.json")
    assert status == 0, err
    result = json.loads((tmp_path / "f.json").read_text())
    if name in ("one domain", "no domain", "one request"):
        assert "unavailable" in result["domain"] and "(b) Domain specificity: not measured:" in out
    if name in ("one request", "no decode"):
        assert "unavailable" in result["prefill_decode"] and "(c) Prefill predicts decode: not measured:" in out
    if name == "one domain":
        assert "every request is labelled 'code'" in out
    status, out, err = run(capsys, "report", "--trace", path, "--topologies", "2x2", "--out", tmp_path / "r")
    assert status == 0, err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert (tmp_path / "r" / "report.html").is_file() and (tmp_path / "r" / "report.txt").read_text() in out + "\n"
    if name == "no decode":  # phases say prefill only: split in time instead, and say so
        assert report["split"]["kind"] == "time" and "the trace has no decode tokens: each request's first half" in out
        html = (tmp_path / "r" / "report.html").read_text()  # the figures name the fit modes as the text does
        assert "fit: first half" in html and "fitted on prefill" not in html
        assert len(report["rows"]) == 2 * len(METHODS) * 3 and "Decision" in out
    else:
        assert len(report["rows"]) == 2 * len(METHODS) * 3  # 2 slot budgets x methods x fit modes
        for row in report["rows"]:
            assert np.isfinite(row["inter_node_bytes"]) and -1 <= row["cut_vs_contiguous"] <= 1


def test_one_domain_trace_keeps_the_other_findings():
    trace = edge_traces()["one domain"]
    result = run_report(trace, [Topology(2, 2)])
    assert result["findings"]["imbalance"]["groups"]["all"]["tokens"] == trace.num_tokens
    assert result["findings"]["prefill_decode"]["matched"]["mean"] > 0.3  # the synthetic requests persist
    assert result["unavailable"]["drift"].startswith("needs requests of the domains")


# ---- numbers that must never be wrong ------------------------------------------------------------------------------
@pytest.mark.parametrize("topology", ["1x1", "1x16"])
def test_one_node_has_no_inter_node_saving_to_report(topology, tmp_path, capsys):
    base_trace().save(tmp_path / "t.npz")
    status, out, err = run(capsys, "report", "--trace", tmp_path / "t.npz", "--topologies", topology,
                           "--out", tmp_path / "r")
    assert status == 0, err
    rows = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
    assert rows and all(r["cut_vs_contiguous"] is None and r["inter_node_bytes"] == 0 for r in rows)
    assert "100.0%" not in out and "one node: nothing crosses a node boundary" in out


def test_cut_is_the_saved_fraction_and_undefined_without_a_baseline():
    assert cut(30.0, 40.0) == pytest.approx(0.25) and cut(50.0, 40.0) == pytest.approx(-0.25)
    assert cut(0.0, 0.0) is None and cut(5.0, 0.0) is None


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), top_k=st.integers(1, 4), shape=st.sampled_from([(2, 1), (2, 2), (4, 1), (4, 2)]),
       spare=st.booleans())
def test_saving_is_zero_for_contiguous_and_at_most_100_percent(seed, top_k, shape, spare):
    """A saving is 1 - bytes / contiguous bytes: never above 100% (bytes >= 0), and below -100% only when a
    placement sends more than twice contiguous's bytes, which a load-capped fit on a tiny trace can (seed 17,
    top-1, 2x2 with spare slots: locality fitted on prefill sends 2.07x)."""
    trace = synthetic_trace(num_requests=12, tokens_per_request=16, num_layers=2, num_experts=16, top_k=top_k,
                            seed=seed)
    topology = Topology(*shape)
    rows = compare(trace, topology, 16 + spare * topology.num_gpus, window=2, seed=seed)
    for row in rows:
        if row["method"] == "contiguous":
            assert row["cut_vs_contiguous"] == 0.0
        assert row["cut_vs_contiguous"] <= 1.0
        assert row["cut_vs_contiguous"] == pytest.approx(1 - row["inter_node_bytes"] / next(
            r["inter_node_bytes"] for r in rows if r["method"] == "contiguous" and r["fit"] == row["fit"]))


# ---- bad input: one line, the flag, the value, what was expected; exit 2; nothing left behind --------------------
@pytest.mark.parametrize("argv, expected", [
    (["report", "--topologies", "abc"], "topology 'abc' is not of the form NODESxGPUS"),
    (["report", "--topologies", "4x"], "topology '4x' is not of the form NODESxGPUS"),
    (["report", "--topologies", "2x2x2"], "topology '2x2x2' is not of the form NODESxGPUS"),
    (["report", "--topologies", "-2x2"], "topology '-2x2' is not of the form NODESxGPUS"),
    (["report", "--topologies", "0x2"], "topology '0x2' needs at least 1 node"),
    (["report", "--topologies", "2x2,2x2"], "lists a topology twice"),
    (["report", "--window", "0"], "argument --window: expected a whole number >= 1, got 0"),
    (["report", "--window", "-1"], "argument --window: expected a whole number >= 1, got -1"),
    (["report", "--window", "8", "--new-tokens", "8"], "--window 8 must be smaller than --new-tokens 8"),
    (["report", "--topologies", "8x8"], "8x8 has 64 GPUs, which cannot hold 32 experts evenly"),
    (["trace", "--new-tokens", "0"], "argument --new-tokens: expected a whole number from 1 to 65536, got 0"),
    (["trace", "--out", "trace.txt"], "--out trace.txt: expected a file name ending in .npz or .parquet"),
    (["demo", "--seed", str(2**64)], "argument --seed: expected a whole number from 0 to 4294967295"),
    (["report", "--fit-processes", "100000"], "argument --fit-processes: expected at most"),
    (["findings", "--requests-per-domain", "1"], "expected a whole number from 2 to 100000, got 1"),
    (["demo", "--steps", "-3"], "argument --steps: expected a whole number >= 1, got -3"),
    (["train", "--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["report", "--temperature", "nan"], "argument --temperature: expected a finite number >= 0.0"),
    (["report", "--trace", "missing.npz"], "--trace missing.npz: no such file"),
    (["report", "--model", "."], "--model .: not a model folder"),
])
def test_bad_arguments_fail_in_one_line_before_any_work(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        status = main(argv)
    except SystemExit as stop:  # argparse stops the parse itself
        status = stop.code
    err = capsys.readouterr().err
    assert status == 2
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not any(tmp_path.iterdir()), "a failed command left files behind"


def test_resume_of_a_run_that_never_trained_is_refused(tmp_path, capsys):
    status, _, err = run(capsys, "train", "--resume", "--out", tmp_path / "never")
    assert status == 2 and "holds no run to resume" in err and not (tmp_path / "never").exists()


def test_an_unwritable_output_fails_before_recording(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    status, _, err = run(capsys, "report", "--out", blocker / "report")  # a folder inside a file
    assert status == 2 and "--out" in err and "cannot write there" in err
    status, _, err = run(capsys, "findings", "--out", tmp_path / "missing" / "f.json")
    assert status == 2 and "the folder" in err and "does not exist" in err


def test_an_empty_output_name_is_refused_by_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty name would otherwise write into the current folder
    for argv, expected in ((["report", "--out", ""], "--out: expected a folder name, got an empty one"),
                           (["findings", "--out", " "], "--out: expected a file name, got an empty one"),
                           (["trace", "--out", ""], "--out: expected a file name, got an empty one")):
        status, _, err = run(capsys, *argv)
        assert status == 2 and expected in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())


def test_a_failed_report_leaves_no_empty_output_folder(tmp_path, capsys):
    base_trace().save(tmp_path / "t.npz")
    status, _, err = run(capsys, "report", "--trace", tmp_path / "t.npz", "--window", "50",
                         "--out", tmp_path / "new" / "report")
    assert status == 2 and "--window 50: no decode token lies after the online window of 50 tokens" in err
    assert err.count("no decode token") == 1
    assert "use a window of at most 11" in err and not (tmp_path / "new").exists()


def test_a_topology_the_trace_cannot_fill_is_refused_by_name(tmp_path, capsys):
    base_trace().save(tmp_path / "t.npz")  # 16 experts
    for topology in ("16x2", "8x4"):
        status, out, err = run(capsys, "report", "--trace", tmp_path / "t.npz", "--topologies", f"2x2,{topology}",
                               "--out", tmp_path / "r")
        assert status == 2 and f"{topology} has 32 GPUs, which cannot hold 16 experts evenly" in err and not out


def test_the_suggested_topology_holds_the_experts(tmp_path, capsys):
    from minimoe.placement.commands import suggested_topology

    for experts, expected in ((3, "3x1"), (6, "2x3"), (9, "3x3"), (12, "2x2"), (1, None)):
        assert suggested_topology(experts) == expected
        assert expected is None or not Topology.parse(expected).fits(experts)
    base_trace(num_experts=3, top_k=1).save(tmp_path / "t.npz")
    status, _, err = run(capsys, "report", "--trace", tmp_path / "t.npz", "--out", tmp_path / "r")
    assert status == 2 and err.endswith("divides the expert count, e.g. --topologies 3x1\n")


def test_drift_runs_on_a_requested_topology_and_says_which(tmp_path, capsys):
    trace = planted_trace(num_domains=4, experts_per_domain=4, num_requests=64, tokens_per_request=24)
    names = np.array(["code", "math", "chat", "general"])[[int(d[-1]) for d in trace.domain]]
    relabel(trace, domain=names).save(tmp_path / "t.npz")
    for topologies, expected in (("1x2,2x2", "Drift at 1x2, the first topology compared"),
                                 ("2x2,4x2", "Drift at 4x2, the reference topology")):
        status, out, err = run(capsys, "report", "--trace", tmp_path / "t.npz", "--topologies", topologies,
                               "--out", tmp_path / "r")
        assert status == 0 and expected in out, err


def test_a_reused_output_folder_keeps_no_placement_of_an_earlier_report(tmp_path, capsys):
    base_trace().save(tmp_path / "t.npz")
    (tmp_path / "r").mkdir()
    earlier = Placement(np.arange(8)[None], 8, 1, 2, "contiguous")  # what an earlier report wrote (both forms)
    earlier.save(tmp_path / "r" / "placement-4x2-placement-only.json")
    (tmp_path / "r" / "placement-8x8.json").write_text(json.dumps({"format": "minimoe.deployment/1"}))
    for name in ("placement-notes.json", "placement-4x4.json"):  # the user's files: another name, no format tag
        (tmp_path / "r" / name).write_text("{}")
    status, out, err = run(capsys, "report", "--trace", tmp_path / "t.npz", "--topologies", "2x2",
                           "--out", tmp_path / "r")
    assert status == 0, err
    assert f"removed placement-4x2-placement-only.json, placement-8x8.json from {tmp_path / 'r'}" in out
    assert f"left placement-4x4.json in {tmp_path / 'r'}: not placement files of minimoe" in out
    left = sorted(p.name for p in (tmp_path / "r").glob("placement-*"))
    assert "placement-2x2.json" in left and "placement-notes.json" in left  # not the report's name: kept
    assert (tmp_path / "r" / "placement-4x4.json").read_text() == "{}"  # the report's name, not its file: kept
    assert not any(name.startswith(("placement-8x8", "placement-4x2")) for name in left)


def test_flags_a_run_would_ignore_are_refused_by_name(tmp_path, capsys):
    from minimoe.traces.loads import LoadTrace

    base_trace().save(tmp_path / "t.npz")
    counts = np.random.default_rng(0).integers(0, 50, size=(3, 2, 8))  # (steps, layers, experts)
    LoadTrace(counts=counts, num_experts=8, top_k=2).save(tmp_path / "l.npz")
    cases = [(["report", "--trace", tmp_path / "t.npz", "--new-tokens", "4", "--temperature", "0"],
              "--new-tokens, --temperature do not apply with --trace"),
             (["findings", "--trace", tmp_path / "t.npz", "--requests-per-domain", "5"],
              "--requests-per-domain does not apply with --trace"),
             (["report", "--trace", tmp_path / "l.npz", "--window", "3", "--compare-partitioners"],
              "--window, --compare-partitioners do not apply to --trace"),
             (["report", "--trace", tmp_path / "l.npz", "--hidden-size=5"], "--hidden-size does not apply to --trace")]
    for argv, expected in cases:
        status, _, err = run(capsys, *argv, *(["--topologies", "2x2", "--out", tmp_path / "r"] if argv[0] == "report"
                                               else []))
        assert status == 2 and expected in err and err.count("\n") == 1, err


def test_a_trace_file_that_is_not_a_trace_names_the_file(tmp_path, capsys):
    (tmp_path / "x.npz").write_text("not a zip")
    status, _, err = run(capsys, "report", "--trace", tmp_path / "x.npz", "--out", tmp_path / "r")
    assert status == 2 and str(tmp_path / "x.npz") in err and not (tmp_path / "r").exists()


# ---- defaults that work together ----------------------------------------------------------------------------------
def test_a_trace_with_8_decode_tokens_works_with_the_default_window(tmp_path, capsys):
    trace = base_trace(tokens_per_request=16)  # 8 prefill + 8 decode tokens per request
    assert default_window(trace) == 2 and default_window(base_trace(tokens_per_request=64)) == 8
    trace.save(tmp_path / "t.npz")
    status, out, err = run(capsys, "report", "--trace", tmp_path / "t.npz", "--topologies", "2x2",
                           "--out", tmp_path / "r")
    assert status == 0, err
    assert "each request's decode tokens after the first 2" in out


def test_flags_agree_across_commands_and_every_flag_has_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("report", "findings", "trace"):
        flags = {flag for action in commands[name]._actions for flag in action.option_strings}
        assert {"--new-tokens", "--requests-per-domain", "--seed", "--threads"} <= flags, name
    for name, command in commands.items():
        assert command.prog == f"minimoe {name}"
        for action in command._actions:
            assert action.help, f"minimoe {name} {action.option_strings} has no help text"
    assert "``" not in commands["report"].format_help() and "MISS" not in commands["report"].format_help()


def test_report_output_defines_its_terms_and_never_speaks_of_pass_or_miss(tmp_path, capsys):
    planted_trace(num_domains=4, experts_per_domain=8, num_requests=32, tokens_per_request=24).save(tmp_path / "t.npz")
    status, out, err = run(capsys, "report", "--trace", tmp_path / "t.npz", "--topologies", "2x2,4x2",
                           "--out", tmp_path / "r")
    assert status == 0, err
    assert "PASS" not in out and "MISS" not in out and "issue" not in out
    assert "4x2, 32 slots: 100.0% fewer inter-node bytes than contiguous" in out  # the planted optimum
    assert "[    0 s] findings" in err and "placement and grouping: 4x2 (8 GPUs), 40 slots per layer" in err
    html = (tmp_path / "r" / "report.html").read_text()
    for term in ("saved", "de-duplicated bytes", "per-pair bytes", "slots", "fitted on", "load max/mean"):
        assert f"<dt>{term}</dt>" in html
    assert "Tokens per GPU" not in html and "(token, expert) pairs per GPU, max \\u002f mean (fit: prefill)" in html
    assert html.count("plotly.js v") == 1 and '<script src="http' not in html  # opens offline
    assert html.count("trace synthetic") == 0 and html.count("Trace: (unnamed)") == 1  # the summary, once
    assert html.count('"marker":{"color":"#d62728"') == 4  # grouping+locality: one colour in every figure


def test_python_dash_m_minimoe_prints_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "minimoe", "report", "--trace", str(tmp_path / "none.npz")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and done.stderr == f"minimoe report: error: --trace {tmp_path / 'none.npz'}: no such file\n"
    done = subprocess.run([sys.executable, "-m", "minimoe", "--debug", "report", "--trace", "none.npz"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 1 and "Traceback" in done.stderr
    usage = subprocess.run([sys.executable, "-m", "minimoe", "trace", "--help"], capture_output=True, text=True,
                           timeout=120).stdout
    assert usage.startswith("usage: minimoe trace")


def test_threads_flag_sets_torch_threads(tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        base_trace().save(tmp_path / "t.npz")
        assert main(["findings", "--trace", str(tmp_path / "t.npz"), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_findings_on_a_saved_trace_never_load_torch(tmp_path):
    base_trace().save(tmp_path / "t.npz")
    script = ("import sys; from minimoe.cli import main; "
              f"code = main(['findings', '--trace', {str(tmp_path / 't.npz')!r}, '--threads', '1']); "
              "print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0 False"  # exit code 0, torch not imported


def test_outputs_of_the_readme_commands_are_ignored_by_git():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {"/report/", "/trace.npz", "/runs/"} <= set(ignored)
