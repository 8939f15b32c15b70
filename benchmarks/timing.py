"""What every benchmark here shares: timing a call (wall, process CPU, CUDA peak memory), interleaved repeats,
the size of what autograd saves for backward, and a one-line description of the machine for the docs' tables."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # process CPU time, all threads
    peak_mib: float | None = None  # CUDA only: most memory allocated above what was resident

    def median(self, clock: str) -> float:
        return statistics.median(self.wall_ms if clock == "wall" else self.cpu_ms)


def time_call(fn: Callable[[], object], device: str) -> tuple[float, float, float | None]:
    """Wall and process CPU time of one call in ms, and on CUDA the peak memory it allocated above what was
    resident before the call, in MiB."""
    resident = 0
    if device == "cuda":
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    wall, cpu = 1000 * (time.perf_counter() - wall), 1000 * (time.process_time() - cpu)
    peak = (torch.cuda.max_memory_allocated() - resident) / 2**20 if device == "cuda" else None
    return wall, cpu, peak


def interleaved_times(
    tasks: dict[str, Callable[[], object]], repeats: int, warmup: int, device: str
) -> dict[str, Timing]:
    """Every task once per round, `warmup` untimed rounds then `repeats` timed ones -> {name: Timing}.

    Interleaving spreads a busy machine's slow and fast moments over all tasks alike, instead of handing one
    task a quiet minute and the next a busy one.
    """
    timings = {name: Timing() for name in tasks}
    for round_number in range(warmup + repeats):
        for name, fn in tasks.items():
            wall, cpu, peak = time_call(fn, device)
            if round_number < warmup:
                continue
            timing = timings[name]
            timing.wall_ms.append(wall)
            timing.cpu_ms.append(cpu)
            if peak is not None:
                timing.peak_mib = peak if timing.peak_mib is None else max(timing.peak_mib, peak)
    return timings


class SavedTensorMeter:
    """Size of what autograd keeps for backward while the context is open: the distinct storages handed to the
    saved-tensor hooks, parameters and buffers of `modules` excluded. Exact and noise-free, unlike a peak-RSS
    reading on CPU; it does not see what torch.utils.checkpoint keeps outside the hooks (a step's inputs)."""

    def __init__(self, *modules: torch.nn.Module):
        self.skip = {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())}
        self.sizes: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()  # kept alive by the graph, so its address is not reused meanwhile
        if storage.data_ptr() not in self.skip:
            self.sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedTensorMeter":
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)

    @property
    def mib(self) -> float:
        return sum(self.sizes.values()) / 2**20


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def describe_machine(args: argparse.Namespace) -> str:
    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_model()
    return (f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), device {args.device} ({device}), dtype {args.dtype}")
