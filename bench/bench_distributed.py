"""GMD across processes (gloo, W ranks on this machine): values sent per rank per step, step time, peak memory.

Providers, on an MLP with K one-output heads (K objectives; N trainable elements), each rank on its own batch:
  ddp            plain DDP: one backward of the summed losses, DDP's bucketed all-reduce
  gmd_all_reduce GMD(ddp_module=ddp, communication="all_reduce"): every objective row all-reduced
  gmd_rs         GMD(ddp_module=ddp, communication="reduce_scatter"): rows reduce-scattered, Γ all-reduced,
                 merged shard all-gathered
  gmd_fsdp       GMD on the model sharded with fully_shard (each Linear and the root; default options)

values_sent: counted by wrapping every collective the step issues (torch.distributed.* functions, and DDP's
bucket all-reduces through a comm hook) and charging each the values a ring algorithm sends per rank: all-reduce
of n values 2·n·(W−1)/W, reduce-scatter of an n-value input and all-gather of an n-value output n·(W−1)/W.
peak_mib: peak bytes live during one full first step (wrapper construction, forward, backward, communication,
optimizer step), parameters excluded, by torch.distributed._tools.mem_tracker.MemTracker; the maximum over ranks.
Forward activations are included and equal across providers, so differences between providers are their
gradient and communication memory. step_ms: median over --steps steps of rank 0 (providers interleaved, one
barrier before each step).

Low-memory mode (one process, 1 thread): one GMD step (backward + optimizer.step; the K forwards run before the
window) per model, K and mode: memory="default", memory="low" with LowMemory(method=...) set to "batched" and to
"sliced" (auto picks sliced when the losses have separate graphs, batched when they share nodes). Models:
DSUNet3d width 0.25 and 0.5 at 16³ with K subset forwards (separate graphs) and with forward_branches +
subset_losses (the K losses share the M branch graphs), and a parameter-heavy MLP (6 square
layers of 512, batch 16) with K heads on one forward (shared graph) and with K subset forwards. Live memory by
own accounting (class Live): peak_mib (all storages made in the window), grad_peak_mib (gradient-shaped:
per-objective rows, stacked parameter gradients, .grad) and other_peak_mib (activation cotangents, temporaries),
against N·4 B, K·N·4 B and the target 1.2·N + K·max|p| (×4 B).

    python bench/bench_distributed.py            # bench/results/distributed.csv + distributed.md
    python bench/bench_distributed.py --quick    # tiny sizes, rows to bench/scratch/distributed.csv
    python bench/bench_distributed.py --worlds ""   # the low-memory part only (-> distributed_lowmem.md)
    python bench/bench_distributed.py --ds-default   # DSUNet3d on 2 DDP ranks, default GMD arguments, this
                                                    # engine vs --old-engine's (-> distributed_ds_default.md)

DS default (--ds-default): DSUNet3d (width 0.5, 3.25 M parameters, 16³, one sample per rank, K = 15 subsets,
forward_branches + subset_losses) under DDP on 2 gloo ranks, 1 thread each, GMD(opt, ddp_module=ddp) with default
arguments from this engine (it resolves the branches source on reduce_scatter) and from the engine of
--old-engine (default 6275a69, loaded from git by bench_step.load_old_engine; it fell back to the sequential
source under reduce_scatter without a word); each on its own model copy, steps interleaved, barrier before each.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

import utils

from gmd_ext import GMD, DSUNet3d, sample_subsets, subset_losses
from gmd_ext.gmd.sources import LowMemory

PROVIDERS = ("ddp", "gmd_all_reduce", "gmd_rs", "gmd_fsdp")
BATCH = 8


class Heads(nn.Module):
    def __init__(self, width: int, K: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(K))

    def forward(self, x):
        z = self.trunk(x)
        return [h(z) for h in self.heads]


class Counter:
    """Values each rank sends, per collective kind, charged by the ring-algorithm rule of the module docstring."""

    WRAPPED = {"all_reduce": (0, 2.0), "reduce_scatter_tensor": (1, 1.0), "reduce_scatter_single": (1, 1.0),
               "all_gather_into_tensor": (0, 1.0), "all_gather_single": (0, 1.0)}

    def __init__(self, world: int):
        self.world = world
        self.values = 0.0
        self.calls = 0
        self._orig = {}

    def charge(self, numel: int, factor: float):
        self.values += factor * numel * (self.world - 1) / self.world
        self.calls += 1

    def install(self):
        for name, (arg, factor) in self.WRAPPED.items():
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapped(*args, _orig=orig, _arg=arg, _factor=factor, **kwargs):
                t = args[_arg] if len(args) > _arg else next(iter(kwargs.values()))
                self.charge(t.numel(), _factor)
                return _orig(*args, **kwargs)
            setattr(dist, name, wrapped)

    def ddp_hook(self):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            self.charge(bucket.buffer().numel(), 2.0)
            return allreduce_hook(state, bucket)
        return hook


def build(provider: str, width: int, K: int, counter: Counter):
    torch.manual_seed(0)
    model = Heads(width, K)
    if provider == "gmd_fsdp":
        from torch.distributed.fsdp import fully_shard

        for m in model.modules():
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        gmd = GMD(opt, seed=0)
        return model, lambda losses: (gmd.zero_grad(), gmd.backward(losses), gmd.step())
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    if provider == "ddp":
        ddp.register_comm_hook(None, counter.ddp_hook())

        def step(losses):
            opt.zero_grad(set_to_none=True)
            sum(losses).backward()
            opt.step()
        return ddp, step
    gmd = GMD(opt, ddp_module=ddp, seed=0,
              communication="all_reduce" if provider == "gmd_all_reduce" else "reduce_scatter")
    return ddp, lambda losses: (gmd.zero_grad(), gmd.backward(losses), gmd.step())


def losses_of(outs, y):
    return [((o - y) ** 2).mean() for o in outs]


def peak_mib(fn):
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    with mt:
        out = fn()
    snap = mt.get_tracker_snapshot("peak")
    dev = snap[torch.device("cpu")]  # the tracker also keeps a "meta" device entry
    total = dev["Total"] - sum(v for k, v in dev.items() if str(k).endswith("PARAM"))
    return total / 2 ** 20, out


def _rank(rank, world, port, cases, steps, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    counter = Counter(world)
    counter.install()
    rows = []
    g = torch.Generator().manual_seed(rank)
    for width, K in cases:
        x, y = torch.randn(BATCH, width, generator=g), torch.randn(BATCH, 1, generator=g)
        built, values, peaks, times = {}, {}, {}, {p: [] for p in PROVIDERS}
        for p in PROVIDERS:
            def first(p=p):
                model, step = build(p, width, K, counter)
                step(losses_of(model(x), y))
                return model, step
            dist.barrier()
            peak, built[p] = peak_mib(first)
            peaks[p] = peak
        N = sum(q.numel() for q in Heads(width, K).parameters())
        for _ in range(steps):
            for p in PROVIDERS:
                model, step = built[p]
                dist.barrier()
                counter.values, counter.calls = 0.0, 0
                t0 = time.perf_counter()
                step(losses_of(model(x), y))
                times[p].append((time.perf_counter() - t0) * 1e3)
                values[p] = (counter.values, counter.calls)
        peak_all = torch.tensor([peaks[p] for p in PROVIDERS])
        dist.all_reduce(peak_all, op=dist.ReduceOp.MAX)
        for p, pk in zip(PROVIDERS, peak_all.tolist()):
            rows.append(dict(world=world, K=K, N=N, provider=p, values_sent=int(round(values[p][0])),
                             collectives=values[p][1], values_per_N=values[p][0] / N,
                             step_ms=statistics.median(times[p]), peak_mib=pk, note=""))
    if rank == 0:
        torch.save(rows, out_path)
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_rows(world, cases, steps, tmp):
    out = os.path.join(tmp, f"rows_{world}.pt")
    mp.start_processes(_rank, args=(world, _free_port(), cases, steps, out), nprocs=world, start_method="spawn")
    return torch.load(out)


class Live(TorchDispatchMode):
    """Bytes of the storages created inside the window that are still alive, split into gradient memory and the
    rest, with both peaks (own accounting; MemTracker puts everything of a window without module calls in one
    category). A new storage counts as gradient memory when the op's output is shaped like a parameter's
    gradient ([*p.shape], K stacked [K, *p.shape] / [K, |p|]) or is a flat / [K, ·] row buffer of at least
    max|p| elements (the default mode's [K, N] rows and merged gradient, the sliced [K, group] buffer); everything
    else (activation cotangents, batched cotangents, kernel temporaries) is "other". Inputs have >= 3 dims (conv)
    or a batch size no parameter dimension has (MLP), so no activation cotangent takes a parameter's shape."""

    def __init__(self, params, K):
        super().__init__()
        self.shapes = set()
        for p in params:
            self.shapes |= {tuple(p.shape), (K, *p.shape), (K, p.numel())}
        self.big = max(p.numel() for p in params)
        self.live = {"grad": 0, "other": 0}
        self.peak = {"grad": 0, "other": 0, "total": 0}
        self.seen = WeakIdKeyDictionary()

    def _is_grad(self, t):
        return tuple(t.shape) in self.shapes or (t.dim() <= 2 and t.numel() >= self.big)

    def _free(self, kind, n):
        self.live[kind] -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self.seen:
                self.seen[t.untyped_storage()] = None  # made before the window: not counted, nor its views
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            if st in self.seen:
                continue
            kind = "grad" if self._is_grad(t) else "other"
            n = st.nbytes()
            self.seen[st] = kind
            self.live[kind] += n
            weakref.finalize(st, self._free, kind, n)
        self.peak["grad"] = max(self.peak["grad"], self.live["grad"])
        self.peak["other"] = max(self.peak["other"], self.live["other"])
        self.peak["total"] = max(self.peak["total"], self.live["grad"] + self.live["other"])
        return out


class Stack(nn.Module):
    """Parameter-heavy MLP: `depth` square layers; forward(x, present) masks the input's M modality blocks.
    heads=True: one forward, K one-output heads (objectives share the trunk's graph)."""

    def __init__(self, width, depth, M=4, K=4, heads=False):
        super().__init__()
        self.M = M
        self.trunk = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())])
        self.out = nn.ModuleList(nn.Linear(width, 1) for _ in range(K if heads else 1))

    def forward(self, x, present=None):
        if present is not None:
            x = (x.view(x.shape[0], self.M, -1) * present.view(1, self.M, 1)).view(x.shape)
        z = self.trunk(x)
        return [h(z) for h in self.out]


