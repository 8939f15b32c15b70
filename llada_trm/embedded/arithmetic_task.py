"""Seeded generator of multi-step arithmetic word problems: the embedded default data set.

Problems are drawn from one seeded stream and routed to train / validation / test by a hash of the question
text, so the splits never share a question whatever sizes are asked for. Each record has the shape
`{"question", "reasoning": [step, ...], "answer"}` (one step a line, an exact-match integer answer).

Write a split to a file with `python -m llada_trm.synthetic` (llada_trm/synthetic.py).
"""

from __future__ import annotations

import hashlib
import random

SPLITS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}  # hash buckets out of 100

NAMES = ["Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Sara", "Tom", "Ines", "Kai"]
ITEMS = ["apples", "marbles", "books", "stickers", "coins", "pencils", "cards", "shells", "stamps", "cookies"]
# Sized so that a backbone of a few million parameters, trained for CPU minutes, solves a fair share of the
# problems (docs/embedded_default.md): one-digit operands on a two-digit running total, doubling only below 26.
MAX_START, MAX_OPERAND, MAX_OPERATIONS, MAX_DOUBLED = 20, 9, 3, 25


def _step(rng: random.Random, name: str, item: str, current: int) -> tuple[str, str, int]:
    """One operation: (question clause, reasoning line, new value)."""
    other = rng.choice([n for n in NAMES if n != name])
    kinds = ["add", "add", "sub", "sub"] + (["double"] if current <= MAX_DOUBLED else [])
    kind = rng.choice(kinds) if current > 0 else "add"
    if kind == "add":
        n = rng.randint(1, MAX_OPERAND)
        verb = rng.choice(["buys", "finds", "wins"])
        return f"{name} {verb} {n} more {item}.", f"{name} {verb} {n}: {current} + {n} = {current + n}.", current + n
    if kind == "sub":
        n = rng.randint(1, min(current, MAX_OPERAND))
        clause, verb = rng.choice([(f"gives {n} {item} to {other}", "gives away"), (f"loses {n} {item}", "loses")])
        return f"{name} {clause}.", f"{name} {verb} {n}: {current} - {n} = {current - n}.", current - n
    return f"{name} doubles the {item}.", f"{name} doubles them: {current} * 2 = {current * 2}.", current * 2


def make_problem(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    current = rng.randint(1, MAX_START)
    clauses, steps = [f"{name} has {current} {item}."], [f"{name} starts with {current} {item}."]
    for _ in range(rng.randint(1, MAX_OPERATIONS)):
        clause, line, current = _step(rng, name, item, current)
        clauses.append(clause)
        steps.append(line)
    clauses.append(f"How many {item} does {name} have now?")
    return {"question": " ".join(clauses), "reasoning": steps, "answer": str(current)}


def split_of(question: str) -> str:
    bucket = int(hashlib.sha256(question.encode()).hexdigest(), 16) % 100
    return next(name for name, (low, high) in SPLITS.items() if low <= bucket < high)


def generate_split(split: str, num: int, seed: int = 0) -> list[dict]:
    """`num` distinct problems of `split`; deterministic in (split, num, seed)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    rng, seen, records = random.Random(seed), set(), []
    for _ in range(200 * num + 1000):
        if len(records) == num:
            return records
        problem = make_problem(rng)
        if problem["question"] not in seen and split_of(problem["question"]) == split:
            seen.add(problem["question"])
            records.append(problem)
    raise RuntimeError(f"could not draw {num} distinct {split} problems; ask for fewer")
