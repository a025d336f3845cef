"""Offline corpora, splits, generated math, the BPE tokenizer and LM batches.

References used here are independent of the code under test: the source files and package data read
again directly, `fractions.Fraction` and brute force for the math answers, and plain numpy
re-constructions of the token streams.
"""

import ast
import hashlib
import json
import math
import operator
import random
import re
import subprocess
import sys
import sysconfig
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer, models, trainers

from minimoe.data import math_problems as corpora_math
from minimoe.data.corpora import (DOMAINS, Document, _package_dir, chunk_text, corpus_stats, load_corpus,
                          split_documents)
from minimoe.data.tokenizer import (IGNORE_INDEX, SPECIAL_TOKENS, batch_iterator, encode_documents, load_tokenizer,
                               save_tokenizer, train_tokenizer, validation_batches)

FUZZ = settings(max_examples=25, deadline=None)
BUDGET = 150_000
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_chars_per_domain=BUDGET, seed=0)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer([d.text for docs in corpus.values() for d in docs], vocab_size=1024)


# --------------------------------------------------------------------------- corpora
def test_every_domain_is_present_balanced_and_within_budget(corpus):
    assert tuple(corpus) == DOMAINS
    stats = corpus_stats(corpus)
    for domain, docs in corpus.items():
        assert docs and all(d.domain == domain for d in docs)
        assert stats[domain]["characters"] == sum(len(d.text) for d in docs)
        assert 0.9 * BUDGET <= stats[domain]["characters"] <= BUDGET
        assert len({d.source_id for d in docs}) == len(docs)


def test_code_documents_are_pieces_of_the_stdlib_files(corpus):
    root = Path(sysconfig.get_paths()["stdlib"])
    for doc in corpus["code"]:
        assert doc.source_id.startswith("stdlib:")
        relative = doc.source_id[len("stdlib:"):].rsplit("#", 1)[0]
        assert "site-packages" not in relative and "/test/" not in f"/{relative}"
        assert doc.text in (root / relative).read_text(encoding="utf-8")


def test_general_documents_are_kjv_verses(corpus):
    with open(_package_dir("bible") / "data" / "kjv.jsonl", encoding="utf-8") as handle:
        verses = {json.loads(line)["text"] for line in handle}
    for doc in corpus["general"]:
        assert doc.source_id.startswith("kjv:")
        lines = [line for line in doc.text.splitlines() if line]
        if doc.source_id.endswith("#0"):  # the first chunk of a chapter starts with "Book N"
            assert re.fullmatch(r"[1-3A-Z][A-Za-z ]* \d+", lines.pop(0)), lines[:1]
        assert lines and all(line in verses for line in lines)


def test_chat_is_chatterbot_then_labelled_templates(corpus):
    english = _package_dir("chatterbot_corpus") / "data" / "english"
    said = set()
    for path in english.glob("*.yml"):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            said.update(" ".join(str(turn).split()) for turn in conversation)
    sources = [d.source_id.split(":")[0] for d in corpus["chat"]]
    assert set(sources) == {"chatterbot", "chat-template"}
    assert sources == sorted(sources, key=lambda s: s != "chatterbot")  # the real corpus first
    for doc in corpus["chat"]:
        lines = [line for line in doc.text.splitlines() if line]
        assert all(re.match(r"(User|Assistant): ", line) for line in lines)
        if doc.source_id.startswith("chatterbot:"):
            assert all(line.split(": ", 1)[1] in said for line in lines)


def test_math_documents_are_worksheets(corpus):
    for doc in corpus["math"]:
        assert doc.source_id.startswith("math-gen:0:")
        assert doc.text.endswith("\n")
        for block in doc.text[:-1].split("\n\n"):
            assert re.fullmatch(r"Problem: .+\nSolution: .+\nAnswer: .+", block), block


def test_same_seed_same_corpus_other_seed_other_sample():
    small = dict(domains=("code", "math", "chat"), max_chars_per_domain=40_000)
    first, again, other = load_corpus(seed=3, **small), load_corpus(seed=3, **small), load_corpus(seed=4, **small)
    assert first == again
    for domain in small["domains"]:
        assert [d.text for d in first[domain]] != [d.text for d in other[domain]]


