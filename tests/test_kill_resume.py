"""SIGKILL a training run at seeded moments while it writes checkpoints, then resume with `latest`: the resumed
run's loss sequence and final weights equal the uninterrupted run's, and no finished checkpoint is ever lost
or damaged. The kill points are drawn from the events counted by tests/kill_runner.py."""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import assert_same_losses, losses
from support import run_args as fault_run_args

from llada_trm import LLaDATRMHybrid
from llada_trm.train import main as train_main
from llada_trm.training.checkpointing import checkpoint_step, complete_checkpoints, resolve_resume, validate_checkpoint

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
KILLS, TORN_KILLS, SEED = 4, 2, 13


def run_args(backbone_dir, output_dir, *extra):
    """The fault-injection runs' flags, 4 steps, the last 2 checkpoints kept (later flags win)."""
    return fault_run_args(backbone_dir, output_dir, "--max_steps", "4", "--save_total_limit", "2", *extra)


def run_killable(backbone_dir, output_dir, kill_at: int, torn: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "KILL_AT_EVENT": str(kill_at),
           "KILL_TORN": "1" if torn else "0", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(TESTS / "kill_runner.py"), *run_args(backbone_dir, output_dir)],
                          capture_output=True, text=True, env=env, timeout=600)


def completed_steps(output_dir) -> list[int]:
    log = Path(output_dir) / "completed.log"
    return [int(line) for line in log.read_text().split()] if log.exists() else []


@pytest.fixture(scope="module")
def uninterrupted(backbone_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_killable(backbone_dir, root, kill_at=0)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, int((root / "events.count").read_text())


def kill_points(total_events: int) -> list[tuple[int, bool]]:
    rng = random.Random(SEED)
    points = rng.sample(range(1, total_events + 1), KILLS + TORN_KILLS)
    return [(p, False) for p in points[:KILLS]] + [(p, True) for p in points[KILLS:]]


@pytest.mark.slow
def test_sigkill_while_checkpointing_then_resume_continues_exactly(uninterrupted, backbone_dir, tmp_path):
    reference, total_events = uninterrupted
    assert total_events > 40  # every checkpoint write is made of many events
    expected_losses = losses(reference)
    assert [step for step, _ in expected_losses] == [1, 2, 3, 4]
    expected = LLaDATRMHybrid.from_pretrained(reference / "model")
    killed_somewhere = 0
    for kill_at, torn in kill_points(total_events):
        root = tmp_path / f"kill-{kill_at}{'-torn' if torn else ''}"
        result = run_killable(backbone_dir, root, kill_at, torn)
        assert result.returncode == -signal.SIGKILL, (kill_at, result.stderr[-2000:])
        killed_somewhere += 1

        # Nothing a finished checkpoint held is lost or damaged.
        for checkpoint in complete_checkpoints(root):
            validate_checkpoint(checkpoint)
        done = completed_steps(root)
        latest = resolve_resume("latest", str(root))
        if done:
            assert latest is not None and checkpoint_step(latest) >= max(done), (kill_at, done, latest)

        assert train_main(run_args(backbone_dir, root, "--resume_from_checkpoint", "latest")) == 0
        assert_same_losses(losses(root), expected_losses)
        resumed = LLaDATRMHybrid.from_pretrained(root / "model")
        for a, b in zip(expected.head.parameters(), resumed.head.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert killed_somewhere == KILLS + TORN_KILLS
