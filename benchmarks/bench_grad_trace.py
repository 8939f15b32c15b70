"""Cost of the per-token gradient trace on the embedded default: training with and without it.

    python benchmarks/bench_grad_trace.py [--steps 50] [--every 50] [--threads 1] [--keep DIR]

Trains the embedded default (shipped tiny-llada, synthetic data, the default flags of configs/default.yaml,
no evaluation) for --steps optimiser steps, once without the trace and once per parameter selection with
`--token_grad_trace_every --every`, and prints wall and process CPU time per step, the seconds of each trace
(from the trace file) and the overhead. CPU time is the steadier measure on a shared machine. The overhead at
another interval N follows: trace seconds / (N x step seconds). `--keep DIR` keeps the run directories.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from llada_trm.training.arguments import parse_arguments
from llada_trm.training.trainer import Trainer

SELECTIONS = (("off", None), ("default (head last layer + out_proj)", "default"), ("out_proj only", "head.out_proj"))


def run(steps: int, every: int, params: str | None, root: Path) -> tuple[float, float, list[float], list[float]]:
    out = root / (params or "off").replace("/", "_")
    argv = ["--config", "configs/default.yaml", "--output_dir", str(out), "--max_steps", str(steps),
            "--eval_split", "none", "--logging_steps", str(steps)]
    if params:
        argv += ["--token_grad_trace_every", str(every), "--token_grad_trace_params", params]
    trainer = Trainer(parse_arguments(argv))
    started, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    trace = out / "token_grad_trace.jsonl"
    headers = [r for r in map(json.loads, trace.read_text().splitlines()) if r["record"] == "trace"] \
        if trace.exists() else []
    return wall, cpu, [h["seconds"] for h in headers], [h["cpu_seconds"] for h in headers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", default=None, help="keep the run directories here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        results = [(name, *run(args.steps, args.every, params, root)) for name, params in SELECTIONS]
    base_wall, base_cpu = results[0][1], results[0][2]
    print(f"embedded default, {args.steps} optimiser steps, trace every {args.every}, torch {torch.__version__}, "
          f"{args.threads} thread(s)")
    print(f"{'trace':38} {'s/step':>7} {'cpu s/step':>10} {'traces':>6} {'s/trace':>8} {'cpu s/trace':>11} "
          f"{'overhead':>9} {'cpu overhead':>12}")
    for name, wall, cpu, seconds, cpu_seconds in results:
        per_trace = sum(seconds) / len(seconds) if seconds else 0.0
        cpu_trace = sum(cpu_seconds) / len(cpu_seconds) if cpu_seconds else 0.0
        print(f"{name:38} {wall / args.steps:7.3f} {cpu / args.steps:10.3f} {len(seconds):6d} {per_trace:8.2f} "
              f"{cpu_trace:11.2f} {(wall - base_wall) / base_wall:9.1%} {(cpu - base_cpu) / base_cpu:12.1%}")


if __name__ == "__main__":
    main()
