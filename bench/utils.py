"""Shared benchmark plumbing: interleaved timing, machine naming, CSV rows, markdown tables.

Providers are timed in the same process, interleaved (one call of each per round, so drift and background load
hit all of them alike), after warm-up; the median and the 20/80% quantiles of the rounds are reported.
"""
from __future__ import annotations

import csv
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> str:
    """e.g. "2-core AMD EPYC 7B13 (cpu)" or "NVIDIA H100 80GB HBM3 (cuda)"."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (cuda)"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core {model} (cpu)"


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], *, rounds: int = 7, warmup: int = 2,
                     device: str = "cpu") -> dict[str, dict[str, float]]:
    """Time each callable `rounds` times, interleaved; returns name -> {median_ms, q20_ms, q80_ms}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, xs in samples.items():
        qs = statistics.quantiles(xs, n=5) if len(xs) >= 2 else [xs[0]] * 4
        out[name] = {"median_ms": statistics.median(xs), "q20_ms": qs[0], "q80_ms": qs[-1]}
    return out


def write_csv(name: str, rows: list[dict]) -> str:
    """Write rows to bench/results/<name>.csv (atomically) and return the path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.csv")
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(x):
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def common_fields() -> dict:
    import gmd_ext

    return {"machine": machine(), "torch": torch.__version__, "gmd_ext": gmd_ext.__version__,
            "threads": torch.get_num_threads()}