def _cases(quick):
    """(name, make model, losses(model, K) -> dict of K losses) of the low-memory comparison."""
    bce = nn.functional.binary_cross_entropy_with_logits
    cases = []
    for width in ((0.25,) if quick else (0.25, 0.5)):
        size = 16
        x = torch.randn(1, 4, size, size, size, generator=torch.Generator().manual_seed(1))
        y = (torch.rand(1, 3, size, size, size, generator=torch.Generator().manual_seed(2)) > 0.5).float()

        def unet_losses(model, K, x=x, y=y):
            chosen = sample_subsets(model.modalities, K, torch.Generator().manual_seed(0))
            return {s.name: bce(model(x, s.mask[None]), y) for s in chosen}
        def branch_losses(model, K, x=x, y=y):
            chosen = sample_subsets(model.modalities, K, torch.Generator().manual_seed(0))
            return subset_losses(model.forward_branches(x), y, bce, chosen)
        cases.append((f"DSUNet3d w{width} {size}^3, K subset forwards", lambda K, w=width: DSUNet3d(width=w),
                      unet_losses))
        cases.append((f"DSUNet3d w{width} {size}^3, branches + subset_losses (shared graph)",
                      lambda K, w=width: DSUNet3d(width=w), branch_losses))
    width, depth, batch = (128, 3, 8) if quick else (512, 6, 16)
    xs = torch.randn(batch, width, generator=torch.Generator().manual_seed(3))
    ys = torch.randn(batch, 1, generator=torch.Generator().manual_seed(4))

    def heads_losses(model, K):
        return [((o - ys) ** 2).mean() for o in model(xs)]

    def subset_losses_(model, K):
        chosen = sample_subsets(["m0", "m1", "m2", "m3"], K, torch.Generator().manual_seed(0))
        return [((model(xs, s.mask.float())[0] - ys) ** 2).mean() for s in chosen]
    cases.append((f"MLP {depth}x{width}, batch {batch}, K heads on one forward",
                  lambda K: Stack(width, depth, K=K, heads=True), heads_losses))
    cases.append((f"MLP {depth}x{width}, batch {batch}, K subset forwards",
                  lambda K: Stack(width, depth), subset_losses_))
    return cases


