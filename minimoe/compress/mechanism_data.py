"""Data for the mechanism experiment: a seeded stream of fresh training documents, and held-out sets.

Every training step draws ``batch_size`` **new** documents (four one-person paragraphs, distinct names), so a
compressor never sees a context twice, and every step trains two tasks on the same contexts (``mechanism``):

    QA                  [memory] bos "\\nQuestion: Where was Talira Venmor born?\\nAnswer:"  ->  " Port Ardel\\n"
    addressed repeat    [memory] bos "\\nRepeat the paragraph about Talira Venmor:\\n"       ->  paragraph + eos

The repeat asks for one paragraph by the full name of its person: the dense signal of autoencoding (ICAE's
pretraining, Ge et al. 2024), but addressed the way QA is, by name, rather than "the whole text in order".
The batch of step ``s`` is a pure function of ``(seed, s)``, so two compressors trained with one seed see the
same contexts, questions and repeats in the same order; only their masks differ.

Held-out sets (dev, test) are documents of the dev / test name pools. Each holds every question of its
documents and one repeat per document (paragraph ``d mod paragraphs`` of document ``d``, so every paragraph
index is covered), with a mask over each repeat's target tokens that marks the attribute values (the city, the
year, the employer...), the tokens a compressor must carry rather than guess from the template.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from minimoe.compress.qa_data import QADocument, answer_text, generate_documents, pack, question_prompt, repeat_prompt
from minimoe.compress.setup import sentence_token_counter

STREAM_OFFSET = 1_000_003  # the stream's documents use seeds far from the fixed sets' (seed, seed + 1, ...)


@dataclass
class Rows:
    """Decoder rows over a set of contexts: row i reads context ``doc[i]``, then ``prompts[i]``, scored on
    ``targets[i]``. ``values[i]`` (repeats only) marks the target tokens that belong to an attribute value."""

    doc: list[int]
    prompts: list[list[int]]
    targets: list[list[int]]
    values: list[list[bool]] | None = None


@dataclass
class MechanismSet:
    """Contexts (D, n) int64 with their question rows and repeat rows, and what the statistics need."""

    contexts: torch.Tensor
    questions: Rows
    repeats: Rows
    answers: list[str]  # gold answer of every question row
    paragraph: list[int]  # paragraph index of every question row
    other_values: list[set[str]]  # per question row: every value stated in the *other* paragraphs of its document


def value_mask(tokenizer, paragraph: str, values: tuple[str, ...]) -> tuple[list[int], list[bool]]:
    """The paragraph's token ids and, per token, whether it overlaps one of the ``values`` (character spans
    from the tokenizer's offsets). Raises ValueError when a value is not in the paragraph."""
    encoding = tokenizer.encode(paragraph, add_special_tokens=False)
    spans, start = [], 0
    for value in values:
        at = paragraph.find(value, start)
        if at < 0:
            at = paragraph.find(value)
        if at < 0:
            raise ValueError(f"value {value!r} is not stated in the paragraph {paragraph!r}")
        spans.append((at, at + len(value)))
        start = at + len(value)
    flags = [any(a < end and b > begin for begin, end in spans) for a, b in encoding.offsets]
    return list(encoding.ids), flags


def rows_for(documents: list[QADocument], tokenizer, eos_id: int, repeat_paragraphs: list[list[int]]):
    """Question rows (every question of every document) and repeat rows (the given paragraphs of each)."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    questions = Rows([], [], [])
    answers, paragraph, other_values = [], [], []
    for d, document in enumerate(documents):
        for q in document.questions:
            questions.doc.append(d)
            questions.prompts.append(encode(question_prompt(q)))
            questions.targets.append(encode(answer_text(q)))
            answers.append(q.answer)
            paragraph.append(q.paragraph)
            other_values.append({v for j, vs in enumerate(document.values) if j != q.paragraph for v in vs})
    repeats = Rows([], [], [], [])
    for d, (document, chosen) in enumerate(zip(documents, repeat_paragraphs)):
        for j in chosen:
            ids, flags = value_mask(tokenizer, document.paragraphs[j], document.values[j])
            repeats.doc.append(d)
            repeats.prompts.append(encode(repeat_prompt(document, j)))
            repeats.targets.append(ids + [eos_id])
            repeats.values.append(flags + [False])
    return questions, repeats, answers, paragraph, other_values


def held_out_set(split: str, num_documents: int, cfg, tokenizer, pad_id: int, eos_id: int) -> MechanismSet:
    """``num_documents`` documents of ``split`` (dev or test) with every question and one repeat each."""
    documents = _documents(split, num_documents, cfg.seed, cfg, tokenizer)
    paragraphs = len(documents[0].paragraphs)
    questions, repeats, answers, paragraph, other = rows_for(documents, tokenizer, eos_id,
                                                             [[d % paragraphs] for d in range(len(documents))])
    return MechanismSet(_contexts(documents, tokenizer, cfg.block_tokens, pad_id), questions, repeats, answers,
                        paragraph, other)


def training_batch(seed: int, step: int, cfg, tokenizer, pad_id: int, eos_id: int):
    """Step ``step`` of the stream of ``seed``: (contexts (B, n) int64, question rows, repeat rows), with
    ``cfg.ae_rows_per_context`` distinct paragraphs of each context asked back."""
    documents = _documents("train", cfg.batch_size, STREAM_OFFSET * (seed + 1) + step, cfg, tokenizer)
    paragraphs = len(documents[0].paragraphs)
    rng = np.random.default_rng([seed, step])
    chosen = [sorted(rng.choice(paragraphs, size=cfg.ae_rows_per_context, replace=False).tolist())
              for _ in documents]
    questions, repeats, *_ = rows_for(documents, tokenizer, eos_id, chosen)
    return _contexts(documents, tokenizer, cfg.block_tokens, pad_id), questions, repeats


def _documents(split: str, count: int, seed: int, cfg, tokenizer) -> list[QADocument]:
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    return generate_documents(split, count, seed, encode, cfg.context_tokens, cfg.block_tokens,
                              cfg.questions_per_document, sentence_token_counter(tokenizer), cfg.distinct_names)


def _contexts(documents: list[QADocument], tokenizer, block_tokens: int, pad_id: int) -> torch.Tensor:
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    return torch.tensor([pack(d, encode, block_tokens, pad_id) for d in documents], dtype=torch.long)  # (D, n)
