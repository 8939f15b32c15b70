"""The accuracy-vs-speed frontier: exact match against tokens per backbone row-pass (TPF), decoder by decoder.

A point is a decoder and how hard it works per pass, written as a short name:
- `sampler/kN`: LLaDA's sampler committing N tokens per step (blocks of chunk_size; N divides chunk_size);
- `sampler/tX`: LLaDA's sampler with confidence-threshold parallel decoding at X (Fast-dLLM);
- `chunked/rN`, `hybrid/rN`: the chunk decoder on the backbone alone / with the refinement head, N rounds a chunk;
- `chunked/tX`, `hybrid/tX`: the same with the threshold rule inside each chunk (`commit_threshold`).
Every point scores the same problems with the same new-token budget at temperature 0, through
`inference.exact_match`, which also counts the backbone row-passes each decoder ran and its FLOPs per new token.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from llada_trm.inference.exact_match import SAMPLER_MIN_BATCH, chunk_decoder_accuracy, llada_sampler_accuracy

DECODER_KINDS = ("sampler", "chunked", "hybrid")
BACKBONE_KINDS = ("sampler", "chunked")  # the points a plain LLaDA (no trained head) can run
DEFAULT_POINTS = ("sampler/k1", "sampler/k2", "sampler/k4", "sampler/k8", "sampler/k16",
                  "sampler/t0.9", "sampler/t0.7", "sampler/t0.5",
                  "chunked/r16", "chunked/r4", "chunked/r2", "chunked/r1", "chunked/t0.9",
                  "hybrid/r16", "hybrid/r4", "hybrid/r2", "hybrid/r1", "hybrid/t0.9")
FRONTIER_FILE, PLOT_FILE = "frontier.json", "frontier.png"


class PointError(ValueError):
    """A point name that cannot be parsed or does not fit the model."""


@dataclass(frozen=True)
class FrontierPoint:
    name: str  # as written: "sampler/k1", "hybrid/t0.9"
    kind: str  # sampler | chunked | hybrid
    per_step: int | None = None  # tokens per step (sampler) or rounds per chunk (chunk decoders)
    threshold: float | None = None  # confidence threshold instead of a fixed count


def _number(text: str, kind: type):
    """`kind(text)`, or None where it is not a number of that kind."""
    try:
        return kind(text)
    except ValueError:
        return None


def parse_point(text: str, chunk_size: int) -> FrontierPoint:
    """`kind/kN`, `kind/rN` or `kind/tX` -> FrontierPoint; a PointError names what is wrong."""
    kind, _, setting = text.strip().partition("/")
    if kind not in DECODER_KINDS or len(setting) < 2:
        raise PointError(f"point {text!r}: expected KIND/kN, KIND/rN or KIND/tX with KIND in {DECODER_KINDS}")
    letter, value = setting[0], setting[1:]
    expected = "k" if kind == "sampler" else "r"
    if letter == "t":
        threshold = _number(value, float)
        if threshold is not None and 0 <= threshold < float("inf"):
            return FrontierPoint(text.strip(), kind, threshold=threshold)
    elif letter == expected:
        count = _number(value, int)
        if count is not None and 1 <= count <= chunk_size and (kind != "sampler" or chunk_size % count == 0):
            return FrontierPoint(text.strip(), kind, per_step=count)
    need = "a divisor of" if kind == "sampler" else "from 1 to"
    raise PointError(f"point {text!r}: {kind} takes {expected}N (N {need} chunk_size {chunk_size}) or tX (X >= 0)")


def parse_points(text: str | None, chunk_size: int, kinds: tuple[str, ...] = DECODER_KINDS) -> list[FrontierPoint]:
    """A comma-separated list of point names (None: DEFAULT_POINTS of `kinds`); duplicates dropped, order kept."""
    names = [n for n in (text.split(",") if text is not None else DEFAULT_POINTS) if n.strip()]
    points = list({p.name: p for p in (parse_point(name, chunk_size) for name in names)}.values())
    if text is None:
        points = [p for p in points if p.kind in kinds]
    outside = [p.name for p in points if p.kind not in kinds]
    if outside:
        raise PointError(f"points {outside} need a trained head; this model runs {', '.join(kinds)} points only")
    if not points:
        raise PointError("no points given")
    return points


def score_point(point: FrontierPoint, model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 8,
                flop_sample: int = 0, progress: bool = True) -> dict:
    """One point's exact match, cost and speed on `rows` (an `LLaDATRMHybrid`; the sampler uses its backbone)."""
    if point.kind == "sampler":
        result = llada_sampler_accuracy(model.backbone, tokenizer, rows, max_new_tokens, model.config.chunk_size,
                                        batch_size=max(batch_size, SAMPLER_MIN_BATCH), progress=progress,
                                        tokens_per_step=point.per_step or 1, threshold=point.threshold,
                                        flop_sample=flop_sample, name=point.name)
    else:
        rounds = {"decode_steps_per_chunk": point.per_step} if point.per_step else {}
        result = chunk_decoder_accuracy(model, tokenizer, rows, max_new_tokens,
                                        enable_refinement=point.kind == "hybrid", batch_size=batch_size,
                                        progress=progress, flop_sample=flop_sample, name=point.name,
                                        commit_threshold=point.threshold, **rounds)
    return {**asdict(point), **result}


def frontier(model, tokenizer, rows: list[dict], max_new_tokens: int, points: list[FrontierPoint],
             batch_size: int = 8, flop_sample: int = 8, progress: bool = True) -> dict:
    """Score every point on the same rows and budget: {"num_samples", "max_new_tokens", "flop_sample", "points"}."""
    scored = [score_point(p, model, tokenizer, rows, max_new_tokens, batch_size, flop_sample, progress)
              for p in points]
    return {"num_samples": len(rows), "max_new_tokens": max_new_tokens, "flop_sample": min(flop_sample, len(rows)),
            "points": scored}


def _flops(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:,.1f}"


def format_frontier_table(result: dict) -> str:
    """A markdown table: exact match, TPF, backbone and head MFLOPs per new token, tokens/s, mean refinement steps."""
    header = ("point", "exact match", "TPF", "backbone MFLOP/tok", "head MFLOP/tok", "tokens/s", "steps/round")
    lines = [header]
    for p in result["points"]:
        lines.append((p["name"], f"{p['accuracy']:.3f}", f"{p['tokens_per_pass']:.2f}",
                      _flops(p.get("backbone_flops_per_token")), _flops(p.get("head_flops_per_token")),
                      f"{p['tokens_per_second']:.1f}", f"{p['mean_refinement_steps']:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))) + " |"
            for line in lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)


def write_frontier(result: dict, output_dir: Path) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / FRONTIER_FILE
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def plot_frontier(result: dict, path: Path) -> Path | None:
    """Exact match against TPF, one marker series per decoder kind; None (and a note) without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"note: matplotlib is not installed, so {Path(path).name} was skipped (pip install -e .[plot])")
        return None
    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = figure.subplots()
    for kind, marker in zip(DECODER_KINDS, "osD"):
        points = [p for p in result["points"] if p["kind"] == kind]
        if points:
            ax.scatter([p["tokens_per_pass"] for p in points], [p["accuracy"] for p in points], marker=marker,
                       label=kind)
            for p in points:
                ax.annotate(p["name"].split("/")[1], (p["tokens_per_pass"], p["accuracy"]), fontsize="x-small",
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("new tokens per backbone row-pass (TPF)")
    ax.set_ylabel("held-out exact match")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(path, dpi=110)
    return Path(path)
