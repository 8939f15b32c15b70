"""Fault injection: every file of a checkpoint and of a model directory truncated, given a corrupt header,
deleted or replaced by a directory; run directories owned and locked. Each case ends in a clean resume or
one clear line (exit code 2 in the CLIs, a typed exception in the API). Kill tests: tests/test_kill_resume.py."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import assert_same_losses, losses, run_args

from llada_trm import LLaDAModelLM, LLaDATRMHybrid
from llada_trm.generate import main as generate_main
from llada_trm.train import main as train_main
from llada_trm.model.integrity import MANIFEST, BrokenFileError, write_manifest
from llada_trm.model.loading import load_tokenizer, resolve_device
from llada_trm.training.checkpointing import complete_checkpoints, resolve_resume, validate_checkpoint
from llada_trm.training.run_directory import acquire_lock, release_lock

CHECKPOINT_FILES = [
    "manifest.json", "model.safetensors", "optimizer.bin", "rng_state_0.json", "rng_state_0.safetensors",
    "scheduler.json", "trainer_state.json", "model/manifest.json", "model/config.json", "model/model.safetensors",
    "model/tokenizer.json", "model/tokenizer_config.json", "model/chat_template.jinja",
]
MODEL_FILES = [f.removeprefix("model/") for f in CHECKPOINT_FILES if f.startswith("model/")]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(b"\xff" * min(16, len(data)) + data[16:])


def delete(path: Path) -> None:
    path.unlink()


def replace_with_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


FAULTS = {"truncate": truncate, "corrupt_header": corrupt_header, "delete": delete, "directory": replace_with_directory}


def one_error_line(err: str, *fragments: str) -> None:
    """stderr ends with exactly one `error:` line naming every fragment (progress bars may come before it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


@pytest.fixture(scope="module")
def reference_run(backbone_dir, tmp_path_factory):
    """Three steps with a checkpoint after each: checkpoint-1..3, model/."""
    root = tmp_path_factory.mktemp("reference") / "run"
    assert train_main(run_args(backbone_dir, root, "--max_steps", "3")) == 0
    return root


@pytest.fixture
def run_copy(reference_run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(reference_run, root, ignore=shutil.ignore_patterns(".lock"))
    return root


def test_a_checkpoint_holds_exactly_the_files_under_test_and_no_pickle(reference_run):
    checkpoint = reference_run / "checkpoint-3"
    files = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())
    assert files == sorted(CHECKPOINT_FILES)
    assert not list(reference_run.rglob("*.pkl"))
    listed = json.loads((checkpoint / MANIFEST).read_text())["files"]
    assert listed["optimizer.bin"] == (checkpoint / "optimizer.bin").stat().st_size


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_broken_checkpoint_file_is_one_line_and_latest_falls_back(name, fault, run_copy, backbone_dir, capsys):
    checkpoint = run_copy / "checkpoint-3"
    FAULTS[fault](checkpoint / name)
    with pytest.raises(BrokenFileError) as caught:
        validate_checkpoint(checkpoint)
    assert str(checkpoint / name) in str(caught.value)

    code = train_main(run_args(backbone_dir, run_copy, "--max_steps", "3", "--resume_from_checkpoint", str(checkpoint)))
    assert code == 2
    one_error_line(capsys.readouterr().err, str(checkpoint / name))

    said = []
    assert resolve_resume("latest", str(run_copy), say=said.append) == run_copy / "checkpoint-2"
    assert len(said) == 1 and "skipping checkpoint-3" in said[0] and name in said[0]


def test_latest_skips_a_broken_checkpoint_and_continues_exactly(run_copy, reference_run, backbone_dir, capsys):
    truncate(run_copy / "checkpoint-3" / "optimizer.bin")
    assert train_main(run_args(backbone_dir, run_copy, "--max_steps", "3", "--resume_from_checkpoint", "latest")) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint-3" in out and "resumed from" in out and "checkpoint-2 at step 2" in out
    assert_same_losses(losses(run_copy), losses(reference_run))
    expected = LLaDATRMHybrid.from_pretrained(reference_run / "model")
    resumed = LLaDATRMHybrid.from_pretrained(run_copy / "model")
    for a, b in zip(expected.head.parameters(), resumed.head.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_every_checkpoint_broken_is_an_error_not_a_fresh_start(run_copy, backbone_dir, capsys):
    for checkpoint in complete_checkpoints(run_copy):
        corrupt_header(checkpoint / "model.safetensors")
    assert train_main(run_args(backbone_dir, run_copy, "--max_steps", "3", "--resume_from_checkpoint", "latest")) == 2
    one_error_line(capsys.readouterr().err, "no usable checkpoint", "checkpoint-1")


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", MODEL_FILES)
def test_broken_hybrid_model_file_is_one_line_in_api_and_cli(name, fault, run_copy, capsys):
    model_dir = run_copy / "model"
    FAULTS[fault](model_dir / name)
    with pytest.raises(BrokenFileError) as caught:
        LLaDATRMHybrid.from_pretrained(model_dir)
    assert str(model_dir / name) in str(caught.value)
    assert generate_main(["--checkpoint", str(model_dir), "--prompt", "Mia has 3 apples.", "--device", "cpu"]) == 2
    one_error_line(capsys.readouterr().err, str(model_dir), name)


def backbone_files(backbone_dir) -> list[str]:
    return sorted(p.name for p in Path(backbone_dir).iterdir() if p.is_file())


# A plain model directory (no manifest) cannot tell an optional file that is missing from one never written.
OPTIONAL_BACKBONE_FILES = {"chat_template.jinja", "generation_config.json"}


@pytest.mark.parametrize("fault", FAULTS)
def test_broken_backbone_directory_file_is_one_line_in_training(fault, backbone_dir, tmp_path, capsys):
    for name in backbone_files(backbone_dir):
        broken = tmp_path / f"{fault}-{name}"
        shutil.copytree(backbone_dir, broken)
        FAULTS[fault](broken / name)
        code = train_main(run_args(broken, tmp_path / f"out-{fault}-{name}", "--max_steps", "1"))
        err = capsys.readouterr().err
        if fault == "delete" and name in OPTIONAL_BACKBONE_FILES:
            assert code == 0, err
            continue
        assert code == 2, (name, err)
        one_error_line(err, str(broken))


def test_backbone_loaders_raise_typed_errors_naming_the_path(backbone_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BrokenFileError, match="no config.json"):
        LLaDAModelLM.from_pretrained(str(empty))
    with pytest.raises(BrokenFileError, match="no tokenizer files"):
        load_tokenizer(str(empty))
    with pytest.raises(BrokenFileError, match="runs/missing/model: no such directory"):
        LLaDAModelLM.from_pretrained("runs/missing/model")
    copy = tmp_path / "copy"
    shutil.copytree(backbone_dir, copy)
    (copy / "tokenizer_config.json").unlink()
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(BrokenFileError, match="no mask token"):
        load_tokenizer(str(copy))


@pytest.mark.parametrize("target", ["empty", "missing", "file"])
def test_bad_model_name_or_path_exits_2_with_one_line(target, tmp_path, capsys):
    path = tmp_path / target
    if target == "empty":
        path.mkdir()
    elif target == "file":
        path.write_text("not a model")
    assert train_main(["--model_name_or_path", str(path), "--output_dir", str(tmp_path / "out")]) == 2
    one_error_line(capsys.readouterr().err, str(path))


def test_generate_on_a_device_this_torch_lacks_is_one_line(reference_run, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert generate_main(["--checkpoint", str(reference_run / "model"), "--prompt", "x", "--device", "cuda"]) == 2
    one_error_line(capsys.readouterr().err, "--device cuda")
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("quantum")


def test_a_pickle_in_a_checkpoint_is_refused(run_copy):
    checkpoint = run_copy / "checkpoint-3"
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(BrokenFileError, match="custom_checkpoint_0.pkl: a pickle file"):
        validate_checkpoint(checkpoint)


def test_a_checkpoint_without_manifest_is_not_complete(run_copy):
    (run_copy / "checkpoint-3" / MANIFEST).unlink()  # as an interrupted copy, or a checkpoint of an older version
    with pytest.raises(BrokenFileError, match="manifest.json: missing"):
        validate_checkpoint(run_copy / "checkpoint-3")
    said = []
    assert resolve_resume("latest", str(run_copy), say=said.append).name == "checkpoint-2"
    assert "checkpoint-3" in said[0] and "never completed" in said[0]


def test_an_interrupted_write_is_never_listed(run_copy):
    shutil.copytree(run_copy / "checkpoint-3", run_copy / ".tmp-checkpoint-4")
    assert [p.name for p in complete_checkpoints(run_copy)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_latest_means_the_most_recent_write_not_the_highest_step(run_copy):
    manifest_file = run_copy / "checkpoint-3" / MANIFEST
    manifest = json.loads(manifest_file.read_text())
    manifest["written_at_ns"] = 0  # as if written before checkpoint-1 and checkpoint-2
    manifest_file.write_text(json.dumps(manifest))
    assert resolve_resume("latest", str(run_copy)).name == "checkpoint-2"


def test_latest_ignores_a_checkpoint_of_another_run(run_copy):
    manifest_file = run_copy / "checkpoint-3" / MANIFEST
    manifest_file.write_text(json.dumps({**json.loads(manifest_file.read_text()), "run_id": "someone-else"}))
    run_id = json.loads((run_copy / "run.json").read_text())["run_id"]
    said = []
    assert resolve_resume("latest", str(run_copy), say=said.append, run_id=run_id).name == "checkpoint-2"
    assert "written by another run" in said[0]


def test_a_new_run_refuses_a_directory_of_another_run(run_copy, backbone_dir, capsys):
    before = (run_copy / "model" / "model.safetensors").read_bytes()
    assert train_main(run_args(backbone_dir, run_copy, "--max_steps", "1")) == 2
    one_error_line(capsys.readouterr().err, "--overwrite_output_dir", "--resume_from_checkpoint latest")
    assert (run_copy / "model" / "model.safetensors").read_bytes() == before  # nothing replaced


def test_the_directory_is_checked_before_data_or_model_are_loaded(run_copy, backbone_dir, monkeypatch):
    from llada_trm.training import trainer as trainer_module
    from llada_trm.training.arguments import UsageError, parse_arguments

    def must_not_load(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the run directory was checked")

    monkeypatch.setattr(trainer_module, "load_tokenizer", must_not_load)
    with pytest.raises(UsageError, match="holds the output of another run"):
        trainer_module.Trainer(parse_arguments(run_args(backbone_dir, run_copy, "--max_steps", "1")))
    lock = acquire_lock(run_copy)
    try:
        with pytest.raises(UsageError, match="another run is training in it"):
            trainer_module.Trainer(parse_arguments(run_args(backbone_dir, run_copy,
                                                            "--resume_from_checkpoint", "latest")))
    finally:
        release_lock(lock)


def test_overwrite_output_dir_starts_a_new_run(run_copy, backbone_dir, capsys):
    old_run = json.loads((run_copy / "run.json").read_text())["run_id"]
    assert train_main(run_args(backbone_dir, run_copy, "--max_steps", "1", "--overwrite_output_dir")) == 0
    assert [p.name for p in complete_checkpoints(run_copy)] == ["checkpoint-1"]
    assert json.loads((run_copy / "run.json").read_text())["run_id"] != old_run
    assert [step for step, _ in losses(run_copy)] == [1]


def test_resume_beyond_the_schedule_is_an_error(run_copy, backbone_dir, capsys):
    assert train_main(run_args(backbone_dir, run_copy, "--max_steps", "2", "--resume_from_checkpoint", "latest")) == 2
    one_error_line(capsys.readouterr().err, "at step 3", "--max_steps")


def test_a_second_live_run_in_the_same_directory_is_refused(run_copy, backbone_dir, capsys):
    lock = acquire_lock(run_copy)
    try:
        code = train_main(run_args(backbone_dir, run_copy, "--max_steps", "3", "--resume_from_checkpoint", "latest"))
    finally:
        release_lock(lock)
    assert code == 2
    one_error_line(capsys.readouterr().err, "another run is training in it")
    (run_copy / ".lock").write_text("999999\n")  # a stale lock file of a dead process does not block
    assert train_main(run_args(backbone_dir, run_copy, "--max_steps", "3", "--resume_from_checkpoint", "latest")) == 0


@pytest.mark.parametrize("cli", ["generate", "evaluate", "inspect"])
def test_inference_clis_on_a_truncated_checkpoint_print_one_line(cli, run_copy, capsys):
    from llada_trm import evaluate, generate, inspect

    model_dir = run_copy / "checkpoint-3" / "model"
    truncate(model_dir / "model.safetensors")
    argv = {"generate": ["--checkpoint", str(model_dir), "--prompt", "x", "--device", "cpu"],
            "evaluate": ["--checkpoint", str(model_dir), "--max_samples", "2", "--device", "cpu"],
            "inspect": ["--checkpoint", str(model_dir)]}[cli]
    assert {"generate": generate, "evaluate": evaluate, "inspect": inspect}[cli].main(argv) == 2
    one_error_line(capsys.readouterr().err, str(model_dir / "model.safetensors"), "truncated")


def test_from_pretrained_of_a_missing_or_plain_directory_raises_typed_errors(tmp_path, backbone_dir):
    with pytest.raises(BrokenFileError, match="no such directory"):
        LLaDATRMHybrid.from_pretrained(tmp_path / "runs" / "nothing" / "model")
    with pytest.raises(BrokenFileError, match="'llada': not a hybrid checkpoint"):
        LLaDATRMHybrid.from_pretrained(backbone_dir)
    copy = tmp_path / "hybrid"
    model = LLaDATRMHybrid.from_pretrained(save_fresh_hybrid(backbone_dir, copy))
    assert model.config.backbone_name_or_path == str(backbone_dir)
    (copy / MANIFEST).unlink()  # as a directory written by an older version, or an interrupted copy
    with pytest.raises(BrokenFileError, match="manifest.json: missing"):
        LLaDATRMHybrid.from_pretrained(copy)


def save_fresh_hybrid(backbone_dir, directory: Path) -> Path:
    from llada_trm import HybridConfig

    config = HybridConfig(backbone_name_or_path=str(backbone_dir), head_hidden_size=32)
    LLaDATRMHybrid(config).save_pretrained(directory)
    return directory


def test_resume_with_other_head_settings_is_one_line_naming_both_values(run_copy, backbone_dir, capsys):
    code = train_main(run_args(backbone_dir, run_copy, "--max_steps", "4", "--head_hidden_size", "64",
                               "--resume_from_checkpoint", "latest"))
    assert code == 2
    one_error_line(capsys.readouterr().err, str(run_copy / "checkpoint-3"), "--head_hidden_size 32")


def test_head_weights_of_another_shape_are_one_error_naming_the_file(run_copy, backbone_dir):
    """The loader's own check, for a checkpoint whose config no longer describes its weights."""
    from llada_trm.model.configuration_hybrid import HybridConfig
    from llada_trm.model.integrity import CheckpointMismatchError

    trained = HybridConfig.from_pretrained(run_copy / "checkpoint-3" / "model")  # same parts (draft_proj or not), wider
    backbone = LLaDAModelLM.from_pretrained(backbone_dir)
    width = trained.head_hidden_size or backbone.config.d_model
    wider = LLaDATRMHybrid(HybridConfig(chunk_size=16, head_hidden_size=2 * width,
                                        draft_feedback=trained.draft_feedback), backbone=backbone)
    weights = run_copy / "checkpoint-3" / "model.safetensors"
    with pytest.raises(CheckpointMismatchError, match="mis-shaped head weights"):
        wider.load_head_weights(weights)


def test_a_trained_backbone_in_a_checkpoint_is_checked_too(backbone_dir, tmp_path, capsys):
    root = tmp_path / "full"
    assert train_main(run_args(backbone_dir, root, "--max_steps", "1", "--no_freeze_backbone")) == 0
    checkpoint = root / "checkpoint-1"
    weights = checkpoint / "model" / "backbone" / "model.safetensors"
    listed = json.loads((checkpoint / MANIFEST).read_text())["files"]
    assert weights.is_file() and "model/backbone/model.safetensors" in listed
    truncate(weights)
    code = train_main(run_args(backbone_dir, root, "--max_steps", "2", "--no_freeze_backbone",
                               "--resume_from_checkpoint", str(checkpoint)))
    assert code == 2
    one_error_line(capsys.readouterr().err, str(weights), "truncated")
    with pytest.raises(BrokenFileError, match="backbone/model.safetensors"):
        LLaDATRMHybrid.from_pretrained(checkpoint / "model")


class RunsCode:
    """Unpickling this runs a shell command: what a hostile checkpoint would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_hostile_optimizer_file_is_refused_without_running_it(run_copy, backbone_dir, tmp_path, capsys):
    checkpoint, marker = run_copy / "checkpoint-3", tmp_path / "code-ran"
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    torch.save({"state": RunsCode(marker), "param_groups": []}, checkpoint / "optimizer.bin")
    write_manifest(checkpoint, run_id=manifest["run_id"], step=3)  # a consistent manifest: it is no signature
    validate_checkpoint(checkpoint)
    code = train_main(run_args(backbone_dir, run_copy, "--max_steps", "3", "--resume_from_checkpoint", str(checkpoint)))
    assert code == 2 and not marker.exists()
    one_error_line(capsys.readouterr().err, str(checkpoint), "weights_only")


def test_llada_from_pretrained_on_a_damaged_directory_names_the_file(backbone_dir, tmp_path):
    from llada_trm import LLaDAModelLM

    copy = tmp_path / "backbone"
    shutil.copytree(backbone_dir, copy)
    truncate(copy / "model.safetensors")
    with pytest.raises(BrokenFileError, match="model.safetensors: truncated"):
        LLaDAModelLM.from_pretrained(copy)
    with pytest.raises(BrokenFileError, match="no such directory"):
        LLaDAModelLM.from_pretrained(tmp_path / "runs" / "missing")


def test_a_run_killed_before_its_first_checkpoint_does_not_block_a_new_one(backbone_dir, tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    (root / ".tmp-checkpoint-1").mkdir()  # what the killed attempt left
    (root / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
    assert train_main(run_args(backbone_dir, root, "--max_steps", "2")) == 0
    assert [step for step, _ in losses(root)] == [1, 2]  # the dead attempt's records are gone
    assert not (root / ".tmp-checkpoint-1").exists()


@pytest.mark.parametrize("case", ["truncated_checkpoint", "empty_model_directory"])
def test_the_reported_cases_exit_2_without_traceback_from_the_script(case, run_copy, backbone_dir, tmp_path):
    """The two inputs of the issue that ended in tracebacks, run as a user runs them."""
    if case == "truncated_checkpoint":
        truncate(run_copy / "checkpoint-3" / "model.safetensors")
        argv = run_args(backbone_dir, run_copy, "--resume_from_checkpoint", str(run_copy / "checkpoint-3"))
        named = str(run_copy / "checkpoint-3" / "model.safetensors")
    else:
        (tmp_path / "empty").mkdir()
        argv = ["--model_name_or_path", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")]
        named = str(tmp_path / "empty")
    script = Path(__file__).resolve().parents[1] / "train_llada_trm_hybrid_sft.py"
    result = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    one_error_line(result.stderr, named)
