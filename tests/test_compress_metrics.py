"""SQuAD v1.1 answer scoring on worked examples (normalisation, EM, token F1), checked by hand."""

import pytest

from minimoe.compress.metrics import exact_match, f1_score, normalize_answer, squad_scores


@pytest.mark.parametrize("text, expected", [
    ("The Eiffel Tower", "eiffel tower"),  # lowercase, article dropped
    ("  an   apple, a pear!  ", "apple pear"),  # punctuation, articles, whitespace
    ("Port-Ardel", "portardel"),  # punctuation is removed, not replaced by a space
    ("theatre", "theatre"),  # 'the' inside a word stays
    ("1,873.", "1873"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_uses_normalised_strings_and_the_best_gold():
    assert exact_match("the Port Ardel.", "Port Ardel") == 1.0
    assert exact_match("Port Ardel Falls", "Port Ardel") == 0.0
    assert exact_match("1873", ["1874", "1873"]) == 1.0


def test_f1_worked_examples():
    # prediction "new port ardel" vs gold "port ardel": common = 2, P = 2/3, R = 1, F1 = 2 * (2/3) / (5/3) = 0.8
    assert f1_score("New Port Ardel", "Port Ardel") == pytest.approx(0.8)
    # repeated tokens count as a multiset: pred "a b b", gold "b" -> common 1, P = 1/3, R = 1, F1 = 0.5
    assert f1_score("x y y", "y") == pytest.approx(0.5)
    assert f1_score("Velmora", "Port Ardel") == 0.0
    assert f1_score("", "Port Ardel") == 0.0
    assert f1_score("Saint Dronpai", ["Dronpai", "Saint Dronpai"]) == 1.0


def test_squad_scores_are_percent_means():
    scores = squad_scores(["Port Ardel", "new port ardel", "1900"], ["Port Ardel", "Port Ardel", "1873"])
    assert scores == {"em": pytest.approx(100 / 3), "f1": pytest.approx(100 * (1 + 0.8 + 0) / 3), "count": 3}


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2 predictions for 1 gold"):
        squad_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        squad_scores([], [])
    with pytest.raises(ValueError, match="at least one gold"):
        f1_score("a", [])
