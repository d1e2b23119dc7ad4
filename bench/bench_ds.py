"""DSUNet3d (width 0.5) with Dynamic Sharing: forward+backward with missing modalities, and full GMD steps.

fwd+bwd (op dsunet3d_fwd_bwd, one BCE loss of the fused logits), per missing rate:
  official   every modality's branch on every sample (model.forward_modality, the official ModuleParallel
             execution), the missing ones discarded by the masked mean
  ds         the library's default path, DSUNet3d.forward: present pairs packed once, the shared network on the
             packed rows (gmd_ext kernels: pack/scatter, fused modality_group_norm + ReLU), fused once
  ds_layers  the same weights run as a network of DS layers on [B, M, ...] tensors (masked_conv /
             modality_group_norm ops, every layer packing and scattering)
GMD step (op dsunet3d_gmd_step: K = 15 subset objectives, gmd_ext.subset_losses, GMD.backward, optimizer step; all
modalities present), every provider under the same engine and fixed orders:
  official     one branch per modality (forward_modality: separate graphs), subset fusion over a Python list,
               GMD(strategy="sequential")
  ds_stacked   torch.stack(model.forward_branches(x), 1): one [B, M, ...] tensor indexed per subset (every subset's
               backward runs through every branch), sequential
  ds           the recipe path, subset_losses(model.forward_branches(x), ...): per-modality graphs on the library
               kernels (Σ_S |S| branch backwards, the floor of the sequential engine), sequential
  ds_branches  the same with GMD(strategy="branches"): one backward per branch, its 8 objectives' cotangents batched
               (torch.func.vmap with the DS ops' vmap rules)

Providers are checked against each other before timing, interleaved with alternating order after warm-up (bench/
utils), median reported; rows appended to bench/results/ds.csv in the shared schema.

    python bench/bench_ds.py --threads 1                 # the committed numbers
    python bench/bench_ds.py --quick                     # smoke run into bench/scratch/
"""
from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.nn.functional as F

import utils

import gmd_ext
from gmd_ext import GMD, DSUNet3d, masked_mean
from gmd_ext.ds import masked_apply
from gmd_ext.ops import PairPlan


