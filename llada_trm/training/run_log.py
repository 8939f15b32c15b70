"""What a run writes about itself: metrics.jsonl (plus accelerate's trackers) and run_config.json.

Only the main process writes. A metrics record of training steps averages the window of steps since the
previous record; evaluation records are written as they come.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator

from llada_trm.training.arguments import RunArguments


class MetricsLog:
    """metrics.jsonl in the run directory (always) plus accelerate's trackers; main process only."""

    def __init__(self, accelerator: Accelerator, output_dir: str):
        self.accelerator, self.path = accelerator, Path(output_dir) / "metrics.jsonl"

    def write(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        self.accelerator.log(numbers, step=record["step"])


def on_host(window_log: list[dict]) -> list[dict]:
    """The records with their tensor values (metrics summed on the device) as Python floats, in one transfer."""
    places = [(i, key) for i, record in enumerate(window_log) for key, value in record.items()
              if isinstance(value, torch.Tensor)]
    if not places:
        return window_log
    values = torch.stack([window_log[i][key].detach().float().reshape(()) for i, key in places]).tolist()
    records = [dict(record) for record in window_log]
    for (i, key), value in zip(places, values):
        records[i][key] = value
    return records


def summarise(window_log: list[dict], state, learning_rate: float, elapsed: float) -> dict:
    """One metrics record for the steps in `window_log`: their numeric metrics averaged, plus the counters."""
    window_log = on_host(window_log)
    numeric = [k for k, v in window_log[-1].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    record = {"step": state.global_step, "epoch": state.epoch, "learning_rate": learning_rate,
              "tokens_per_second": sum(r["tokens"] for r in window_log) / elapsed,
              "empty_steps": state.empty_steps, "skipped_steps": state.skipped_steps}
    for key in numeric:
        if key != "tokens":
            values = [r[key] for r in window_log if key in r]
            record[key] = sum(values) / len(values)
    return record


def write_run_config(args: RunArguments, num_processes: int) -> Path:
    """run_config.json: every argument group as parsed, and the number of processes."""
    config = {"model": asdict(args.model), "data": asdict(args.data), "train": asdict(args.train),
              "truncation": args.truncation.to_dict(), "truncation_flags": args.truncation_flags,
              "weighting": asdict(args.weighting), "num_processes": num_processes}
    path = Path(args.train.output_dir) / "run_config.json"
    path.write_text(json.dumps(config, indent=2, default=str) + "\n")
    return path
