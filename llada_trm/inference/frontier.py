"""The accuracy-vs-speed frontier: exact match against tokens per backbone row-pass (TPF), decoder by decoder.

A point is a decoder and how hard it works per pass, written as a short name:
- `sampler/kN`: LLaDA's sampler committing N tokens per step (blocks of chunk_size; N divides chunk_size);
- `sampler/tX`: LLaDA's sampler with confidence-threshold parallel decoding at X (Fast-dLLM);
- `chunked/rN`, `hybrid/rN`: the chunk decoder on the backbone alone / with the refinement head, N rounds a chunk;
- `chunked/tX`, `hybrid/tX`: the same with the threshold rule inside each chunk (`commit_threshold`).
Every point scores the same problems with the same new-token budget at temperature 0, through
`inference.exact_match`, which also counts the backbone row-passes each decoder ran and its FLOPs per new token;
sampler points below a whole chunk per step may score only the first of those problems (`sampler_max_samples`: at
one token per step the sampler costs about 16x a pass per chunk). Each exact match comes with its standard error,
and each method (a decoder kind here, a trained run in `compare`) with one number for speed and accuracy together,
AUP, and its TPF within 1 point of its one-token exact match (inference/reporting.py, docs/evaluation.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from llada_trm.inference.exact_match import SAMPLER_MIN_BATCH, chunk_decoder, sampler_decoder, score_decoder
from llada_trm.inference.reporting import ONE_TOKEN_DROP, aup, cell, markdown_table, matplotlib_figure, tpf_within

DECODER_KINDS = ("sampler", "chunked", "hybrid")
BACKBONE_KINDS = ("sampler", "chunked")  # the points a plain LLaDA (no trained head) can run
DEFAULT_POINTS = ("sampler/k1", "sampler/k2", "sampler/k4", "sampler/k8", "sampler/k16",
                  "sampler/t0.9", "sampler/t0.7", "sampler/t0.5",
                  "chunked/r16", "chunked/r4", "chunked/r2", "chunked/r1", "chunked/t0.9",
                  "hybrid/r16", "hybrid/r4", "hybrid/r2", "hybrid/r1", "hybrid/t0.9")
FRONTIER_FILE, PLOT_FILE = "frontier.json", "frontier.png"
FRONTIER_HEADER = ("point", "exact match", "s.e.", "TPF", "backbone MFLOP/tok", "head MFLOP/tok", "tokens/s",
                   "steps/round")


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


def point_decoder(point: FrontierPoint, model, tokenizer, max_new_tokens: int, block_length: int | None = None):
    """The decoder of a point, prompts -> DecodedBatch (an `LLaDATRMHybrid`; the sampler runs its backbone in blocks
    of `block_length`, default the chunk size): the one mapping from point names to decoder settings."""
    if point.kind == "sampler":
        return sampler_decoder(model.backbone, tokenizer, max_new_tokens, block_length or model.config.chunk_size,
                               point.per_step or 1, point.threshold)
    rounds = {"decode_steps_per_chunk": point.per_step} if point.per_step else {}
    return chunk_decoder(model, tokenizer, max_new_tokens, enable_refinement=point.kind == "hybrid",
                         commit_threshold=point.threshold, **rounds)


def score_point(point: FrontierPoint, model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 8,
                flop_sample: int = 0, progress: bool = True) -> dict:
    """One point's exact match, cost and speed on `rows` (an `LLaDATRMHybrid`; the sampler uses its backbone)."""
    decode = point_decoder(point, model, tokenizer, max_new_tokens)
    if point.kind == "sampler":
        batch_size = max(batch_size, SAMPLER_MIN_BATCH)
    parts = (model.backbone, model.head if point.kind == "hybrid" else None)
    result = score_decoder(point.name, rows, batch_size, progress, decode, parts, flop_sample)
    return {**asdict(point), **result}


def frontier(model, tokenizer, rows: list[dict], max_new_tokens: int, points: list[FrontierPoint],
             batch_size: int = 8, flop_sample: int = 8, progress: bool = True,
             sampler_max_samples: int | None = None) -> dict:
    """Score every point on the same rows and budget: {"num_samples", "sampler_num_samples", "max_new_tokens",
    "chunk_size", "flop_sample", "points"}. Sampler points score only the first `sampler_max_samples` rows (None:
    all), except the one that commits a whole chunk per step: the sampler re-runs the whole sequence at every step,
    about 16x the cost of one pass per chunk at one token per step, and about that cost at a chunk per step."""
    sampler_rows = rows[:sampler_max_samples] if sampler_max_samples is not None else rows
    chunk_size = model.config.chunk_size
    scored = [score_point(p, model, tokenizer, sampler_rows if is_limited_sampler_point(p, chunk_size) else rows,
                          max_new_tokens, batch_size, flop_sample, progress) for p in points]
    return {"num_samples": len(rows), "sampler_num_samples": len(sampler_rows), "max_new_tokens": max_new_tokens,
            "chunk_size": chunk_size, "flop_sample": min(flop_sample, len(rows)), "points": scored}


