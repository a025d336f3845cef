"""The PIC experiment end to end at CPU size (the same code as the recorded GPU run), and its command line."""

import json
import shutil

import numpy as np
import pytest
import torch

from minimoe.compress.analysis import locality, time_to_target
from minimoe.cli import main as cli_main
from minimoe.compress.experiment import main, run, settings
from minimoe.compress.experiment_config import PRESETS, ExperimentConfig
from minimoe.compress.out_folder import claim, first_difference
from minimoe.compress.report import markdown, paired_time_ratio

TINY = {**PRESETS["cpu"], "corpus_chars": 5_000, "pretrain_documents": 16, "train_documents": 8, "dev_documents": 2,
        "test_documents": 2, "steps": 2, "eval_every": 1, "dev_limit": 4, "ablations": False}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("pic")
    cfg = ExperimentConfig(**TINY)
    return cfg, out, run(cfg, out, workers=1, progress=False)


def test_every_setting_ran_with_equal_steps_and_seeds(finished):
    cfg, out, summary = finished
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    assert sorted(r["name"] for r in runs) == sorted(s["name"] for s in settings(cfg))
    assert {(r["method"], r["ratio"]) for r in runs} == {(m, r) for m in ("global", "pic") for r in cfg.ratios}
    for r in runs:
        assert [p["step"] for p in r["curve"]] == [1, 2]
        assert r["num_memory"] == cfg.context_tokens // r["ratio"]
        assert 0 <= r["test"]["em"] <= 100 and 0 <= r["test"]["f1"] <= 100 and r["test"]["count"] == 4


def test_summary_means_and_spreads_come_from_the_runs(finished):
    cfg, out, summary = finished
    runs = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    for row in summary["table"]:
        values = [r["test"]["f1"] for r in runs if r["method"] == row["method"] and r["ratio"] == row["ratio"]]
        assert row["seeds"] == len(cfg.seeds) == len(values)
        assert row["f1"] == pytest.approx(np.mean(values)) and row["f1_sd"] == pytest.approx(np.std(values, ddof=1))
    assert set(summary["bounds"]) == {"dev_full", "dev_none", "test_full", "test_none"}
    assert summary["time_to_target"]["ratio"] == 16 and summary["time_to_target"]["global"]["of"] == 2
    attention = summary["attention"]
    assert len(attention["last_layer"]) == cfg.context_tokens // 16  # k rows of n text columns
    assert all(0 < sum(row) <= 1 + 1e-4 for row in attention["last_layer"])  # text share of each memory row
    text = (out / "results.md").read_text()
    assert text == markdown(summary) and "full context (upper bound)" in text and "| pic | 16x |" in text


def test_settings_pair_methods_and_list_ablations():
    cfg = ExperimentConfig(**{**TINY, "ablations": True})
    names = [s["name"] for s in settings(cfg)]
    assert len(names) == len(set(names)) == len(cfg.seeds) * (2 * len(cfg.ratios) + 3)
    assert "pic-interleave-mem2mem_16x_seed1" in names and "global_4x_seed0" in names


def test_locality_and_time_to_target_by_hand():
    uniform = torch.full((2, 8), 1 / 8)
    assert locality(uniform, 2)["window_mass"] == pytest.approx(0.25)
    diagonal = torch.zeros(2, 8)
    diagonal[0, :4], diagonal[1, 4:] = 0.25, 0.25
    result = locality(diagonal, 4)
    assert result["window_mass"] == pytest.approx(1.0) and result["order"] == pytest.approx(1.0)
    assert result["centres"] == [1.5, 5.5]
    curve = [{"step": 10, "seconds": 1.0, "f1": 5.0}, {"step": 20, "seconds": 2.0, "f1": 9.0}]
    assert time_to_target(curve, 8.0) == {"step": 20, "seconds": 2.0} and time_to_target(curve, 10.0) is None


