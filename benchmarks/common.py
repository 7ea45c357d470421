"""Shared by the benchmarks: interleaved timing, the machine's description, JSON output."""

from __future__ import annotations

import json
import os
import platform as _platform  # the standard library's module, or the repository's stand-in re-exporting it
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(functions: dict[str, Callable[[], None]], repeats: int, warmup: int,
                     device: torch.device) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process-CPU seconds per call of each function, run round-robin (a, b, c, a, b, c, ...).

    Interleaving spreads slow drifts of a shared machine (other processes, clocks,
    caches) over every function instead of penalising whichever ran during them.
    The first ``warmup`` rounds are run and discarded (allocator, oneDNN/cuDNN kernel
    choice, torch.compile). Process CPU time (all threads) does not grow while the
    process waits for a core that another process holds, so on a busy CPU it is the
    steadier measure of the work done; on a GPU it only counts the host's share.
    """
    wall: dict[str, list[float]] = {name: [] for name in functions}
    cpu: dict[str, list[float]] = {name: [] for name in functions}
    for round_index in range(warmup + repeats):
        for name, function in functions.items():
            synchronize(device)
            started, cpu_started = time.perf_counter(), time.process_time()
            function()
            synchronize(device)
            if round_index >= warmup:
                wall[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - cpu_started)
    return wall, cpu


def summary(seconds: list[float]) -> dict[str, float | list[float]]:
    """Median (the reported number), min, max and every sample, in seconds."""
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "samples": seconds}


def cpu_model_name() -> str:
    """``lscpu``'s "Model name" (from /proc/cpuinfo on Linux), else what Python knows."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else (_platform.processor() or _platform.machine())


def hardware(device: torch.device) -> dict[str, object]:
    """What the numbers were measured on."""
    info: dict[str, object] = {
        "cpu": cpu_model_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        # Other processes on the machine skew timings (2 OpenMP threads stall when a core is taken):
        # the 1-minute load average when the result was written says how busy it was.
        "load_average_1min": os.getloadavg()[0],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
        print(f"wrote {path}")
