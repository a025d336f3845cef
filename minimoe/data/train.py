"""Train a small multi-domain (MoE) language model offline: corpus -> BPE -> Transformer -> checkpoint.

    loss = cross_entropy(next token) + sum over MoE layers of aux_loss          (aux: Switch/GShard balance,
                                                                                 router z-loss; see router.py)
    lr(step) = peak * step / warmup                      during warm-up
             = min + (peak - min) * (1 + cos(pi * progress)) / 2   afterwards (cosine decay)

A run directory holds everything needed to use or resume it:

    config.json, model.safetensors   the model (``Transformer.load(dir)``)
    tokenizer.json                   the byte-level BPE it reads
    train_config.json                the TrainConfig of the run
    trainer_state.pt                 optimizer state and step, for ``resume=True``
    log.json                         training loss per step, per-domain validation loss per evaluation
    validation_tokens.npz            the tokenised validation split, so the reported losses can be checked
                                     anywhere (the code corpus is the running Python's standard library)

Data order is a pure function of the seed (``tokenizer.batch_iterator``), so resuming skips the batches
already seen and continues exactly where the run stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from minimoe.data.corpora import DOMAINS, load_corpus, split_documents
from minimoe.model.transformer import ModelConfig, Transformer, lm_loss
from minimoe.data.tokenizer import batch_iterator, encode_documents, load_tokenizer, save_tokenizer, train_tokenizer, \
    validation_batches


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


def learning_rate(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def prepare_data(cfg: TrainConfig, tokenizer_path: Path | None = None):
    """Corpus -> splits -> tokenizer (trained on the train split, or loaded) -> token arrays per split."""
    corpus = load_corpus(max_chars_per_domain=cfg.max_chars_per_domain, seed=cfg.seed)
    splits = split_documents([doc for domain in DOMAINS for doc in corpus[domain]], seed=cfg.seed)
    if tokenizer_path is not None and tokenizer_path.is_file():
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        tokenizer = train_tokenizer((doc.text for doc in splits.train), vocab_size=cfg.vocab_size)
    data = {}
    for name in ("train", "validation", "test"):
        docs = getattr(splits, name)
        data[name] = (encode_documents(tokenizer, docs), [doc.domain for doc in docs])
    return tokenizer, data, splits


@torch.no_grad()
def evaluate(model: Transformer, batches: dict[str, list], device, max_batches: int = 0, bf16: bool = False) -> dict:
    """Mean next-token loss per domain over its validation batches (token-weighted)."""
    model.eval()
    losses = {}
    for domain, domain_batches in batches.items():
        total, count = 0.0, 0
        for batch in domain_batches[: max_batches or None]:
            x = torch.from_numpy(batch.input_ids).to(device)
            y = torch.from_numpy(batch.labels).to(device)
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            n = int((y != -100).sum())
            total += lm_loss(logits.float(), y, shift=False).item() * n  # y[:, t] is the token after x[:, t]
            count += n
        losses[domain] = total / max(count, 1)
    model.train()
    return losses


def train(model_config: ModelConfig, cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) a run in ``cfg.out_dir``; returns the log (losses per step and evaluation). Resuming
    raises ValueError when the settings differ from the saved run's or it already reached ``cfg.steps``
    (``resume_state``)."""
    out = Path(cfg.out_dir)
    state = resume_state(cfg) if resume and (out / "trainer_state.pt").is_file() else None
    start_step = int(state["step"]) if state is not None else 0
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tokenizer, data, _ = prepare_data(cfg, out / "tokenizer.json" if resume else None)
    save_tokenizer(tokenizer, out / "tokenizer.json")
    if model_config.vocab_size != tokenizer.get_vocab_size():
        model_config = dataclasses.replace(model_config, vocab_size=tokenizer.get_vocab_size())
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    if start_step:
        model = Transformer.load(out, device=cfg.device)
        log = json.loads((out / "log.json").read_text())
    else:
        model = Transformer(model_config).to(cfg.device)
        log = {"train_loss": [], "eval": [], "tokens_per_second": None}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    if start_step:
        optimizer.load_state_dict(state["optimizer"])  # moves the state to the parameters' device

    train_tokens, train_domains = data["train"]
    batches = batch_iterator(train_tokens, train_domains, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    for _ in range(start_step):  # the data order is fixed by the seed: skip what was already seen
        next(batches)
    val_tokens, val_domains = data["validation"]
    save_token_arrays(out / "validation_tokens.npz", val_tokens, val_domains)
    val_batches = validation_batches(val_tokens, val_domains, cfg.seq_len, cfg.batch_size)

    model.train()
    bar = tqdm(range(start_step, cfg.steps), desc="train", disable=not progress, initial=start_step, total=cfg.steps)
    started, tokens_seen = time.perf_counter(), 0
    for step in bar:
        batch = next(batches)
        x = torch.from_numpy(batch.input_ids).to(cfg.device)  # (B, T)
        y = torch.from_numpy(batch.labels).to(cfg.device)  # (B, T)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        with torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = model(x)
        loss = lm_loss(logits.float(), y, shift=False)  # the batches' labels are already the next tokens
        total = loss + model.moe_aux_loss()
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss became {total.item()} at step {step}; lower lr (now {cfg.lr})")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        tokens_seen += x.numel()
        log["train_loss"].append(round(loss.item(), 5))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val = evaluate(model, val_batches, cfg.device, cfg.eval_batches, cfg.bf16)
            log["eval"].append({"step": done, **{d: round(v, 5) for d, v in val.items()}})
            bar.write(f"step {done}: validation loss " + ", ".join(f"{d} {v:.3f}" for d, v in val.items()))
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            log["tokens_per_second"] = round(tokens_seen / (time.perf_counter() - started), 1)
            save_checkpoint(model, optimizer, done, log, out)
    return log


def save_checkpoint(model: Transformer, optimizer, step: int, log: dict, out: Path) -> None:
    model.save(out)
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, out / "trainer_state.pt")
    (out / "log.json").write_text(json.dumps(log) + "\n")


