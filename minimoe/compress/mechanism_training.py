"""Training and scoring one compressor of the mechanism experiment (``mechanism``): one schedule, two tasks.

Every step compresses ``batch_size`` fresh contexts once and trains both tasks on them (``mechanism_data``):

    loss = mean CE over answer tokens (QA)  +  mean CE over repeated-paragraph tokens (addressed autoencoding)

each averaged over its own tokens, so the short answers are not drowned by the long repeats. AdamW on the LoRA
matrices and the memory embeddings (and on the decoder's LoRA when the read path adapts the decoder), linear
warm-up then cosine decay. The decoder reads the memory as keys/values in every layer (500xCompressor, Li et
al. 2025), then ``[bos, prompt]``.

Dense, cheap curves on the dev set every ``eval_every`` steps, all teacher-forced (one decoder pass, no sampling):

    answer EM          a question counts when the argmax at every answer token *and* at the stop token is the
                       gold token. Greedy decoding then writes exactly the gold tokens and stops, so this equals
                       token-level greedy exact match by construction (tested); SQuAD EM, after normalisation,
                       can only be higher.
    repeat loss        nats per token of the addressed repeats
    value accuracy     the share of attribute-value tokens (cities, years, employers...) of the repeats whose
                       argmax is right: what the memory must carry, not the template around it

The end point is greedy decoding of every test question, scored with SQuAD EM / F1 per question.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from minimoe.compress.compressor import Compressor, to_device
from minimoe.compress.masks import Layout
from minimoe.compress.mechanism_data import MechanismSet, Rows, training_batch
from minimoe.compress.metrics import exact_match, f1_score, normalize_answer
from minimoe.compress.objectives import decoder_target_logits, greedy_from_embeds
from minimoe.compress.training import _autocast, lr_at
from minimoe.model.dense import KVCache
from minimoe.model.transformer import Transformer

EVAL_CONTEXTS = 256  # contexts per evaluation batch (the dev set in one: fewer, larger kernels)


def compile_blocks(compressor: Compressor, backend: str = "inductor") -> None:
    """Compile every block a compressor runs (its encoder's, and its decoder's when the decoder has a LoRA of its
    own) in place with ``torch.compile`` (TorchInductor), one block at a time as torchtitan does: a step of this
    30-block model is a few hundred small kernels per block (autocast's casts, RMSNorm, RoPE, each LoRA's
    scale-and-add), and fusing them is what makes it fast on a GPU. The blocks share
    one compiled graph: the block's layer index becomes a symbolic integer instead of one graph per value
    (``allow_unspec_int_on_nn_module``). The KV cache's in-place write stays eager (``KVCache.update`` is wrapped in
    ``torch.compiler.disable``, once, for every cache). Results match the eager blocks to rounding (tested), not
    bit for bit: fused kernels round in another order. ``backend``: any ``torch.compile`` backend ("aot_eager"
    traces the same graphs without generating kernels)."""
    import torch._dynamo

    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    if not getattr(KVCache.update, "_torchdynamo_disable", False):  # wrapped here, not where it is defined: the
        KVCache.update = torch.compiler.disable(KVCache.update)  # decorator would load dynamo for every model user
    for model in (compressor.base, compressor.reader):  # the decoder without a LoRA is the encoder's base
        for layer in [] if model is None else model.layers:
            layer.compile(backend=backend)


def _select(memory_kv, doc: list[int]):
    keys, values, start = memory_kv
    index = to_device(torch.tensor(doc), keys[0].device)
    return [k[index] for k in keys], [v[index] for v in values], start


def read(compressor: Compressor, memory_kv, rows: Rows, bos_id: int, pad_id: int):
    """The decoder reads each row's memory keys/values, then ``[bos, prompt]``: teacher-forced
    (logits (N, V), labels (N,), row (N,)) over every target token of ``rows`` (see ``decoder_target_logits``)."""
    kv = _select(memory_kv, rows.doc)
    with compressor.decoder() as decoder:
        bos = decoder.embed(to_device(torch.tensor([[bos_id]]), kv[0][0].device))  # (1, 1, H)
        prefix = bos.expand(len(rows.doc), -1, -1)
        return decoder_target_logits(decoder, prefix, rows.prompts, rows.targets, pad_id, memory_kv=kv)


def _rows_of(rows: Rows, docs: range) -> tuple[Rows, list[int]]:
    """The rows whose context lies in ``docs``, renumbered to the batch (and their indices in ``rows``)."""
    keep = [i for i, d in enumerate(rows.doc) if d in docs]
    return Rows([rows.doc[i] - docs.start for i in keep], [rows.prompts[i] for i in keep],
                [rows.targets[i] for i in keep], None if rows.values is None else [rows.values[i] for i in keep]), keep


def read_both(compressor: Compressor, memory_kv, questions: Rows, repeats: Rows, bos_id: int, pad_id: int):
    """``read`` of the question rows and the repeat rows in **one** decoder pass (the rows concatenated and padded
    to the longest; padding comes after every target, so no target's logits change): (question logits, labels,
    row), (repeat logits, labels, row), rows numbered within each kind. One pass instead of two halves the
    decoder's kernel launches, which bound a step of this small model on a GPU."""
    both = Rows(questions.doc + repeats.doc, questions.prompts + repeats.prompts, questions.targets + repeats.targets)
    logits, labels, row = read(compressor, memory_kv, both, bos_id, pad_id)
    split = sum(len(t) for t in questions.targets)  # row-major order: every question token comes first
    return ((logits[:split], labels[:split], row[:split]),
            (logits[split:], labels[split:], row[split:] - len(questions.doc)))