def test_time_ratio_pairs_the_seeds_where_both_reached_the_target():
    def rows(steps):
        return [{"seed": seed, "step": step, "seconds": None if step is None else step / 2}
                for seed, step in enumerate(steps)]
    # the baseline's slow seed 0 (450 steps) must not count: PIC missed it
    reach = {"global": {"per_seed": rows([450, 400, 400])}, "pic": {"per_seed": rows([None, None, 400])}}
    assert paired_time_ratio(reach) == {"paired_seeds": 1, "pic_over_global_steps": 1.0,
                                        "pic_over_global_seconds": 1.0}
    reach = {"global": {"per_seed": rows([250, 50])}, "pic": {"per_seed": rows([200, 150])}}
    assert paired_time_ratio(reach)["pic_over_global_steps"] == pytest.approx(350 / 300)
    assert paired_time_ratio({"global": {"per_seed": rows([100])}, "pic": {"per_seed": rows([None])}}) == {}


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "argument --workers: expected a whole number >= 1, got 0"),
    (["--steps", "0"], "argument --steps: expected a whole number >= 1, got 0"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--ratios", "0"], "argument --ratios: expected a whole number >= 1, got 0"),
    (["--seeds", "-1"], "argument --seeds: expected a whole number >= 0, got -1"),
    (["--lr", "inf"], "argument --lr: expected a finite number > 0, got inf"),
    (["--pretrain-seconds", "nan"], "argument --pretrain-seconds: expected a finite number > 0, got nan"),
    (["--handoff", "cache"], "argument --handoff: invalid choice: 'cache'"),
    (["--prepare-only", "--report-only"], "argument --report-only: not allowed with argument --prepare-only"),
])
def test_command_line_rejects_bad_values_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and error.count("\n") == 1


@pytest.mark.parametrize("overrides, message", [
    ({"ratios": (5,)}, "--ratios: 5 does not divide the chunk of 48 tokens"),
    ({"ratios": (0,)}, r"--ratios must be whole numbers >= 1, got \[0\]"),
    ({"lr": float("nan")}, "--lr must be a finite number > 0 and <= 1, got nan"),
    ({"lr": 5.0}, "--lr must be a finite number > 0 and <= 1, got 5.0"),
    ({"seeds": ()}, r"--seeds must be whole numbers >= 0, got \[\]"),
    ({"steps": 10**20}, "--steps must be 1 .. 1000000, got 100000000000000000000"),
    ({"ae_steps": 10**7}, "--ae-steps must be 0 .. 1000000, got 10000000"),
    ({"pretrain_steps": 0}, "--pretrain-steps must be 1 .. 1000000, got 0"),
    ({"seeds": (2**31,)}, "--seeds must be 0 .. 2147483647, got 2147483648"),
    ({"seeds": (0, 1, 0)}, "--seeds lists 0 more than once; expected each value once"),
    ({"ratios": (16, 4, 16)}, "--ratios lists 16 more than once; expected each value once"),
])
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig(**{**TINY, **overrides})


def test_unknown_handoff_is_refused():
    with pytest.raises(ValueError, match="--handoff must be one of \\('embeddings', 'kv'\\), got 'cache'"):
        ExperimentConfig(**{**TINY, "handoff": "cache"})


def test_key_value_handoff_runs_end_to_end_and_the_report_says_so(tmp_path):
    torch.set_num_threads(1)
    cfg = ExperimentConfig(**{**TINY, "handoff": "kv", "ae_steps": 1, "ratios": (16,), "seeds": (0,)})
    summary = run(cfg, tmp_path, workers=1, progress=False)
    runs = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob("*.json"))]
    assert sorted(r["name"] for r in runs) == ["global_16x_seed0", "pic_16x_seed0"]
    for r in runs:  # one autoencoding step, then the QA steps; dev F1 after each QA step
        assert len(r["ae_loss"]) == 1 and [p["step"] for p in r["curve"]] == [2, 3]
        assert 0 <= r["test"]["f1"] <= 100 and r["test"]["count"] == 4
    assert summary["config"]["handoff"] == "kv"
    assert "keys/values in every layer (500xCompressor)" in (tmp_path / "results.md").read_text()


def test_cuda_without_a_device_says_whether_the_flag_or_the_preset_asked_for_it(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ValueError, match="^--preset gpu runs on cuda but no CUDA device is visible; use --device cpu$"):
        main(["--preset", "gpu"])
    with pytest.raises(ValueError, match="^--device cuda was given but no CUDA device is visible; use --device cpu$"):
        main(["--preset", "cpu-mech", "--device", "cuda"])


def test_too_many_workers_are_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="^--workers must be 1 .. 64, got 100000000000000000000$"):
        main(["--out", str(tmp_path / "new"), "--workers", "100000000000000000000"])
    assert not (tmp_path / "new").exists()