@FUZZ
@given(st.text(alphabet=st.sampled_from("ab \n\n\t"), max_size=3000), st.integers(1, 300))
def test_chunk_text_is_a_partition_at_line_ends(text, chunk_chars):
    pieces = chunk_text(text, chunk_chars)
    assert "".join(pieces) == text
    assert all(piece.endswith("\n") for piece in pieces[:-1])
    assert all(len(piece) < 2 * chunk_chars + max(map(len, text.splitlines(True)), default=0) + chunk_chars // 4
               for piece in pieces)


# --------------------------------------------------------------------------- splits
def fake_docs(n, prefix="d"):
    return [Document(f"text {i}", DOMAINS[i % 4], f"{prefix}:{i}") for i in range(n)]


def test_split_is_disjoint_covering_and_deterministic():
    docs = fake_docs(4000)
    splits = split_documents(docs, (0.8, 0.1, 0.1), seed=1)
    ids = [{d.source_id for d in part} for part in splits]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set().union(*ids) == {d.source_id for d in docs}
    assert split_documents(docs, (0.8, 0.1, 0.1), seed=1) == splits
    # the expected share of each split, within 5 binomial standard deviations
    for part, fraction in zip(splits, (0.8, 0.1, 0.1)):
        assert abs(len(part) - fraction * len(docs)) < 5 * math.sqrt(len(docs) * fraction * (1 - fraction))
    # independent reference: the same SHA-256 rule written out here
    u = {d.source_id: int(hashlib.sha256(f"split:1:{d.source_id}".encode()).hexdigest()[:16], 16) / 2**64 for d in docs}
    assert all(u[d.source_id] < 0.8 for d in splits.train)
    assert all(0.8 <= u[d.source_id] < 0.9 for d in splits.validation)
    assert all(u[d.source_id] >= 0.9 for d in splits.test)


def test_split_by_document_is_stable_and_seeded(corpus):
    docs = fake_docs(500)
    base = split_documents(docs, seed=0)
    grown = split_documents(docs + fake_docs(300, prefix="new"), seed=0)
    for old, new in zip(base, grown):  # adding documents never moves the existing ones
        assert [d for d in new if d.source_id.startswith("d:")] == old
    assert split_documents(docs, seed=1).train != base.train
    for domain, domain_docs in corpus.items():  # the real corpus: every split of every domain has documents
        assert all(split_documents(domain_docs, (0.8, 0.1, 0.1)))


def test_split_in_a_fresh_process_is_the_same():
    code = ("from minimoe.data import Document, split_documents as s;"
            "d=[Document('x','code',f'id{i}') for i in range(300)];"
            "print([x.source_id for x in s(d, seed=5).test])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "123"}).stdout
    docs = [Document("x", "code", f"id{i}") for i in range(300)]
    assert out.strip() == str([x.source_id for x in split_documents(docs, seed=5).test])


# --------------------------------------------------------------------------- math answers, checked independently
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def exact_eval(expression, x=None):
    """Evaluate + - * / and integers (and x) with Fractions: a brute-force reference."""
    def walk(node):
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.Constant):
            return Fraction(str(node.value))
        if isinstance(node, ast.Name) and node.id == "x":
            return Fraction(x)
        raise AssertionError(f"unexpected syntax in {expression!r}")
    return walk(ast.parse(expression, mode="eval").body)


def number(text):
    return Fraction(text.replace("$", ""))


UNIT_IN_BASE = {"km": 1000, "m": 1, "cm": Fraction(1, 100), "mm": Fraction(1, 1000), "kg": 1000, "g": 1,
                "mg": Fraction(1, 1000), "h": 3600, "min": 60, "s": 1, "L": 1000, "mL": 1}