@torch.no_grad()
def teacher_forced(compressor: Compressor, layout: Layout, data: MechanismSet, bos_id: int, pad_id: int,
                   bf16: bool = False) -> dict:
    """Answer EM (%), repeat loss (nats per token) and value accuracy (%) of a compressor on ``data``,
    teacher-forced (module docstring); the reader's own bounds in the same units: ``mechanism.reader_bounds``."""
    device = compressor.memory.device
    right = tokens = 0
    loss_sum = value_right = value_count = 0.0
    for start in range(0, len(data.contexts), EVAL_CONTEXTS):
        docs = range(start, min(len(data.contexts), start + EVAL_CONTEXTS))
        with _autocast(device.type, bf16):
            memory_kv = compressor.memory_kv(data.contexts[docs.start:docs.stop].to(device), layout)
            questions, _ = _rows_of(data.questions, docs)
            repeats, _ = _rows_of(data.repeats, docs)
            (logits, labels, row), (repeat_logits, repeat_labels, _) = read_both(compressor, memory_kv, questions,
                                                                                 repeats, bos_id, pad_id)
            wrong = torch.zeros(len(questions.doc), device=device).index_add_(0, row, (logits.argmax(-1) != labels)
                                                                             .float())
            right += int((wrong == 0).sum())
            logits, labels = repeat_logits, repeat_labels
        loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        tokens += len(labels)
        values = to_device(torch.tensor([flag for flags in repeats.values for flag in flags]), device)
        value_right += float(((logits.argmax(-1) == labels) & values).sum())
        value_count += float(values.sum())
    return {"em": 100.0 * right / len(data.questions.doc), "repeat_loss": loss_sum / tokens,
            "value_accuracy": 100.0 * value_right / max(1.0, value_count)}


@torch.no_grad()
def greedy_answers(compressor: Compressor, layout: Layout, data: MechanismSet, bos_id: int, stop_ids: set[int],
                   decode, bf16: bool = False, max_new_tokens: int = 16) -> list[str]:
    """Greedy answers to every question of ``data``: the decoder reads the memory's keys/values, then
    ``[bos, question]`` (the memory computed under ``bf16`` autocast as in training, then read in float32)."""
    device = compressor.memory.device
    predictions = []
    with torch.compiler.set_stance("force_eager"):  # one token at a time: compiled blocks would recompile per length
        for start in range(0, len(data.contexts), EVAL_CONTEXTS):
            docs = range(start, min(len(data.contexts), start + EVAL_CONTEXTS))
            with _autocast(device.type, bf16):
                memory_kv = compressor.memory_kv(data.contexts[docs.start:docs.stop].to(device), layout)
            questions, _ = _rows_of(data.questions, docs)
            keys, values, begin = _select(memory_kv, questions.doc)
            kv = ([k.float() for k in keys], [v.float() for v in values], begin)
            with compressor.decoder() as decoder:
                bos = decoder.embed(torch.tensor([bos_id], device=device))
                prefixes = [torch.cat([bos, decoder.embed(torch.tensor(p, device=device))]) for p in questions.prompts]
                out = greedy_from_embeds(decoder, prefixes, max_new_tokens, stop_ids, memory_kv=kv)
            predictions += [decode(ids) for ids in out]
    return predictions


