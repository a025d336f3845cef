"""Training: the loss goes down, resuming equals an uninterrupted run, and the bundled checkpoint is what it says."""

import json
import re
from pathlib import Path

import pytest
import torch

from minimoe.model import ModelConfig, Transformer
from minimoe.model import MoEConfig
from minimoe.cli import main
from minimoe.data.train import learning_rate, summarise, train, validation_losses
from minimoe.data.train_config import PRESETS, TrainConfig, load_train_config, preset

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "checkpoints" / "moe-4domain"

TINY_MODEL = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, tie_word_embeddings=True,
                         max_seq_len=64, moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=32,
                                                       aux_loss_coef=0.01, z_loss_coef=0.001))


def tiny_run(out_dir, steps, **overrides):
    return TrainConfig(out_dir=str(out_dir), steps=steps, batch_size=4, seq_len=32, warmup=2, eval_every=3,
                       eval_batches=1, checkpoint_every=3, max_chars_per_domain=20_000, vocab_size=300,
                       **overrides)


def test_loss_decreases_and_run_directory_is_complete(tmp_path):
    log = train(TINY_MODEL, tiny_run(tmp_path, 12, lr=1e-2), progress=False)
    losses = log["train_loss"]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    # per-domain validation losses, for the domains that have validation documents at this tiny corpus size
    evaluated = set(log["eval"][-1]) - {"step"}
    assert len(evaluated) >= 2 and evaluated <= {"code", "math", "chat", "general"}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_config.json", "log.json",
                 "trainer_state.pt", "validation_tokens.npz"):
        assert (tmp_path / name).is_file(), name
    reloaded = validation_losses(tmp_path)
    # the last evaluation used one batch per domain; the full split is close to it, and finite
    assert all(torch.isfinite(torch.tensor(v)) for v in reloaded.values())


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    torch.set_num_threads(1)
    straight = train(TINY_MODEL, tiny_run(tmp_path / "straight", 6), progress=False)
    train(TINY_MODEL, tiny_run(tmp_path / "resumed", 3), progress=False)
    resumed = train(TINY_MODEL, tiny_run(tmp_path / "resumed", 6), resume=True, progress=False)
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], abs=1e-4)
    a = Transformer.load(tmp_path / "straight").state_dict()
    b = Transformer.load(tmp_path / "resumed").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_resume_refuses_other_settings_and_a_run_that_is_already_done(tmp_path, capsys):
    train(TINY_MODEL, tiny_run(tmp_path, 3), progress=False)
    saved = (tmp_path / "train_config.json").read_text()
    with pytest.raises(ValueError, match=r"with seed=1: the saved run has seed=0 \(.*train_config.json\)"):
        train(TINY_MODEL, tiny_run(tmp_path, 6, seed=1), resume=True, progress=False)
    with pytest.raises(ValueError, match="is already at step 3: resuming with steps=3 trains nothing"):
        train(TINY_MODEL, tiny_run(tmp_path, 3), resume=True, progress=False)
    assert main(["train", "--resume", "--preset", "shipped", "--steps", "6", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"minimoe train: error: --resume: {tmp_path} was not made by a preset of minimoe train (its "
                   "train_config.json matches none of ['shipped', 'tiny']); resume it from Python: "
                   "minimoe.data.train.train(..., resume=True)\n")
    assert (tmp_path / "train_config.json").read_text() == saved  # nothing of the run was rewritten


def test_the_train_command_resumes_with_the_runs_own_settings(tmp_path, capsys, monkeypatch):
    """--resume takes the run's --preset, --seed and --bf16 from its train_config.json; flags that contradict them
    are refused, and a run folder is never trained over without --resume."""
    import importlib

    training = importlib.import_module("minimoe.data.train")  # the module (minimoe.data.train is also a function)

    def fake_train(model_config, train_config, resume=False, progress=True):  # the settings, not the training
        Path(train_config.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(train_config.out_dir) / "train_config.json").write_text(json.dumps(train_config.__dict__))
        torch.save({"step": train_config.steps}, Path(train_config.out_dir) / "trainer_state.pt")
        calls.append((train_config.seed, train_config.steps, train_config.batch_size, resume))
        return {"train_loss": [1.0], "steps": train_config.steps}

    calls = []
    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setattr(training, "summarise", lambda log: "trained")
    run = str(tmp_path / "run")
    assert main(["train", "--preset", "shipped", "--seed", "5", "--steps", "2", "--out", run]) == 0
    assert main(["train", "--resume", "--steps", "4", "--out", run]) == 0  # shipped, seed 5: the run's own
    assert calls[-1] == (5, 4, PRESETS["shipped"]["train"]["batch_size"], True)
    capsys.readouterr()
    refused = [(["--resume", "--steps", "6", "--seed", "0"], f"--seed 0: {run} was trained with --seed 5"),
               (["--resume", "--steps", "6", "--preset", "tiny"], f"--preset tiny: {run} was trained with --preset "
                                                                  "shipped"),
               (["--resume"], "is already at step 4: resuming with steps=4 trains nothing"),
               (["--steps", "6"], f"--out {run} holds a training run (trainer_state.pt): pass --resume")]
    for argv, message in refused:
        assert main(["train", *argv, "--out", run]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert len(calls) == 2
    (Path(run) / "trainer_state.pt").write_bytes(b"junk")
    assert main(["train", "--resume", "--steps", "9", "--out", run]) == 2
    err = capsys.readouterr().err
    assert "trainer_state.pt is not a readable trainer state" in err and err.count("\n") == 1, err
    # a folder with other files and no run (a checkpoint, a run whose trainer_state.pt was deleted) is never written over
    (Path(run) / "trainer_state.pt").unlink()
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    for folder in (run, str(checkpoint)):
        assert main(["train", "--steps", "2", "--out", folder]) == 2
        err = capsys.readouterr().err
        assert f"--out {folder} holds files but no training run" in err and err.count("\n") == 1, err
    assert (checkpoint / "config.json").read_text() == "{}" and len(calls) == 2


@pytest.mark.parametrize("text, message", [
    ("[]", "must hold a JSON object of training settings, got list"),
    ("{}", "missing settings \\['batch_size'"),
    ("{", "is not valid JSON"),
    (None, "no such file: .* is not a minimoe training run"),
])
def test_a_damaged_train_config_names_the_file(tmp_path, text, message):
    if text is not None:
        (tmp_path / "train_config.json").write_text(text)
    with pytest.raises(ValueError, match=f"train_config.json.*{message}"):
        load_train_config(tmp_path)


def test_summary_of_a_short_run_gives_its_first_and_last_step():
    log = {"train_loss": [7.5, 7.25, 7.0], "eval": []}
    assert summarise(log).startswith("3 steps, train loss 7.500 (step 1) -> 7.000 (step 3);")
    log = {"train_loss": [2.0] * 10 + [1.0] * 10, "eval": []}
    assert summarise(log).startswith("20 steps, train loss 2.000 -> 1.000 (means of 10 steps);")
    log = {"train_loss": [7.5], "eval": [{"chat": 1.0, "math": 2.0, "general": 3.0}]}
    assert summarise(log) == ("1 step, train loss 7.500 (step 1) -> 7.500 (step 1); validation math 2.000, "
                              "chat 1.000, general 3.000 (no code documents in this seed's validation split)")


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=110, warmup=10, lr=1.0, min_lr=0.1)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.55)  # half-way down the cosine
    assert learning_rate(110, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("bad, match", [(dict(steps=0), "steps"), (dict(lr=-1.0), "lr"),
                                        (dict(min_lr=1.0, lr=0.1), "min_lr"), (dict(warmup=-1), "warmup")])
def test_bad_train_config(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")


def test_bundled_checkpoint_matches_its_preset_and_reproduces_its_losses():
    model = Transformer.load(BUNDLED)
    model_config, train_config = preset("shipped")
    assert model.config.moe == model_config.moe
    assert model.config.hidden_size == model_config.hidden_size and model.config.num_layers == model_config.num_layers
    assert model.num_parameters() == 3_982_464
    assert json.loads((BUNDLED / "train_config.json").read_text())["steps"] == PRESETS["shipped"]["train"]["steps"]

    # the losses the README reports, recomputed from the shipped files
    readme = (BUNDLED / "README.md").read_text()
    reported = dict(re.findall(r"(code|math|chat|general) (\d\.\d{4})", readme.split("Recomputed on a CPU")[1]))
    assert set(reported) == {"code", "math", "chat", "general"}
    torch.set_num_threads(1)
    measured = validation_losses(BUNDLED)
    for domain, value in reported.items():
        assert measured[domain] == pytest.approx(float(value), abs=2e-4), domain
    # and the training run's own last evaluation (on the GPU) agrees to its 3 printed decimals
    last = json.loads((BUNDLED / "log.json").read_text())["eval"][-1]
    for domain in reported:
        assert measured[domain] == pytest.approx(last[domain], abs=2e-3)


def test_training_scores_the_next_token_not_the_one_after():
    # regression: the batches' labels are already shifted; scoring them with a second shift trained the model
    # to predict the token two positions ahead
    import numpy as np

    from minimoe.model import lm_loss
    from minimoe.data.tokenizer import batch_iterator

    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 50, size=40).astype(np.int32) for _ in range(6)]
    batch = next(batch_iterator(docs, ["code"] * 6, seq_len=16, batch_size=3, seed=0))
    x, y = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.labels)
    logits = torch.randn(3, 16, 50)
    # brute force: position t of the window is scored against the token that follows it in the stream
    terms = [-torch.log_softmax(logits[b, t], -1)[y[b, t]] for b in range(3) for t in range(16) if y[b, t] != -100]
    assert lm_loss(logits, y, shift=False) == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)
    following = y[:, :-1] != -100
    assert torch.equal(x[:, 1:][following], y[:, :-1][following])  # labels[t] == inputs[t + 1]
