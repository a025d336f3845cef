"""The `minimoe` command end to end, the way a user types it (small sizes)."""

import json

import numpy as np
import pytest

from minimoe.cli import main
from minimoe.traces import BUNDLED_MODEL, Trace


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
    for argv in (["findings", "--trace", "t.npz", "--topologies", "2x2"], ["report", "--trace", "t.npz", "extra"]):
        with pytest.raises(SystemExit) as stop:  # named by the command it was given to, like its other errors
            main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err == (f"minimoe {argv[0]}: error: unrecognized arguments: "
                                                f"{' '.join(argv[3:])} (see 'minimoe {argv[0]} --help')\n")


def test_no_command_prints_the_usage_and_fails(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: minimoe") and "give a command" in err


def test_an_option_before_the_command_is_named_with_the_commands_that_take_it(capsys):
    assert main(["--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minimoe: error: --threads is an option of report,") and "invalid choice" not in err
    assert err.endswith("e.g. minimoe report --threads 1") and len(err.splitlines()) == 1
    # the command given after the option is the one the example uses, the option moved after it
    assert main(["--topologies", "2x2", "report", "--trace", "t.npz"]) == 2
    assert capsys.readouterr().err.strip().endswith("e.g. minimoe report --topologies 2x2 --trace t.npz")
    assert main(["--threads", "1", "demo"]) == 2
    assert capsys.readouterr().err.strip().endswith("e.g. minimoe demo --threads 1")
    assert main(["--out", "f", "export", "p.json"]) == 2  # the forwarded commands' own options count
    err = capsys.readouterr().err
    assert ", import, export, pic-experiment and goes after" in err and err.strip().endswith("minimoe export --out f p.json")
    assert main(["--topologies", "2x2", "findings"]) == 2  # an option of another command than the one given
    assert "--topologies is not an option of minimoe findings; it is one of report" in capsys.readouterr().err
    assert main(["findings", "--trace", "t.npz", "--debug"]) == 2  # minimoe's own option, after the command
    assert capsys.readouterr().err.strip().endswith("goes before the command, e.g. minimoe --debug findings --trace t.npz")
    for argv in (["--bogus"], ["--nproc", "2", "report"]):  # no command takes it
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{argv[0]} is not an option of minimoe or of any of its commands" in err and "invalid choice" not in err


def run_folder(path, **changes):
    """A copy of the bundled run in ``path`` (weights linked), with files replaced by ``changes``."""
    path.mkdir()
    for file in BUNDLED_MODEL.iterdir():
        (path / file.name).symlink_to(file)
    for name, text in changes.items():
        (path / name.replace("_json", ".json")).unlink()
        (path / name.replace("_json", ".json")).write_text(text)
    return path


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_dense_model_is_refused_by_every_command_that_needs_experts(tmp_path, capsys):
    config = json.loads((BUNDLED_MODEL / "config.json").read_text())
    dense = run_folder(tmp_path / "dense", config_json=json.dumps(dict(config, moe=None)))
    for command in ("trace", "findings", "report"):
        err = one_line_error(capsys, [command, "--model", str(dense), "--out", str(tmp_path / "out.npz")])
        assert f"--model {dense}: a dense model" in err and "expected a minimoe MoE checkpoint" in err
    damaged = run_folder(tmp_path / "damaged", config_json=json.dumps(dict(config, moe=dict(config["moe"],
                                                                                          num_experts="32"))))
    err = one_line_error(capsys, ["trace", "--model", str(damaged), "--out", str(tmp_path / "out.npz")])
    assert "\"moe\" section must hold num_experts, a whole number >= 1, got '32'" in err and "a dense model" not in err


@pytest.mark.parametrize("changes, expected", [
    (dict(tokenizer_json="garbage"), "tokenizer.json is not a readable tokenizer file"),
    (dict(train_config_json="[]"), "train_config.json must hold a JSON object of training settings, got list"),
    (dict(train_config_json="{}"), "train_config.json: unknown settings [], missing settings ['batch_size'"),
    (dict(train_config_json="{"), "train_config.json is not valid JSON"),
])
def test_a_damaged_run_folder_is_named_in_one_line(tmp_path, capsys, changes, expected):
    folder = run_folder(tmp_path / "run", **changes)
    err = one_line_error(capsys, ["trace", "--model", str(folder), "--requests-per-domain", "2", "--new-tokens", "2",
                                  "--out", str(tmp_path / "t.npz")])
    assert str(folder) in err and expected in err


def test_a_model_config_that_is_not_utf8_is_named_in_one_line(tmp_path, capsys):
    config = (BUNDLED_MODEL / "config.json").read_text().replace("{", '{"name": "\udcff",', 1)
    folder = run_folder(tmp_path / "run")
    (folder / "config.json").unlink()
    (folder / "config.json").write_bytes(config.encode("utf-8", "surrogateescape"))  # a lone 0xff byte
    for command in ("report", "findings"):
        err = one_line_error(capsys, [command, "--model", str(folder), "--out", str(tmp_path / "out")])
        assert f"{folder / 'config.json'} is not valid JSON" in err and "can't decode" in err


def test_too_many_new_tokens_are_refused_before_recording(tmp_path, capsys):
    err = one_line_error(capsys, ["trace", "--requests-per-domain", "2", "--new-tokens", "470",
                                  "--out", str(tmp_path / "t.npz")])
    assert err.startswith("minimoe trace: error: --new-tokens 470: the longest prompt has ")
    assert "max_seq_len=512: expected --new-tokens" in err and "or fewer" in err and "recording" not in err


def test_recording_sizes_that_would_only_exhaust_memory_are_refused(tmp_path, capsys):
    cases = [([command, "--requests-per-domain", "100000000"], "argument --requests-per-domain: expected a whole "
              "number from 2 to 100000, got 100000000") for command in ("trace", "report", "findings")]
    cases.append((["trace", "--new-tokens", "99999999"], "argument --new-tokens: expected a whole number from 1 to 65536"))
    cases.append((["report", "--hidden-size", "99999999999999999999"],
                  "argument --hidden-size: expected a whole number from 1 to 65536"))
    for argv, expected in cases:
        with pytest.raises(SystemExit) as stop:  # argparse's type check: one line, status 2
            main([*argv, "--out", str(tmp_path / "t.npz")])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and expected in err and err.count("\n") == 1, err


def test_a_transformers_folder_without_tokenizer_files_is_named(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    err = one_line_error(capsys, ["trace", "--hf", str(tmp_path), "--out", str(tmp_path / "t.npz")])
    assert f"--hf {tmp_path}: no tokenizer files (tokenizer.json, " in err


def test_a_transformers_folder_given_as_model_and_a_file_as_a_folder_are_named(tmp_path, capsys):
    (tmp_path / "ds3").mkdir()
    (tmp_path / "ds3" / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "num_hidden_layers": 4}))
    for command in ("trace", "report"):  # a transformers checkpoint is recorded with --hf, not --model
        err = one_line_error(capsys, [command, "--model", str(tmp_path / "ds3"), "--out", str(tmp_path / "o.npz")])
        assert (f"--model {tmp_path / 'ds3'}: a transformers checkpoint (model_type 'deepseek_v3'), not a minimoe run: "
                f"record it with minimoe trace --hf {tmp_path / 'ds3'}") in err, err
    (tmp_path / "afile").write_text("x")
    err = one_line_error(capsys, ["trace", "--out", str(tmp_path / "afile" / "t.npz")])
    assert f"--out {tmp_path / 'afile' / 't.npz'}: {tmp_path / 'afile'} is a file, not a folder" in err
