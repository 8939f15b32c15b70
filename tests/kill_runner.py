"""Run the training command and SIGKILL it at the Nth step of writing a checkpoint (a test helper).

    KILL_AT_EVENT=N [KILL_TORN=1] python tests/kill_runner.py <training flags>

Every call of the functions that write a checkpoint counts two events, one before and one after it:
accelerate's save_state, each file synced to disk, the RNG and scheduler states, each manifest, the rename's
directory sync, the rotation. At event N the process kills itself with SIGKILL (no cleanup, no atexit); with
KILL_TORN=1 and a file about to be synced, that file is first cut to half its size, as a write that broke
off. KILL_AT_EVENT=0 never kills and writes the number of events to `events.count` in the output directory.
Each finished checkpoint's step is appended to `completed.log` in the output directory.
"""

import os
import signal
import sys
from pathlib import Path

import accelerate

from llada_trm.train import main
from llada_trm.model import integrity
from llada_trm.training import checkpointing, trainer

KILL_AT = int(os.environ.get("KILL_AT_EVENT", "0"))
output_dir = Path(sys.argv[sys.argv.index("--output_dir") + 1])
TORN = os.environ.get("KILL_TORN") == "1"
events = 0


def event(name: str, args: tuple) -> None:
    global events
    events += 1
    if events != KILL_AT:
        return
    if TORN and name == "fsync_file":
        path = Path(args[0])
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (output_dir / "killed_at.txt").write_text(f"event {events}: {name}{' (torn)' if TORN else ''}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def counted(module, name: str) -> None:
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        event(name, args)
        result = original(*args, **kwargs)
        event(f"after {name}", args)
        return result

    setattr(module, name, wrapper)


for module, name in [(integrity, "fsync_file"), (checkpointing, "save_rng_state"),
                     (checkpointing, "save_scheduler_state"), (checkpointing, "write_manifest"),
                     (checkpointing, "fsync_directory"), (checkpointing, "rotate"), (checkpointing, "discard"),
                     (accelerate.Accelerator, "save_state")]:
    counted(module, name)

save = trainer.save_checkpoint


def save_and_record(*args, **kwargs):
    final = save(*args, **kwargs)
    with open(output_dir / "completed.log", "a") as log:
        log.write(f"{checkpointing.checkpoint_step(final)}\n")
    return final


trainer.save_checkpoint = save_and_record

if __name__ == "__main__":
    code = main(sys.argv[1:])
    if KILL_AT == 0:
        (output_dir / "events.count").write_text(f"{events}\n")
    sys.exit(code)
