"""The generated QA documents: extractive answers inside one block, disjoint entities across splits, seeds."""

import pytest

from minimoe.compress.qa_data import (FIRST_NAMES, LAST_NAMES, answer_text, generate_documents, pack,
                                      question_prompt)
from minimoe.compress.setup import sentence_token_counter
from minimoe.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    text = [d.text() for d in generate_documents("train", 30, 9, lambda s: [0] * (len(s) // 3), 256, 64)]
    return train_tokenizer(text, vocab_size=600)


def encoder(tokenizer):
    return lambda s: tokenizer.encode(s, add_special_tokens=False).ids


def test_answers_are_spans_of_their_paragraph_and_blocks_fit(tokenizer):
    encode = encoder(tokenizer)
    docs = generate_documents("dev", 6, 0, encode, context_tokens=256, block_tokens=64, questions_per_document=5)
    for doc in docs:
        assert len(doc.paragraphs) == 4 and len(doc.questions) == 5
        for question in doc.questions:
            assert question.answer in doc.paragraphs[question.paragraph]
            name = question.text.rstrip("?").split(" of ")[-1]
            assert any(part in doc.paragraphs[question.paragraph] for part in name.split())
        ids = pack(doc, encode, 64, pad_id=2)
        assert len(ids) == 256
        for block in range(4):  # every paragraph (and its newline) lies in its own block of 64 tokens
            chunk = [t for t in ids[64 * block:64 * (block + 1)] if t != 2]
            assert tokenizer.decode(chunk).strip() == doc.paragraphs[block]


def test_distractors_share_surnames():
    docs = generate_documents("train", 10, 0, lambda s: [0] * (len(s) // 4), 512, 64)
    for doc in docs:
        assert len(doc.paragraphs) == 8
        surnames = [next(w for w in p.replace(".", " ").split() if w in LAST_NAMES["train"]) for p in doc.paragraphs]
        assert len(set(surnames)) < len(surnames), "people of one document share surnames"


def test_splits_share_no_names_and_are_seeded():
    for pools in (FIRST_NAMES, LAST_NAMES):
        assert not set(pools["train"]) & set(pools["dev"]) and not set(pools["train"]) & set(pools["test"])
        assert not set(pools["dev"]) & set(pools["test"])
    count = lambda s: [0] * (len(s) // 4)  # noqa: E731
    a = generate_documents("test", 3, 4, count, 256, 64)
    assert a == generate_documents("test", 3, 4, count, 256, 64)
    assert a != generate_documents("test", 3, 5, count, 256, 64)
    names = {w for d in a for p in d.paragraphs for w in p.split()[:2]}
    assert not names & set(FIRST_NAMES["train"] + LAST_NAMES["train"])


def test_fast_counter_equals_tokenizing_each_sentence(tokenizer):
    sentences = ["Talira Venmor was born in Port Ardel.", "Talira Venmor has 3 children.", "It is 1873."]
    assert sentence_token_counter(tokenizer)(sentences) == [len(encoder(tokenizer)(" " + s)) for s in sentences]


def test_prompt_and_answer_format():
    doc = generate_documents("train", 1, 0, lambda s: [0] * (len(s) // 4), 128, 64)[0]
    q = doc.questions[0]
    assert question_prompt(q) == f"\nQuestion: {q.text}\nAnswer:" and answer_text(q) == f" {q.answer}\n"


@pytest.mark.parametrize("kwargs, message", [
    (dict(split="val"), "split must be one of"),
    (dict(context_tokens=100), "multiple of block_tokens"),
    (dict(block_tokens=8, context_tokens=64), "block_tokens at least 24"),
    (dict(num_documents=0), "num_documents >= 1"),
])
def test_bad_arguments_raise(kwargs, message):
    args = dict(split="train", num_documents=1, seed=0, tokenize=lambda s: [0] * len(s), context_tokens=128,
                block_tokens=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generate_documents(**args)


def test_block_too_small_for_any_fact():
    with pytest.raises(ValueError, match="too small for one fact"):
        generate_documents("train", 1, 0, lambda s: [0] * len(s), 48, 24)
