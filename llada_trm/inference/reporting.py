"""What a report of exact match says and how it is printed: standard errors, AUP, one table writer, optional plots.

What is notable:
- `standard_error(k, n)` is the binomial standard error of an exact match of k right out of n, sqrt(p (1 - p) / n).
- `paired_difference(a, b)` compares two decoders on the same problems (per-problem right/wrong): the difference
  of their exact match and its paired standard error, sqrt(mean(d^2) - mean(d)^2) / sqrt(n) over d_i = a_i - b_i.
  Two decoders of one model fail on many of the same problems, so this is smaller than the two standard errors
  combined as if independent; it is the one a lead over another decoder is judged by.
- `aup` is the d3LLM leaderboard's Accuracy Under Parallelism (docs/evaluation.md, "AUP"): the area under
  accuracy (in percent) against tokens per forward pass (TPF), each point's accuracy weighted by
  W(y) = min(exp(-alpha (1 - y / y_max)), 1) with y_max the best accuracy of every method compared, over the points
  within 5 points of the method's accuracy at its lowest TPF. A method's points are first reduced to its Pareto
  frontier (the decoders a user would pick at some speed).
- `tpf_within` is the largest measured TPF whose exact match is within `drop` of the method's one-token exact match
  (not interpolated between points).
- `markdown_table` is the one writer of every table the programs print (aligned, so it reads in a terminal too);
  `matplotlib_figure` is the one place that finds out whether the optional plotting package is there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

AUP_ALPHA = 3.0  # the leaderboard's penalty factor for accuracy below the best
AUP_WINDOW = 5.0  # points (percent) below the lowest-TPF accuracy beyond which a point is left out
ONE_TOKEN_DROP = 0.01  # "TPF at one-token accuracy minus 1 point"


# --------------------------------------------------------------------------------------------- statistics
def standard_error(correct: int, total: int) -> float:
    """Standard error of an exact match of `correct` right out of `total`: sqrt(p (1 - p) / n), p = k / n."""
    if total <= 0:
        raise ValueError(f"standard error needs at least one problem, got {total}")
    p = correct / total
    return math.sqrt(p * (1.0 - p) / total)


def paired_difference(right: Sequence[int], other: Sequence[int]) -> tuple[float, float]:
    """(exact match of `right` minus that of `other`, its paired standard error) over the problems both scored:
    the first min(len) of them, in order (the sampler scores the first --eval_sampler_max_samples)."""
    count = min(len(right), len(other))
    if count <= 0:
        raise ValueError("a paired difference needs at least one problem scored by both decoders")
    differences = [a - b for a, b in zip(right[:count], other[:count])]
    mean = sum(differences) / count
    variance = sum(d * d for d in differences) / count - mean * mean
    return mean, math.sqrt(max(variance, 0.0) / count)


def pareto_points(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (tpf, accuracy) points no other point beats at once on speed and accuracy, by rising TPF: at each TPF the
    best accuracy, and a point only where it is more accurate than every faster one."""
    best: list[tuple[float, float]] = []
    for tpf, accuracy in sorted(points, key=lambda p: (-p[0], -p[1])):  # fastest first
        if not best or accuracy > best[-1][1]:
            best.append((tpf, accuracy))
    return best[::-1]


def aup_weight(accuracy: float, best_accuracy: float, alpha: float = AUP_ALPHA) -> float:
    """W(y) = min(exp(-alpha (1 - y / y_max)), 1): 1 at the best accuracy of all methods, e^-alpha at 0."""
    if best_accuracy <= 0:
        return 1.0
    return min(math.exp(-alpha * (1.0 - accuracy / best_accuracy)), 1.0)


def aup(points: Sequence[tuple[float, float]], best_accuracy: float, alpha: float = AUP_ALPHA,
        window: float = AUP_WINDOW) -> float | None:
    """AUP of one method's (tpf, accuracy in percent) points, against `best_accuracy` (percent) of all methods.

    On the method's Pareto points rho_1 < ... < rho_m with accuracies y_i, kept where y_i >= y_1 - `window`:
    AUP = rho_1 y_1 + sum_{i >= 2} (rho_i - rho_{i-1}) (y_i W(y_i) + y_{i-1} W(y_{i-1})) / 2. None without points.
    """
    front = pareto_points([(tpf, y) for tpf, y in points if tpf > 0])
    if not front:
        return None
    floor = front[0][1] - window
    kept = [(tpf, y) for tpf, y in front if y >= floor]
    total = kept[0][0] * kept[0][1]
    for (tpf_before, y_before), (tpf, y) in zip(kept, kept[1:]):
        total += (tpf - tpf_before) * (y * aup_weight(y, best_accuracy, alpha)
                                       + y_before * aup_weight(y_before, best_accuracy, alpha)) / 2
    return total


def tpf_within(points: Sequence[tuple[float, float]], reference: float | None,
               drop: float = ONE_TOKEN_DROP) -> float | None:
    """The largest TPF among (tpf, exact match) points whose exact match is at least `reference` - `drop` (measured
    points only, no interpolation); None without a reference or without such a point."""
    if reference is None:
        return None
    reached = [tpf for tpf, accuracy in points if accuracy >= reference - drop - 1e-12]
    return max(reached) if reached else None


# --------------------------------------------------------------------------------------------- printing
def cell(value, fmt: str = "{}") -> str:
    """`fmt.format(value)`, or "-" for a value that is not there."""
    return "-" if value is None else fmt.format(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str | None]], right: Sequence[int] = ()) -> str:
    """An aligned Markdown table of string cells (None prints as "-"); columns in `right` are right-aligned (and
    marked so for a Markdown renderer)."""
    lines = [list(header)] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = set(right)

    def row_text(line):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(line, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([row_text(lines[0]), rule, *(row_text(line) for line in lines[1:])])


def matplotlib_figure(skipped: str):
    """matplotlib's Figure class, or None after a note that `skipped` was not written (matplotlib is optional)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"note: matplotlib is not installed, skipped {skipped} (pip install matplotlib, or pip install -e .[plot])")
        return None
    return Figure
