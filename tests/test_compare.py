"""The hybrid-vs-LLaDA-SFT runner: end to end on a tiny budget, and its compute bookkeeping."""

import json

import pytest

from llada_trm.compare import (
    FRONTIER_POINTS,
    PLOT_FILE,
    SUMMARY_FILE,
    compute_to_reach,
    headline,
    main,
    make_parser,
    method_argv,
)
from llada_trm.ablate import training_arguments
from llada_trm.training.arguments import parse_arguments


def run(method, points):
    return {"method": method, "decoder": "d", "points": [
        {"step": s, "train_seconds": s / 10, "flops": s * 100, "exact_match": em, "accuracy": {"x": em}}
        for s, em in points]}


def test_headline_finds_the_compute_at_which_the_hybrid_reaches_the_best_sft_accuracy():
    runs = [run("hybrid", [(0, 0.1), (10, 0.3), (20, 0.5)]), run("llada_sft", [(0, 0.1), (10, 0.2), (40, 0.3)]),
            run("llada_sft_lora", [(0, 0.1), (40, 0.25)])]
    assert compute_to_reach(runs[1], 0.3, "flops") == 4000
    assert compute_to_reach(runs[2], 0.3, "flops") is None
    result = headline(runs)
    assert result["best_exact_match"] == {"hybrid": 0.5, "llada_sft": 0.3, "llada_sft_lora": 0.25}
    assert result["target"] == {"method": "llada_sft", "exact_match": 0.3}
    assert result["hybrid_flops_fraction"] == 0.25 and result["hybrid_step_fraction"] == 0.25
    never = headline([run("hybrid", [(0, 0.1), (10, 0.2)]), run("llada_sft", [(0, 0.1), (10, 0.3)])])
    assert never["hybrid_flops_fraction"] is None


def test_the_hybrid_trains_at_the_profile_learning_rate_and_sft_at_its_own():
    options = make_parser().parse_args(["--output_dir", "runs/x"])
    hybrid = training_arguments(method_argv("hybrid", options))
    assert hybrid.train.learning_rate == parse_arguments([], environ={}).train.learning_rate
    assert training_arguments(method_argv("llada_sft", options)).train.learning_rate == 5e-4
    options = make_parser().parse_args(["--output_dir", "runs/x", "--hybrid_extra", "--learning_rate 7e-4"])
    assert training_arguments(method_argv("hybrid", options)).train.learning_rate == 7e-4


def test_bad_methods_and_owned_flags_are_usage_errors(tmp_path, capsys):
    assert main(["--output_dir", str(tmp_path), "--methods", "hybrid,dpo"]) == 2
    assert "dpo" in capsys.readouterr().err
    assert main(["--output_dir", str(tmp_path), "--extra", "--max_steps 3"]) == 2
    assert "--max_steps" in capsys.readouterr().err
    assert main(["--output_dir", str(tmp_path), "--frontier_points", "sampler/k3"]) == 2
    assert "--frontier_points" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_runs_end_to_end_and_writes_table_summary_and_plot(backbone_dir, tmp_path, capsys):
    pytest.importorskip("peft")
    extra = ("--num_synthetic_train 16 --num_synthetic_eval 4 --batch_size 4 --eval_max_samples 3 "
             "--eval_max_new_tokens 32 --max_recursive_steps 2 --min_recursive_steps 1 --head_hidden_size 32 "
             "--max_length 192 --lora_r 2")
    argv = ["--output_dir", str(tmp_path), "--max_steps", "2", "--eval_every", "1",
            "--model_name_or_path", str(backbone_dir), "--extra", extra]
    assert main(argv) == 0
    out, frontier_out = capsys.readouterr().out.split("decoding frontier after training")
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].split("|")[1].strip() == "method" and len(table) == 1 + 3 * 3  # 3 methods x steps 0, 1, 2
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    runs = {r["method"]: r for r in summary["runs"]}
    assert set(runs) == {"hybrid", "llada_sft", "llada_sft_lora"}
    for method, r in runs.items():
        assert [p["step"] for p in r["points"]] == [0, 1, 2]
        assert r["flops_per_step"] > 0 and r["points"][2]["flops"] == 2 * r["flops_per_step"]
        assert r["points"][2]["train_seconds"] > r["points"][1]["train_seconds"] > 0
        assert all(0.0 <= p["exact_match"] <= 1.0 for p in r["points"]), method
    assert runs["hybrid"]["decoder"] == "hybrid_refined"
    assert runs["llada_sft"]["decoder"] == runs["llada_sft_lora"]["decoder"] == "backbone_llada_sampler"
    assert "hybrid_refined" not in runs["llada_sft"]["points"][1]["accuracy"]
    # the frozen backbone's sampler score stays; full fine-tuning moves the backbone itself
    hybrid_sampler = [p["accuracy"]["backbone_llada_sampler"] for p in runs["hybrid"]["points"]]
    assert len(set(hybrid_sampler)) == 1
    assert runs["llada_sft"]["flops_per_step"] != runs["hybrid"]["flops_per_step"]
    assert set(summary["headline"]["best_exact_match"]) == set(runs)
    frontier_rows = [line.split("|")[1:3] for line in frontier_out.splitlines() if line.startswith("| ")][1:]
    hybrid_points = [point.strip() for method, point in frontier_rows if method.strip() == "hybrid"]
    assert hybrid_points == FRONTIER_POINTS.split(",")
    assert not any(point.strip().startswith("hybrid/") for method, point in frontier_rows if method.strip() != "hybrid")
    for r in runs.values():
        assert all(p["tokens_per_pass"] > 0 and p["backbone_flops_per_token"] > 0 for p in r["frontier"]["points"])
    pytest.importorskip("matplotlib")
    assert (tmp_path / PLOT_FILE).stat().st_size > 1000
