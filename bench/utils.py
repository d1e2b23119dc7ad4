"""Shared benchmark plumbing: interleaved timing, machine naming, one CSV schema, markdown tables.

Providers are timed in the same process, interleaved (one call of each per round, so drift and background load
hit all of them alike), after warm-up; the median and the 20/80% quantiles of the rounds are reported.

Results: every bench writes rows of one schema, SCHEMA (the common fields, then the measurement fields), followed
by its own columns, and appends them to a CSV; a run never overwrites earlier rows. The API, used by every
bench/bench_<name>.py:

    add_output_args(parser, "projection")        # --quick and --out
    args = parser.parse_args()
    banner()                                     # which gmd_ext runs, and whether its C++ kernels loaded
    rows = [{**common_fields("projection", device="cpu"), "op": ..., "provider": ..., "shape": ..., "dtype": ...,
             **summarize(samples_ms), "my_column": ...}, ...]
    path = append_rows(csv_path(args), rows)

csv_path: --out when given; with --quick the scratch folder bench/scratch/ (git-ignored); otherwise the committed
bench/results/<name>.csv. The scripts import the installed gmd_ext (bench/ is first on sys.path when they run, the
checkout root is not): install it first (README).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

from gmd_ext.io import atomic_write

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
SCRATCH_DIR = os.path.join(BENCH_DIR, "scratch")
# The columns every row has, in this order: who ran what where (COMMON), then what was measured (MEASURED).
COMMON = ("bench", "timestamp", "git_rev", "machine", "device", "torch", "gmd_ext", "kernels", "threads")
MEASURED = ("op", "provider", "shape", "dtype", "median_ms", "q20_ms", "q80_ms")
SCHEMA = COMMON + MEASURED


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


def add_output_args(parser: argparse.ArgumentParser, name: str) -> None:
    """Add --quick (the script's smoke sizes; rows go to the scratch folder) and --out PATH (the CSV to append to;
    default bench/results/<name>.csv, the committed results)."""
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny sizes to check the script runs; appends to bench/scratch/{name}.csv unless --out "
                             "is given (the committed results are left alone)")
    parser.add_argument("--out", default=None,
                        help=f"CSV to append the rows to (default: bench/results/{name}.csv)")
    parser.set_defaults(bench_name=name)


def csv_path(args: argparse.Namespace) -> str:
    """Where this run's rows go (see add_output_args)."""
    if args.out:
        return os.fspath(args.out)
    return os.path.join(SCRATCH_DIR if args.quick else RESULTS_DIR, f"{args.bench_name}.csv")


def git_revision() -> str:
    """The checkout's commit (12 hex digits, "+dirty" with uncommitted changes to tracked files), or "unknown"."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=BENCH_DIR,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def kernels() -> str:
    """"cpp" when gmd_ext's compiled kernels are loaded, else "none" (every op then runs a fallback)."""
    from gmd_ext import _backend

    return "cpp" if _backend.CPP_LOADED else "none"


def banner() -> None:
    """Print which gmd_ext is benchmarked and whether its C++ kernels loaded; if not, why and the fixing command:
    numbers of the fallback must never pass for the kernels'."""
    import gmd_ext
    from gmd_ext import _backend

    print(f"# gmd_ext {gmd_ext.__version__} from {_backend.PACKAGE_DIR}; torch {torch.__version__}")
    if _backend.CPP_LOADED:
        print(f"# C++ kernels: loaded ({_backend.LIBRARY})")
    else:
        print(f"# WARNING: the C++ kernels are NOT loaded; 'gmd_ext' rows time the fallback. {_backend.CPP_REASON}")


def common_fields(bench: str, *, device: str = "cpu", machine_name: str | None = None) -> dict:
    """The COMMON columns of one run (the timestamp is taken now, in UTC)."""
    import gmd_ext

    return {"bench": bench, "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "git_rev": git_revision(), "machine": machine_name or machine(), "device": device,
            "torch": torch.__version__, "gmd_ext": gmd_ext.__version__, "kernels": kernels(),
            "threads": torch.get_num_threads()}


def append_rows(path: str | os.PathLike, rows: list[dict]) -> str:
    """Append rows to the CSV at path, atomically; return the path. Every row must have the SCHEMA columns; the
    file's columns are SCHEMA, then the extra columns of this run and of older rows (missing cells left empty)."""
    for row in rows:
        missing = [k for k in SCHEMA if k not in row]
        if missing:
            raise ValueError(f"rows: every row needs the columns {SCHEMA}; a row lacks {missing}: {row}")
    path = os.fspath(path)
    old = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    fields = list(dict.fromkeys([*SCHEMA, *(k for r in rows for k in r), *(k for r in old for k in r)]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(old + rows)
    return path


def read_rows(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_text(path: str, text: str) -> str:
    """Write text to path atomically (tmp + os.replace); return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "w") as f:
        f.write(text)
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(x):
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