def lowmem_rows(quick):
    """One GMD step per (model, K, memory mode), its live-memory peaks from the first backward to after step."""
    torch.set_num_threads(1)
    rows = []
    Ks = (4,) if quick else (4, 15)
    for name, make, losses_of in _cases(quick):
        for K in Ks:
            if "subset" in name and K > 15:
                continue
            for memory, method in (("default", ""), ("low", "batched"), ("low", "sliced")):
                torch.manual_seed(0)
                model = make(K)
                params = list(model.parameters())
                N = sum(p.numel() for p in params)
                big = max(p.numel() for p in params)
                kw = dict(source=LowMemory(method=method)) if memory == "low" else {}
                gmd = GMD(torch.optim.SGD(params, lr=1e-3), seed=0, **kw)
                losses = losses_of(model, K)  # the forwards run before the window (equal for every mode)
                live = Live(params, K)
                t0 = time.perf_counter()
                with live:
                    gmd.backward(losses)
                    gmd.step()
                ms = (time.perf_counter() - t0) * 1e3
                mib = 2 ** 20
                target = (1.2 * N + K * big) * 4 / mib
                provider = f"memory_{memory}" + (f"_{method}" if method else "")
                rows.append(dict(world=1, K=K, N=N, provider=provider, values_sent=0, collectives=0,
                                 values_per_N=0.0, step_ms=ms, peak_mib=live.peak["total"] / mib,
                                 grad_peak_mib=live.peak["grad"] / mib, other_peak_mib=live.peak["other"] / mib,
                                 target_mib=target, model=name, max_param=big,
                                 note=f"{name}; N·4 B = {N * 4 / mib:.2f} MiB, K·N·4 B = {K * N * 4 / mib:.2f} MiB, "
                                      f"target 1.2·N + K·max|p| = {target:.2f} MiB"))
                print(f"{name} K={K} {provider}: total {rows[-1]['peak_mib']:.2f} grad "
                      f"{rows[-1]['grad_peak_mib']:.2f} other {rows[-1]['other_peak_mib']:.2f} MiB "
                      f"(target {target:.2f}), {ms:.0f} ms", flush=True)
    return rows