def check_problem(p):
    q, a = p.question, p.answer
    if p.kind == "arithmetic":
        assert exact_eval(q.removeprefix("Evaluate ").removesuffix(".")) == number(a)
        for step in re.findall(r"(-?\d+ [-+*/] -?\d+) = (-?\d+)", p.solution):
            assert exact_eval(step[0]) == number(step[1])
    elif p.kind == "fractions":
        assert exact_eval(re.fullmatch(r"Compute (.+) and simplify\.", q)[1]) == number(a)
        assert math.gcd(*map(int, a.split("/"))) == 1 if "/" in a else True
    elif p.kind == "linear_equation":
        left, right = (re.sub(r"(\d)x", r"\1*x", side) for side in q.removeprefix("Solve for x: ")[:-1].split(" = "))
        x = int(a.removeprefix("x = "))
        assert exact_eval(left, x) == exact_eval(right, x)
        assert exact_eval(left, x + 1) - exact_eval(right, x + 1) != 0  # the solution is unique
    elif p.kind == "word_change":
        count, price, bill = re.search(r"buys (\d+) .* at \$([\d.]+) each .* a \$(\d+) bill", q).groups()
        assert number(bill) - int(count) * number(price) == number(a) >= 0
    elif p.kind == "word_share":
        total, friends = map(int, re.search(r"shares (\d+) .* among (\d+) friends", q).groups())
        each, left = map(int, re.fullmatch(r"(\d+) each, (\d+) left over", a).groups())
        assert (each, left) == divmod(total, friends)
    elif p.kind == "word_distance":
        speed, hours = re.search(r"at (\d+) km/h for ([\d.]+) hours", q).groups()
        assert int(speed) * number(hours) == number(a.removesuffix(" km"))
    elif p.kind == "word_age":
        gap, later, total = map(int, re.search(r"is (\d+) years older .* In (\d+) years .* will be (\d+)\.", q).groups())
        assert [age for age in range(200) if (age + later) + (age + gap + later) == total] == [int(a)]
    elif p.kind == "sequence":
        terms = [int(t) for t in re.search(r"sequence (.+), \.\.\.\?", q)[1].split(", ")]
        differences = {b - t for t, b in zip(terms, terms[1:])}
        if len(differences) == 1:
            assert int(a) == terms[-1] + differences.pop()
        else:
            ratios = {Fraction(b, t) for t, b in zip(terms, terms[1:])}
            assert len(ratios) == 1 and int(a) == terms[-1] * ratios.pop()
    elif p.kind == "unit_conversion":
        amount, source, target = re.fullmatch(r"Convert ([\d.]+) (\w+) to (\w+)\.", q).groups()
        assert number(amount) * UNIT_IN_BASE[source] / UNIT_IN_BASE[target] == number(a.removesuffix(f" {target}"))
    elif p.kind == "percent_of":
        pct, base = map(int, re.fullmatch(r"What is (\d+)% of (\d+)\?", q).groups())
        assert number(a) == Fraction(pct * base, 100)
    elif p.kind == "percent_increase":
        base, pct = map(int, re.search(r"\$(\d+) rises by (\d+)%", q).groups())
        assert number(a) == base + Fraction(pct * base, 100)
        assert re.fullmatch(r"\$\d+(\.\d\d)?", a)  # dollars and cents
    elif p.kind in ("gcd", "lcm"):
        m, n = map(int, re.search(r"of (\d+) and (\d+)\.", q).groups())
        if p.kind == "gcd":
            assert int(a) == max(d for d in range(1, min(m, n) + 1) if m % d == 0 and n % d == 0)
        else:
            assert int(a) == min(k for k in range(max(m, n), m * n + 1) if k % m == 0 and k % n == 0)
    elif p.kind == "prime_factorisation":
        n = int(re.search(r"Write (\d+) as", q)[1])
        product = 1
        for factor in a.split(" * "):
            prime, _, power = factor.partition("^")
            assert all(int(prime) % d for d in range(2, int(prime)))
            product *= int(prime) ** int(power or 1)
        assert product == n
    else:
        raise AssertionError(f"no independent check for kind {p.kind!r}")


def test_generated_math_answers_are_correct():
    rng = random.Random("math-test")
    kinds = set()
    for generator in corpora_math.GENERATORS:
        for _ in range(150):
            problem = generator(rng)
            check_problem(problem)
            kinds.add(problem.kind)
    assert len(kinds) == 14


def test_math_worksheets_depend_only_on_seed_and_index():
    first = [text for _, (_, text) in zip(range(5), corpora_math.math_worksheets(seed=2))]
    again = [text for _, (_, text) in zip(range(5), corpora_math.math_worksheets(seed=2))]
    other = [text for _, (_, text) in zip(range(5), corpora_math.math_worksheets(seed=3))]
    assert first == again and all(a != b for a, b in zip(first, other))


@pytest.mark.parametrize("value, text", [(Fraction(3), "3"), (Fraction(-7, 4), "-1.75"), (Fraction(1, 3), "1/3"),
                                          (Fraction(1, 1000000), "0.000001"), (Fraction(-2, 5), "-0.4")])
