"""PNG plots of a trace summary (the optional `plot` extra: matplotlib). Without matplotlib they are skipped
with a note; the HTML page never needs them."""

from __future__ import annotations

from pathlib import Path

from llada_trm.inference.reporting import matplotlib_figure
from llada_trm.training.grad_trace.token_types import TOKEN_TYPES

PLOT_FILES = ("grad_trace_alignment_by_type.png", "grad_trace_magnitude_vs_alignment.png",
              "grad_trace_gini_over_steps.png")
TYPE_COLOURS = dict(zip(TOKEN_TYPES, ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#7f7f7f")))


def write_plots(run_dir: str | Path, result: dict, tokens: list[dict]) -> list[Path]:
    Figure = matplotlib_figure("the PNG plots")
    if Figure is None:
        return []
    run_dir = Path(run_dir)
    paths = [run_dir / name for name in PLOT_FILES]
    _by_type(Figure, result, paths[0])
    _scatter(Figure, tokens, paths[1])
    _over_steps(Figure, result, paths[2])
    return paths


def _by_type(Figure, result: dict, path: Path) -> None:
    kinds = [k for k in TOKEN_TYPES if result["by_token_type"][k]["tokens"]]
    figure = Figure(figsize=(8, 3.2), layout="constrained")
    for ax, key, title in zip(figure.subplots(1, 2), ("mean_alignment", "opposing_fraction"),
                              ("mean alignment with the micro-batch gradient", "fraction of opposing tokens")):
        values = [result["by_token_type"][k][key] or 0.0 for k in kinds]
        ax.bar(kinds, values, color=[TYPE_COLOURS[k] for k in kinds])
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
    figure.savefig(path, dpi=110)


def _scatter(Figure, tokens: list[dict], path: Path) -> None:
    figure = Figure(figsize=(5.5, 4), layout="constrained")
    ax = figure.subplots()
    for kind in TOKEN_TYPES:
        points = [(t["grad_norm"], t["alignment"]) for t in tokens if t["token_type"] == kind
                  and t.get("alignment") is not None and (t.get("grad_norm") or 0) > 0]
        if points:
            ax.scatter(*zip(*points), s=6, alpha=0.6, color=TYPE_COLOURS[kind], label=kind)
    ax.set_xscale("log")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("per-token gradient magnitude (contribution)")
    ax.set_ylabel("alignment (cosine)")
    ax.legend(fontsize=8, markerscale=2)
    figure.savefig(path, dpi=110)


def _over_steps(Figure, result: dict, path: Path) -> None:
    rows = result["over_training"]
    figure = Figure(figsize=(8, 3.2), layout="constrained")
    for ax, key, title in zip(figure.subplots(1, 2), ("gini", "opposing_fraction"),
                              ("Gini of magnitudes", "fraction of opposing tokens")):
        points = [(r["step"], r[key]) for r in rows if r[key] is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3)
        ax.set_xlabel("optimiser step")
        ax.set_title(title, fontsize=10)
    figure.savefig(path, dpi=110)