def _ds_rank(rank, world, port, old_rev, steps, out_path):
    from bench_step import load_old_engine

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    engines = {"gmd_default": GMD, "gmd_default_old": load_old_engine(old_rev)}
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(1, 4, 16, 16, 16, generator=g), (torch.rand(1, 3, 16, 16, 16, generator=g) > 0.5).float()
    subs = sample_subsets(("flair", "t1", "t1ce", "t2"), 15)
    bce = nn.functional.binary_cross_entropy_with_logits
    built = {}
    for name, cls in engines.items():
        torch.manual_seed(0)
        model = DSUNet3d(width=0.5)
        ddp = nn.parallel.DistributedDataParallel(model)
        built[name] = (model, cls(torch.optim.SGD(model.parameters(), lr=1e-3), ddp_module=ddp, seed=0))
    times = {n: [] for n in built}
    for step in range(steps + 1):  # the first is warm-up
        for name, (model, gmd) in built.items():
            dist.barrier()
            t0 = time.perf_counter()
            gmd.zero_grad()
            gmd.backward(subset_losses(model.forward_branches(x), y, bce, subs))
            gmd.step()
            if step:
                times[name].append((time.perf_counter() - t0) * 1e3)
    N = sum(p.numel() for p in DSUNet3d(width=0.5).parameters())
    rows = [dict(world=world, K=15, N=N, provider=name, values_sent="", collectives="", values_per_N="",
                 step_ms=statistics.median(times[name]), peak_mib="", model="DSUNet3d(width=0.5), 16^3, 1/rank",
                 # the old engine reports its configured strategy ("auto"); its latch says what ran
                 note=f"source={'sequential' if getattr(gmd._s, 'auto_sequential', False) else gmd.strategy}, "
                      f"comm={type(gmd.comm).__name__}")
            for name, (model, gmd) in built.items()]
    if rank == 0:
        torch.save(rows, out_path)
    dist.barrier()
    dist.destroy_process_group()


def ds_default_rows(old_rev, steps, tmp):
    out = os.path.join(tmp, "ds_default.pt")
    mp.start_processes(_ds_rank, args=(2, _free_port(), old_rev, steps, out), nprocs=2, start_method="spawn")
    return torch.load(out)


