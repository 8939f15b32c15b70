"""The hybrid-vs-fine-tuned-backbone runner: end to end on a tiny budget, its compute bookkeeping, its own flag
handling, and the LoRA block-SFT competitor."""

import json

import pytest
import torch

from llada_trm.compare import (
    FRONTIER_POINTS,
    METHODS,
    PLOT_FILE,
    SUMMARY_FILE,
    compute_to_reach,
    headline,
    main,
    make_parser,
    method_argv,
    training_arguments,
)
from llada_trm.training.arguments import parse_arguments
from llada_trm.training.objectives import BlockSFTObjective


def parsed(method, *flags):
    options = make_parser().parse_args(["--output_dir", "runs/x", *flags])
    return training_arguments(method, method_argv(method, options))


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
    assert parsed("hybrid").train.learning_rate == parse_arguments([], environ={}).train.learning_rate
    assert parsed("llada_sft").train.learning_rate == 5e-4
    assert parsed("hybrid", "--hybrid_extra", "--learning_rate 7e-4").train.learning_rate == 7e-4


def test_every_method_scores_500_problems_and_the_sampler_200():
    for method in METHODS:
        args = parsed(method)
        assert (args.train.eval_max_samples, args.data.num_synthetic_eval) == (500, 500)
        assert args.train.eval_sampler_max_samples == 200
    assert parsed("hybrid", "--extra", "--eval_max_samples 50").train.eval_max_samples == 50  # --extra overrides


def test_block_sft_lora_is_lora_with_the_block_causal_objective():
    args = parsed("block_sft_lora")
    assert args.model.objective == "block_sft" and args.model.use_lora and args.model.freeze_backbone
    assert args.train.learning_rate == 2e-3 and METHODS["block_sft_lora"][1] == "backbone_chunked"


def test_any_training_flag_passes_through_extra():
    """compare has its own flag handling: --truncation_preset is a training flag like any other (ablate owns it)."""
    assert main.__module__ == "llada_trm.compare"
    assert parsed("hybrid", "--extra", "--truncation_preset A2").truncation_flags == {"preset": "A2"}
    assert parsed("llada_sft", "--llada_sft_extra=--truncation_preset A2").truncation_flags == {"preset": "A2"}


