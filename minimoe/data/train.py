"""Train a small multi-domain (MoE) language model offline: corpus -> BPE -> Transformer -> checkpoint.

    loss = cross_entropy(next token) + sum over MoE layers of aux_loss          (aux: Switch/GShard balance,
                                                                                 router z-loss; minimoe.model.aux_losses)
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
already seen and continues exactly where the run stopped. The settings, the named presets and the checks that a
resumed run is the same run are in ``minimoe.data.train_config``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from minimoe.data.corpora import DOMAINS, load_corpus, split_documents
from minimoe.data.tokenizer import batch_iterator, encode_documents, load_tokenizer, save_tokenizer, train_tokenizer, \
    validation_batches
from minimoe.data.train_config import TrainConfig, load_train_config, resume_state
from minimoe.model.model_config import ModelConfig
from minimoe.model.transformer import Transformer, lm_loss


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
