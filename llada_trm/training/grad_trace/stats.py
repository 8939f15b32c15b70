"""The numbers of the analysis, on plain lists of floats (no torch, so they can be checked by hand).

- Gini coefficient of non-negative magnitudes x sorted ascending, i = 1..n:
  sum_i (2i - n - 1) x_i / (n sum_i x_i); 0 when every token carries the same weight, towards 1 when one does.
- weight fraction: the smallest fraction of tokens whose magnitudes add up to at least `share` (0.8) of the
  total, taking the largest first.
- opposing fraction: the fraction of alignments below 0.
- Pearson r of two lists; None when either is constant.
"""

from __future__ import annotations

import math

_SLACK = 1e-12  # relative: 0.8 of a total reached exactly is reached


def gini(values: list[float]) -> float | None:
    xs = sorted(values)
    n, total = len(xs), sum(xs)
    if n == 0 or total <= 0:
        return None
    return sum((2 * i - n - 1) * x for i, x in enumerate(xs, start=1)) / (n * total)


def weight_fraction(values: list[float], share: float = 0.8) -> float | None:
    xs = sorted(values, reverse=True)
    total = sum(xs)
    if not xs or total <= 0:
        return None
    running = 0.0
    for k, x in enumerate(xs, start=1):
        running += x
        if running >= share * total * (1 - _SLACK):
            return k / len(xs)
    return 1.0


def opposing_fraction(alignments: list[float]) -> float | None:
    return sum(a < 0 for a in alignments) / len(alignments) if alignments else None


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def pearson(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    if n < 2 or n != len(ys):
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def summary(magnitudes: list[float], alignments: list[float]) -> dict:
    """The headline numbers of one group of tokens (magnitudes and alignments of the same tokens)."""
    return {
        "tokens": len(magnitudes),
        "gini": gini(magnitudes),
        "weight_fraction_80": weight_fraction(magnitudes, 0.8),
        "opposing_fraction": opposing_fraction(alignments),
        "mean_alignment": mean(alignments),
        "mean_magnitude": mean(magnitudes),
        "pearson_magnitude_alignment": pearson(magnitudes, alignments),
    }
