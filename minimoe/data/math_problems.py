"""Generated math problems with worked answers: the `math` domain of the corpus.

Each problem is drawn from one of a few families (arithmetic with precedence, fractions, linear
equations, word problems, sequences, unit conversions, percentages, gcd/lcm, prime factorisation),
with numbers chosen so that every answer is exact. All arithmetic is done with `fractions.Fraction`,
so there is no rounding anywhere. A problem is rendered as

    Problem: <question>
    Solution: <worked steps>
    Answer: <answer>

and a *worksheet* (one corpus document) is several problems separated by blank lines.

Determinism: the random generator of worksheet i is `random.Random(f"math:{seed}:{i}")`; seeding
`random.Random` with a string hashes it with SHA-512, so the text is the same in every process.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator


@dataclass(frozen=True)
class MathProblem:
    kind: str
    question: str
    solution: str
    answer: str

    def render(self) -> str:
        return f"Problem: {self.question}\nSolution: {self.solution}\nAnswer: {self.answer}\n"


def fmt(value: Fraction) -> str:
    """An exact number as text: integer, terminating decimal, or a reduced fraction a/b."""
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return f"{value.numerator}/{value.denominator}"
    digits = 0
    while (value * 10**digits).denominator != 1:
        digits += 1
    scaled = abs(value.numerator) * 10**digits // value.denominator  # exact: 10**digits clears the denominator
    whole, frac = divmod(scaled, 10**digits)
    return f"{'-' if value < 0 else ''}{whole}.{frac:0{digits}d}"


def money(value: Fraction) -> str:
    """Dollars with cents when there are any: $26, $7.50."""
    text = fmt(value)
    if "." in text:
        whole, cents = text.split(".")
        text = f"{whole}.{cents:0<2}"
    return f"${text}"


# --------------------------------------------------------------------------- arithmetic
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def _expression(rng: random.Random, leaves: int) -> tuple[str, Fraction, int, list[str]]:
    """A random expression tree over small integers: (text, value, precedence, evaluation steps)."""
    if leaves == 1:
        n = rng.randint(1, 20)
        return str(n), Fraction(n), 3, []
    left_leaves = rng.randint(1, leaves - 1)
    left, lv, lp, lsteps = _expression(rng, left_leaves)
    right, rv, rp, rsteps = _expression(rng, leaves - left_leaves)
    op = rng.choice("+-*/")
    if op == "/" and (rv in (0, 1) or (lv / rv).denominator != 1):
        op = rng.choice("+-*")  # keep every intermediate an integer
    value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else None}[op]
    prec = _PRECEDENCE[op]
    left_text = f"({left})" if lp < prec else left
    right_text = f"({right})" if rp < prec or (rp == prec and op in "-/") else right
    step = f"{fmt(lv)} {op} {fmt(rv)} = {fmt(value)}"
    return f"{left_text} {op} {right_text}", value, prec, lsteps + rsteps + [step]


def arithmetic(rng: random.Random) -> MathProblem:
    text, value, _, steps = _expression(rng, rng.randint(2, 4))
    return MathProblem("arithmetic", f"Evaluate {text}.",
                       "Work from the innermost operations outwards: " + "; ".join(steps) + ".", fmt(value))


# --------------------------------------------------------------------------- fractions
def fractions_problem(rng: random.Random) -> MathProblem:
    a = Fraction(rng.randint(1, 11), rng.randint(2, 12))
    b = Fraction(rng.randint(1, 11), rng.randint(2, 12))
    op = rng.choice(["+", "-", "*", "/"])
    a_txt, b_txt = f"{a.numerator}/{a.denominator}", f"{b.numerator}/{b.denominator}"
    if op in "+-":
        common = math.lcm(a.denominator, b.denominator)
        an, bn = a.numerator * common // a.denominator, b.numerator * common // b.denominator
        result = a + b if op == "+" else a - b
        raw = an + bn if op == "+" else an - bn
        steps = (f"The common denominator is {common}: {a_txt} = {an}/{common} and {b_txt} = {bn}/{common}. "
                 f"Then {an}/{common} {op} {bn}/{common} = {raw}/{common}")
    elif op == "*":
        result = a * b
        raw_n, raw_d = a.numerator * b.numerator, a.denominator * b.denominator
        steps = f"Multiply tops and bottoms: ({a.numerator}*{b.numerator})/({a.denominator}*{b.denominator}) = {raw_n}/{raw_d}"
    else:
        result = a / b
        raw_n, raw_d = a.numerator * b.denominator, a.denominator * b.numerator
        steps = (f"Dividing by {b_txt} is multiplying by {b.denominator}/{b.numerator}: "
                 f"({a.numerator}*{b.denominator})/({a.denominator}*{b.numerator}) = {raw_n}/{raw_d}")
    answer = f"{result.numerator}/{result.denominator}" if result.denominator != 1 else str(result.numerator)
    ending = "already in lowest terms" if steps.endswith(f" = {answer}") else f"which simplifies to {answer}"
    # "5/4 / 1/4" would mean ((5/4)/1)/4: bracket the fractions around * and /
    shown = f"{a_txt} {op} {b_txt}" if op in "+-" else f"({a_txt}) {op} ({b_txt})"
    return MathProblem("fractions", f"Compute {shown} and simplify.", f"{steps}, {ending}.", answer)


# --------------------------------------------------------------------------- linear equations
def _linear(coef: int, const: int) -> str:
    """coef*x + const as text, e.g. '3x - 4', 'x', '-x + 2', '7'."""
    parts = []
    if coef:
        parts.append({1: "x", -1: "-x"}.get(coef, f"{coef}x"))
    if const or not parts:
        parts.append(f"{const}" if not parts else f"{'+' if const > 0 else '-'} {abs(const)}")
    return " ".join(parts)


def linear_equation(rng: random.Random) -> MathProblem:
    x = rng.randint(-12, 12)
    a, c = rng.sample([k for k in range(-9, 10) if k], 2)  # a != c, so exactly one solution
    if rng.random() < 0.4:
        c = 0
    b = rng.randint(-30, 30)
    d = a * x + b - c * x
    coef, const = a - c, d - b
    steps = []
    if c:
        steps.append(f"Move the x terms to the left: {_linear(coef, b)} = {d}")
    if b:
        steps.append(f"Move the constant to the right: {_linear(coef, 0)} = {const}")
    if coef != 1:
        steps.append(f"Divide both sides by {coef}: x = {const} / {coef} = {x}")
    steps.append(f"Check: with x = {x} the left side is {a * x + b} and the right side is {c * x + d}")
    return MathProblem("linear_equation", f"Solve for x: {_linear(a, b)} = {_linear(c, d)}.",
                       ". ".join(steps) + ".", f"x = {x}")


# --------------------------------------------------------------------------- word problems
_NAMES = ["Ada", "Ben", "Chen", "Dara", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kemi", "Lena"]
_ITEMS = ["apple", "pencil", "notebook", "marble", "sticker", "cookie", "ticket", "book"]


def word_problem(rng: random.Random) -> MathProblem:
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    template = rng.randrange(4)
    if template == 0:
        count, price = rng.randint(2, 9), Fraction(rng.randint(2, 40), 4)  # cost <= $90
        bill = next(b for b in (5, 10, 20, 50, 100) if b >= count * price)
        q = f"{name} buys {count} {item}s at {money(price)} each and pays with a ${bill} bill. How much change does {name} get?"
        s = f"The cost is {count} * {fmt(price)} = {fmt(count * price)}. The change is {bill} - {fmt(count * price)} = {fmt(bill - count * price)}."
        return MathProblem("word_change", q, s, money(bill - count * price))
    if template == 1:
        friends, each = rng.randint(2, 9), rng.randint(1, 15)
        left = rng.randint(0, friends - 1)
        total = friends * each + left
        q = f"{name} shares {total} {item}s equally among {friends} friends. How many does each friend get, and how many are left over?"
        s = f"{total} = {friends} * {each} + {left}, so each friend gets {each} and {left} are left over."
        return MathProblem("word_share", q, s, f"{each} each, {left} left over")
    if template == 2:
        speed, hours = rng.randint(20, 120), Fraction(rng.randint(1, 16), 4)
        q = f"A train travels at {speed} km/h for {fmt(hours)} hours. How far does it go?"
        s = f"Distance = speed * time = {speed} * {fmt(hours)} = {fmt(speed * hours)} km."
        return MathProblem("word_distance", q, s, f"{fmt(speed * hours)} km")
    young, gap, later = rng.randint(3, 40), rng.randint(1, 30), rng.randint(1, 20)
    total = 2 * young + gap + 2 * later
    q = (f"{name} is {gap} years older than {other}. In {later} years the sum of their ages will be {total}. "
         f"How old is {other} now?")
    s = (f"Let {other}'s age be a. Then (a + {later}) + (a + {gap} + {later}) = {total}, so 2a + {gap + 2 * later} = {total}, "
         f"2a = {total - gap - 2 * later} and a = {young}.")
    return MathProblem("word_age", q, s, str(young))


# --------------------------------------------------------------------------- sequences, units, percent, number theory
def sequence(rng: random.Random) -> MathProblem:
    first, shown = rng.randint(-10, 20), rng.randint(4, 6)
    if rng.random() < 0.6:
        step = rng.choice([k for k in range(-9, 13) if k])
        terms = [first + i * step for i in range(shown + 1)]
        s = f"Each term adds {step} to the one before, so the next term is {terms[-2]} + {step} = {terms[-1]}."
    else:
        first, ratio = rng.choice([1, 2, 3, 5, -1, -2]), rng.choice([-3, -2, 2, 3, 4])
        terms = [first * ratio**i for i in range(shown + 1)]
        s = f"Each term is {ratio} times the one before, so the next term is {terms[-2]} * {ratio} = {terms[-1]}."
    return MathProblem("sequence", f"What is the next term of the sequence {', '.join(map(str, terms[:-1]))}, ...?",
                       s, str(terms[-1]))


_UNITS = {  # unit: (quantity, size in the base unit)
    "km": ("length", Fraction(1000)), "m": ("length", Fraction(1)), "cm": ("length", Fraction(1, 100)),
    "mm": ("length", Fraction(1, 1000)), "kg": ("mass", Fraction(1000)), "g": ("mass", Fraction(1)),
    "mg": ("mass", Fraction(1, 1000)), "h": ("time", Fraction(3600)), "min": ("time", Fraction(60)),
    "s": ("time", Fraction(1)), "L": ("volume", Fraction(1000)), "mL": ("volume", Fraction(1)),
}

# only conversions whose factor is a terminating decimal (h -> min, not min -> h)
_CONVERSIONS = [(s, t) for s in sorted(_UNITS) for t in sorted(_UNITS)
                if s != t and _UNITS[s][0] == _UNITS[t][0] and "/" not in fmt(_UNITS[s][1] / _UNITS[t][1])]


def unit_conversion(rng: random.Random) -> MathProblem:
    source, target = rng.choice(_CONVERSIONS)
    amount = Fraction(rng.randint(1, 400), rng.choice([1, 2, 4, 10]))
    factor = _UNITS[source][1] / _UNITS[target][1]
    s = f"1 {source} = {fmt(factor)} {target}, so {fmt(amount)} {source} = {fmt(amount)} * {fmt(factor)} {target} = {fmt(amount * factor)} {target}."
    return MathProblem("unit_conversion", f"Convert {fmt(amount)} {source} to {target}.", s, f"{fmt(amount * factor)} {target}")


def percentage(rng: random.Random) -> MathProblem:
    pct, base = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 75]), rng.randint(2, 80) * 4
    part = Fraction(pct, 100) * base
    if rng.random() < 0.5:
        return MathProblem("percent_of", f"What is {pct}% of {base}?",
                           f"{pct}% of {base} = {pct}/100 * {base} = {fmt(part)}.", fmt(part))
    s = f"The increase is {pct}% of {base} = {fmt(part)}, so the new price is {base} + {fmt(part)} = {fmt(base + part)}."
    return MathProblem("percent_increase", f"A price of ${base} rises by {pct}%. What is the new price?", s, money(base + part))


def gcd_lcm(rng: random.Random) -> MathProblem:
    g = rng.randint(2, 15)
    a, b = g * rng.randint(2, 15), g * rng.randint(2, 15)
    big, small, steps = max(a, b), min(a, b), []
    while small:
        steps.append(f"{big} = {big // small} * {small} + {big % small}")
        big, small = small, big % small
    if rng.random() < 0.5:
        return MathProblem("gcd", f"Find the greatest common divisor of {a} and {b}.",
                           "By Euclid's algorithm: " + "; ".join(steps) + f". The last non-zero remainder is {big}.", str(big))
    return MathProblem("lcm", f"Find the least common multiple of {a} and {b}.",
                       "By Euclid's algorithm: " + "; ".join(steps) + f", so gcd = {big} and lcm = {a} * {b} / {big} = {a * b // big}.",
                       str(a * b // big))


def prime_factorisation(rng: random.Random) -> MathProblem:
    n = 1
    for prime in rng.sample([2, 2, 2, 3, 3, 5, 7, 11, 13], rng.randint(2, 5)):
        n *= prime
    remaining, factors, steps, p = n, [], [], 2
    while remaining > 1:
        while remaining % p == 0:
            steps.append(f"{remaining} / {p} = {remaining // p}")
            factors.append(p)
            remaining //= p
        p += 1
    answer = " * ".join(f"{q}^{factors.count(q)}" if factors.count(q) > 1 else str(q) for q in sorted(set(factors)))
    return MathProblem("prime_factorisation", f"Write {n} as a product of prime powers.",
                       "Divide by the smallest prime that fits: " + "; ".join(steps) + ".", answer)


GENERATORS = (arithmetic, fractions_problem, linear_equation, word_problem, sequence,
              unit_conversion, percentage, gcd_lcm, prime_factorisation)


def random_problem(rng: random.Random) -> MathProblem:
    return rng.choice(GENERATORS)(rng)


def math_worksheets(seed: int = 0, problems_per_sheet: tuple[int, int] = (6, 12)) -> Iterator[tuple[str, str]]:
    """Endless (source_id, text) worksheets; worksheet i depends only on (seed, i)."""
    index = 0
    while True:
        rng = random.Random(f"math:{seed}:{index}")
        problems = [random_problem(rng).render() for _ in range(rng.randint(*problems_per_sheet))]
        yield f"math-gen:{seed}:{index:06d}", "\n".join(problems)
        index += 1