def missing_mask(batch: int, num_modalities: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """bool [batch, M] with round(fraction·B·M) pairs absent, chosen at random, every sample keeping one."""
    total = batch * num_modalities
    n_missing = round(fraction * total)
    if n_missing > total - batch:
        raise ValueError(f"missing fraction {fraction} drops {n_missing} of {total} pairs; at most {total - batch} "
                         f"can be dropped with every one of the {batch} samples keeping a modality")
    present = torch.ones(batch, num_modalities, dtype=torch.bool)
    dropped = 0
    for k in torch.randperm(total, generator=generator).tolist():
        if dropped == n_missing:
            break
        b, m = divmod(k, num_modalities)
        if present[b].sum() > 1:
            present[b, m] = False
            dropped += 1
    return present


# ---------------------------------------------------------------- fwd+bwd providers
def official_logits(model, x, present):
    branches = torch.stack([model.forward_modality(x[:, m], m) for m in range(model.num_modalities)], 1)
    return masked_mean(branches, present)


def ds_logits(model, x, present):
    return model(x, present)


def ds_layers_logits(model, x, present):
    """The DS-layers network of the same modules on [B, M, ...] tensors (each layer packs and scatters)."""
    plan = PairPlan(present, *present.shape, x.device)

    def block(b, h):
        h = b.norm1(b.conv1(h, plan), plan)
        return b.norm2(b.conv2(h, plan), plan)

    def up(h):
        return F.interpolate(h, scale_factor=2, mode="trilinear", align_corners=True)

    h = block(model.inc, x.unsqueeze(2))
    skips = [h]
    for down in model.downs:
        h = block(down, masked_apply(lambda t: F.max_pool3d(t, 2), h, plan))
        skips.append(h)
    skips.pop()
    for u in model.ups:
        h = block(u, torch.cat([skips.pop(), masked_apply(up, h, plan)], dim=2))
    return masked_mean(model.outc(h, plan), plan)


FWD_BWD = {"official": official_logits, "ds": ds_logits, "ds_layers": ds_layers_logits}


# ---------------------------------------------------------------- GMD step providers
def subset_losses(branches, target, subsets):
    """Each subset's BCE loss of the mean of its branches (all present): gmd_ext.subset_losses, the recipe path."""
    return gmd_ext.subset_losses(branches, target, F.binary_cross_entropy_with_logits, subsets)


STEPS = {
    "official": ("sequential", lambda model, x, y, subs: subset_losses(
        [model.forward_modality(x[:, m], m) for m in range(model.num_modalities)], y, subs)),
    "ds_stacked": ("sequential", lambda model, x, y, subs: subset_losses(
        torch.stack(model.forward_branches(x), 1), y, subs)),
    "ds": ("sequential", lambda model, x, y, subs: subset_losses(model.forward_branches(x), y, subs)),
    "ds_branches": ("branches", lambda model, x, y, subs: subset_losses(model.forward_branches(x), y, subs)),
}


def make_gmd_step(name, model, x, y, subs, order):
    strategy, losses = STEPS[name]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every provider steps the same weights
    gmd = GMD(opt, order=order, strategy=strategy)

    def step():
        gmd.zero_grad()
        gmd.backward(losses(model, x, y, subs))
        gmd.step()
        return [p.grad for p in model.parameters()]
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32, help="cubic volume side of fwd+bwd (default 32)")
    parser.add_argument("--step-size", type=int, default=16, help="cubic volume side of the GMD step (default 16)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--missing", default="0,50", help="comma-separated missing percentages (fwd+bwd)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per cell (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="fwd_bwd,gmd_step")
    parser.add_argument("--machine", default=None, help="machine label (default: cores and CPU model)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 on a shared box)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="what is timed: this process's CPU time (default: on a shared box the wall clock "
                             "mostly measures the scheduler) or the wall clock")
    utils.add_output_args(parser, "ds")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.step_size, args.width, args.reps, args.warmup = 16, 16, 0.25, 1, 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    utils.banner()
    warnings.simplefilter("ignore", RuntimeWarning)  # backend fallback / vmap notices are not results
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = DSUNet3d(width=args.width)
    M = model.num_modalities
    common = utils.common_fields("ds", machine_name=args.machine)
    print(f"# load average before: {os.getloadavg()[0]:.2f}", flush=True)
    rows, tables = [], []
    common["clock"] = args.clock

    def timed(fns):
        samples = utils.sample_interleaved(fns, rounds=args.reps, warmup=args.warmup, alternate=True, progress=True)
        return {name: utils.summarize(s[f"{args.clock}_ms"]) for name, s in samples.items()}

    if "fwd_bwd" in parts:
        x = torch.randn(args.batch, M, *[args.size] * 3, generator=gen)
        target = (torch.rand(args.batch, 3, *[args.size] * 3, generator=gen) > 0.5).float()
        percents = [int(p) for p in args.missing.split(",")]
        masks = {p: missing_mask(args.batch, M, p / 100, gen) for p in percents}
        for p in percents:  # every provider is checked against the official execution first
            ref = official_logits(model, x, masks[p])
            for name, fn in FWD_BWD.items():
                torch.testing.assert_close(fn(model, x, masks[p]), ref, rtol=1e-3, atol=1e-4)

        def fwd_bwd(fn, present):
            def step():
                model.zero_grad(set_to_none=True)
                F.binary_cross_entropy_with_logits(fn(model, x, present), target).backward()
            return step

        res = timed({(p, n): fwd_bwd(fn, masks[p]) for p in percents for n, fn in FWD_BWD.items()})
        shape = f"B={args.batch},M={M},{args.size}^3,width={args.width}"
        for p in percents:
            for n in FWD_BWD:
                r = res[(p, n)]
                rows.append({**common, "op": "dsunet3d_fwd_bwd", "provider": n, "shape": shape, "dtype": "float32",
                             **{k: f"{v:.1f}" for k, v in r.items()}, "missing": f"{p}%",
                             "vs_official": f"{r['median_ms'] / res[(p, 'official')]['median_ms']:.3f}",
                             "vs_all_present": f"{r['median_ms'] / res[(0, n)]['median_ms']:.3f}"
                             if 0 in percents else ""})
        tables.append(utils.markdown_table(
            ["missing"] + [f"{n} ms (x official, x 0% missing)" for n in FWD_BWD],
            [[f"{p}%"] + [f"{res[(p, n)]['median_ms']:.0f} ({res[(p, n)]['median_ms'] / res[(p, 'official')]['median_ms']:.2f}, "
                          f"{res[(p, n)]['median_ms'] / res[(percents[0], n)]['median_ms']:.2f})" for n in FWD_BWD]
             for p in percents]))

    if "gmd_step" in parts:
        subs = gmd_ext.subsets(model.modalities)
        K = len(subs)
        x = torch.randn(args.batch, M, *[args.step_size] * 3, generator=gen)
        y = (torch.rand(args.batch, 3, *[args.step_size] * 3, generator=gen) > 0.5).float()
        order = torch.stack([torch.randperm(K, generator=gen) for _ in range(K)])
        steps = {n: make_gmd_step(n, model, x, y, subs, order) for n in STEPS}
        want = [g.clone() for g in steps["official"]()]
        for n, step in steps.items():  # same merged gradient as the official execution
            for g, w in zip(step(), want):
                torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-6)
        res = timed(steps)
        shape = f"B={args.batch},M={M},{args.step_size}^3,width={args.width},K={K}"
        base = res["official"]["median_ms"]
        for n in STEPS:
            r = res[n]
            rows.append({**common, "op": "dsunet3d_gmd_step", "provider": n, "shape": shape, "dtype": "float32",
                         **{k: f"{v:.1f}" for k, v in r.items()}, "missing": "0%",
                         "vs_official": f"{r['median_ms'] / base:.3f}", "vs_all_present": ""})
        tables.append(utils.markdown_table(["provider", "GMD step ms", "x official", "ds (sequential) / this"],
                                           [[n, f"{res[n]['median_ms']:.0f}", f"{res[n]['median_ms'] / base:.2f}",
                                             f"{res['ds']['median_ms'] / res[n]['median_ms']:.2f}"] for n in STEPS]))

    path = utils.append_rows(utils.csv_path(args), rows)
    print(f"\n{common['machine']}, {torch.get_num_threads()} thread(s); load average after: "
          f"{os.getloadavg()[0]:.2f}; median {args.clock} time of {args.reps} after {args.warmup} warm-up\n")
    print("\n\n".join(tables))
    print(f"\nappended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