def is_limited_sampler_point(point: FrontierPoint, chunk_size: int) -> bool:
    """Whether `sampler_max_samples` applies: a sampler point that may take more than one step per chunk."""
    return point.kind == "sampler" and point.per_step != chunk_size


def _flops(value: float | None) -> str:
    return cell(None if value is None else value / 1e6, "{:,.1f}")


def format_frontier_table(result: dict) -> str:
    """A markdown table: exact match and its standard error, TPF, backbone and head MFLOPs per new token, tokens/s,
    mean refinement steps."""
    return markdown_table(FRONTIER_HEADER, [frontier_row(p) for p in result["points"]],
                          right=range(1, len(FRONTIER_HEADER)))


def frontier_row(p: dict) -> tuple:
    """The cells of one scored point, in FRONTIER_HEADER's order."""
    return (p["name"], f"{p['accuracy']:.3f}", cell(p.get("standard_error"), "{:.3f}"), f"{p['tokens_per_pass']:.2f}",
            _flops(p.get("backbone_flops_per_token")), _flops(p.get("head_flops_per_token")),
            f"{p['tokens_per_second']:.1f}", f"{p['mean_refinement_steps']:.2f}")


# --------------------------------------------------------------------------------------------- one number per method
def is_one_token_point(point: dict, chunk_size: int) -> bool:
    """A point that commits one token per backbone pass by its schedule: sampler/k1, or chunk_size rounds a chunk."""
    if point.get("threshold") is not None:
        return False
    return point["per_step"] == (1 if point["kind"] == "sampler" else chunk_size)


def method_scores(points_by_method: dict[str, list[dict]], chunk_size: int) -> dict[str, dict]:
    """Per method (a name -> its scored frontier points): AUP against the best exact match of all methods, its
    one-token exact match (the best of its one-token points) and the largest TPF within 1 point of it."""
    every = [p["accuracy"] for points in points_by_method.values() for p in points]
    best = 100 * max(every) if every else 0.0
    scores = {}
    for method, points in points_by_method.items():
        curve = [(p["tokens_per_pass"], p["accuracy"]) for p in points]
        one_token = [p["accuracy"] for p in points if is_one_token_point(p, chunk_size)]
        reference = max(one_token) if one_token else None
        scores[method] = {
            "aup": aup([(tpf, 100 * accuracy) for tpf, accuracy in curve], best),
            "one_token_exact_match": reference,
            "tpf_at_one_token_minus_1": tpf_within(curve, reference, ONE_TOKEN_DROP),
            "best_exact_match_at_tpf_8": max((a for tpf, a in curve if tpf >= 8), default=None),
        }
    return scores


def format_method_scores(scores: dict[str, dict]) -> str:
    """One row per method: AUP, one-token exact match, TPF at that minus 1 point, best exact match at TPF >= 8."""
    header = ("method", "AUP", "one-token exact match", "TPF at one-token - 1 pt", "best exact match at TPF >= 8")
    rows = [(method, cell(s["aup"], "{:.1f}"), cell(s["one_token_exact_match"], "{:.3f}"),
             cell(s["tpf_at_one_token_minus_1"], "{:.2f}"), cell(s["best_exact_match_at_tpf_8"], "{:.3f}"))
            for method, s in scores.items()]
    return markdown_table(header, rows, right=range(1, len(header)))


def points_by_kind(result: dict) -> dict[str, list[dict]]:
    """The frontier's points grouped by decoder kind (sampler, chunked, hybrid): its methods."""
    grouped = {kind: [p for p in result["points"] if p["kind"] == kind] for kind in DECODER_KINDS}
    return {kind: points for kind, points in grouped.items() if points}


def write_frontier(result: dict, output_dir: Path) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / FRONTIER_FILE
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def plot_frontier(result: dict, path: Path) -> Path | None:
    """Exact match against TPF, one marker series per decoder kind; None (and a note) without matplotlib."""
    Figure = matplotlib_figure(Path(path).name)
    if Figure is None:
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
