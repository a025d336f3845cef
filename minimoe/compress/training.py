"""Training and scoring: the base LM (pretraining), a compressor (QA fine-tuning), and the readers' bounds.

    pretrain_base      a Llama on the project's corpora mixed with QA documents (the reader we compress for)
    train_compressor   LoRA + memory tokens on QA: loss = CE(answer | bos, memory, question), base frozen
    evaluate_*         greedy answers scored with SQuAD EM / F1 (``minimoe.compress.metrics``)

Bounds for every table: the same frozen base reading the **full** context (upper bound) and reading **no**
context (lower bound). Data order is a pure function of the seed, so two compressors trained with the same
seed see the same batches in the same order; only the attention mask differs.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from minimoe.compress.compressor import Compressor
from minimoe.compress.masks import Layout
from minimoe.compress.metrics import squad_scores
from minimoe.compress.objectives import decoder_loss, greedy_from_embeds
from minimoe.compress.qa_data import QADocument, answer_text, pack, question_prompt
from minimoe.model.model_config import ModelConfig
from minimoe.model.transformer import Transformer, lm_loss


@dataclass
class QASet:
    """Tokenised QA data: contexts (D, n) int64 and one row per question pointing at its context."""

    contexts: torch.Tensor  # (D, n)
    doc: list[int]  # question -> context row
    prompts: list[list[int]]  # "\nQuestion: ...\nAnswer:"
    targets: list[list[int]]  # " answer\n"
    answers: list[str]


def build_qa_set(documents: list[QADocument], encode, block_tokens: int, pad_id: int) -> QASet:
    contexts = torch.tensor([pack(d, encode, block_tokens, pad_id) for d in documents], dtype=torch.long)
    rows = [(i, q) for i, d in enumerate(documents) for q in d.questions]
    return QASet(contexts, [i for i, _ in rows], [encode(question_prompt(q)) for _, q in rows],
                 [encode(answer_text(q)) for _, q in rows], [q.answer for _, q in rows])


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _autocast(device: str, bf16: bool):
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


def pretrain_base(config: ModelConfig, rows: np.ndarray, steps: int, batch_size: int, lr: float, device: str,
                  bf16: bool, seed: int, pad_id: int, max_seconds: float | None = None, progress: bool = True,
                  initial: Transformer | None = None):
    """Next-token pretraining on ``rows`` (N, T) int32 token rows (padding = ``pad_id``, not scored).

    ``initial`` (optional): a pretrained model to fine-tune instead of a fresh one of ``config``.
    Returns (model, log); stops early after ``max_seconds`` of training if given (the log says so).
    """
    torch.manual_seed(seed)
    model = (initial if initial is not None else Transformer(config)).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(seed)
    log, started = {"loss": [], "steps": 0, "stopped_early": False}, time.perf_counter()
    for step in tqdm(range(steps), desc="pretrain base", disable=not progress):
        batch = torch.from_numpy(rows[rng.integers(0, len(rows), batch_size)].astype(np.int64)).to(device)
        labels = batch.masked_fill(batch == pad_id, -100)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, max(1, steps // 20))
        with _autocast(device, bf16):
            logits = model(batch)
        loss = lm_loss(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        log["loss"].append(round(loss.item(), 4) if step % 10 == 0 or step == steps - 1 else None)
        log["steps"] = step + 1
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            log["stopped_early"] = True
            break
    log["seconds"] = round(time.perf_counter() - started, 1)
    log["loss"] = [x for x in log["loss"] if x is not None]
    return model.eval(), log


@torch.no_grad()
def evaluate_reader(model: Transformer, data: QASet, mode: str, bos_id: int, stop_ids: set[int], decode,
                    batch_size: int = 64, max_new_tokens: int = 12, limit: int | None = None) -> dict:
    """The frozen base answering with the ``"full"`` context or ``"none"``: SQuAD EM / F1 in percent."""
    if mode not in ("full", "none"):
        raise ValueError(f"mode must be 'full' or 'none', got {mode!r}")
    device = model.embed.weight.device
    count = len(data.doc) if limit is None else min(limit, len(data.doc))
    predictions = []
    for start in range(0, count, batch_size):
        rows = range(start, min(count, start + batch_size))
        ids = [[bos_id] + (data.contexts[data.doc[r]].tolist() if mode == "full" else []) + data.prompts[r]
               for r in rows]
        prefixes = [model.embed(torch.tensor(x, device=device)) for x in ids]
        predictions += [decode(out) for out in greedy_from_embeds(model, prefixes, max_new_tokens, stop_ids)]
    return squad_scores(predictions, data.answers[:count])


HANDOFFS = ("embeddings", "kv")


def hand_over(compressor: Compressor, contexts: torch.Tensor, layout: Layout, expand: torch.Tensor, handoff: str):
    """Compress ``contexts`` (B, n) and hand the result to the decoder's rows: row i reads context ``expand[i]``.

    Returns (memory, memory_kv): ``"embeddings"`` gives memory (rows, k, H), the embeddings the decoder reads
    after bos, and memory_kv None; ``"kv"`` gives an empty memory (rows, 0, H) and memory_kv (keys, values,
    start) with rows matched (see ``Compressor.memory_kv``). Either way the decoder reads ``[bos, memory, ...]``.
    """
    if handoff == "kv":
        keys, values, start = compressor.memory_kv(contexts, layout)  # per layer (B, n_kv, k, d)
        empty = compressor.memory.new_zeros(len(expand), 0, compressor.memory.shape[-1])
        return empty, ([k[expand] for k in keys], [v[expand] for v in values], start)
    return compressor.encode(contexts, layout)[expand], None  # (rows, k, H)


@torch.no_grad()
def evaluate_compressor(compressor: Compressor, layout: Layout, data: QASet, bos_id: int, stop_ids: set[int],
                        decode, batch_size: int = 64, max_new_tokens: int = 12, limit: int | None = None,
                        bf16: bool = False, handoff: str = "embeddings") -> dict:
    """Compress each context once, then let the frozen decoder answer its questions: EM / F1 in percent.

    handoff: ``"embeddings"`` (ICAE: the decoder reads ``[bos, memory, question]``) or ``"kv"``
    (500xCompressor: the decoder reads the memory's keys/values in every layer, then ``[bos, question]``).
    Returns ``{"em", "f1", "count"}`` (percent, percent, questions scored). Raises ValueError for another handoff.
    """
    if handoff not in HANDOFFS:
        raise ValueError(f"handoff must be one of {HANDOFFS}, got {handoff!r}")
    base = compressor.base
    device = base.embed.weight.device
    count = len(data.doc) if limit is None else min(limit, len(data.doc))
    predictions = []
    for start in range(0, count, batch_size):
        rows = list(range(start, min(count, start + batch_size)))
        docs = sorted({data.doc[r] for r in rows})
        contexts = data.contexts[docs].to(device)
        expand = torch.tensor([docs.index(data.doc[r]) for r in rows], device=device)  # question -> context row
        with _autocast(device.type, bf16):
            memory, memory_kv = hand_over(compressor, contexts, layout, expand, handoff)
        memory = memory.float()  # the decoder answers in float32
        if memory_kv is not None:
            memory_kv = ([k.float() for k in memory_kv[0]], [v.float() for v in memory_kv[1]], memory_kv[2])
        with compressor.decoder():
            bos = base.embed(torch.tensor([bos_id], device=device))
            prefixes = [torch.cat([bos, memory[i], base.embed(torch.tensor(data.prompts[r], device=device))])
                        for i, r in enumerate(rows)]
            out = greedy_from_embeds(base, prefixes, max_new_tokens, stop_ids, memory_kv=memory_kv)
        predictions += [decode(ids) for ids in out]
    return squad_scores(predictions, data.answers[:count])


def train_compressor(base: Transformer, layout: Layout, train: QASet, dev: QASet, *, steps: int, batch_size: int,
                     lr: float, lora_rank: int, seed: int, eval_every: int, bos_id: int, pad_id: int,
                     stop_ids: set[int], decode, device: str, bf16: bool = False, dev_limit: int | None = None,
                     progress: bool = True, desc: str = "compressor", ae_steps: int = 0,
                     ae_cue: list[int] | None = None, eos_id: int | None = None, handoff: str = "embeddings"):
    """A fresh compressor on ``base``: ``ae_steps`` of autoencoding, then ``steps`` of QA fine-tuning.

    Autoencoding (ICAE's pretraining, Ge et al. 2024 §3.2): the frozen decoder reads ``[bos, memory, ae_cue]``
    and is scored on the context itself (its padding dropped) + ``eos_id``, a dense signal (every context token)
    that teaches the encoder to put the text into the memory before the sparse QA signal (a few answer tokens)
    takes over. Each phase has its own warm-up and cosine decay; both start from the same data order.

    log["curve"]: [{step, seconds, em, f1}] on the dev set every ``eval_every`` QA steps; ``step`` and
    ``seconds`` (training time only, evaluation excluded) count the autoencoding phase too. A batch is
    ``batch_size`` contexts (with all their questions in the QA phase). ``handoff``: how the decoder reads the
    memory, ``"embeddings"`` (ICAE) or ``"kv"`` (500xCompressor), as in ``evaluate_compressor``. Returns
    (compressor, log); log also holds "ae_loss" and "loss" (per step) and "train_seconds". Raises ValueError for
    an unknown handoff, or ``ae_steps`` without ``ae_cue`` and ``eos_id``.
    """
    if handoff not in HANDOFFS:
        raise ValueError(f"handoff must be one of {HANDOFFS}, got {handoff!r}")
    if ae_steps and (ae_cue is None or eos_id is None):
        raise ValueError("ae_steps > 0 needs ae_cue (the prompt ids) and eos_id (the end of the reconstruction)")
    torch.manual_seed(seed)
    base = copy.deepcopy(base)  # peft injects the adapters in place: every run gets its own copy
    compressor = Compressor(base, layout.num_memory, lora_rank=lora_rank, lora_alpha=2.0 * lora_rank, seed=seed)
    compressor.to(device)
    trainable = [p for p in compressor.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    by_doc: dict[int, list[int]] = {}
    for row, d in enumerate(train.doc):
        by_doc.setdefault(d, []).append(row)
    order = np.random.default_rng(seed).permutation(len(train.contexts))  # the data order: seed only
    bos = torch.tensor([bos_id], device=device)
    log, seconds = {"curve": [], "loss": []}, 0.0
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    bar = tqdm(range(ae_steps + steps), desc=desc, disable=not progress)
    for step in bar:
        autoencoding = step < ae_steps
        phase_step, phase_steps = (step, ae_steps) if autoencoding else (step - ae_steps, steps)
        sync()
        started = time.perf_counter()
        start = (phase_step * batch_size) % len(order)
        docs = [int(d) for d in np.take(order, range(start, start + batch_size), mode="wrap")]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(phase_step, phase_steps, lr, max(1, phase_steps // 20))
        with _autocast(device, bf16):
            contexts = train.contexts[docs].to(device)  # (B, n)
            if autoencoding:
                rows = list(range(len(docs)))
                prompts = [ae_cue] * len(docs)
                targets = [[t for t in context.tolist() if t != pad_id] + [eos_id] for context in contexts]
                expand = torch.arange(len(docs), device=device)
            else:
                rows = [r for d in docs for r in by_doc[d]]
                prompts, targets = [train.prompts[r] for r in rows], [train.targets[r] for r in rows]
                expand = torch.tensor([docs.index(train.doc[r]) for r in rows], device=device)
            memory, memory_kv = hand_over(compressor, contexts, layout, expand, handoff)  # (rows, k or 0, H)
            with compressor.decoder():
                prefix = torch.cat([base.embed(bos)[None].expand(len(rows), -1, -1).to(memory.dtype), memory],
                                   dim=1)  # (rows, 1 + k, H), or (rows, 1, H) with keys/values
                loss = decoder_loss(base, prefix, prompts, targets, pad_id, memory_kv=memory_kv)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        sync()
        seconds += time.perf_counter() - started
        log["loss"].append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if not autoencoding and ((phase_step + 1) % eval_every == 0 or phase_step + 1 == steps):
            compressor.eval()
            scores = evaluate_compressor(compressor, layout, dev, bos_id, stop_ids, decode, limit=dev_limit, bf16=bf16,
                                         handoff=handoff)
            compressor.train()
            log["curve"].append({"step": step + 1, "seconds": round(seconds, 2), "em": round(scores["em"], 2),
                                 "f1": round(scores["f1"], 2)})
    log["ae_loss"], log["loss"] = log["loss"][:ae_steps], log["loss"][ae_steps:]
    log["train_seconds"] = round(seconds, 2)
    return compressor, log