@pytest.mark.parametrize("flags, fragment", [
    (["--methods", "hybrid,dpo"], "dpo"),
    (["--extra", "--max_steps 3"], "--max_steps"),
    (["--frontier_points", "sampler/k3"], "--frontier_points"),
    (["--extra", "--no_such_flag 3"], "--no_such_flag"),
    (["--extra", "--batch_size lots"], "--batch_size"),
    (["--extra", "--batch_size -1"], "--batch_size"),
    (["--extra", "--truncation_preset A9"], "A9"),
    (["--block_sft_lora_extra", "--lora_r 0"], "--lora_r"),
    (["--extra", "--mask_probability 'unclosed"], "--extra"),
])
def test_bad_flags_are_one_line_naming_the_flag_exit_2(flags, fragment, tmp_path, capsys):
    assert main(["--output_dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not list(tmp_path.iterdir())  # refused before anything is trained or written


def test_block_sft_lora_one_step_trains_only_adapters_with_the_block_causal_objective(backbone_dir, tmp_path):
    pytest.importorskip("peft")
    from llada_trm.training.trainer import Trainer

    args = parsed("block_sft_lora", "--model_name_or_path", str(backbone_dir), "--extra",
                  "--num_synthetic_train 8 --num_synthetic_eval 2 --batch_size 4 --eval_max_samples 0 "
                  "--max_length 192 --lora_r 2 --learning_rate 0.05 --warmup_ratio 0")
    args.train.output_dir = str(tmp_path)
    trainer = Trainer(args)
    assert type(trainer.objective) is BlockSFTObjective
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train_step(next(trainer.windows()))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed and all("lora_" in name for name in changed)
    lora_b = {name for name in before if "lora_B" in name}
    assert lora_b <= changed  # every adapter moved (B starts at zero, so A gets no gradient at the first step)
    assert all(not p.requires_grad for name, p in model.named_parameters() if "lora_" not in name)


@pytest.mark.slow
def test_compare_runs_end_to_end_and_writes_table_summary_and_plot(backbone_dir, tmp_path, capsys):
    pytest.importorskip("peft")
    extra = ("--num_synthetic_train 16 --num_synthetic_eval 4 --batch_size 4 --eval_max_samples 3 "
             "--eval_sampler_max_samples 2 "
             "--eval_max_new_tokens 32 --max_recursive_steps 2 --min_recursive_steps 1 --head_hidden_size 32 "
             "--max_length 192 --lora_r 2")
    argv = ["--output_dir", str(tmp_path), "--max_steps", "2", "--eval_every", "1",
            "--model_name_or_path", str(backbone_dir), "--extra", extra]
    assert main(argv) == 0
    out, frontier_out = capsys.readouterr().out.split("decoding frontier after training")
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].split("|")[1].strip() == "method" and len(table) == 1 + 4 * 3  # 4 methods x steps 0, 1, 2
    assert table[0].split("|")[6].strip() == "s.e."
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    runs = {r["method"]: r for r in summary["runs"]}
    assert set(runs) == set(METHODS)
    for method, r in runs.items():
        assert [p["step"] for p in r["points"]] == [0, 1, 2]
        assert r["flops_per_step"] > 0 and r["points"][2]["flops"] == 2 * r["flops_per_step"]
        assert r["points"][2]["train_seconds"] > r["points"][1]["train_seconds"] > 0
        assert all(0.0 <= p["exact_match"] <= 1.0 for p in r["points"]), method
    assert runs["hybrid"]["decoder"] == "hybrid_refined"
    assert runs["llada_sft"]["decoder"] == runs["llada_sft_lora"]["decoder"] == "backbone_llada_sampler"
    assert runs["block_sft_lora"]["decoder"] == "backbone_chunked"
    assert "hybrid_refined" not in runs["llada_sft"]["points"][1]["accuracy"]
    # the frozen backbone's sampler score stays; full fine-tuning moves the backbone itself
    hybrid_sampler = [p["accuracy"]["backbone_llada_sampler"] for p in runs["hybrid"]["points"]]
    assert len(set(hybrid_sampler)) == 1
    assert runs["llada_sft"]["flops_per_step"] != runs["hybrid"]["flops_per_step"]
    assert set(summary["headline"]["best_exact_match"]) == set(runs)
    frontier_out, scores_out = frontier_out.split("each method's frontier in one number")
    frontier_rows = [line.split("|")[1:3] for line in frontier_out.splitlines() if line.startswith("| ")][1:]
    hybrid_points = [point.strip() for method, point in frontier_rows if method.strip() == "hybrid"]
    assert hybrid_points == FRONTIER_POINTS.split(",")
    assert not any(point.strip().startswith("hybrid/") for method, point in frontier_rows if method.strip() != "hybrid")
    for r in runs.values():
        assert all(p["tokens_per_pass"] > 0 and p["backbone_flops_per_token"] > 0 for p in r["frontier"]["points"])
        # the sampler below a chunk per step scores --eval_sampler_max_samples, sampler/k16 all of them
        assert all(p["num_samples"] == (2 if p["kind"] == "sampler" and p["per_step"] != 16 else 3)
                   for p in r["frontier"]["points"])
    scores = [line.split("|")[1].strip() for line in scores_out.splitlines() if line.startswith("| ")][1:]
    assert scores == list(METHODS) and set(summary["methods"]) == set(METHODS)
    assert all(s["aup"] is not None and s["one_token_exact_match"] is not None for s in summary["methods"].values())
    pytest.importorskip("matplotlib")
    assert (tmp_path / PLOT_FILE).stat().st_size > 1000