def ds_default_main(args):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = ds_default_rows(args.old_engine, 2 if args.quick else args.steps, tmp)
    common = utils.common_fields("distributed")
    out = [{**common, "op": "gmd_step_ds_default", "shape": f"W={r['world']},K={r['K']},N={r['N']}",
            "dtype": "float32", "median_ms": r["step_ms"], "q20_ms": "", "q80_ms": "", "backend": "gloo", **r}
           for r in rows]
    path = utils.append_rows(utils.csv_path(args), out)
    by = {r["provider"]: r for r in rows}
    md = (f"Machine: {common['machine']} (shared with other jobs, 1-min load {os.getloadavg()[0]:.1f} at the end), "
          f"1 torch thread per rank; gloo on localhost.\n\n"
          + utils.markdown_table(["engine", "resolved parts", "median step ms"],
                                 [[r["provider"], r["note"], f"{r['step_ms']:.0f}"] for r in rows])
          + f"\n\nold default / this default = "
            f"{by['gmd_default_old']['step_ms'] / by['gmd_default']['step_ms']:.2f}x step time.\n")
    utils.write_text(os.path.splitext(path)[0] + "_ds_default.md", md)
    print(md)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    utils.add_output_args(ap, "distributed")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worlds", default="2,4", help='comma-separated world sizes ("" skips the distributed part)')
    ap.add_argument("--lowmem", choices=("on", "off"), default="on", help="run the low-memory comparison")
    ap.add_argument("--ds-default", action="store_true", help="only the DSUNet3d DDP default-arguments comparison")
    ap.add_argument("--old-engine", default="6275a69", help="git revision of the engine --ds-default compares with")
    args = ap.parse_args()
    if args.ds_default:
        ds_default_main(args)
        return
    widths = (32, 128) if args.quick else (64, 256, 1024)
    Ks = (4, 15)
    cases = [(w, K) for w in widths for K in Ks]
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (int(w) for w in args.worlds.split(",") if w):
            rows += distributed_rows(world, cases, 2 if args.quick else args.steps, tmp)
    low = lowmem_rows(args.quick) if args.lowmem == "on" else []
    rows += low
    common = utils.common_fields("distributed")
    out = [{**common, "op": "gmd_step", "shape": f"W={r['world']},K={r['K']},N={r['N']}", "dtype": "float32",
            "median_ms": r["step_ms"], "q20_ms": "", "q80_ms": "", "backend": "gloo", **r} for r in rows]
    path = utils.append_rows(utils.csv_path(args), out)

    ar = {(r["world"], r["K"], r["N"]): r["values_sent"] for r in rows if r["provider"] == "gmd_all_reduce"}
    table = [[r["world"], r["K"], r["N"], r["provider"], r["values_sent"], r["collectives"],
              f"{r['values_per_N']:.2f}",
              f"{r['values_sent'] / ar[(r['world'], r['K'], r['N'])]:.3f}" if (r["world"], r["K"], r["N"]) in ar
              else "", f"{r['step_ms']:.1f}", f"{r['peak_mib']:.2f}"] for r in rows if r not in low]
    load = os.getloadavg()[0]
    md = f"Machine: {common['machine']} (shared with other jobs, 1-min load {load:.1f} at the end), 1 torch thread.\n\n"
    if table:
        md += (f"gloo on localhost, batch {BATCH} per rank.\n\n"
               + utils.markdown_table(["W", "K", "N", "provider", "values sent / rank / step", "collectives",
                                       "values / N", "vs gmd_all_reduce", "step ms", "peak MiB"], table) + "\n\n")
    if low:
        mib = 2 ** 20
        md += ("Low-memory mode: live memory from the first backward to after optimizer.step (the K forwards run "
               "before; gradient = per-objective rows, stacked parameter gradients, .grad; other = activation "
               "cotangents and temporaries).\n\n"
               + utils.markdown_table(
                   ["model", "K", "N", "mode", "peak MiB", "gradient peak MiB", "other peak MiB", "N·4 B MiB",
                    "K·N·4 B MiB", "1.2·N + K·max\\|p\\| MiB", "step ms"],
                   [[r["model"], r["K"], r["N"], r["provider"], f"{r['peak_mib']:.2f}", f"{r['grad_peak_mib']:.2f}",
                     f"{r['other_peak_mib']:.2f}", f"{r['N'] * 4 / mib:.2f}", f"{r['K'] * r['N'] * 4 / mib:.2f}",
                     f"{r['target_mib']:.2f}", f"{r['step_ms']:.0f}"] for r in low]) + "\n")
    # A run of the low-memory comparison alone keeps the distributed table.
    utils.write_text(os.path.splitext(path)[0] + ("" if args.worlds else "_lowmem") + ".md", md)
    print(md)
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
