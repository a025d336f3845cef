"""SQuAD answer scoring: normalisation, exact match (EM) and token F1.

The definition of the official SQuAD v1.1 evaluation script (Rajpurkar et al. 2016,
"SQuAD: 100,000+ Questions for Machine Comprehension of Text"):

    normalize(s) = lowercase -> remove punctuation -> remove the articles a / an / the -> collapse whitespace
    EM(pred, gold) = 1 if normalize(pred) == normalize(gold) else 0
    F1(pred, gold) = 2 P R / (P + R) over the multiset of normalised tokens,
                     P = |common| / |pred tokens|, R = |common| / |gold tokens|;  F1 = 0 when nothing is common

With several gold answers a prediction scores the maximum over them. Reported numbers are means over
questions, in percent.
"""

from __future__ import annotations

import re
import string
from collections import Counter

PUNCTUATION = set(string.punctuation)
ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (the order of SQuAD v1.1's script)."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    text = ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str | list[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer, else 0.0."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    if not golds:
        raise ValueError("exact_match needs at least one gold answer")
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def f1_score(prediction: str, gold: str | list[str]) -> float:
    """Token-overlap F1 in [0, 1] against the best-matching gold answer."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    if not golds:
        raise ValueError("f1_score needs at least one gold answer")
    return max(_f1(prediction, g) for g in golds)


def _f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], golds: list[str | list[str]]) -> dict[str, float]:
    """{"em": mean EM %, "f1": mean F1 %, "count": n} over aligned lists of predictions and gold answers."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold answers")
    if not predictions:
        raise ValueError("no predictions to score")
    em = sum(exact_match(p, g) for p, g in zip(predictions, golds)) / len(predictions)
    f1 = sum(f1_score(p, g) for p, g in zip(predictions, golds)) / len(predictions)
    return {"em": 100.0 * em, "f1": 100.0 * f1, "count": len(predictions)}
