"""Step time of the GMD engine on a 3D U-Net (DSUNet3d, width 0.5, 3.25 M parameters) with K subset objectives.

Providers, timed interleaved in one process after warm-up, median of --repeats steps each (every step includes
the K forwards, the backward passes and optimizer.step()):
  plain       one loss (the sum of the K subset losses), one backward: a single-loss step
  k_backward  K backward passes accumulating into .grad (plain autograd, no projection): the floor GMD adds to
  gmd_seq     GMD(strategy="sequential"): K backward passes into the [K, N] buffer + projection
  gmd_batched GMD(strategy="batched"): one vmapped backward over the K losses
  official    the official loop: K backward passes, retrieve / clone / cat the grads, reference.pairwise_pcgrad
              (compute_dtype=None: fp32, one dot and one host sync per pair), unflatten into .grad
  gmd_old     GMD with default arguments from the engine of another revision (--old-engine REV, default
              6275a69: the engine before it was split into source / communicator / aggregator), loaded from git
              as a separate package on the same ops, on its own copy of the model
  gmd_upgrad  GMD(aggregator=torchjd.aggregation.UPGrad()): the Gramian weighting on the engine's kernels
  torchjd_upgrad  torchjd's own step: autojac.backward(losses) + jac_to_grad(params, UPGrad())

GMD overhead = (gmd_seq - k_backward) / gmd_seq: the cost beyond the K backward passes (target <= 5 %).
Appends to bench/results/step.csv (bench/utils.py schema) and writes step.md next to it.

    python bench/bench_step.py --k 4 --size 16 --repeats 5
    python bench/bench_step.py --width 0.25 --k 15 --providers gmd_seq,gmd_old,gmd_upgrad,torchjd_upgrad
    python bench/bench_step.py --quick            # smoke run: K = 2, 16^3, 2 repeats, rows to bench/scratch/
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import utils

from gmd_ext import GMD, DSUNet3d, _backend, sample_subsets
from gmd_ext.ops.reference import official_step

MODS = ("flair", "t1", "t1ce", "t2")


def make_losses(model, x, target, chosen, shared_graph):
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    if shared_graph:
        # One forward (all modalities), K losses on different targets: the multi-task shape, one graph.
        targets = [(torch.rand(target.shape, generator=torch.Generator().manual_seed(k)) > 0.5).float()
                   for k in range(len(chosen))]

        def losses():
            out = model(x)
            return {f"task{k}": bce(out, t) for k, t in enumerate(targets)}
        return losses

    def losses():
        return {s.name: bce(model(x, s.mask.expand(x.shape[0], -1)), target) for s in chosen}
    return losses


def step_plain(model, opt, losses):
    opt.zero_grad(set_to_none=True)
    sum(losses().values()).backward()
    opt.step()


def step_k_backward(model, opt, losses):
    opt.zero_grad(set_to_none=True)
    ls = list(losses().values())
    for k, l in enumerate(ls):
        l.backward(retain_graph=k < len(ls) - 1)
    opt.step()


def make_official(params, perms_fn):
    def step(model, opt, losses):
        ls = list(losses().values())
        official_step(params, ls, perms_fn(len(ls)), "mean", compute_dtype=None)
        opt.step()
    return step


class BackwardClock:
    """CPU time spent inside Tensor.backward while active: separates GMD's own work (zeroing, hooks,
    projection, .grad views) from the K backward passes it drives."""

    def __init__(self):
        self.inside = 0.0
        self._orig = torch.Tensor.backward

    def __enter__(self):
        orig = self._orig

        def timed(t, *a, **kw):
            c0 = time.process_time()
            try:
                return orig(t, *a, **kw)
            finally:
                self.inside += time.process_time() - c0

        torch.Tensor.backward = timed
        return self

    def __exit__(self, *exc):
        torch.Tensor.backward = self._orig
        return False


def make_gmd(gmd, engine_cpu):
    def step(model, opt, losses):
        gmd.zero_grad()
        ls = losses()
        with BackwardClock() as clock:
            c0 = time.process_time()
            gmd.backward(ls)
            engine_cpu.append(time.process_time() - c0 - clock.inside)
        gmd.step()
    return step


def load_old_engine(rev: str):
    """The GMD class of revision `rev`'s gmd_ext/gmd package, loaded from git as the package `gmd_old` (its
    gmd_ext.gmd imports rewritten; gmd_ext.ops and the kernels are this checkout's), so both engines run on the
    same ops in one process."""
    import importlib
    import subprocess
    import sys
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = subprocess.run(["git", "ls-tree", "--name-only", rev, "gmd_ext/gmd/"], cwd=root, check=True,
                           capture_output=True, text=True).stdout.split()
    pkg = os.path.join(tempfile.mkdtemp(prefix="gmd_old_"), "gmd_old")
    os.makedirs(pkg)
    for f in files:
        text = subprocess.run(["git", "show", f"{rev}:{f}"], cwd=root, check=True, capture_output=True,
                              text=True).stdout
        with open(os.path.join(pkg, os.path.basename(f)), "w") as out:
            out.write(text.replace("gmd_ext.gmd", "gmd_old"))
    sys.path.insert(0, os.path.dirname(pkg))
    return importlib.import_module("gmd_old.engine").GMD


def on_copy(step, model, losses_of):
    """A step on its own copy of the model (two engines' gradient hooks must not see each other's passes)."""
    import copy

    twin = copy.deepcopy(model)
    losses = losses_of(twin)
    opt = torch.optim.SGD(twin.parameters(), lr=1e-3)
    return lambda *_: step(twin, opt, losses)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=4, help="objectives (sampled modality subsets, full set included)")
    ap.add_argument("--size", type=int, default=16, help="cubic input side (>= 16)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--machine", default=None, help="machine label for the CSV (default: cores and CPU model)")
    ap.add_argument("--providers", default="plain,k_backward,gmd_seq,gmd_batched,official")
    ap.add_argument("--old-engine", default="6275a69", help="git revision of the engine gmd_old runs")
    ap.add_argument("--shared-graph", action="store_true",
                    help="K losses on one all-modality forward (multi-task) instead of K subset forwards")
    ap.add_argument("--report", action="store_true", help="only rebuild step.md from the CSV")
    utils.add_output_args(ap, "step")
    args = ap.parse_args()
    path = utils.csv_path(args)
    md_path = os.path.splitext(path)[0] + ".md"
    if args.report:
        render(path, md_path)
        return
    if args.quick:
        args.k, args.size, args.repeats, args.warmup = 2, 16, 2, 1
    torch.set_num_threads(args.threads)
    utils.banner()

    torch.manual_seed(0)
    model = DSUNet3d(MODS, width=args.width)
    params = list(model.parameters())
    N = sum(p.numel() for p in params)
    opt = torch.optim.SGD(params, lr=1e-3)
    x = torch.randn(args.batch, len(MODS), args.size, args.size, args.size)
    target = (torch.rand(args.batch, 3, args.size, args.size, args.size) > 0.5).float()
    chosen = sample_subsets(MODS, args.k, torch.Generator().manual_seed(0))
    losses = make_losses(model, x, target, chosen, args.shared_graph)
    backend = _backend.resolve(args.backend, "cpu")
    perm_gen = torch.Generator().manual_seed(0)
    names = [p for p in args.providers.split(",") if p]

    def losses_of(m):
        return make_losses(m, x, target, chosen, args.shared_graph)

    def copies(name, make_step):  # built only when asked for (each holds a model copy and, for GMD, K·N rows)
        return {name: on_copy(make_step(), model, losses_of)} if name in names else {}

    engine_cpu = {"gmd_seq": [], "gmd_batched": []}
    extra = {}
    extra.update(copies("gmd_old", lambda: _gmd_step(load_old_engine(args.old_engine), backend)))
    extra.update(copies("gmd_upgrad", lambda: _gmd_step(GMD, backend, aggregator=_upgrad())))
    extra.update(copies("torchjd_upgrad", lambda: _torchjd_step(_upgrad())))
    steps = {**extra,
        "plain": step_plain,
        "k_backward": step_k_backward,
        "gmd_seq": make_gmd(GMD(opt, seed=0, backend=backend), engine_cpu["gmd_seq"]),
        "gmd_batched": make_gmd(GMD(opt, seed=0, backend=backend, strategy="batched"), engine_cpu["gmd_batched"]),
        "official": make_official(params, lambda K: torch.stack([torch.randperm(K, generator=perm_gen)
                                                                 for _ in range(K)])),
    }
    unknown = set(names) - set(steps)
    if unknown:
        raise SystemExit(f"--providers: unknown {sorted(unknown)}; choose from {list(steps)}")
    # The models' parameters are updated by every step; times do not depend on their values.
    # Wall time and process CPU time: on a box shared with other jobs the wall clock of a 1-thread run mostly
    # measures the scheduler (measured: k_backward wall minima varied 2.5-3.6 s between runs of one config),
    # while CPU time counts only this process's work.
    samples = utils.sample_interleaved({n: (lambda n=n: steps[n](model, opt, losses)) for n in names},
                                       rounds=args.repeats, warmup=args.warmup)

    model_name = f"DSUNet3d(width={args.width}), " + ("one shared graph" if args.shared_graph else "subset forwards")
    common = utils.common_fields("step", machine_name=args.machine)
    shape = f"{args.batch}x{len(MODS)}x{args.size}^3"
    rows = []
    for n in names:
        rows.append({
            **common, "op": "gmd_step", "provider": n, "shape": shape, "dtype": "float32",
            **{k: round(v, 2) for k, v in utils.summarize(samples[n]["wall_ms"]).items()},
            "min_ms": round(min(samples[n]["wall_ms"]), 2),
            "cpu_median_ms": round(statistics.median(samples[n]["cpu_ms"]), 2),
            # gmd_seq: CPU time of gmd.backward outside the backward passes (warm-up excluded)
            "engine_cpu_median_ms": (round(1e3 * statistics.median(engine_cpu[n][args.warmup:]), 2)
                                     if n == "gmd_seq" else ""),
            "model": model_name, "params": N, "K": args.k, "backend": backend, "repeats": args.repeats,
        })
    utils.append_rows(path, rows)
    render(path, md_path)


def _upgrad():
    from torchjd.aggregation import UPGrad
    return UPGrad()


def _gmd_step(cls, backend, **kw):
    """A step of engine class `cls` (default arguments + kw) on the model it is given (built at the first step)."""
    engines = {}

    def step(model, opt, losses):
        gmd = engines.get(id(opt))
        if gmd is None:
            gmd = engines[id(opt)] = cls(opt, seed=0, backend=backend, **kw)
        gmd.zero_grad()
        gmd.backward(losses())
        gmd.step()
    return step


def _torchjd_step(aggregator):
    from torchjd.autojac import backward, jac_to_grad

    def step(model, opt, losses):
        opt.zero_grad(set_to_none=True)
        backward(list(losses().values()))
        jac_to_grad(list(model.parameters()), aggregator)
        opt.step()
    return step


def render(csv_path: str, md_path: str) -> None:
    """step.md from every configuration in step.csv (the latest run of each), ratios per configuration."""
    rows = utils.read_rows(csv_path)

    def ratio(times, n, base):
        return f"{times[n] / times[base]:.3f}" if base in times else ""

    configs: dict = {}
    for r in rows:
        key = (r["machine"], r["model"], r["params"], r["K"], r["shape"], r["threads"], r["backend"], r["torch"])
        configs.setdefault(key, {})[r["provider"]] = r  # later rows (newer runs) win
    lines = ["# GMD step time (bench/bench_step.py)", "",
             "Each step = K subset forwards + backward pass(es) + optimizer.step(); median of `repeats` steps after "
             "warm-up, providers interleaved in one process. plain: one backward of the summed loss; k_backward: K "
             "plain backward passes (no projection); gmd_seq / gmd_batched: the GMD engine; official: K backward "
             "passes + clone/cat + reference.pairwise_pcgrad (fp32) + unflatten.", ""]
    for (machine, model, params, K, inp, threads, backend, tv), provs in configs.items():
        med = {n: float(r["median_ms"]) / 1e3 for n, r in provs.items()}
        cpu = {n: float(r["cpu_median_ms"]) / 1e3 for n, r in provs.items()}
        reps = next(iter(provs.values()))["repeats"]
        lines += [f"## {model}, {int(params) / 1e6:.2f} M params, K = {K}, input {inp}", "",
                  f"Machine: {machine}; {threads} thread(s); projection backend {backend}; torch {tv}; "
                  f"median of {reps}.", ""]
        header = ["provider", "median wall (s)", "median CPU (s)", "CPU vs plain", "CPU vs k_backward",
                  "wall vs k_backward"]
        lines += [utils.markdown_table(header, [
            [n, f"{med[n]:.4f}", f"{cpu[n]:.4f}", ratio(cpu, n, "plain"), ratio(cpu, n, "k_backward"),
             ratio(med, n, "k_backward")] for n in med]), ""]
        if "gmd_seq" in cpu and "k_backward" in cpu:
            over = (cpu["gmd_seq"] - cpu["k_backward"]) / cpu["gmd_seq"]
            over_wall = (med["gmd_seq"] - med["k_backward"]) / med["gmd_seq"]
            lines.append(f"- GMD overhead beyond the K backward passes, (gmd_seq - k_backward) / gmd_seq: "
                         f"**{100 * over:.1f} %** of CPU time ({100 * over_wall:.1f} % of wall time; target <= 5 %).")
        eng = provs.get("gmd_seq", {}).get("engine_cpu_median_ms", "")
        if eng:
            lines.append(f"- GMD's own CPU time per step outside the K backward passes (zeroing, projection, "
                         f".grad views; its reach hooks run inside backward): {float(eng):.1f} ms = "
                         f"{100 * float(eng) / 1e3 / cpu['gmd_seq']:.1f} % of the gmd_seq step.")
        if "official" in cpu and "gmd_seq" in cpu:
            lines.append(f"- official / gmd_seq = {cpu['official'] / cpu['gmd_seq']:.2f}x CPU time "
                         f"({med['official'] / med['gmd_seq']:.2f}x wall).")
        if "gmd_old" in cpu and "gmd_seq" in cpu:
            lines.append(f"- gmd_seq / gmd_old (this engine's default step vs the old revision's, same ops) = "
                         f"{cpu['gmd_seq'] / cpu['gmd_old']:.3f}x CPU time ({med['gmd_seq'] / med['gmd_old']:.3f}x "
                         f"wall; target <= 1.02).")
        if "torchjd_upgrad" in cpu and "gmd_upgrad" in cpu:
            lines.append(f"- torchjd_upgrad / gmd_upgrad = {cpu['torchjd_upgrad'] / cpu['gmd_upgrad']:.2f}x CPU time "
                         f"({med['torchjd_upgrad'] / med['gmd_upgrad']:.2f}x wall): GMD with torchjd's UPGrad as its "
                         f"aggregator vs torchjd's autojac step (target >= 1.5x).")
        if "gmd_batched" in cpu and "gmd_seq" in cpu:
            lines.append(f"- gmd_batched / gmd_seq = {cpu['gmd_batched'] / cpu['gmd_seq']:.2f}x CPU time: vmap over "
                         f"the K one-hot cotangents differentiates the whole graph K times, so 'batched' pays off "
                         f"only when the objectives share one graph (and a vmapped backward beats K plain ones).")
        lines.append("")
    utils.write_text(md_path, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
