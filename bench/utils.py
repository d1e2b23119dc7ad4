"""Shared benchmark plumbing: interleaved timing, machine naming, CSV rows, markdown tables.

Providers are timed in the same process, interleaved (one call of each per round, so drift and background load
hit all of them alike), after warm-up; the median and the 20/80% quantiles of the rounds are reported.
"""
from __future__ import annotations

import csv
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# The scripts run as `python bench/<script>.py` from a source checkout: gmd_ext is importable from the repo root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gmd_ext.io import atomic_write  # noqa: E402


def machine(threads: bool = False) -> str:
    """e.g. "2-core AMD EPYC 7B13 (cpu)" or "NVIDIA H100 80GB HBM3 (cuda)".

    threads=True appends torch's current intra-op thread count (", 1 torch thread(s)"): CPU timings depend on it.
    """
    if torch.cuda.is_available():
        name = f"{torch.cuda.get_device_name()} (cuda)"
    else:
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"{os.cpu_count()}-core {model} (cpu)"
    return f"{name}, {torch.get_num_threads()} torch thread(s)" if threads else name


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def sample_interleaved(fns: dict[str, Callable[[], object]], *, rounds: int = 7, warmup: int = 2,
                       device: str = "cpu", alternate: bool = False,
                       progress: bool = False) -> dict[str, dict[str, list[float]]]:
    """Run each callable warmup + rounds times, interleaved (one call of each per round); returns
    name -> {"wall_ms": [...], "cpu_ms": [...]}, one entry per timed round (warm-up rounds dropped).

    cpu_ms is this process's CPU time (all threads): on a box shared with other jobs the wall clock mostly measures
    the scheduler, CPU time only this process's work. alternate=True reverses the call order every other round so
    that no callable always runs on the cache/allocator state left by the same neighbour. progress=True prints
    every call's wall time as it happens (for long runs).
    """
    names = list(fns)
    samples = {name: {"wall_ms": [], "cpu_ms": []} for name in names}
    total = warmup + rounds
    for r in range(total):
        for name in (names[::-1] if alternate and r % 2 else names):
            _sync(device)
            c0 = time.process_time()
            t0 = time.perf_counter()  # innermost: the wall time excludes the process_time calls
            fns[name]()
            _sync(device)
            t1 = time.perf_counter()
            wall, cpu = (t1 - t0) * 1e3, (time.process_time() - c0) * 1e3
            if r >= warmup:
                samples[name]["wall_ms"].append(wall)
                samples[name]["cpu_ms"].append(cpu)
            if progress:
                print(f"  round {r + 1}/{total}{' (warm-up)' if r < warmup else ''} {name}: {wall:.0f} ms",
                      flush=True)
    return samples


def summarize(xs: list[float]) -> dict[str, float]:
    """{median_ms, q20_ms, q80_ms} of a list of millisecond samples."""
    qs = statistics.quantiles(xs, n=5) if len(xs) >= 2 else [xs[0]] * 4
    return {"median_ms": statistics.median(xs), "q20_ms": qs[0], "q80_ms": qs[-1]}


def time_interleaved(fns: dict[str, Callable[[], object]], *, rounds: int = 7, warmup: int = 2,
                     device: str = "cpu", alternate: bool = False,
                     progress: bool = False) -> dict[str, dict[str, float]]:
    """Time each callable `rounds` times, interleaved; returns name -> {median_ms, q20_ms, q80_ms} of the wall
    time (alternate, progress: see sample_interleaved)."""
    samples = sample_interleaved(fns, rounds=rounds, warmup=warmup, device=device, alternate=alternate,
                                 progress=progress)
    return {name: summarize(s["wall_ms"]) for name, s in samples.items()}


def results_path(name: str | os.PathLike) -> str:
    """bench/results/<name>.csv for a bare name; a Path, or a str with a directory part or a ".csv" suffix, is
    taken as the path itself."""
    if isinstance(name, os.PathLike) or os.sep in name or name.endswith(".csv"):
        return os.fspath(name)
    return os.path.join(RESULTS_DIR, f"{name}.csv")


def write_csv(name: str | os.PathLike, rows: list[dict], *, append: bool = False) -> str:
    """Write rows to results_path(name) atomically; return the path.

    append=True keeps the rows already in the file: it is rewritten whole with the union of the columns (this run's
    first, then any only the older rows have), so older rows gain new columns as empty cells.
    """
    path = results_path(name)
    old = []
    if append and os.path.exists(path):
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    fields = list(dict.fromkeys([*rows[0], *(k for r in old for k in r)]))
    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(old + rows)
    return path


def write_text(path: str, text: str) -> str:
    """Write text to path atomically (tmp + os.replace); return the path."""
    with atomic_write(path, "w") as f:
        f.write(text)
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