def save_token_arrays(path: Path, token_arrays: list[np.ndarray], domains: list[str]) -> None:
    """Documents as one int32 stream + offsets + domain labels (loadable with allow_pickle=False)."""
    offsets = np.cumsum([0] + [len(a) for a in token_arrays])
    np.savez_compressed(path, tokens=np.concatenate(token_arrays).astype(np.int32), offsets=offsets,
                        domains=np.asarray(domains, dtype=str))


def load_token_arrays(path: Path) -> tuple[list[np.ndarray], list[str]]:
    with np.load(path, allow_pickle=False) as f:
        tokens, offsets, domains = f["tokens"], f["offsets"], f["domains"]
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])], [str(d) for d in domains]


def validation_losses(run_dir, device="cpu") -> dict:
    """Per-domain loss of a saved run on its whole validation split (the numbers a run reports)."""
    run_dir = Path(run_dir)
    cfg = load_train_config(run_dir)
    model = Transformer.load(run_dir, device=device)
    batches = validation_batches(*load_token_arrays(run_dir / "validation_tokens.npz"), cfg.seq_len, cfg.batch_size)
    return evaluate(model, batches, device, 0)


def summarise(log: dict) -> str:
    """One line: the steps, the train loss at the start and the end (the mean of the first and of the last 10
    steps; for a run under 20 steps, whose windows would overlap, the first and the last step's) and the last
    validation losses, naming a domain the validation split holds no documents of."""
    last = log["eval"][-1] if log["eval"] else {}
    losses = np.asarray(log["train_loss"])
    if len(losses) >= 20:
        train_loss = f"train loss {losses[:10].mean():.3f} -> {losses[-10:].mean():.3f} (means of 10 steps)"
    else:
        train_loss = f"train loss {losses[0]:.3f} (step 1) -> {losses[-1]:.3f} (step {len(losses)})"
    missing = [d for d in DOMAINS if d not in last]
    note = f" (no {' or '.join(missing)} documents in this seed's validation split)" if last and missing else ""
    return (f"{len(losses)} step{'' if len(losses) == 1 else 's'}, {train_loss}; "
            "validation " + ", ".join(f"{d} {last[d]:.3f}" for d in DOMAINS if d in last) + note)


# Named sizes: "tiny" trains in about a minute on a laptop CPU (the notebook and the tests use it);
# "shipped" is the model bundled in checkpoints/ (see checkpoints/README.md for the command and its losses).
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
    from minimoe.model.moe import MoEConfig

    model_kwargs = dict(PRESETS[name]["model"])
    moe = MoEConfig(**model_kwargs.pop("moe"))
    train_kwargs = {**PRESETS[name]["train"], **{k: v for k, v in train_overrides.items() if v is not None}}
    vocab = train_kwargs.get("vocab_size", TrainConfig.vocab_size)
    return ModelConfig(vocab_size=vocab, moe=moe, **model_kwargs), TrainConfig(**train_kwargs)