def test_prepare_only_scores_the_bounds_and_a_later_run_reuses_them(tmp_path, capsys):
    args = ["--preset", "cpu", "--out", str(tmp_path), "--pretrain-steps", "2", "--no-progress", "--prepare-only"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["bounds"]) == {"dev_full", "dev_none", "test_full", "test_none"}
    assert printed["pretrain_steps"] == 2 and not (tmp_path / "runs").exists()
    stamp = (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0 and (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_cpu_smoke_report_says_its_numbers_mean_nothing_and_concludes_nothing(finished):
    cfg, out, summary = finished
    text = (out / "results.md").read_text()
    assert cfg.smoke and text.startswith("**Smoke run: these numbers mean nothing.**")
    assert "PIC needs" not in text


# ---- the --out folder: resume one experiment, refuse another ---------------------------------------------------
def _no_training(*args, **kwargs):
    raise AssertionError("a finished setting was trained again")


def test_same_settings_resume_without_training_and_report_only_this_configuration(finished, tmp_path, monkeypatch):
    cfg, out, summary = finished
    shutil.copytree(out, tmp_path / "again")
    stray = json.loads((out / "runs" / "pic_16x_seed0.json").read_text())
    (tmp_path / "again" / "runs" / "pic_64x_seed0.json").write_text(json.dumps({**stray, "ratio": 64}) + "\n")
    monkeypatch.setattr("minimoe.compress.experiment.run_setting", _no_training)
    again = run(cfg, tmp_path / "again", workers=1, progress=False)
    assert again["table"] == summary["table"] and {row["ratio"] for row in again["table"]} == {4, 16}


@pytest.mark.parametrize("overrides, difference", [
    ({"steps": 7, "lr": 0.05}, "steps: 2 there, 7 now; set by --steps"),
    ({"ratios": (4,)}, "ratios: [4, 16] there, [4] now; set by --ratios"),
    ({"seeds": (0,)}, "seeds: [0, 1] there, [0] now; set by --seeds"),
])
def test_other_settings_in_the_same_out_are_refused_and_the_record_is_kept(finished, overrides, difference,
                                                                          monkeypatch):
    cfg, out, _ = finished
    record = (out / "experiment_config.json").read_text()
    monkeypatch.setattr("minimoe.compress.experiment.run_setting", _no_training)
    with pytest.raises(ValueError) as error:
        run(ExperimentConfig(**{**TINY, **overrides}), out, workers=1, progress=False)
    assert str(error.value) == (f"--out {out} holds a run made with other settings ({difference}); pass another "
                                "--out, or that run's settings to resume it")
    assert (out / "experiment_config.json").read_text() == record


def test_a_mechanism_folder_is_refused_by_the_classic_preset_in_one_line(tmp_path, capsys):
    claim(ExperimentConfig(**PRESETS["cpu-mech"]), tmp_path)
    assert cli_main(["pic-experiment", "--preset", "cpu", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error == (f"minimoe pic-experiment: error: --out {tmp_path} holds a run made with other settings "
                     "(train_documents: 4 there, 24 now; set by --preset); pass another --out, or that run's "
                     "settings to resume it\n")


def test_speed_only_settings_do_not_stop_a_resume():
    assert first_difference({"compile": True, "steps": 2}, {"compile": False, "steps": 2}) is None
    assert first_difference({"steps": 2}, {"steps": 2, "lr": 0.1}) == ("lr", "unset", 0.1)


def test_results_without_a_record_of_their_settings_are_refused(tmp_path):
    (tmp_path / "prepare.json").write_text("{}\n")
    with pytest.raises(ValueError) as error:
        main(["--out", str(tmp_path), "--prepare-only"])
    assert str(error.value) == (f"--out {tmp_path} holds results (prepare.json) but no experiment_config.json saying "
                                "which settings made them; pass another --out")


def test_out_must_be_a_folder_this_user_can_write(tmp_path, monkeypatch, capsys):
    file = tmp_path / "notes.md"
    file.write_text("notes\n")
    assert cli_main(["pic-experiment", "--out", str(file)]) == 2
    assert capsys.readouterr().err == (f"minimoe pic-experiment: error: --out {file} is a file; expected a folder "
                                       "(a new one, or an earlier run's to resume)\n")

    def read_only(path, *args, **kwargs):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr("pathlib.Path.write_text", read_only)
    with pytest.raises(ValueError) as error:
        main(["--out", str(tmp_path / "ro"), "--prepare-only"])
    assert str(error.value) == (f"--out {tmp_path / 'ro'}: cannot write there (Operation not permitted); expected a "
                                "folder this user can write to")
