"""Run directories are owned: one run per --output_dir, one live process tree per run.

- `run.json` names the run (a random id) that owns the directory; every checkpoint's manifest repeats it.
- A new run (no --resume_from_checkpoint) refuses a directory that already holds checkpoints or an exported
  `model/`, unless --overwrite_output_dir is given, which removes what an earlier run wrote there first.
- `.lock` is held with an exclusive `flock` by the main process for as long as it trains. The operating system
  drops the lock when the process dies, however it dies (SIGKILL included), so a stale lock file never blocks
  a resume; a second live run in the same directory is refused.
- A fresh start drops the logs of an attempt that died before its first checkpoint; a resume drops the log
  records after its checkpoint, so `metrics.jsonl` always reads as one uninterrupted run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path

from llada_trm.model.integrity import BrokenFileError, check_json
from llada_trm.training.arguments import UsageError
from llada_trm.training.checkpointing import PREFIX, checkpoint_step

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
LOGS = ("metrics.jsonl", "truncation_detailed.jsonl")
RUN_FILES = (".tmp-model", "run_config.json", RUN_FILE, *LOGS)  # removed with the checkpoints on overwrite


def earlier_outputs(root: Path) -> list[str]:
    """What an earlier run finished and a new run must not replace: checkpoints and the exported model."""
    if not root.is_dir():
        return []
    steps = sorted(step for step in map(checkpoint_step, root.iterdir()) if step is not None)
    return [f"{PREFIX}{step}" for step in steps] + (["model"] if (root / "model").exists() else [])


def unfinished_writes(root: Path) -> list[str]:
    """Directories a killed run left half-written: never listed as checkpoints, safe to remove."""
    return [p.name for p in root.iterdir() if p.name.startswith((f".tmp-{PREFIX}", f".deleting-{PREFIX}"))]


def read_run_id(root: Path) -> str | None:
    path = root / RUN_FILE
    if not path.exists():
        return None
    content = check_json(path)
    if not isinstance(content, dict) or not isinstance(content.get("run_id"), str):
        raise BrokenFileError(path, "not a run file (no run_id)")
    return content["run_id"]


def acquire_lock(root: Path):
    """Hold `root/.lock` exclusively; returns the open file (keep it open while training). Raises UsageError."""
    handle = open(root / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UsageError(f"--output_dir {root}: another run is training in it (process {holder}, lock "
                         f"{root / LOCK_FILE}); wait for it to finish or use another --output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def release_lock(handle) -> None:
    if handle is not None and not handle.closed:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def remove_earlier_outputs(root: Path) -> None:
    """--overwrite_output_dir: delete what an earlier run wrote (nothing else in the directory)."""
    for name in [*earlier_outputs(root), *unfinished_writes(root), *RUN_FILES]:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def resumes_this_directory(resume: str | None, root: Path) -> bool:
    if resume == "latest":
        return True
    return bool(resume) and Path(resume).resolve().parent == root.resolve()


def claim_run_directory(output_dir: str, resume: str | None, overwrite: bool, accelerator, say=print,
                        current_run: str | None = None):
    """Check ownership, take the lock and record the run; returns (run_id, lock handle or None). The main
    process decides and tells the others the run id. `current_run`: the id this process already trains under
    (a second `train()` call continues it). Raises UsageError when the directory belongs to another run or
    another live process."""
    run_id, lock = _claim(Path(output_dir), resume, overwrite, accelerator.is_main_process, say, current_run)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        run_id = broadcast_object_list([run_id])[0]  # also a barrier: nobody trains before the claim is done
    return run_id, lock


def check_ownership(root: Path, resume, overwrite: bool, current_run: str | None = None) -> list[str] | None:
    """What --overwrite_output_dir must remove first ([] if nothing), or None when the directory holds no
    finished output. Raises UsageError when it holds another run's output and neither flag allows it."""
    earlier = earlier_outputs(root)
    if current_run is not None and read_run_id(root) == current_run:  # run.json exists by then
        return []
    if not earlier:
        return None
    if resumes_this_directory(resume, root):
        return []
    if not overwrite:
        raise UsageError(f"--output_dir {root} holds the output of another run ({', '.join(earlier[-3:])}); continue "
                         f"it with --resume_from_checkpoint latest, replace it with --overwrite_output_dir, or choose "
                         f"another --output_dir")
    return earlier


def precheck_run_directory(output_dir: str, resume, overwrite: bool, is_main_process: bool) -> None:
    """Refuse a directory of another run, or one a live run holds, before any data or model is loaded."""
    root = Path(output_dir)
    if root.is_dir():
        check_ownership(root, resume, overwrite)
        if is_main_process:
            release_lock(acquire_lock(root))


def _claim(root: Path, resume, overwrite: bool, is_main_process: bool, say, current_run):
    root.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(root) if is_main_process else None
    try:
        to_remove = check_ownership(root, resume, overwrite, current_run)
        if to_remove and is_main_process:
            say(f"--overwrite_output_dir: removing {', '.join(to_remove)} from {root}")
            remove_earlier_outputs(root)
        elif to_remove is None and not resume and is_main_process:
            trim_logs(str(root), 0)  # logs of an attempt that died before its first checkpoint
        # Only the main process reads and writes run.json, so no process ever reads a half-written one.
        run_id = record_run(root) if is_main_process else current_run
    except BaseException:
        release_lock(lock)
        raise
    return run_id, lock


def record_run(root: Path) -> str:
    """The id in run.json, written (atomically) with a new id if there is none yet."""
    run_id = read_run_id(root)
    if run_id is None:
        run_id = uuid.uuid4().hex
        staging = root / f".{RUN_FILE}.tmp"
        staging.write_text(json.dumps({"run_id": run_id}) + "\n")
        os.replace(staging, root / RUN_FILE)
    return run_id


def trim_logs(output_dir: str, step: int) -> None:
    """Drop log records after `step` (written by an attempt that died after its last checkpoint), so that a
    resumed run's logs read exactly as an uninterrupted run's."""
    for name in LOGS:
        path = Path(output_dir) / name
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text().splitlines(keepends=True):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut off by the crash
            record_step = record.get("step", 0) if isinstance(record, dict) else None
            if isinstance(record_step, int) and record_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        staging = path.with_name(f".{name}.tmp")
        staging.write_text("".join(kept))
        os.replace(staging, path)
