"""Training program: end to end, exact resume, crash-safe checkpoints, two processes, usage errors, DEBUG view."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llada_trm import LLaDATRMHybrid
from llada_trm.train import main
from llada_trm.training.arguments import parse_arguments
from llada_trm.training.checkpointing import complete_checkpoints, resolve_resume
from llada_trm.training.trainer import Trainer, TrainingError

REPO = Path(__file__).resolve().parents[1]


def base_args(backbone_dir, output_dir, *extra):
    return [
        "--model_name_or_path", str(backbone_dir), "--output_dir", str(output_dir),
        "--num_synthetic_train", "32", "--num_synthetic_eval", "8", "--batch_size", "4",
        "--max_recursive_steps", "2", "--min_recursive_steps", "1", "--head_hidden_size", "32",
        "--eval_max_samples", "0", "--logging_steps", "1", "--max_length", "192", "--learning_rate", "0.01",
        *extra,
    ]


def read_metrics(output_dir) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_cli_end_to_end_writes_checkpoint_and_metrics(backbone_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "train_llada_trm_hybrid_sft.py"),
         *base_args(backbone_dir, tmp_path, "--max_steps", "3", "--eval_max_samples", "2", "--eval_max_new_tokens", "48")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert complete_checkpoints(tmp_path)[-1].name == "checkpoint-3"
    assert "checkpoint:" in result.stdout
    assert "hybrid_refined" in result.stdout and "backbone_llada_sampler" in result.stdout  # the exact-match table
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert results["num_samples"] == 2
    assert set(results["accuracy"]) == {"backbone_llada_sampler", "backbone_chunked", "hybrid_refined"}
    assert all(0.0 <= value <= 1.0 for value in results["accuracy"].values())
    model = LLaDATRMHybrid.from_pretrained(tmp_path / "model")
    assert model.config.backbone_name_or_path == str(backbone_dir)


def test_frozen_backbone_checkpoint_holds_no_backbone_weights(backbone_dir, tmp_path):
    Trainer(parse_arguments(base_args(backbone_dir, tmp_path, "--max_steps", "1"))).train()
    from safetensors.torch import load_file

    checkpoint = complete_checkpoints(tmp_path)[-1]
    for file in (checkpoint / "model.safetensors", checkpoint / "model" / "model.safetensors"):
        keys = load_file(str(file)).keys()
        assert keys and all(k.startswith("head.") for k in keys), file


def test_exact_resume_matches_the_uninterrupted_run(backbone_dir, tmp_path):
    extra = ("--max_steps", "6", "--gradient_accumulation_steps", "2", "--num_synthetic_train", "24")
    straight = Trainer(parse_arguments(base_args(backbone_dir, tmp_path / "straight", *extra)))
    straight.train()

    interrupted_dir = tmp_path / "interrupted"
    Trainer(parse_arguments(base_args(backbone_dir, interrupted_dir, *extra))).train(until_step=3)
    resumed = Trainer(parse_arguments(base_args(backbone_dir, interrupted_dir, *extra,
                                                "--resume_from_checkpoint", "latest")))
    resumed.train()

    assert [r["loss"] for r in read_metrics(interrupted_dir)] == pytest.approx(
        [r["loss"] for r in read_metrics(tmp_path / "straight")], rel=1e-6)
    for a, b in zip(straight.model.head.parameters(), resumed.model.head.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_held_out_masked_losses_equal_a_plain_reference(backbone_dir, tmp_path):
    """eval_masked_chunk_loss / eval_backbone_masked_chunk_loss: mean CE over the tokens whose input is the mask
    token, the only ones decoding reads the head at (partial chunk masking, so the rule is per position)."""
    import torch.nn.functional as F

    from llada_trm.training.held_out import held_out_loss

    trainer = Trainer(parse_arguments(base_args(backbone_dir, tmp_path, "--max_steps", "2", "--partial_chunk_masking",
                                                "--mask_probability", "0.5")))
    trainer.train()
    metrics = held_out_loss(trainer)
    mask_id = trainer.model.backbone.config.mask_token_id
    head_sum = backbone_sum = count = 0.0
    trainer.model.eval()
    with torch.no_grad():
        for batch in trainer.eval_loader:
            output = trainer.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "chunk_index", "labels",
                                                            "chunk_is_masked")}, return_logits=True)
            masked = (batch["input_ids"] == mask_id) & (batch["labels"] != -100)
            labels = batch["labels"][masked]
            head_sum += float(F.cross_entropy(output.step_logits[-1][masked].float(), labels, reduction="sum"))
            backbone_sum += float(F.cross_entropy(output.backbone_logits[masked].float(), labels, reduction="sum"))
            count += float(masked.sum())
    assert count > 0
    assert metrics["eval_masked_chunk_loss"] == pytest.approx(head_sum / count, rel=1e-4)
    assert metrics["eval_backbone_masked_chunk_loss"] == pytest.approx(backbone_sum / count, rel=1e-4)
    # the trained head moved off the backbone, so the two numbers tell them apart
    assert metrics["eval_masked_chunk_loss"] != pytest.approx(metrics["eval_backbone_masked_chunk_loss"], rel=1e-6)
    assert read_metrics(tmp_path)[-1]["backbone_masked_chunk_loss"] > 0


def test_resume_with_a_changed_architecture_flag_stops_before_training(backbone_dir, tmp_path, capsys):
    assert main(base_args(backbone_dir, tmp_path, "--max_steps", "2", "--chunk_size", "16")) == 0
    metrics_before = (tmp_path / "metrics.jsonl").read_text()
    capsys.readouterr()
    code = main(base_args(backbone_dir, tmp_path, "--max_steps", "4", "--chunk_size", "8",
                          "--resume_from_checkpoint", "latest"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--chunk_size 16" in err[0] and "--chunk_size 8" in err[0] and "Traceback" not in err[0]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2"]  # nothing trained or saved
    assert (tmp_path / "metrics.jsonl").read_text() == metrics_before
    assert main(base_args(backbone_dir, tmp_path, "--max_steps", "3", "--chunk_size", "16",
                          "--resume_from_checkpoint", "latest")) == 0  # the saved value resumes


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(backbone_dir, tmp_path, monkeypatch):
    trainer = Trainer(parse_arguments(base_args(backbone_dir, tmp_path, "--max_steps", "4", "--save_steps", "2")))
    trainer.train(until_step=2)
    assert resolve_resume("latest", str(tmp_path)).name == "checkpoint-2"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(trainer.tokenizer, "save_pretrained", crash)  # dies after accelerate state + weights
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert any(p.name.startswith(".tmp-checkpoint-") for p in tmp_path.iterdir())
    restored = LLaDATRMHybrid.from_pretrained(resolve_resume("latest", str(tmp_path)) / "model")
    assert restored.head.out_proj.weight.abs().sum() > 0


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--batch_size", "-1"], "--batch_size"),
        (["--mask_probability", "1.5"], "--mask_probability"),
        (["--chunk_size", "0"], "--chunk_size"),
        (["--objective", "diffusion"], "--objective"),
        (["--no_such_flag", "1"], "no_such_flag"),
    ],
)
def test_invalid_flags_exit_2_with_the_flag_named(flags, fragment, capsys, tmp_path):
    code = main(["--output_dir", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err


def test_unknown_yaml_key_exits_2_naming_file_and_key(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("batch_size: 4\nmask_probabilty: 0.3\n")
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "mask_probabilty" in err and str(config) in err


def test_yaml_values_are_overridden_by_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("batch_size: 4\nmask_probability: 0.5\n")
    args = parse_arguments(["--config", str(config), "--mask_probability", "0.2"])
    assert args.train.batch_size == 4 and args.model.mask_probability == 0.2


def test_usage_error_in_a_subprocess_has_exit_code_2_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train_llada_trm_hybrid_sft.py"), "--chunk_size", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--chunk_size" in result.stderr and "Traceback" not in result.stderr


def test_debug_view_shows_masking_and_per_chunk_weights(backbone_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DEBUG", "1")
    # The library defaults, not the embedded profile's: whole chunks weigh 1.3 from their first token, and unmasked
    # ones 1.0 (the profile gives them no loss, so no line).
    Trainer(parse_arguments(base_args(backbone_dir, tmp_path, "--max_steps", "1", "--partial_chunk_masking", "false",
                                      "--unmasked_chunk_weight", "1.0"))).train()
    out = capsys.readouterr().out
    assert "Masked chunks: [" in out
    assert any(line.startswith("Masked ") and "tokens (" in line for line in out.splitlines())
    assert ", weight=1.30" in out and ", weight=1.00" in out
    assert "Chunk 0/" in out and "predicted:" in out


def test_llada_sft_baseline_trains_the_backbone(backbone_dir, tmp_path):
    trainer = Trainer(parse_arguments(base_args(backbone_dir, tmp_path, "--max_steps", "2", "--objective",
                                                "llada_sft", "--no_freeze_backbone")))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(tmp_path))


def test_llada_sft_run_is_scored_with_the_sampler_and_a_frozen_backbone_once(backbone_dir, tmp_path, monkeypatch):
    import llada_trm.training.held_out as held_out_module

    calls = []
    real = held_out_module.fair_evaluation

    def counting(**kwargs):
        calls.append(sorted(kwargs["models"]))
        return real(**kwargs)

    monkeypatch.setattr(held_out_module, "fair_evaluation", counting)
    sft = Trainer(parse_arguments(base_args(backbone_dir, tmp_path / "sft", "--max_steps", "2", "--objective",
                                            "llada_sft", "--no_freeze_backbone", "--eval_max_samples", "2",
                                            "--eval_max_new_tokens", "32", "--eval_steps", "1")))
    sft.train()
    results = json.loads((tmp_path / "sft" / "eval_results.json").read_text())
    assert results["step"] == 2 and results["num_samples"] == 2 and results["max_new_tokens"] == 32
    assert results["accuracy"]["hybrid_refined"] is None
    assert set(results["decoders"]) == {"backbone_llada_sampler", "backbone_chunked"}
    assert calls == [["backbone_chunked", "backbone_llada_sampler"]] * 2  # the trained backbone, every time

    calls.clear()
    hybrid = Trainer(parse_arguments(base_args(backbone_dir, tmp_path / "hybrid", "--max_steps", "2",
                                               "--eval_max_samples", "2", "--eval_max_new_tokens", "32",
                                               "--eval_steps", "1")))
    hybrid.train()
    assert calls == [["backbone_chunked", "backbone_llada_sampler", "hybrid_refined"], ["hybrid_refined"]]
    results = json.loads((tmp_path / "hybrid" / "eval_results.json").read_text())
    assert set(results["accuracy"]) == {"backbone_llada_sampler", "backbone_chunked", "hybrid_refined"}


@pytest.mark.slow
def test_two_processes_give_the_loss_of_one_process_with_the_same_global_batch(backbone_dir, tmp_path):
    def run(output_dir, processes, batch_size):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        args = base_args(backbone_dir, output_dir, "--max_steps", "3", "--batch_size", str(batch_size),
                         "--num_synthetic_train", "24", "--eval_split", "none")
        result = subprocess.run([*launcher, str(REPO / "train_llada_trm_hybrid_sft.py"), *args],
                                capture_output=True, text=True, timeout=900,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                     # both runs on CPU with gloo: two ranks cannot share one GPU under NCCL
                                     "CUDA_VISIBLE_DEVICES": ""})
        assert result.returncode == 0, result.stderr[-3000:]
        return [r["loss"] for r in read_metrics(output_dir)]

    one = run(tmp_path / "one", 1, 4)
    two = run(tmp_path / "two", 2, 2)
    assert len(one) == 3 and two == pytest.approx(one, rel=1e-4)


def test_non_finite_steps_are_skipped_then_stop_the_run(backbone_dir, tmp_path):
    trainer = Trainer(parse_arguments(base_args(backbone_dir, tmp_path, "--max_steps", "5", "--max_bad_steps", "3")))

    class Poisoned(type(trainer.objective)):
        def __call__(self, *args, **kwargs):
            result = super().__call__(*args, **kwargs)
            result.loss_sum = result.loss_sum * float("nan")
            return result

    trainer.objective.__class__ = Poisoned
    before = [p.detach().clone() for p in trainer.trainable]
    with pytest.raises(TrainingError, match="--max_bad_steps 3"):
        trainer.train()
    assert trainer.state.skipped_steps == 3 and trainer.state.global_step == 2  # stopped inside the third
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.trainable))


def test_inspect_shows_the_debug_view_without_training(backbone_dir, capsys):
    from llada_trm.inspect import main as inspect_main

    assert inspect_main(["--model_name_or_path", str(backbone_dir), "--chunk_size", "8", "--num_samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("Masked chunks: [") == 2 and "Chunk 0/" in out
    assert inspect_main(["--checkpoint", str(backbone_dir / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_the_main_command_shows_its_sample_marked_and_traced(tmp_path, capsys):
    """The summary's sample: the first validation problem, its answer marked right or wrong against the
    reference, and the hybrid's steps and confidences per chunk."""
    code = main(["--output_dir", str(tmp_path), "--max_steps", "2", "--num_synthetic_train", "32",
                 "--num_synthetic_eval", "8", "--eval_max_samples", "2", "--batch_size", "4"])
    assert code == 0
    out = capsys.readouterr().out
    sample = out[out.index("sample: the first validation problem"):]
    answer_line = next(line for line in sample.splitlines() if line.startswith("  answer: "))
    assert answer_line.endswith((" -> right", " -> wrong"))
    trace_lines = [line for line in sample.splitlines() if line.startswith("  chunk ")]
    assert trace_lines and all(" steps, confidence [" in line for line in trace_lines)
    steps = [int(line.split(": ")[1].split(" steps")[0]) for line in trace_lines]
    assert all(1 <= s <= 2 for s in steps)  # the profile's 2 refinement steps, at least 1 (min_recursive_steps)
