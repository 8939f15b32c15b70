"""`analyze` and `compare`: the summary of a run's trace, and two summaries side by side.

Tokens enter the numbers when they carry weight in the loss (loss_weight > 0) and have an alignment (a zero
gradient has none). Their magnitude is `grad_norm`, the norm of the token's contribution to the micro-batch's
gradient, so token weighting and truncation show in it. Tokens a weighting or truncation removed
(loss_weight = 0) are summarised apart (`dropped`): whether the removed tokens were the opposing ones.
Groups pool the tokens of every trace; `over_training` has the same numbers trace by trace.
"""

from __future__ import annotations

import json
from pathlib import Path

from llada_trm.training.grad_trace.stats import summary
from llada_trm.training.grad_trace.token_types import TOKEN_TYPES
from llada_trm.training.grad_trace.tracer import TRACE_FILE

SUMMARY_FILE = "grad_trace_summary.json"


class TraceInputError(ValueError):
    """A run directory or trace file the analysis cannot read; printed as one line, exit code 2."""


def load_trace(run_dir: str | Path) -> dict[str, list[dict]]:
    """{"trace": [...], "sample": [...], "token": [...]} from RUN_DIR/token_grad_trace.jsonl."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TraceInputError(f"{run_dir}: no such run directory")
    path = run_dir / TRACE_FILE
    if not path.is_file():
        raise TraceInputError(f"{path}: no trace here (train with --token_grad_trace_every N)")
    records = {"trace": [], "sample": [], "token": []}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise TraceInputError(f"{path}:{number}: not a JSON line") from None
        kind = record.get("record") if isinstance(record, dict) else None
        if kind not in records:
            raise TraceInputError(f"{path}:{number}: unknown record kind {kind!r}")
        records[kind].append(record)
    if not records["token"]:
        raise TraceInputError(f"{path}: holds no traced token")
    return records


def _group(tokens: list[dict]) -> dict:
    return summary([t["grad_norm"] for t in tokens], [t["alignment"] for t in tokens])


def _counted(token: dict) -> bool:
    return (token.get("loss_weight") or 0) > 0 and token.get("alignment") is not None \
        and token.get("grad_norm") is not None


def _per_step(tokens: list[dict]) -> list[dict]:
    steps = max((len(t.get("step_alignments") or []) for t in tokens), default=0)
    rows = []
    for s in range(steps):
        pairs = [(t["step_grad_norms"][s], t["step_alignments"][s]) for t in tokens
                 if t.get("step_alignments") and t["step_alignments"][s] is not None]
        rows.append({"refinement_step": s + 1, **summary([m for m, _ in pairs], [a for _, a in pairs])})
    return rows


def analyze(run_dir: str | Path) -> dict:
    records = load_trace(run_dir)
    tokens = [t for t in records["token"] if _counted(t)]
    dropped = [t for t in records["token"] if (t.get("loss_weight") or 0) == 0 and t.get("alignment") is not None]
    header = records["trace"][0] if records["trace"] else {}
    result = {
        "run_dir": str(run_dir),
        "objective": header.get("objective"),
        "loss_weighting": _run_setting(run_dir, "weighting", "loss_weighting"),
        "params": header.get("params"),
        "fast_path": header.get("fast_path"),
        "traces": len(records["trace"]),
        "traced_tokens": len(records["token"]),
        "mean_trace_seconds": (sum(h["seconds"] for h in records["trace"]) / len(records["trace"])
                               if records["trace"] else None),
        "overall": _group(tokens),
        "by_token_type": {kind: _group([t for t in tokens if t["token_type"] == kind]) for kind in TOKEN_TYPES},
        "by_chunk": {},
        "by_refinement_step": _per_step(tokens),
        "over_training": [{"step": step, **_group([t for t in tokens if t["step"] == step])}
                          for step in sorted({t["step"] for t in tokens})],
        "dropped": _group(dropped) if dropped else {"tokens": 0},
    }
    if any(t.get("chunk_masked") is not None for t in tokens):
        result["by_chunk"] = {name: _group([t for t in tokens if t.get("chunk_masked") is flag])
                              for name, flag in (("masked", True), ("unmasked", False))}
    return result


def _run_setting(run_dir, group: str, key: str):
    path = Path(run_dir) / "run_config.json"
    try:
        return json.loads(path.read_text()).get(group, {}).get(key)
    except (OSError, ValueError):
        return None


def write_summary(run_dir: str | Path, result: dict) -> Path:
    path = Path(run_dir) / SUMMARY_FILE
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------- text tables
HEADLINE = (("tokens", "tokens", "{:.0f}"), ("gini", "Gini", "{:.3f}"), ("weight_fraction_80", "80% weight in", "{:.1%}"),
            ("opposing_fraction", "opposing", "{:.1%}"), ("mean_alignment", "mean align.", "{:.4f}"),
            ("mean_magnitude", "mean magn.", "{:.3g}"), ("pearson_magnitude_alignment", "r(magn., align.)", "{:.3f}"))


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def summary_rows(result: dict) -> list[tuple[str, dict]]:
    """(label, group) for every group of the summary, in the order tables show them."""
    rows = [("all tokens", result["overall"])]
    rows += [(f"type {kind}", group) for kind, group in result["by_token_type"].items() if group["tokens"]]
    rows += [(f"{name} chunks", group) for name, group in result["by_chunk"].items()]
    rows += [(f"refinement step {g['refinement_step']}", g) for g in result["by_refinement_step"]]
    rows += [(f"trace at step {g['step']}", g) for g in result["over_training"]]
    if result["dropped"]["tokens"]:
        rows.append(("dropped by weighting/truncation", result["dropped"]))
    return rows


def format_summary(result: dict) -> str:
    widths = [34] + [max(len(h), 9) for _, h, _ in HEADLINE]
    lines = [f"{result['run_dir']}: objective {result['objective']}, weighting {result['loss_weighting']}, "
             f"{result['traces']} traces, {result['traced_tokens']} traced tokens",
             "  ".join(h.rjust(w) if i else "group".ljust(w)
                       for i, (h, w) in enumerate(zip(["group"] + [h for _, h, _ in HEADLINE], widths)))]
    for label, group in summary_rows(result):
        cells = [label.ljust(widths[0])] + [_cell(group.get(k), f).rjust(w) for (k, _, f), w in zip(HEADLINE, widths[1:])]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def format_comparison(a: dict, b: dict) -> str:
    """Every group both runs have (trace-by-trace rows left out), each metric as `A | B`."""
    widths = [34] + [max(len(h), 15) for _, h, _ in HEADLINE]
    lines = [f"A = {a['run_dir']} ({a['objective']}, weighting {a['loss_weighting']}, {a['traces']} traces)",
             f"B = {b['run_dir']} ({b['objective']}, weighting {b['loss_weighting']}, {b['traces']} traces)",
             "  ".join([("group (A | B)").ljust(widths[0])] + [h.rjust(w) for (_, h, _), w in zip(HEADLINE, widths[1:])])]
    groups_b = dict(summary_rows(b))
    for label, group_a in summary_rows(a):
        group_b = groups_b.get(label)
        if group_b is None or label.startswith("trace at step"):
            continue
        cells = [f"{_cell(group_a.get(k), f)} | {_cell(group_b.get(k), f)}".rjust(w)
                 for (k, _, f), w in zip(HEADLINE, widths[1:])]
        lines.append("  ".join([label.ljust(widths[0])] + cells))
    return "\n".join(lines)
