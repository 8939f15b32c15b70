"""The numbers and the printing every report shares: the standard error, AUP and TPF within 1 point against values
worked out by hand, the one table writer, the one optional-matplotlib fallback, and the main command's table with
its standard-error column on a short run."""

import json
import math
import sys

import pytest

from llada_trm.inference.frontier import is_one_token_point, method_scores
from llada_trm.inference.reporting import (
    aup,
    aup_weight,
    markdown_table,
    matplotlib_figure,
    paired_difference,
    pareto_points,
    standard_error,
    tpf_within,
)


def table_cells(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header, *body = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return [dict(zip(header, cells)) for cells in body]


@pytest.mark.parametrize("correct, total", [(0, 10), (1, 3), (37, 100), (99, 200), (500, 500), (213, 500)])
def test_standard_error_is_the_binomial_one(correct, total):
    p = correct / total
    assert standard_error(correct, total) == pytest.approx(math.sqrt(p * (1 - p) / total), rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError):
        standard_error(0, 0)


def test_paired_difference_is_the_mean_difference_and_its_paired_standard_error():
    """Hybrid right on problems 0-5, the other decoder on 3-7 of 10 scored (8 of them shared): d = (1,1,1,0,0,0,-1,
    -1), mean 1/8, E[d^2] = 5/8, s.e. = sqrt((5/8 - 1/64) / 8); the extra problems of the longer list are left out."""
    hybrid = [1, 1, 1, 1, 1, 1, 0, 0, 1, 1]
    other = [0, 0, 0, 1, 1, 1, 1, 1]
    difference, error = paired_difference(hybrid, other)
    assert difference == pytest.approx(1 / 8, abs=1e-15)
    assert error == pytest.approx(math.sqrt((5 / 8 - 1 / 64) / 8), rel=1e-12)
    assert paired_difference([1, 0, 1], [1, 0, 1]) == (0.0, 0.0)  # the same answers: no difference, no error
    with pytest.raises(ValueError):
        paired_difference([], [1])


def test_pareto_points_keep_what_no_faster_point_beats():
    points = [(4.0, 76.0), (1.0, 80.0), (2.0, 78.0), (2.0, 60.0), (3.0, 70.0), (8.0, 50.0)]
    assert pareto_points(points) == [(1.0, 80.0), (2.0, 78.0), (4.0, 76.0), (8.0, 50.0)]


def test_aup_of_a_hand_made_frontier_equals_the_hand_computed_value():
    # Unsorted, with a point dominated at the same TPF (2, 60), one dominated by a faster point (3, 70) and one more
    # than 5 points below the lowest-TPF accuracy (8, 50); another method reaches 90, the best of all.
    points = [(4.0, 76.0), (1.0, 80.0), (2.0, 78.0), (2.0, 60.0), (3.0, 70.0), (8.0, 50.0)]
    w = {y: math.exp(-3.0 * (1.0 - y / 90.0)) for y in (80.0, 78.0, 76.0)}
    by_hand = 1.0 * 80.0 + (2.0 - 1.0) * (78.0 * w[78.0] + 80.0 * w[80.0]) / 2 \
        + (4.0 - 2.0) * (76.0 * w[76.0] + 78.0 * w[78.0]) / 2
    assert by_hand == pytest.approx(234.7475, abs=1e-4)  # 80 + 54.8037 + 99.9437, worked out on paper
    assert aup(points, best_accuracy=90.0) == pytest.approx(by_hand, rel=1e-12)


def test_aup_without_loss_is_the_area_under_the_curve_and_the_weight_caps_at_one():
    assert aup([(1.0, 90.0), (3.0, 90.0)], best_accuracy=90.0) == pytest.approx(270.0)  # 3 x 90 from TPF 0
    assert aup_weight(95.0, 90.0) == 1.0 and aup_weight(0.0, 90.0) == pytest.approx(math.exp(-3.0))
    assert aup([(1.0, 40.0)], best_accuracy=90.0) == pytest.approx(40.0)  # the first point is not weighted
    assert aup([], best_accuracy=90.0) is None


def test_tpf_within_one_point_takes_the_largest_measured_tpf_without_interpolating():
    points = [(0.92, 0.495), (4.4, 0.49), (4.8, 0.485), (7.4, 0.484), (14.7, 0.40)]
    assert tpf_within(points, 0.495) == 4.8  # 0.485 is exactly one point below: included
    assert tpf_within(points, 0.60) is None and tpf_within(points, None) is None


def frontier_point(name, accuracy, tpf):
    kind, setting = name.split("/")
    per_step = int(setting[1:]) if setting[0] in "kr" else None
    threshold = float(setting[1:]) if setting[0] == "t" else None
    return {"name": name, "kind": kind, "per_step": per_step, "threshold": threshold, "accuracy": accuracy,
            "tokens_per_pass": tpf}


def test_method_scores_use_the_best_one_token_point_and_the_best_accuracy_of_all_methods():
    lora = [frontier_point("sampler/k1", 0.56, 0.92), frontier_point("sampler/t0.9", 0.55, 4.5),
            frontier_point("chunked/r16", 0.46, 0.92), frontier_point("chunked/r1", 0.43, 14.7)]
    hybrid = [frontier_point("sampler/k1", 0.51, 0.92), frontier_point("hybrid/r16", 0.50, 0.92),
              frontier_point("hybrid/r1", 0.47, 14.7)]
    assert [is_one_token_point(p, 16) for p in lora] == [True, False, True, False]
    scores = method_scores({"lora": lora, "hybrid": hybrid}, chunk_size=16)
    assert scores["lora"]["one_token_exact_match"] == 0.56 and scores["lora"]["tpf_at_one_token_minus_1"] == 4.5
    assert scores["hybrid"]["one_token_exact_match"] == 0.51 and scores["hybrid"]["tpf_at_one_token_minus_1"] == 0.92
    assert scores["hybrid"]["best_exact_match_at_tpf_8"] == 0.47
    weight = lambda y: math.exp(-3.0 * (1.0 - y / 56.0))  # noqa: E731
    assert scores["lora"]["aup"] == pytest.approx(0.92 * 56.0 + (4.5 - 0.92) * (55.0 * weight(55.0) + 56.0) / 2)
    assert scores["hybrid"]["aup"] == pytest.approx(0.92 * 51.0 + (14.7 - 0.92) * (47.0 * weight(47.0)
                                                                                  + 51.0 * weight(51.0)) / 2)


def test_markdown_table_aligns_columns_and_marks_the_right_aligned_ones():
    text = markdown_table(("name", "value"), [("a", "1.000"), ("long name", None)], right=[1])
    assert text.splitlines() == ["| name      | value |",
                                 "|-----------|------:|",
                                 "| a         | 1.000 |",
                                 "| long name |     - |"]
    assert table_cells(text) == [{"name": "a", "value": "1.000"}, {"name": "long name", "value": "-"}]


def test_without_matplotlib_every_plot_is_skipped_with_one_note(tmp_path, monkeypatch, capsys):
    from llada_trm.compare import plot_accuracy
    from llada_trm.inference.frontier import plot_frontier
    from llada_trm.training.grad_trace.plots import write_plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert matplotlib_figure("x.png") is None
    assert plot_frontier({"points": []}, tmp_path / "frontier.png") is None
    assert plot_accuracy([], tmp_path / "compare.png") is None
    assert write_plots(tmp_path, {}, []) == []
    notes = capsys.readouterr().out.strip().splitlines()
    assert len(notes) == 4 and all("pip install matplotlib" in note for note in notes)
    assert "skipped frontier.png" in notes[1] and "skipped the PNG plots" in notes[3]
    assert not list(tmp_path.iterdir())


def test_main_command_table_shows_the_standard_error_of_each_decoder(tmp_path, capsys):
    """A short run on the shipped backbone (which answers some problems): the table's s.e. is sqrt(p(1-p)/n) of its
    own correct and samples columns, and the sampler scores only the first --eval_sampler_max_samples problems."""
    from llada_trm.train import main

    argv = ["--output_dir", str(tmp_path), "--max_steps", "1", "--num_synthetic_train", "16",
            "--num_synthetic_eval", "12", "--batch_size", "4", "--eval_max_samples", "12",
            "--eval_sampler_max_samples", "6", "--logging_steps", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    table, lead = out[out.index("exact match on 12 held-out problems"):].split("written to")[0].split(
        "| hybrid lead (same problems)")
    rows = {row["decoder"]: row for row in table_cells(table)}
    assert set(rows) == {"backbone_llada_sampler", "backbone_chunked", "hybrid_refined"}
    assert rows["backbone_llada_sampler"]["samples"] == "6" and rows["hybrid_refined"]["samples"] == "12"
    for row in rows.values():
        correct, total = int(row["correct"]), int(row["samples"])
        assert row["exact match"] == f"{correct / total:.3f}"
        assert row["s.e."] == f"{math.sqrt(correct / total * (1 - correct / total) / total):.3f}"
    assert any(0 < int(row["correct"]) < int(row["samples"]) for row in rows.values())  # a non-zero error to check
    # the hybrid's lead over each backbone decoder, paired over the problems both scored (eval_results.json's lists)
    results = json.loads((tmp_path / "eval_results.json").read_text())["decoders"]
    hybrid = results["hybrid_refined"]["right"]
    assert len(hybrid) == 12 and sum(hybrid) == int(rows["hybrid_refined"]["correct"])
    leads = {row["hybrid lead (same problems)"]: row for row in table_cells("| hybrid lead (same problems)" + lead)}
    for name in ("backbone_llada_sampler", "backbone_chunked"):
        other = results[name]["right"]
        shared = len(other)
        differences = [a - b for a, b in zip(hybrid, other)]
        mean = sum(differences) / shared
        error = math.sqrt((sum(d * d for d in differences) / shared - mean ** 2) / shared)
        row = leads[f"hybrid_refined - {name}"]
        assert (row["difference"], row["paired s.e."], row["samples"]) == (f"{mean:+.3f}", f"{error:.3f}", str(shared))
    # the cheap frontier points beside the table: not the table's own chunk decoders again, and the hybrid's lead
    # over each, paired over the problems both scored (the sampler at a chunk per step scores all 12)
    cost_text, cost_lead = out[out.index("decoding cost on the same problems"):].split("| hybrid lead (same problems)")
    cost = {row["point"]: row for row in table_cells(cost_text)}
    assert set(cost) == {"sampler/k16"} and all(row["s.e."] != "-" for row in cost.values())
    cost_leads = {row["hybrid lead (same problems)"]: row
                  for row in table_cells("| hybrid lead (same problems)" + cost_lead)}
    row = cost_leads["hybrid_refined - sampler/k16"]
    assert len(cost_leads) == 1 and row["samples"] == "12"
    assert float(row["difference"]) == pytest.approx(sum(hybrid) / 12 - float(cost["sampler/k16"]["exact match"]),
                                                     abs=1e-3)