def test_exact_number_format(value, text):
    assert corpora_math.fmt(value) == text and Fraction(text) == value


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_layout(tokenizer):
    assert tokenizer.get_vocab_size() == 1024
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    for byte in range(256):  # every byte encodes alone, so every string can be encoded
        assert tokenizer.decode(tokenizer.encode(bytes([byte]).decode("latin-1")).ids) == chr(byte)


def test_tokenizer_round_trips_every_domain(tokenizer, corpus):
    for docs in corpus.values():
        for doc in docs[:20]:
            ids = tokenizer.encode(doc.text).ids
            assert tokenizer.decode(ids) == doc.text
            assert len(ids) < len(doc.text)  # BPE compresses


@FUZZ
@given(st.text(max_size=200) | st.sampled_from(["héllo wörld ✓ 数学 🙂", "\r\n\t\x00 <|eos|><|bos|>", "  x  "]))
def test_tokenizer_round_trips_any_unicode(tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert not set(ids) & {0, 1, 2}  # special ids come only from encode_documents


def test_tokenizer_is_byte_identical_across_runs_and_processes(tmp_path):
    texts = [d.text for docs in load_corpus(("math", "chat"), max_chars_per_domain=30_000).values() for d in docs]
    first, second = train_tokenizer(texts, vocab_size=600), train_tokenizer(texts, vocab_size=600)
    assert first.to_str() == second.to_str()
    save_tokenizer(first, tmp_path)
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    code = ("import json,sys;from minimoe.data import train_tokenizer as t;"
            "sys.stdout.write(t(json.load(open(sys.argv[1])), vocab_size=600).to_str(pretty=True))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "texts.json")], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "99", "RAYON_NUM_THREADS": "1"})
    assert out.stdout == (tmp_path / "tokenizer.json").read_text()
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert [loaded.encode(t).ids for t in texts[:10]] == [first.encode(t).ids for t in texts[:10]]
    assert loaded.encode("a <|eos|>").ids == first.encode("a <|eos|>").ids


def test_encode_documents_wraps_each_document(tokenizer, corpus):
    docs = corpus["chat"][:5] + corpus["code"][:5]
    for doc, ids in zip(docs, encode_documents(tokenizer, docs)):
        assert ids.dtype == np.int32 and ids[0] == 0 and ids[-1] == 1
        assert tokenizer.decode(ids[1:-1].tolist()) == doc.text


# --------------------------------------------------------------------------- batches
def synthetic_stream(lengths=(50, 7, 130, 2, 64, 90, 33), start=3):
    """Documents whose token values are unique positions (3, 4, 5, ...), each starting with bos=0."""
    arrays, value = [], start
    for n in lengths:
        arrays.append(np.concatenate([[0], np.arange(value, value + n - 1)]).astype(np.int32))
        value += n - 1
    domains = [DOMAINS[i % 4] for i in range(len(lengths))]
    return arrays, domains


def test_training_batches_are_shifted_windows_with_domains():
    arrays, domains = synthetic_stream()
    owner = {int(t): DOMAINS.index(d) for a, d in zip(arrays, domains) for t in a[1:]}
    # the next token inside each document; a document's last token is followed by the next <|bos|>: ignored
    successor = {int(t): int(n) for a in arrays for t, n in zip(a[1:-1], a[2:])}
    successor.update({int(a[-1]): IGNORE_INDEX for a in arrays})
    first_tokens = {int(a[1]) for a in arrays}
    batches = list(batch_iterator(arrays, domains, seq_len=16, batch_size=4, seed=0, epochs=2))
    # 376 tokens, offset o in [0, 16): (376 - o - 1) // 16 = 22 or 23 windows -> 5 full batches per epoch
    assert len(batches) == 2 * 5
    seen_inputs = []
    for b in batches:
        assert b.input_ids.shape == b.labels.shape == b.domain_ids.shape == (4, 16)
        assert (b.labels[:, :-1] == np.where(b.input_ids[:, 1:] == 0, IGNORE_INDEX, b.input_ids[:, 1:])).all()
        for token, label, domain in zip(b.input_ids.ravel(), b.labels.ravel(), b.domain_ids.ravel()):
            if token == 0:
                assert label in first_tokens
            else:
                assert label == successor[int(token)] and domain == owner[int(token)]
        seen_inputs.append(b.input_ids[b.input_ids != 0])
    first_epoch = np.concatenate(seen_inputs[:5])
    assert len(first_epoch) == len(set(first_epoch.tolist()))  # windows of one epoch never overlap
    again = list(batch_iterator(arrays, domains, seq_len=16, batch_size=4, seed=0, epochs=2))
    other = list(batch_iterator(arrays, domains, seq_len=16, batch_size=4, seed=1, epochs=2))
    assert all((a.input_ids == b.input_ids).all() for a, b in zip(batches, again))
    assert any((a.input_ids != b.input_ids).any() for a, b in zip(batches, other))


def test_validation_batches_cover_each_domain_once():
    arrays, domains = synthetic_stream()
    result = validation_batches(arrays, domains, seq_len=10, batch_size=3)
    assert set(result) == set(domains)
    for domain, batches in result.items():
        stream = np.concatenate([a for a, d in zip(arrays, domains) if d == domain])
        expected = np.where(stream[1:] == 0, IGNORE_INDEX, stream[1:])
        labels = np.concatenate([b.labels.ravel() for b in batches])
        inputs = np.concatenate([b.input_ids.ravel() for b in batches])
        assert (labels[:len(expected)] == expected).all() and (labels[len(expected):] == IGNORE_INDEX).all()
        assert (inputs[:len(stream) - 1] == stream[:-1]).all()
        assert all((b.domain_ids == DOMAINS.index(domain)).all() and len(b.input_ids) <= 3 for b in batches)


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("call, error, words", [
    (lambda: load_corpus(domains=("code", "poetry")), ValueError, "poetry"),
    (lambda: load_corpus(domains=("code", "code")), ValueError, "distinct"),
    (lambda: load_corpus(domains="code"), TypeError, "'code'"),
    (lambda: load_corpus(max_chars_per_domain=0), ValueError, "max_chars_per_domain"),
    (lambda: Document("x", "poetry", "p:1"), ValueError, "poetry"),
    (lambda: split_documents(fake_docs(3), (0.5, 0.3, 0.1)), ValueError, "summing to 1"),
    (lambda: split_documents(fake_docs(3), (0.9, 0.1)), ValueError, "three"),
    (lambda: split_documents(fake_docs(3), (1.2, -0.1, -0.1)), ValueError, "non-negative"),
    (lambda: split_documents(fake_docs(3) + fake_docs(1), seed=0), ValueError, "duplicate source_id 'd:0'"),
    (lambda: train_tokenizer(["some text"], vocab_size=100), ValueError, ">= 259"),
    (lambda: train_tokenizer([], vocab_size=512), ValueError, "non-empty"),
    (lambda: chunk_text("abc", 0), ValueError, "chunk_chars"),
    (lambda: next(batch_iterator(*synthetic_stream(), seq_len=0, batch_size=2)), ValueError, "seq_len"),
    (lambda: next(batch_iterator(synthetic_stream()[0], ["code"], seq_len=4, batch_size=2)), ValueError, "one domain"),
    (lambda: next(batch_iterator(synthetic_stream()[0], ["poem"] * 7, seq_len=4, batch_size=2)), ValueError, "poem"),
    (lambda: next(batch_iterator(*synthetic_stream(), seq_len=64, batch_size=64)), ValueError, "too few"),
])
def test_bad_inputs_raise_clear_errors(call, error, words):
    with pytest.raises(error, match=re.escape(words)):
        call()


def test_load_tokenizer_rejects_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")
    foreign = Tokenizer(models.BPE())
    foreign.train_from_iterator(["some text"], trainers.BpeTrainer(vocab_size=50, special_tokens=["<s>", "</s>"]))
    foreign.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="<\\|bos\\|>"):
        load_tokenizer(tmp_path)


def test_the_stdlib_walk_prunes_skipped_folders_and_finds_what_rglob_finds():
    import sysconfig
    from pathlib import Path

    from minimoe.data.corpora import _STDLIB_SKIP_DIRS, _python_files

    root = Path(sysconfig.get_paths()["stdlib"])
    expected = sorted(path for path in root.rglob("*.py")
                      if not _STDLIB_SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]))
    assert len(expected) > 100 and sorted(_python_files(root)) == expected
