"""The settings of a training run: ``TrainConfig``, the named presets, and what a resumed run may change.

A run directory's ``train_config.json`` holds its ``TrainConfig``. Resuming continues the same run, so every
setting that decides the model, the data order or the learning-rate schedule must equal the saved one; only
``CHANGEABLE_ON_RESUME`` (the folder, the number of steps, the device) may differ. ``minimoe train`` builds its
runs from the presets (``PRESETS``: "tiny" for the notebook and the tests, "shipped" for the bundled
checkpoint); :func:`resume_settings` tells a resumed command line which preset made the run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from minimoe.model.moe_config import MoEConfig
from minimoe.model.model_config import ModelConfig


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny-moe"
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8  # per domain; 0 = the whole validation split
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False  # autocast matmuls to bfloat16 (weights and optimizer stay float32)
    max_chars_per_domain: int = 400_000
    vocab_size: int = 4096

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_every", "checkpoint_every", "max_chars_per_domain"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup < 0 or self.eval_batches < 0:
            raise ValueError(f"warmup and eval_batches must be >= 0, got {self.warmup}, {self.eval_batches}")


def load_train_config(run_dir) -> TrainConfig:
    """The TrainConfig saved in ``run_dir``/train_config.json. Raises ValueError naming the file when it is
    missing (not a minimoe training run), not JSON, not an object, or lacks or adds a setting."""
    path = Path(run_dir) / "train_config.json"
    if not path.is_file():
        raise ValueError(f"{path}: no such file: {run_dir} is not a minimoe training run (minimoe train writes it)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of training settings, got {type(data).__name__}")
    names = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown, missing = sorted(set(data) - names), sorted(names - set(data))
    if unknown or missing:
        raise ValueError(f"{path}: unknown settings {unknown}, missing settings {missing}")
    try:
        return TrainConfig(**data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


CHANGEABLE_ON_RESUME = ("out_dir", "steps", "device")  # the others decide the data order and the schedule


def resume_step(cfg: TrainConfig) -> int:
    """The step the run in ``cfg.out_dir`` stopped at (``resume_state``'s checks)."""
    return int(resume_state(cfg)["step"])


def resume_state(cfg: TrainConfig) -> dict:
    """The trainer state ({"step", "optimizer"}, on the CPU) of the run in ``cfg.out_dir``. Raises ValueError when
    a setting of ``cfg`` other than ``CHANGEABLE_ON_RESUME`` differs from the saved run's (the model, data order and
    schedule would mix two runs), when the state file is damaged, or when the run is already at ``cfg.steps``."""
    out = Path(cfg.out_dir)
    saved = load_train_config(out)
    for field in dataclasses.fields(TrainConfig):
        old, new = getattr(saved, field.name), getattr(cfg, field.name)
        if field.name not in CHANGEABLE_ON_RESUME and old != new:
            raise ValueError(f"cannot resume {out} with {field.name}={new!r}: the saved run has {field.name}="
                             f"{old!r} ({out / 'train_config.json'}); only steps and device may change")
    state_file = out / "trainer_state.pt"
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        step = int(state["step"])
    except Exception as error:  # noqa: BLE001 - a damaged file raises whatever the unpickler meets
        raise ValueError(f"{state_file} is not a readable trainer state ({type(error).__name__}): the run cannot "
                         "be resumed") from None
    if step >= cfg.steps:
        raise ValueError(f"{out} is already at step {step}: resuming with steps={cfg.steps} trains nothing; "
                         f"give more than {step} steps (--steps)")
    return state


def run_preset(saved: TrainConfig) -> str | None:
    """The preset whose settings a saved run has, apart from those a command line may set (steps, device, seed,
    bf16, the folder); None for a run configured another way (from Python)."""
    for name in PRESETS:
        _, cfg = preset(name, out_dir=saved.out_dir, steps=saved.steps, device=saved.device, seed=saved.seed,
                        bf16=saved.bf16)
        if cfg == saved:
            return name
    return None


def resume_settings(run_dir, preset_name: str | None, seed: int | None, bf16: bool, steps: int | None):
    """(preset, seed, bf16, steps) a resumed ``minimoe train`` continues with: the run's own, read from its
    train_config.json, and ``steps`` when given (else the run's). Raises ValueError naming ``--preset``, ``--seed``
    or ``--bf16`` when one is given and contradicts the saved run, or when no preset made the run."""
    saved = load_train_config(run_dir)
    made_by = run_preset(saved)
    if made_by is None:
        raise ValueError(f"{run_dir} was not made by a preset of minimoe train (its train_config.json matches none "
                         f"of {sorted(PRESETS)}); resume it from Python: minimoe.data.train.train(..., resume=True)")
    keep = "a resumed run keeps its own --preset, --seed and --bf16; only --steps and --device may change"
    if preset_name is not None and preset_name != made_by:
        raise ValueError(f"--preset {preset_name}: {run_dir} was trained with --preset {made_by} ({keep})")
    if seed is not None and seed != saved.seed:
        raise ValueError(f"--seed {seed}: {run_dir} was trained with --seed {saved.seed} ({keep})")
    if bf16 and not saved.bf16:
        raise ValueError(f"--bf16: {run_dir} was trained without --bf16 ({keep})")
    return made_by, saved.seed, saved.bf16, saved.steps if steps is None else steps


# Named sizes: "tiny" trains in about a minute on a laptop CPU (the notebook and the tests use it);
# "shipped" is the model bundled in checkpoints/ (see checkpoints/moe-4domain/README.md for the command and its losses).
PRESETS = {
    "tiny": dict(
        model=dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192,
                   tie_word_embeddings=True, max_seq_len=512,
                   moe=dict(num_experts=16, top_k=2, intermediate_size=64, num_shared_experts=1,
                            aux_loss_coef=0.01, z_loss_coef=0.001)),
        train=dict(steps=200, batch_size=16, seq_len=128, max_chars_per_domain=150_000, vocab_size=2048,
                   eval_every=100, checkpoint_every=100),
    ),
    "shipped": dict(
        model=dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384,
                   tie_word_embeddings=True, max_seq_len=512,
                   moe=dict(num_experts=32, top_k=2, intermediate_size=64, num_shared_experts=1,
                            aux_loss_coef=0.01, z_loss_coef=0.001)),
        train=dict(steps=2000, batch_size=32, seq_len=256, lr=2e-3, min_lr=2e-4, warmup=100,
                   max_chars_per_domain=2_500_000, vocab_size=4096, eval_every=250, eval_batches=0,
                   checkpoint_every=500),
    ),
}


def preset(name: str, **train_overrides) -> tuple[ModelConfig, TrainConfig]:
    """(ModelConfig, TrainConfig) of a named preset; keyword arguments override TrainConfig fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    model_kwargs = dict(PRESETS[name]["model"])
    moe = MoEConfig(**model_kwargs.pop("moe"))
    train_kwargs = {**PRESETS[name]["train"], **{k: v for k, v in train_overrides.items() if v is not None}}
    vocab = train_kwargs.get("vocab_size", TrainConfig.vocab_size)
    return ModelConfig(vocab_size=vocab, moe=moe, **model_kwargs), TrainConfig(**train_kwargs)
