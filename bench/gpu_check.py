"""One command for a fresh H100/H200 machine: build, selftest, the GPU tests, and the bandwidth rows the targets ask.

    python bench/gpu_check.py                       # on the GPU machine, repository root; --budget S (default 330)
    python bench/gpu_check.py --dry-run --out DIR   # here, on a CPU: every step at tiny sizes (tests/test_gpu.py)

A device lease is 15 minutes, machine start included, and must leave room for one rerun: the default budget is
330 s for the whole run (a command limit of ~360 s), split in two phases. Each step has its own limit, cut so that
phase 1 keeps TABLE_RESERVE_S for its table; the clock starts at the first start and is kept across the restart
after the build.

Phase 1 (what the targets need; expected ~4 min on an H100 with 16 cores):
  0. ninja    checked first (without it torch builds serially: 4-5 min); installed with pip where an index is
              reachable, else the run stops and says so (the device machines have ninja);
  1. build    `pip install --no-build-isolation --no-deps -e .` for sm_90 only with MAX_JOBS = the CPU count, while
              a second process compiles the Triton kernels of the tests into Triton's cache (`--warm-triton`: the
              kernels are loaded without importing gmd_ext, so it needs no C++ build); then the script restarts
              itself to import the install (skipped by --dry-run and --no-build);
  2. selftest `python -m gmd_ext.selftest` (every backend on every device against float64 references);
  3. tests    `pytest tests/test_gpu.py -m "not slow"` (fp64 references at K in {1, 4, 15, 64}, group norm, no host
              syncs, CUDA graphs of the projection, a GMD step and a DS training step) with a per-test timeout
              (pytest-timeout, installed on the device machines);
  4. targets  the rows the README's targets are about, each printed next to its target with met / missed: gram
              and combine at K = 15 (>= 80 % of a device-to-device copy of the same bytes), N = 3.25 M (DSUNet3d)
              and 2^26; group norm forward and backward at BraTS shapes [2, 4, C, 128^3], C = 16 .. 128, G = 8
              (0.27-8.6 GB of fp32 x: beyond L2), fp32 and bf16, where they fit in free GPU memory.
Phase 2 (optional: runs while the budget lasts, then stops cleanly): `pytest -m slow` (the rest of the fp64 grid,
the 8 GiB N >= 2^31 case, torch.compile) and the full table (K in {4, 15, 64}, combine_rows, pack/scatter,
N = 2^28).

Fractions: of_copy = time of a device-to-device copy of the floor's bytes (each input read once, each output written
once; the copy reads half and writes half) / the op's time. Group norm cannot reach its 2-pass (forward) / 3-pass
(backward) floor at BraTS shapes: a group (C / G * 128^3 values, >= 16 MB fp32) does not stay on chip between the
statistics and the normalisation, so the forward reads x twice and writes y (3 passes) and the backward reads x and
dy twice and writes dx (5 passes); their best of_copy is 2/3 and 3/5. The target is restated against those bytes:
of_moved = copy of the bytes the kernels must move / op time >= 0.70 (csrc/cuda/modality_group_norm_cuda.cu).

Rows are appended to bench/results/gpu_check.csv (a dry run writes under --out only: committed results are never
overwritten by a smoke run) with the shared bench fields (bench/utils.py common_fields) + timestamp + git revision;
the markdown table goes next to it, rewritten after each phase. Every provider is checked against a float64
reference before it is timed. Exit status 1 if a step or a check failed (a phase-2 step cut by the budget is not a
failure).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bare_gmd_ext() -> None:
    """A bare package object for gmd_ext, so that its submodules import without gmd_ext/__init__.py (which loads
    the C++ library): the Triton warm-up runs while that library is being built."""
    if "gmd_ext" not in sys.modules:
        pkg = types.ModuleType("gmd_ext")
        pkg.__path__ = [os.path.join(ROOT, "gmd_ext")]
        sys.modules["gmd_ext"] = pkg


if __name__ == "__main__" and "--warm-triton" in sys.argv:
    _bare_gmd_ext()  # before utils, which imports gmd_ext.io

import utils  # noqa: E402
BUDGET_S = 330.0  # the whole run: a command limit of ~360 s leaves a 15-minute lease room for one rerun
TABLE_RESERVE_S = 45.0  # phase 1's table: the step limits never eat into it
LIMITS_S = {"ninja": 60, "build": 150, "selftest": 40, "tests": 90}  # phase-1 caps (seconds, on the GPU machine)
TEST_TIMEOUT_S = 60  # per test (pytest-timeout): one hung case costs a minute, not the run
MEMORY_FRACTION = 0.8  # of the free GPU memory a table case may take
TARGETS = {"gram": 0.80, "combine": 0.80, "group_norm_fwd": 0.70, "group_norm_bwd": 0.70}
# Group norm passes over x's bytes: the kernels' (x read twice + y / x, dy read twice + dx) against the floor's.
GN_PASSES = {"group_norm_fwd": (3, 2), "group_norm_bwd": (5, 3)}
_T0_ENV = "GMD_EXT_GPU_CHECK_T0"  # wall-clock start, handed to the process that restarts after the build
_BUILD_ENV = "GMD_EXT_GPU_CHECK_BUILD"  # the build steps' "name rc seconds;...", handed over the same way


def _step(name: str, cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run one step as a subprocess; its output is streamed; returns {step, rc, seconds}."""
    if timeout <= 0:
        print(f"\n=== {name}: skipped, no time left in the budget", flush=True)
        return {"step": name, "rc": "skipped: time budget", "seconds": 0.0}
    print(f"\n=== {name}: {' '.join(cmd)} (limit {timeout:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **(env or {})), timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    return {"step": name, "rc": rc, "seconds": round(time.perf_counter() - t0, 1)}


def _find_ninja() -> str | None:
    """ninja on PATH, else beside this Python (a virtual environment not activated) or in the ninja package; a
    folder found outside PATH is put on it, where torch.utils.cpp_extension looks."""
    found = shutil.which("ninja")
    if found:
        return found
    folders = [os.path.dirname(sys.executable)]
    if importlib.util.find_spec("ninja") is not None:
        import ninja
        folders.append(getattr(ninja, "BIN_DIR", ""))
    for folder in folders:
        found = shutil.which("ninja", path=folder)
        if found:
            os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
            return found
    return None


def _ninja(limit: float) -> dict:
    """ninja for the build (torch.utils.cpp_extension uses it; without it the build is serial): installed if
    missing."""
    t0 = time.perf_counter()
    if _find_ninja():
        print(f"\n=== ninja: {_find_ninja()}", flush=True)
        return {"step": "ninja", "rc": 0, "seconds": 0.0}
    step = _step("ninja", [sys.executable, "-m", "pip", "install", "-q", "ninja"], limit)
    if step["rc"] == 0 and not _find_ninja():
        step["rc"] = "installed but not found"
    if step["rc"] != 0:
        print("ninja is missing and could not be installed (no package index reachable?): carry a ninja wheel "
              "(.library/device/README.md) or install it; a serial build does not fit the budget", flush=True)
    step["seconds"] = round(time.perf_counter() - t0, 1)
    return step


# ---------------------------------------------------------------- Triton cache warm-up (during the build)
def _triton_modules():
    """gmd_ext.triton's modules (the Triton package imports nothing else of gmd_ext) under the bare package."""
    _bare_gmd_ext()
    from gmd_ext.triton import combine, gram, modality_group_norm, pcgrad_coefficients
    return gram, combine, pcgrad_coefficients, modality_group_norm


def warm_triton(device: str, tiny: bool) -> int:
    """Launch every Triton kernel once per specialisation the tests and the selftest hit (dtypes, K classes,
    aligned and odd N, transposed strides, group-norm dtypes and activations): each compile lands in Triton's
    cache, so the tests step finds it there instead of compiling under its time limit."""
    gram, combine, pc, gn = _triton_modules()
    t0, count = time.perf_counter(), 0
    # One K and N per specialisation class (Triton specialises ints on == 1 and % 16 == 0; BLOCK_K is 16 up to K =
    # 16, then 32, 64): the tests' other sizes reuse these compiles.
    Ks = (4,) if tiny else (1, 4, 17, 64)
    Ns = (4099,) if tiny else (4099, 1 << 16)
    for dtype in (torch.float32,) if tiny else (torch.float32, torch.bfloat16):
        for K in Ks:
            perms = torch.stack([torch.randperm(K) for _ in range(K)]).to(device)
            for N in Ns:
                base = torch.randn(K, N, device=device).to(dtype)
                for G in (base, base.T.contiguous().T) if not tiny else (base,):
                    gamma = gram.gram(G)
                    A = pc.pcgrad_coefficients(gamma, perms)
                    shared = torch.rand(N, device=device) < 0.5
                    combine.combine(G, A.sum(0), shared, 1.0 / K, 1.0)
                    combine.combine(G, A.sum(0), None, 1.0 / K, 1.0)
                    combine.combine_rows(G, A)
                    count += 5
    shapes = ((2, 4, 16, 4, 4, 4),) if tiny else ((2, 4, 16, 8, 8, 8), (1, 4, 8, 37, 5), (2, 3, 6, 5, 5))
    # The DS step tests' DSUNet3d (width 0.25, 16^3 input): packed rows [P, 1, C, s^3] and [B, M, C, s^3] at every
    # level; M, C and L of 1 or multiples of 16 are specialisations of their own.
    ds_shapes = () if tiny else tuple((B, M, C, s, s, s) for B, M in ((6, 1), (2, 4)) for C in (8, 16)
                                      for s in (16, 8, 4, 2, 1))
    # The target table's class (BraTS: C, L multiples of 16; > 128 chunks per task: the widest merge tree), small.
    table_shapes = () if tiny else ((2, 4, 16, 80, 64, 64),)
    for dtype in (torch.float32,) if tiny else (torch.float32, torch.bfloat16, torch.float64):
        for shape in shapes + (ds_shapes if dtype == torch.float32 else ()) + (
                table_shapes if dtype != torch.float64 else ()):
            x = torch.randn(*shape, device=device).to(dtype)
            M, C = shape[1], shape[2]
            w, b = torch.randn(M, C, device=device), torch.randn(M, C, device=device)
            present = torch.rand(shape[0], M, device=device) < 0.7
            # leaky_relu: the GPU tests' and selftest's group norm; relu: DSUNet3d's and the table's
            for act in ("relu",) if tiny or shape in ds_shapes + table_shapes else ("relu", "leaky_relu"):
                G = 8 if C % 8 == 0 else 2
                y, mean, rstd = gn.group_norm_fwd(x, w, b, present, G, 1e-5, act)
                gn.group_norm_bwd(torch.randn_like(y), x, w, b, present, mean, rstd, G, act)
                count += 2
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"warm-triton: {count} launches in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


# ---------------------------------------------------------------- bandwidth
def _timer(device: str):
    """fn -> median milliseconds: CUDA events through triton.testing.do_bench on a GPU, interleaved wall clock here."""
    if device.startswith("cuda"):
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return lambda fn: utils.time_interleaved({"f": fn}, rounds=3, warmup=1)["f"]["median_ms"]


def _rel(out, ref) -> float:
    return ((out.double().cpu() - ref.cpu()).norm() / ref.norm()).item()


def _free_bytes(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0] * MEMORY_FRACTION
    return float(1 << 30)  # the dry run's sizes are tiny


def _projection_cases(ops_, K: int, N: int, dtype: torch.dtype, device: str, backend: str):
    """(op, shape, callable, floor bytes, check) of the projection ops at one size; check() raises if wrong."""
    from gmd_ext import ops

    es = torch.tensor([], dtype=dtype).element_size()
    G = ops.padded_rows(K, N, dtype=dtype, device=device).normal_()
    c = torch.randn(K, device=device)
    shared = torch.rand(N, device=device) < 0.5
    A = torch.randn(K, K, device=device)
    small = slice(0, min(N, 1 << 16))  # references on a column slice: fp64 over 2^28 columns costs more than the run
    Gs = G[:, small].double().cpu()
    tol = 1e-5 if dtype == torch.float32 else 1e-2

    def check_gram():
        assert _rel(ops.gram(G[:, small].contiguous(), backend), Gs @ Gs.T) < 1e-5

    def check_combine():
        ref = torch.where(shared[small].cpu(), 1.0 / K, 1.0).double() * (c.double().cpu() @ Gs)
        assert _rel(ops.combine(G, c, shared, 1.0 / K, 1.0, backend)[small], ref) < tol

    def check_rows():
        assert _rel(ops.combine_rows(G[:, small].contiguous(), A, backend), A.double().cpu() @ Gs) < tol

    shape = f"K={K} N={N}"
    if "gram" in ops_:
        yield "gram", shape, lambda: ops.gram(G, backend), K * N * es, check_gram
    if "combine" in ops_:
        yield ("combine", shape, lambda: ops.combine(G, c, shared, 1.0 / K, 1.0, backend), K * N * es + N + N * es,
               check_combine)
    if "combine_rows" in ops_:
        yield "combine_rows", shape, lambda: ops.combine_rows(G, A, backend), 2 * K * N * es, check_rows


def _group_norm_cases(shape: tuple, dtype: torch.dtype, device: str, backend: str):
    """Forward and backward of modality_group_norm (G = 8, relu: DSUNet3d's) at x [B, M, C, *S]."""
    from gmd_ext.ops._registry import triton_ops
    from gmd_ext.ops.reference import modality_group_norm_reference

    B, M, C = shape[:3]
    G_, act = 8, "relu"
    x = torch.randn(*shape, device=device, dtype=dtype)
    w, b = torch.randn(M, C, device=device), torch.randn(M, C, device=device)
    present = torch.ones(B, M, dtype=torch.bool, device=device)
    if backend == "cpp":
        fwd = torch.ops.gmd_ext.modality_group_norm_fwd
        bwd = lambda gy, m, r: torch.ops.gmd_ext.modality_group_norm_bwd(  # noqa: E731
            gy, x, w, b, present, m, r, G_, act, [True, True, True])
    else:
        t = triton_ops()
        fwd = t.modality_group_norm_fwd_triton
        bwd = lambda gy, m, r: t.modality_group_norm_bwd_triton(gy, x, w, b, present, m, r, G_, act)  # noqa: E731
    y, mean, rstd = fwd(x, w, b, present, G_, 1e-5, act)
    gy = torch.randn_like(y)
    tol = 1e-5 if dtype == torch.float32 else 1e-2

    def check_gn():
        # One pair, its channels cut to a few thousand values each: the statistics kernels see other sizes than
        # the timed call, the elementwise passes the same code.
        xs = x[:1, :1, :, :1].contiguous()
        xs.requires_grad_()
        ws, bs = w[:1].clone().requires_grad_(), b[:1].clone().requires_grad_()
        ps = present[:1, :1]
        ys, ms, rs = fwd(xs.detach(), ws.detach(), bs.detach(), ps, G_, 1e-5, act)
        ref = modality_group_norm_reference(xs.double(), ws.double(), bs.double(), ps, num_groups=G_,
                                            activation=act)
        assert _rel(ys, ref) < tol
        g = torch.randn_like(ys)
        if backend == "cpp":
            got = torch.ops.gmd_ext.modality_group_norm_bwd(g, xs.detach(), ws.detach(), bs.detach(), ps, ms, rs,
                                                            G_, act, [True, True, True])
        else:
            got = triton_ops().modality_group_norm_bwd_triton(g, xs.detach(), ws.detach(), bs.detach(), ps, ms, rs,
                                                              G_, act)
        want = torch.autograd.grad(ref, (xs, ws, bs), g.double())
        assert _rel(got[0], want[0]) < 10 * tol

    es = x.element_size()
    n = x.numel()
    text = "x=[" + ", ".join(map(str, shape[:3])) + ", " + "x".join(map(str, shape[3:])) + "]"
    yield "group_norm_fwd", text, lambda: fwd(x, w, b, present, G_, 1e-5, act), 2 * n * es, check_gn
    yield "group_norm_bwd", text, lambda: bwd(gy, mean, rstd), 3 * n * es, check_gn


def _pack_cases(N: int, dtype: torch.dtype, device: str):
    F = 4096
    rows = max(1, N // F)
    es = torch.tensor([], dtype=dtype).element_size()
    xr = torch.randn(rows, F, device=device).to(dtype)
    index = torch.randperm(rows, device=device)
    packed = torch.ops.gmd_ext.pack_pairs(xr, index)

    def check_pack():
        assert torch.equal(torch.ops.gmd_ext.pack_pairs(xr, index), xr[index])

    shape = f"rows={rows} F={F}"
    yield "pack_pairs", shape, lambda: torch.ops.gmd_ext.pack_pairs(xr, index), 2 * rows * F * es, check_pack
    yield ("scatter_pairs", shape, lambda: torch.ops.gmd_ext.scatter_pairs(packed, index, rows), 2 * rows * F * es,
           check_pack)


def _measure(timer, device, op, backend, shape, dtype, fn, nbytes, check, target=None) -> dict:
    """One table row: checked, timed, and compared with a device-to-device copy of the same bytes."""
    row = {"op": op, "backend": backend, "shape": shape, "dtype": str(dtype).removeprefix("torch."), "note": ""}
    try:
        check()
        ms = timer(fn)
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copy_ms = timer(lambda: dst.copy_(src))  # reads nbytes / 2 and writes nbytes / 2
        del src, dst
        row.update(median_ms=round(ms, 4), GB_s=round(nbytes / ms / 1e6, 1), of_copy=round(copy_ms / ms, 3))
        if op in GN_PASSES:
            kernel, floor = GN_PASSES[op]
            row["of_moved"] = round(copy_ms * kernel / floor / ms, 3)  # the copy scales with the bytes
        if target is not None:
            got = row.get("of_moved", row["of_copy"])
            row["target"] = f">= {target:.2f}" + (" of moved" if op in GN_PASSES else "")
            row["verdict"] = "met" if got >= target else "missed"
    except Exception as e:  # noqa: BLE001  (a failing provider is a row, the run goes on)
        row["note"] = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    print(row, flush=True)
    return row


def _run_cases(timer, device, cases, backend, dtype, deadline, rows, target_of=None):
    for op, shape, fn, nbytes, check in cases:
        if time.time() > deadline:
            rows.append({"op": op, "backend": backend, "shape": shape, "dtype": str(dtype),
                         "note": "skipped: time budget"})
            continue
        rows.append(_measure(timer, device, op, backend, shape, dtype, fn, nbytes, check,
                             (target_of or {}).get(op)))


def _bytes_ok(device, need, rows, op, shape, dtype) -> bool:
    if need <= _free_bytes(device):
        return True
    rows.append({"op": op, "shape": shape, "dtype": str(dtype), "note": f"skipped: needs {need / 2**30:.1f} GiB"})
    return False


def target_table(device: str, backends, dry: bool, deadline: float) -> list[dict]:
    """Phase 1: gram / combine at K = 15 and group norm at BraTS shapes, each row with its target."""
    timer, rows = _timer(device), []
    Ns = (4099,) if dry else (3_250_000, 1 << 26)
    gn_shapes = [(2, 4, 16, 4, 4, 4)] if dry else [(2, 4, C, 128, 128, 128) for C in (16, 32, 64, 128)]
    for dtype in (torch.float32, torch.bfloat16):
        es = torch.tensor([], dtype=dtype).element_size()
        for N in Ns:
            if not _bytes_ok(device, 3 * 15 * N * es, rows, "gram+combine", f"K=15 N={N}", dtype):
                continue
            for backend in backends:
                _run_cases(timer, device, _projection_cases(("gram", "combine"), 15, N, dtype, device, backend),
                           backend, dtype, deadline, rows, TARGETS)
        for shape in gn_shapes:
            n = 1
            for s in shape:
                n *= s
            # x, y, dy, dx, the copy's two buffers of 1.5 x's bytes, fp64 partials: ~7 x's bytes at most
            if not _bytes_ok(device, 7 * n * es, rows, "group_norm", str(shape), dtype):
                continue
            for backend in backends:
                _run_cases(timer, device, _group_norm_cases(shape, dtype, device, backend), backend, dtype, deadline,
                           rows, TARGETS)
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
    return rows


def full_table(device: str, backends, dry: bool, deadline: float) -> list[dict]:
    """Phase 2: every projection op at K in {4, 15, 64} and N in {3.25 M, 2^28}, and pack / scatter."""
    timer, rows = _timer(device), []
    Ns = (4099,) if dry else (3_250_000, 1 << 28)
    Ks = (4,) if dry else (4, 15, 64)
    for N in Ns:
        for dtype in (torch.float32, torch.bfloat16):
            es = torch.tensor([], dtype=dtype).element_size()
            for K in Ks:
                if not _bytes_ok(device, 3 * K * N * es, rows, "projection", f"K={K} N={N}", dtype):
                    continue
                for backend in backends:
                    _run_cases(timer, device, _projection_cases(("gram", "combine", "combine_rows"), K, N, dtype,
                                                                device, backend), backend, dtype, deadline, rows)
            if _bytes_ok(device, 3 * N * es, rows, "pack/scatter", f"N={N}", dtype):
                _run_cases(timer, device, _pack_cases(N, dtype, device), "cpp", dtype, deadline, rows)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- the run
def _pytest(dry: bool, marker: str) -> list[str]:
    # Not -x: one failing test must not hide the others; -rfE lists the failures at the end; --durations lists the
    # slowest tests, to refit the limits after a run.
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "--durations=10", "-p", "no:cacheprovider",
           os.path.join("tests", "test_gpu.py"), "-m", marker]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += [f"--timeout={TEST_TIMEOUT_S * (4 if dry else 1)}"]
    # On the GPU every test but the dry run of this script (a CPU smoke test of it, minutes there for nothing).
    return cmd + ["-k", "matrix" if dry else "not dry_run"]


def _append_csv(out_dir: str, meta: dict, steps: list[dict], rows: list[dict]) -> str:
    blank = dict.fromkeys(utils.MEASURED, "")
    csv_rows = ([{**meta, **blank, "provider": r.get("backend", ""), **r} for r in rows]
                + [{**meta, **blank, "op": f"step:{s['step']}", "note": f"rc={s['rc']}",
                    "median_ms": s["seconds"] * 1e3} for s in steps])
    return utils.append_rows(os.path.join(out_dir, "gpu_check.csv"), csv_rows)


def _write_md(out_dir: str, meta: dict, steps: list[dict], rows: list[dict]) -> str:
    header = ["op", "backend", "shape", "dtype", "median_ms", "GB_s", "of_copy", "of_moved", "target", "verdict",
              "note"]
    md = (f"GPU check on {meta['machine']} (git {meta['git_rev']}, {meta['timestamp']})\n\n"
          + utils.markdown_table(["step", "rc", "seconds"], [[s["step"], s["rc"], s["seconds"]] for s in steps])
          + "\n\n" + utils.markdown_table(header, [[r.get(h, "") for h in header] for r in rows]) + "\n")
    return utils.write_text(os.path.join(out_dir, "gpu_check.md"), md)


def _failed(steps: list[dict], rows: list[dict], ok=(0,)) -> list:
    return [s for s in steps if s["rc"] not in ok] + [r for r in rows if r.get("note", "").startswith("FAILED")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no build: checks the script itself")
    parser.add_argument("--no-build", action="store_true", help="skip step 1 (extension already built)")
    parser.add_argument("--out", default=None, help="folder for the CSV and markdown (default bench/results)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run (default %(default)s)")
    parser.add_argument("--warm-triton", action="store_true", help=argparse.SUPPRESS)  # the build's helper process
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if args.warm_triton:
        return warm_triton(device, tiny=args.dry_run)
    t0 = float(os.environ.setdefault(_T0_ENV, repr(time.time())))  # set by the first start, kept by the restart
    dry = args.dry_run
    slack = 4 if dry else 1  # a dry run shares a loaded CPU box: its limits only guard against hangs
    budget = args.budget * slack
    end = t0 + budget

    def limit(name: str) -> float:
        """A phase-1 step's limit: its cap, cut so that the phase-1 table keeps its reserve."""
        return min(LIMITS_S[name] * slack, end - TABLE_RESERVE_S * slack - time.time())

    if dry and args.out is None:
        raise SystemExit("--dry-run needs --out (a smoke run never writes into bench/results)")
    out_dir = args.out or utils.RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    steps = []
    for item in filter(None, os.environ.pop(_BUILD_ENV, "").split(";")):  # restarted after the build: report it
        name, rc, seconds = item.split()
        steps.append({"step": name, "rc": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": float(seconds)})
    py = sys.executable
    interp = {"TRITON_INTERPRET": "1" if dry else "0", "PYTHONPATH": ROOT}
    warm_cmd = [py, os.path.abspath(__file__), "--warm-triton"] + (["--dry-run"] if dry else [])
    meta = dict(utils.common_fields("gpu_check", device=device), dry_run=dry)
    if not (dry or args.no_build):
        steps.append(_ninja(limit("ninja")))
        if steps[-1]["rc"] != 0:
            _append_csv(out_dir, meta, steps, [])
            _write_md(out_dir, meta, steps, [])
            return 1
        # The Triton kernels compile in a second process while the C++/CUDA build runs (both are CPU work; the
        # machine has 16 cores and nvcc's longest file runs on one).
        warm_t0 = time.perf_counter()
        warm = subprocess.Popen(warm_cmd, cwd=ROOT, env=dict(os.environ, **interp))
        steps.append(_step("build", [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e",
                                     ROOT], limit("build"), {"TORCH_CUDA_ARCH_LIST": "9.0",
                                                             "MAX_JOBS": str(os.cpu_count() or 4)}))
        try:
            warm_rc = warm.wait(timeout=max(1.0, limit("selftest")))
        except subprocess.TimeoutExpired:
            warm.kill()
            warm_rc = "timeout"
        steps.append({"step": "warm-triton", "rc": warm_rc, "seconds": round(time.perf_counter() - warm_t0, 1)})
        if steps[-2]["rc"] != 0:
            print("build failed: the later steps would only fail after it", flush=True)
            _append_csv(out_dir, meta, steps, [])
            _write_md(out_dir, meta, steps, [])
            return 1
        # This process imported gmd_ext (bench/utils.py) before its library existed; a new one loads the install.
        os.environ[_BUILD_ENV] = ";".join(f"{s['step']} {str(s['rc']).replace(' ', '_')} {s['seconds']}"
                                          for s in steps)
        os.execv(py, [py, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]), "--no-build"])
    if dry:  # the warm-up's own smoke run (on the GPU it ran beside the build)
        steps.append(_step("warm-triton", warm_cmd, limit("selftest"), interp))
    selftest = [py, "-m", "gmd_ext.selftest"] + (["--device", "cpu", "--backend", "cpp", "--backend", "torch"]
                                                 if dry else [])
    steps.append(_step("selftest", selftest, limit("selftest"), interp))
    steps.append(_step("tests", _pytest(dry, "not slow"), limit("tests"), interp))

    os.environ["TRITON_INTERPRET"] = interp["TRITON_INTERPRET"]
    backends = ("cpp",) if dry else ("cpp", "triton")
    print("\n=== phase 1: targets", flush=True)
    rows = target_table(device, backends, dry, end)
    _append_csv(out_dir, meta, steps, rows)
    md_path = _write_md(out_dir, meta, steps, rows)
    # The warm-up only saves compile time: a warm-up that failed or timed out leaves the compiles to the tests.
    failed = _failed([s for s in steps if s["step"] != "warm-triton"], rows)
    print(f"\nphase 1 done in {time.time() - t0:.0f} s (budget {budget:.0f} s); wrote {md_path}", flush=True)

    print("\n=== phase 2 (optional, until the budget ends)", flush=True)
    # A phase-2 step cut by the budget is no failure; pytest's 5 is "no test selected" (the dry run's filter).
    steps2 = [_step("tests-slow", _pytest(dry, "slow"), end - time.time() - 20 * slack, interp)]
    rows2 = full_table(device, backends, dry, end - 5 * slack)
    csv_path = _append_csv(out_dir, meta, steps2, rows2)
    md_path = _write_md(out_dir, meta, steps + steps2, rows + rows2)
    failed += _failed(steps2, rows2, ok=(0, 5, "timeout", "skipped: time budget"))
    summary = [[r["op"], r.get("backend", ""), r.get("shape", ""), r.get("dtype", ""), r.get("of_copy", ""),
                r.get("of_moved", ""), r.get("target", ""), r.get("verdict", r.get("note", ""))] for r in rows]
    print("\n" + utils.markdown_table(["op", "backend", "shape", "dtype", "of_copy", "of_moved", "target",
                                       "verdict"], summary))
    print(f"\nwrote {csv_path} and {md_path} in {time.time() - t0:.0f} s (budget {budget:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
