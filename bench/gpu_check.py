"""One command for a fresh H100/H200 machine: build, selftest, the GPU tests, a bandwidth table.

    python bench/gpu_check.py                 # on the GPU machine, from the repository root (< 8 min)
    python bench/gpu_check.py --dry-run       # here, on a CPU: every step at tiny sizes (tests/test_gpu.py)

Steps, each with its own time limit, all within one budget (BUDGET_S, counted from the first start: the restart
after the build keeps the clock) so the whole stays under 8 minutes:
  1. build    `pip install --no-build-isolation --no-deps -e .` for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0), then the
              script restarts itself to import that install (skipped by --dry-run and --no-build);
  2. selftest `python -m gmd_ext.selftest` (every backend on every device against float64 references);
  3. tests    `pytest tests/test_gpu.py` with TRITON_INTERPRET=0 (fp64 references, N >= 2^31, no host syncs, CUDA
              graphs, torch.compile, cuda:1 when present);
  4. table    GB/s of gram, combine, combine_rows, group norm fwd/bwd and pack/scatter per backend, K in {4, 15, 64},
              N in {3.25M, 2^28}, fp32 and bf16, and the fraction of a device-to-device copy of the same bytes
              (bytes read + bytes written, each input read once and each output written once: the floor).
Rows are appended to bench/results/gpu_check.csv (a dry run writes under --out only: committed results are never
overwritten by a smoke run) with the shared bench fields (bench/utils.py common_fields) + timestamp + git revision;
the markdown table goes next to it. Every provider is checked against the float64 reference before it is timed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_FULL = (3_250_000, 1 << 28)  # DSUNet3d's parameter count; a buffer several times any L2
K_FULL = (4, 15, 64)
MEMORY_BUDGET = 48 << 30  # bytes of operands per case; larger cases are listed as skipped (K = 64, N = 2^28 fp32)
BUDGET_S = 465.0  # the whole run, build included: 8 minutes less 15 s for writing the results
TABLE_RESERVE_S = 100.0  # kept for the bandwidth table: a step's limit never eats into it
_T0_ENV = "GMD_EXT_GPU_CHECK_T0"  # wall-clock start, handed to the process that restarts after the build
_BUILD_ENV = "GMD_EXT_GPU_CHECK_BUILD"  # the build step's "rc seconds", handed over the same way


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


# ---------------------------------------------------------------- bandwidth
def _timer(device: str):
    """fn -> median milliseconds: CUDA events through triton.testing.do_bench on a GPU, interleaved wall clock here."""
    if device.startswith("cuda"):
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return lambda fn: utils.time_interleaved({"f": fn}, rounds=3, warmup=1)["f"]["median_ms"]


def _cases(K: int, N: int, dtype: torch.dtype, device: str, backend: str):
    """(op, callable, bytes moved at the floor, check) per op for one size; check() raises if the provider is wrong."""
    from gmd_ext import ops
    from gmd_ext.ops._registry import triton_ops

    es = torch.tensor([], dtype=dtype).element_size()
    G = ops.padded_rows(K, N, dtype=dtype, device=device).normal_()
    c = torch.randn(K, device=device)
    shared = torch.rand(N, device=device) < 0.5
    A = torch.randn(K, K, device=device)
    rel = lambda out, ref: ((out.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    small = slice(0, min(N, 1 << 16))  # references on a column slice: fp64 over 2^28 columns costs more than the run
    Gs = G[:, small].double()

    def check_gram():
        assert rel(ops.gram(G[:, small].contiguous(), backend), Gs @ Gs.T) < 1e-5

    def check_combine():
        ref = torch.where(shared[small], 1.0 / K, 1.0).double() * (c.double() @ Gs)
        assert rel(ops.combine(G, c, shared, 1.0 / K, 1.0, backend)[small], ref) < 1e-2

    def check_rows():
        assert rel(ops.combine_rows(G[:, small].contiguous(), A, backend), A.double() @ Gs) < 1e-2

    yield "gram", lambda: ops.gram(G, backend), K * N * es, check_gram
    yield "combine", lambda: ops.combine(G, c, shared, 1.0 / K, 1.0, backend), K * N * es + N + N * es, check_combine
    yield "combine_rows", lambda: ops.combine_rows(G, A, backend), 2 * K * N * es, check_rows
    del G
    if K != K_FULL[0] and device.startswith("cuda"):
        return  # the DS ops do not depend on K: timed once per N
    # Group norm at BraTS shapes: 4 modalities x 16 channels, groups of 2 channels, N elements in all.
    B, M, C, G_ = 1, 4, 16, 8
    L = max(64, N // (B * M * C) // 64 * 64)  # a multiple of 64 like BraTS volumes: the 128-bit path runs
    x = torch.randn(B, M, C, L, device=device).to(dtype)
    w, b = torch.randn(M, C, device=device), torch.randn(M, C, device=device)
    present = torch.ones(B, M, dtype=torch.bool, device=device)
    if backend == "cpp":
        fwd, bwd = torch.ops.gmd_ext.modality_group_norm_fwd, torch.ops.gmd_ext.modality_group_norm_bwd
        bwd_call = lambda gy, m, r: bwd(gy, x, w, b, present, m, r, G_, "relu", [True, True, True])  # noqa: E731
    elif backend == "triton":
        t = triton_ops()
        fwd = t.modality_group_norm_fwd_triton
        bwd_call = lambda gy, m, r: t.modality_group_norm_bwd_triton(gy, x, w, b, present, m, r, G_,  # noqa: E731
                                                                     "relu")
    else:
        return
    y, mean, rstd = fwd(x, w, b, present, G_, 1e-5, "relu")
    gy = torch.randn_like(y)

    def check_gn():
        from gmd_ext.ops.reference import modality_group_norm_reference
        xs = x[..., :min(L, 4096)]
        ref = modality_group_norm_reference(xs.double(), w.double(), b.double(), present, num_groups=G_,
                                            activation="relu")
        assert rel(fwd(xs.contiguous(), w, b, present, G_, 1e-5, "relu")[0], ref) < 1e-2

    n = x.numel()
    yield "group_norm_fwd", lambda: fwd(x, w, b, present, G_, 1e-5, "relu"), 2 * n * es, check_gn
    yield "group_norm_bwd", lambda: bwd_call(gy, mean, rstd), 3 * n * es, check_gn
    if backend == "cpp":
        F = 4096
        rows = max(1, N // F)
        xr = torch.randn(rows, F, device=device).to(dtype)
        index = torch.randperm(rows, device=device)
        packed = torch.ops.gmd_ext.pack_pairs(xr, index)

        def check_pack():
            assert torch.equal(torch.ops.gmd_ext.pack_pairs(xr, index), xr[index])

        yield "pack_pairs", lambda: torch.ops.gmd_ext.pack_pairs(xr, index), 2 * rows * F * es, check_pack
        yield ("scatter_pairs", lambda: torch.ops.gmd_ext.scatter_pairs(packed, index, rows), 2 * rows * F * es,
               check_pack)


def bandwidth(device: str, Ks, Ns, dtypes, backends, deadline: float) -> list[dict]:
    timer = _timer(device)
    rows = []
    for N in Ns:
        for dtype in dtypes:
            for K in Ks:
                es = torch.tensor([], dtype=dtype).element_size()
                if 2 * K * N * es > MEMORY_BUDGET:
                    rows.append({"op": "*", "K": K, "N": N, "dtype": str(dtype), "note": "skipped: memory budget"})
                    continue
                for backend in backends:
                    for op, fn, nbytes, check in _cases(K, N, dtype, device, backend):
                        if time.time() > deadline:
                            rows.append({"op": op, "K": K, "N": N, "dtype": str(dtype), "backend": backend,
                                         "note": "skipped: time budget"})
                            continue
                        try:
                            check()
                            ms = timer(fn)
                            src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
                            dst = torch.empty_like(src)
                            copy_ms = timer(lambda: dst.copy_(src))  # reads nbytes / 2 and writes nbytes / 2
                            del src, dst
                            rows.append({"op": op, "backend": backend, "K": K, "N": N,
                                         "dtype": str(dtype).removeprefix("torch."), "median_ms": round(ms, 4),
                                         "GB_s": round(nbytes / ms / 1e6, 1),
                                         "of_copy": round(copy_ms / ms, 3), "note": ""})
                        except Exception as e:  # noqa: BLE001  (a failing provider is a row, the run goes on)
                            rows.append({"op": op, "backend": backend, "K": K, "N": N, "dtype": str(dtype),
                                         "note": f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:100]}"})
                        print(rows[-1], flush=True)
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no build: checks the script itself")
    parser.add_argument("--no-build", action="store_true", help="skip step 1 (extension already built)")
    parser.add_argument("--out", default=None, help="folder for the CSV and markdown (default bench/results)")
    args = parser.parse_args(argv)
    t0 = float(os.environ.setdefault(_T0_ENV, repr(time.time())))  # set by the first start, kept by the restart
    dry = args.dry_run
    slack = 4 if dry else 1  # a dry run shares a loaded CPU box: its limits only guard against hangs
    budget = BUDGET_S * slack

    def limit(want: float) -> float:
        """A step's time limit: `want`, cut so that the bandwidth table keeps its reserve."""
        return min(want * slack, t0 + budget - TABLE_RESERVE_S * slack - time.time())

    if dry and args.out is None:
        raise SystemExit("--dry-run needs --out (a smoke run never writes into bench/results)")
    out_dir = args.out or utils.RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    steps = []
    if _BUILD_ENV in os.environ:  # restarted after the build: report it
        rc, seconds = os.environ.pop(_BUILD_ENV).split()
        steps.append({"step": "build", "rc": int(rc), "seconds": float(seconds)})
    py = sys.executable
    if not (dry or args.no_build):
        # An editable install of this checkout (the bench scripts import the installed package), then this script
        # again in a new process, which sees the install.
        steps.append(_step("build", [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e",
                                     ROOT], limit(180), {"TORCH_CUDA_ARCH_LIST": "9.0",
                                                         "MAX_JOBS": str(os.cpu_count() or 4)}))
        if steps[-1]["rc"] == 0:
            os.environ[_BUILD_ENV] = f"{steps[-1]['rc']} {steps[-1]['seconds']}"
            os.execv(py, [py, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]), "--no-build"])
    interp = {"TRITON_INTERPRET": "1" if dry else "0", "PYTHONPATH": ROOT}
    selftest = [py, "-m", "gmd_ext.selftest"] + (["--device", "cpu", "--backend", "cpp", "--backend", "torch"]
                                                 if dry else [])
    steps.append(_step("selftest", selftest, limit(60), interp))
    # Not -x: one failing test must not hide the others; -rfE lists the failures at the end.
    # --durations: the slowest tests are listed, to refit the step limits after a run.
    tests = [py, "-m", "pytest", "-q", "-rfE", "--durations=15", "-p", "no:cacheprovider",
             os.path.join("tests", "test_gpu.py")]
    # On the GPU every test but the dry run of this script (a CPU smoke test of it, minutes there for nothing).
    steps.append(_step("tests", tests + ["-k", "matrix" if dry else "not dry_run"], limit(240), interp))
    device = "cpu" if dry else "cuda"
    os.environ["TRITON_INTERPRET"] = interp["TRITON_INTERPRET"]
    deadline = min(t0 + budget, time.time() + (60 if dry else budget))
    print("\n=== bandwidth", flush=True)
    rows = bandwidth(device, (4,) if dry else K_FULL, (4099,) if dry else N_FULL,
                     (torch.float32, torch.bfloat16), ("cpp",) if dry else ("cpp", "triton"), deadline)
    meta = dict(utils.common_fields("gpu_check", device=device), dry_run=dry)
    blank = dict.fromkeys(utils.MEASURED, "")
    csv_rows = ([{**meta, **blank, "provider": r.get("backend", ""), **r} for r in rows]
                + [{**meta, **blank, "op": f"step:{s['step']}", "note": f"rc={s['rc']}",
                    "median_ms": s["seconds"] * 1e3} for s in steps])
    csv_path = utils.append_rows(os.path.join(out_dir, "gpu_check.csv"), csv_rows)
    header = ["op", "backend", "K", "N", "dtype", "median_ms", "GB_s", "of_copy", "note"]
    md = (f"GPU check on {meta['machine']} (git {meta['git_rev']}, {meta['timestamp']})\n\n"
          + utils.markdown_table(["step", "rc", "seconds"], [[s["step"], s["rc"], s["seconds"]] for s in steps])
          + "\n\n" + utils.markdown_table(header, [[r.get(h, "") for h in header] for r in rows]) + "\n")
    md_path = utils.write_text(os.path.join(out_dir, "gpu_check.md"), md)
    print("\n" + md + f"\nwrote {csv_path} and {md_path} in {time.time() - t0:.0f} s (budget {budget:.0f} s)")
    failed = [s for s in steps if s["rc"] != 0] + [r for r in rows if r.get("note", "").startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
