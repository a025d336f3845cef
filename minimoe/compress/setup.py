"""The experiment's fixed parts: tokenizer, QA splits, the pretrained reader and its bounds.

The reader is a Llama (``minimoe.model``), one of two bases (``cfg.base``):
    own       pretrained from scratch here, with a BPE trained on the project's corpora and the QA text
    smollm2   SmolLM2-135M loaded from its GGUF file with its own tokenizer (``minimoe.compress.smollm2``),
              then fine-tuned (its preset uses QA rows alone)
Either is trained on rows of two kinds, mixed by ``cfg.qa_fraction``:
    corpus rows   windows of the project's four corpora (``minimoe.data``: code, math, chat, general)
    QA rows       ``<bos> context  \\nQuestion: q1\\nAnswer: a1\\n  \\nQuestion: q2 ...`` from the train split
so that it reads extractive questions well with the context in front of it (the upper bound) and cannot
guess them without (the lower bound). Its weights are rounded to bfloat16 once trained, so the checkpoint
saved (half the bytes) *is* the model every compressor reads.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from minimoe.compress.qa_data import answer_text, generate_documents, pack, question_prompt, repeat_prompt
from minimoe.compress.training import QASet, build_qa_set, evaluate_reader, pretrain_base
from minimoe.data.corpora import DOMAINS, load_corpus
from minimoe.data.tokenizer import BOS, EOS, PAD, load_tokenizer, save_tokenizer, train_tokenizer
from minimoe.model.model_config import ModelConfig
from minimoe.model.transformer import Transformer

SPECIAL_FILE = "special_tokens.json"  # bos / eos / pad ids of a base that brings its own tokenizer


@dataclass
class Prepared:
    tokenizer: object
    base: Transformer
    train: QASet
    dev: QASet
    test: QASet
    bos_id: int
    pad_id: int
    stop_ids: set
    eos_id: int

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids).strip()


def _approximate_tokens(text: str) -> list[int]:
    return [0] * (len(text) // 3 + 1)  # only to size paragraphs of the tokenizer's own training text


def sentence_token_counter(tokenizer):
    """Token counts of " " + s for each sentence s, from one encoding of all of them (byte-level BPE splits
    at the spaces, so the counts add up), assigning each token to the sentence its first character is in."""
    def count_each(sentences: list[str]) -> list[int]:
        starts = np.cumsum([0] + [len(s) + 1 for s in sentences[:-1]])  # where " " + sentence i begins
        encoding = tokenizer.encode("".join(" " + s for s in sentences), add_special_tokens=False)
        owner = np.searchsorted(starts, [start for start, _ in encoding.offsets], side="right") - 1
        return np.bincount(owner, minlength=len(sentences)).tolist()
    return count_each


def _qa_sets(cfg, encode, pad_id: int, tokenizer) -> dict[str, QASet]:
    sizes = {"train": cfg.train_documents, "dev": cfg.dev_documents, "test": cfg.test_documents}
    return {split: build_qa_set(generate_documents(split, count, cfg.seed, encode, cfg.context_tokens,
                                                   cfg.block_tokens, cfg.questions_per_document,
                                                   sentence_token_counter(tokenizer), cfg.distinct_names),
                                encode, cfg.block_tokens, pad_id)
            for split, count in sizes.items()}


def model_config(cfg, vocab_size: int, row_tokens: int) -> ModelConfig:
    max_seq_len = max(2 * cfg.context_tokens, 64 * -(-row_tokens // 64))  # room for context + memory and a QA row
    return ModelConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                       num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size,
                       max_seq_len=max_seq_len, tie_word_embeddings=True, rope_theta=10000.0)


def pretraining_rows(cfg, tokenizer, encode, bos_id: int, pad_id: int, eos_id: int | None = None) -> np.ndarray:
    """(N, T) int32: QA rows and corpus windows, shuffled (seeded), padded with ``pad_id``.

    A QA row keeps the first p paragraphs of a document, p uniform in 1 .. context_tokens / block_tokens (short
    contexts first teach the lookup, long ones its reach), then up to ``pretrain_questions`` questions about them,
    then ``pretrain_repeats`` addressed repeats (``repeat_prompt`` + the paragraph + eos; at most one, as it ends
    the row) so that the reader also knows the autoencoding task from the full context.
    """
    if cfg.pretrain_repeats not in (0, 1):
        raise ValueError(f"pretrain_repeats must be 0 or 1 (a repeat ends its row with eos), got {cfg.pretrain_repeats}")
    documents = generate_documents("train", cfg.pretrain_documents, cfg.seed + 1, encode, cfg.context_tokens,
                                   cfg.block_tokens, 10 * cfg.pretrain_questions, sentence_token_counter(tokenizer),
                                   cfg.distinct_names)
    rng = np.random.default_rng(cfg.seed + 1)
    qa_rows = []
    for document in documents:
        keep = int(rng.integers(1, len(document.paragraphs) + 1))
        questions = [q for q in document.questions if q.paragraph < keep][:cfg.pretrain_questions]
        short = dataclasses.replace(document, paragraphs=document.paragraphs[:keep])
        row = [bos_id] + pack(short, encode, cfg.block_tokens, pad_id)
        for question in questions:
            row += encode(question_prompt(question)) + encode(answer_text(question))
        if cfg.pretrain_repeats:
            paragraph = int(rng.integers(0, keep))
            row += encode(repeat_prompt(document, paragraph)) + encode(document.paragraphs[paragraph]) + [eos_id]
        qa_rows.append(row)
    length = max(len(row) for row in qa_rows)
    num_corpus = int(round(len(qa_rows) * (1 - cfg.qa_fraction) / cfg.qa_fraction))
    stream = np.zeros(0, dtype=np.int32)
    if num_corpus:
        corpus = load_corpus(max_chars_per_domain=cfg.corpus_chars, seed=cfg.seed)
        texts = [doc.text for d in DOMAINS for doc in corpus[d]]
        stream = np.concatenate([[bos_id, *e.ids] for e in tokenizer.encode_batch(texts, add_special_tokens=False)])
    starts = np.random.default_rng(cfg.seed).integers(0, max(1, len(stream) - length), num_corpus)
    rows = np.full((len(qa_rows) + num_corpus, length), pad_id, dtype=np.int32)
    for i, row in enumerate(qa_rows):
        rows[i, :len(row)] = row
    for i, start in enumerate(starts):
        window = stream[start:start + length]
        rows[len(qa_rows) + i, :len(window)] = window
    return rows[np.random.default_rng(cfg.seed).permutation(len(rows))]


def prepare(cfg, out: Path, progress: bool = True) -> dict:
    """Tokenizer, reader and bounds into ``out`` (skipped when ``out/prepare.json`` exists); returns that info."""
    info_path = out / "prepare.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    initial = None
    if cfg.base == "smollm2":
        from minimoe.compress.smollm2 import load_smollm2

        initial, tokenizer, special = load_smollm2(cfg.gguf)
        tokenizer.save(str(out / "tokenizer.json"))
        (out / SPECIAL_FILE).write_text(json.dumps(special) + "\n")
    elif (out / "tokenizer.json").is_file():  # a tokenizer given with the run (e.g. from an earlier prepare)
        tokenizer = load_tokenizer(out / "tokenizer.json")
    else:
        corpus = load_corpus(max_chars_per_domain=cfg.corpus_chars, seed=cfg.seed)
        qa_text = [d.text() for d in generate_documents("train", 400, cfg.seed + 2, _approximate_tokens,
                                                        cfg.context_tokens, cfg.block_tokens)]
        tokenizer = train_tokenizer([doc.text for d in DOMAINS for doc in corpus[d]] + qa_text,
                                    vocab_size=cfg.vocab_size)
        save_tokenizer(tokenizer, out / "tokenizer.json")
    prepared = load_prepared(cfg, out, base=False)
    rows = pretraining_rows(cfg, tokenizer, prepared.encode, prepared.bos_id, prepared.pad_id, prepared.eos_id)
    config = initial.config if initial is not None else model_config(cfg, tokenizer.get_vocab_size(), rows.shape[1])
    if rows.shape[1] > config.max_seq_len:
        raise ValueError(f"training rows of {rows.shape[1]} tokens exceed the base's max_seq_len={config.max_seq_len}")
    model, log = pretrain_base(config, rows, cfg.pretrain_steps, cfg.pretrain_batch, cfg.pretrain_lr, cfg.device,
                               cfg.bf16, cfg.seed, prepared.pad_id, cfg.pretrain_max_seconds, progress, initial)
    model = model.to(torch.bfloat16)
    model.save(out / "base")  # bfloat16 weights: the reader every compressor uses
    base = Transformer.load(out / "base", device=cfg.device, dtype=torch.float32).eval()
    bounds = {}
    for split in ("dev", "test"):
        data = getattr(prepared, split)
        for mode in ("full", "none"):
            bounds[f"{split}_{mode}"] = evaluate_reader(base, data, mode, prepared.bos_id, prepared.stop_ids,
                                                        prepared.decode)
    info = {"base": cfg.base, "pretrain": {**log, "rows": int(rows.shape[0]), "row_tokens": int(rows.shape[1]),
                         "parameters": base.num_parameters()}, "bounds": bounds,
            "questions": {s: len(getattr(prepared, s).doc) for s in ("train", "dev", "test")},
            "device": torch.cuda.get_device_name() if cfg.device == "cuda" else "cpu"}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def load_prepared(cfg, out: Path, base: bool = True) -> Prepared:
    """Tokenizer and QA sets (regenerated: they are a pure function of cfg and the tokenizer) and the reader."""
    if (out / SPECIAL_FILE).is_file():  # a base with its own tokenizer (smollm2)
        tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
        special = json.loads((out / SPECIAL_FILE).read_text())
    else:
        tokenizer = load_tokenizer(out / "tokenizer.json")
        special = {name: tokenizer.token_to_id(token) for name, token in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    pad_id, bos_id = special["pad"], special["bos"]
    newline = encode("\n")
    if len(newline) != 1:
        raise ValueError(f"the tokenizer encodes a newline as {newline}; the answers stop at a one-token newline")
    sets = _qa_sets(cfg, encode, pad_id, tokenizer)
    model = Transformer.load(out / "base", device=cfg.device, dtype=torch.float32).eval() if base else None
    return Prepared(tokenizer, model, sets["train"], sets["dev"], sets["test"], bos_id, pad_id,
                    {newline[0], special["eos"]}, special["eos"])
