"""Extractive QA documents generated offline, for training and scoring context compressors.

No QA data set with passages installs offline, so documents are generated: each is a list of *paragraphs*,
one per person, and each paragraph states some of that person's attributes:

    Talira Venmor was born in Port Ardel in 1873. Talira Venmor works as a pharmacist for Orlen Shipping.
    Talira Venmor lives in Velmora. Talira Venmor won the Dask Medal in 1911. Talira Venmor has 3 children.

Questions are extractive ("Where was Talira Venmor born?" -> "Port Ardel"): the answer is a span of one
paragraph, and every paragraph fits in one block of ``block_tokens`` tokens (``pack`` pads each paragraph
to a block), so an answer never straddles a chunk whose size is a multiple of the block. Distractors share
surface forms: people of one document share surnames and first names, the same city is a birthplace of one
and a home of another, years of birth and of prizes mix. Answering needs the right (person, relation) pair.
With ``distinct_names=True`` no two people of a document share a first name or a surname: finding the
paragraph is easy, and what is left to learn is carrying its facts.

Names, cities, companies and prizes are built from syllables; the syllables of first and last names are cut
into disjoint train / dev / test pools, so the three splits share **no entity** (no full name, first name or
surname). Attribute values (cities, professions, years) come from one pool for all splits: a model cannot
learn who lives where, only how to read it. A no-context guess is therefore poor by construction (about
1 in 50 cities, 1 in 40 professions, 1 in 200 years). Everything is a pure function of ``seed``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

SPLITS = ("train", "dev", "test")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "tr", "kal", "mor")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea")
_CODAS = ("", "n", "r", "l", "s", "th", "nd", "mir", "ven")
PROFESSIONS = ("pharmacist", "carpenter", "teacher", "surgeon", "architect", "baker", "pilot", "lawyer", "nurse",
               "chemist", "librarian", "painter", "farmer", "engineer", "journalist", "tailor", "sailor", "judge",
               "dentist", "geologist", "florist", "butcher", "translator", "mechanic", "composer", "gardener",
               "astronomer", "potter", "locksmith", "banker", "economist", "firefighter", "plumber", "miner",
               "veterinarian", "historian", "jeweler", "clockmaker", "brewer", "weaver")
COMPANY_KINDS = ("Shipping", "Foods", "Textiles", "Railways", "Mining", "Press", "Bank", "Motors", "Glassworks")
PRIZE_KINDS = ("Medal", "Prize", "Award", "Cup")
CITY_FORMS = ("{}", "Port {}", "New {}", "{} Falls", "Saint {}")


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(_syllable(rng) for _ in range(syllables)).capitalize()


def _pool(seed: str, size: int, syllables: int) -> list[str]:
    rng, words = random.Random(seed), []
    while len(words) < size:
        word = _word(rng, syllables)
        if word not in words and len(word) <= 11:
            words.append(word)
    return words


def _split_pool(words: list[str]) -> dict[str, list[str]]:
    """70 / 15 / 15 percent, disjoint."""
    a, b = int(0.7 * len(words)), int(0.85 * len(words))
    return {"train": words[:a], "dev": words[a:b], "test": words[b:]}


FIRST_NAMES = _split_pool(_pool("first", 400, 2))
LAST_NAMES = _split_pool([w for w in _pool("last", 460, 2) if w not in set(sum(FIRST_NAMES.values(), []))][:400])
CITIES = [form.format(word) for form, word in zip(CITY_FORMS * 20, _pool("city", 50, 2))]
COMPANIES = [f"{word} {kind}" for word, kind in zip(_pool("company", 45, 2), COMPANY_KINDS * 5)]
PRIZES = [f"{word} {kind}" for word, kind in zip(_pool("prize", 24, 1), PRIZE_KINDS * 6)]

# attribute: (fact templates, question template); {n} = the full name
FACTS = {
    "birthplace": (("{n} was born in {v}.", "The birthplace of {n} is {v}."), "Where was {n} born?"),
    "birth_year": (("{n} was born in the year {v}.", "{n} came into the world in {v}."),
                   "In which year was {n} born?"),
    "profession": (("{n} works as a {v}.", "By profession, {n} is a {v}."), "What is the profession of {n}?"),
    "employer": (("{n} is employed by {v}.", "The employer of {n} is {v}."), "Which company employs {n}?"),
    "home": (("{n} lives in {v}.", "These days {n} makes a home in {v}."), "In which city does {n} live?"),
    "prize_year": (("{n} won the {p} in {v}.", "In {v}, {n} received the {p}."), "In which year did {n} win the {p}?"),
    "children": (("{n} has {v} children.", "{n} is the parent of {v} children."), "How many children does {n} have?"),
}


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    paragraph: int  # index of the paragraph that holds the answer
    attribute: str = ""  # the FACTS key it asks for


@dataclass(frozen=True)
class QADocument:
    paragraphs: tuple[str, ...]
    questions: tuple[Question, ...]
    split: str
    people: tuple[str, ...] = ()  # the full name each paragraph is about
    values: tuple[tuple[str, ...], ...] = ()  # the attribute values each paragraph states, in order of mention

    def text(self) -> str:
        return "\n".join(self.paragraphs)


def _person(rng: random.Random, family: list[str], firsts: list[str]) -> tuple[str, dict]:
    name = f"{rng.choice(firsts)} {rng.choice(family)}"
    values = {"birthplace": rng.choice(CITIES), "birth_year": str(rng.randint(1800, 1999)),
              "profession": rng.choice(PROFESSIONS), "employer": rng.choice(COMPANIES),
              "home": rng.choice(CITIES), "prize_year": str(rng.randint(1820, 2020)),
              "children": str(rng.randint(0, 9)), "prize": rng.choice(PRIZES)}
    return name, values


def generate_documents(split: str, num_documents: int, seed: int, tokenize: Callable[[str], list[int]],
                       context_tokens: int = 512, block_tokens: int = 64,
                       questions_per_document: int = 4,
                       count_each: Callable[[list[str]], list[int]] | None = None,
                       distinct_names: bool = False) -> list[QADocument]:
    """``num_documents`` documents of ``context_tokens // block_tokens`` paragraphs, each paragraph fitting in
    ``block_tokens - 1`` tokens of ``tokenize`` (one slot is kept for the newline ``pack`` adds).

    ``distinct_names``: every person of a document gets a first name and a surname no other person of that
    document has, so finding a paragraph by name is easy and the hard part left is carrying its facts; by default
    people share a few first names and surnames (distractors that make binding names to facts the hard part).

    ``count_each`` (optional, faster) returns the token count of ``" " + s`` for each sentence ``s`` of a list
    (a paragraph is then checked once more with ``tokenize``). Raises ValueError for an unknown split or sizes
    that do not fit a paragraph.
    """
    count_each = count_each or (lambda texts: [len(tokenize(" " + text)) for text in texts])
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if block_tokens < 24 or context_tokens % block_tokens or context_tokens < block_tokens:
        raise ValueError(f"context_tokens ({context_tokens}) must be a positive multiple of block_tokens "
                         f"({block_tokens}), and block_tokens at least 24 (one fact and a name)")
    if num_documents < 1 or questions_per_document < 1:
        raise ValueError(f"need num_documents >= 1 and questions_per_document >= 1, got {num_documents}, "
                         f"{questions_per_document}")
    rng = random.Random(f"qa:{split}:{seed}")
    num_paragraphs = context_tokens // block_tokens
    documents = []
    for _ in range(num_documents):
        if distinct_names:  # person i: first name i and surname i, no two alike
            families = rng.sample(LAST_NAMES[split], k=num_paragraphs)
            firsts = rng.sample(FIRST_NAMES[split], k=num_paragraphs)
        else:
            families = rng.sample(LAST_NAMES[split], k=max(2, num_paragraphs // 3))  # shared surnames: distractors
            firsts = rng.sample(FIRST_NAMES[split], k=max(2, num_paragraphs // 2))  # shared first names too
        paragraphs, facts, names, people, stated_values = [], [], set(), [], []
        while len(paragraphs) < num_paragraphs:
            if distinct_names:
                name, values = _person(rng, [families[len(paragraphs)]], [firsts[len(paragraphs)]])
            else:
                name, values = _person(rng, families, firsts)
            if name in names:
                continue
            names.add(name)
            attributes = rng.sample(list(FACTS), k=len(FACTS))
            candidates = [rng.choice(FACTS[a][0]).format(n=name, v=values[a], p=values["prize"]) for a in attributes]
            lengths = count_each(candidates)  # tokens of " " + sentence, for every candidate sentence
            sentences, stated, used = [], [], 1  # one token for the newline
            for attribute, sentence, length in zip(attributes, candidates, lengths):
                if used + length <= block_tokens:
                    sentences.append(sentence)
                    stated.append(attribute)
                    used += length
            while sentences and len(tokenize(" ".join(sentences) + "\n")) > block_tokens:  # exact check
                sentences.pop()
                stated.pop()
            if not stated:
                raise ValueError(f"block_tokens={block_tokens} is too small for one fact about {name}")
            facts += [(len(paragraphs), name, attribute, values) for attribute in stated]
            paragraphs.append(" ".join(sentences))
            people.append(name)
            stated_values.append(tuple(values[attribute] for attribute in stated))
        questions = []
        for index, name, attribute, values in rng.sample(facts, k=min(questions_per_document, len(facts))):
            text = FACTS[attribute][1].format(n=name, p=values["prize"])
            questions.append(Question(text, values[attribute], index, attribute))
        documents.append(QADocument(tuple(paragraphs), tuple(questions), split, tuple(people), tuple(stated_values)))
    return documents


def repeat_prompt(document: QADocument, paragraph: int) -> str:
    """Addressed autoencoding: the cue asking for one paragraph back by the full name of its person."""
    return f"\nRepeat the paragraph about {document.people[paragraph]}:\n"


def pack(document: QADocument, tokenize: Callable[[str], list[int]], block_tokens: int, pad_id: int) -> list[int]:
    """The context ids: every paragraph + newline, right-padded with ``pad_id`` to ``block_tokens`` tokens."""
    ids = []
    for paragraph in document.paragraphs:
        block = tokenize(paragraph + "\n")
        if len(block) > block_tokens:
            raise ValueError(f"a paragraph takes {len(block)} tokens, more than block_tokens={block_tokens}")
        ids += block + [pad_id] * (block_tokens - len(block))
    return ids


def question_prompt(question: Question) -> str:
    """What the decoder reads after the context (or its memory): the question and an answer cue."""
    return f"\nQuestion: {question.text}\nAnswer:"


def answer_text(question: Question) -> str:
    """The target the decoder writes: a space, the answer span, a newline (the stop token)."""
    return f" {question.answer}\n"