def score_answers(predictions: list[str], data: MechanismSet) -> list[dict]:
    """Per question: SQuAD EM and F1 (0/1 and [0, 1]), its paragraph, and whether a wrong answer is a value
    stated in *another* paragraph of the document (read from the wrong person)."""
    rows = []
    for i, prediction in enumerate(predictions):
        em, f1 = exact_match(prediction, data.answers[i]), f1_score(prediction, data.answers[i])
        other = {normalize_answer(v) for v in data.other_values[i]}
        rows.append({"doc": data.questions.doc[i], "paragraph": data.paragraph[i], "em": em, "f1": round(f1, 4),
                     "from_other": bool(em == 0 and normalize_answer(prediction) in other)})
    return rows


def train_step(compressor: Compressor, optimizer, layout: Layout, contexts: torch.Tensor, questions: Rows,
               repeats: Rows, bos_id: int, pad_id: int, bf16: bool = False):
    """One optimiser step on one batch: compress ``contexts`` (B, n) once, score the question rows and the repeat
    rows on that memory (one decoder pass, ``read_both``), step on the sum of the two mean losses. Returns the two
    losses (0-dim tensors)."""
    device = compressor.memory.device
    with _autocast(device.type, bf16):
        memory_kv = compressor.memory_kv(to_device(contexts, device), layout)  # per layer (B, n_kv, k, d)
        (qa_logits, qa_labels, _), (repeat_logits, repeat_labels, _) = read_both(compressor, memory_kv, questions,
                                                                                 repeats, bos_id, pad_id)
    qa_loss = F.cross_entropy(qa_logits.float(), qa_labels)
    repeat_loss = F.cross_entropy(repeat_logits.float(), repeat_labels)
    optimizer.zero_grad(set_to_none=True)
    (qa_loss + repeat_loss).backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
    optimizer.step()
    return qa_loss.detach(), repeat_loss.detach()


def train_mechanism(base: Transformer, layout: Layout, dev: MechanismSet, *, cfg, tokenizer, seed: int, lr: float,
                    steps: int, bos_id: int, pad_id: int, eos_id: int, reader_lora: bool = False,
                    compile: bool = False, progress: bool = False):
    """A fresh compressor on ``base`` trained ``steps`` steps of the stream of ``seed`` (module docstring).

    Returns (compressor, log): log["curve"] = [{step, seconds, em, repeat_loss, value_accuracy}] on ``dev``
    every ``cfg.eval_every`` steps and at the last (seconds: training time only), log["qa_loss"] and
    log["repeat_loss"] per step, log["train_seconds"]. ``compile``: the blocks run compiled (``compile_blocks``);
    the first steps then include the compilation.
    """
    from tqdm.auto import tqdm

    device, bf16 = cfg.device, cfg.bf16
    torch.manual_seed(seed)
    compressor = Compressor(copy.deepcopy(base), layout.num_memory, lora_rank=cfg.lora_rank,
                            lora_alpha=2.0 * cfg.lora_rank, seed=seed, reader_lora=reader_lora).to(device)
    trainable = [p for p in compressor.parameters() if p.requires_grad]
    if compile:
        compile_blocks(compressor)
    on_gpu = torch.device(device).type == "cuda"
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, fused=on_gpu)  # fused: a few kernels per step
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    log, seconds, losses = {"curve": [], "qa_loss": [], "repeat_loss": []}, 0.0, []
    started = time.perf_counter()  # training time runs from here to each evaluation, which it leaves out
    for step in tqdm(range(steps), disable=not progress, desc=f"mechanism seed {seed}"):
        contexts, questions, repeats = training_batch(seed, step, cfg, tokenizer, pad_id, eos_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, max(1, steps // 20))
        losses.append(train_step(compressor, optimizer, layout, contexts, questions, repeats, bos_id, pad_id, bf16))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:  # no host sync between evaluations
            sync()
            seconds += time.perf_counter() - started
            for qa_loss, repeat_loss in torch.stack([torch.stack(pair) for pair in losses]).tolist():
                log["qa_loss"].append(round(qa_loss, 4))
                log["repeat_loss"].append(round(repeat_loss, 4))
            losses = []
            compressor.eval()
            scores = teacher_forced(compressor, layout, dev, bos_id, pad_id, bf16)
            compressor.train()
            log["curve"].append({"step": step + 1, "seconds": round(seconds, 2),
                                 **{key: round(value, 4) for key, value in scores.items()}})
            started = time.perf_counter()
    log["train_seconds"] = round(seconds, 2)
    return compressor.eval(), log
