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

Networks converted by gmd_ext.dynamic_sharing (parts convert_fwd_bwd, convert_gmd_step, convert_dsunet3d):
  convert_fwd_bwd    op converted_fwd_bwd: a converted MONAI SegResNet and BasicUNet, forward + backward of the
                     fused output at each missing rate; vs_all_present is the ratio to 0% missing (target at 50%:
                     <= 0.55)
  convert_gmd_step   op converted_gmd_step: the converted SegResNet / BasicUNet GMD step (K = 15) with
                     strategy="auto" (provider auto: the per-branch source) vs the per-modality loop under the same
                     engine (provider per_modality_loop: forward_modality per modality, separate graphs, sequential);
                     vs_official is the ratio to the loop (target <= 1.0)
  convert_dsunet3d   op converted_dsunet3d_gmd_step: dynamic_sharing(UNet3d) (DSUNet3d's architecture as a plain
                     net, loaded with DSUNet3d's weights) vs the hand-built DSUNet3d, both on the recipe path
                     (subset_losses(forward_branches), strategy "auto"); ratio converted / hand-built (target <= 1.1)

Providers are checked against each other before timing, interleaved with alternating order after warm-up (bench/
utils), median reported; rows appended to bench/results/ds.csv in the shared schema.

    python bench/bench_ds.py --threads 1                 # the committed numbers
    python bench/bench_ds.py --threads 1 --parts convert_fwd_bwd,convert_gmd_step,convert_dsunet3d
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
from gmd_ext.apps.brats import UNet3d
from gmd_ext.ds import dynamic_sharing, masked_apply
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


def step_inputs(modalities, batch, size, gen):
    """The GMD-step parts' inputs, drawn from `gen` in one order: (subsets, K, x [B, M, size^3], BCE targets
    [B, 3, size^3], a fixed [K, K] order)."""
    subs = gmd_ext.subsets(modalities)
    K = len(subs)
    x = torch.randn(batch, len(modalities), *[size] * 3, generator=gen)
    y = (torch.rand(batch, 3, *[size] * 3, generator=gen) > 0.5).float()
    order = torch.stack([torch.randperm(K, generator=gen) for _ in range(K)])
    return subs, K, x, y, order


def make_gmd_step(name, model, x, y, subs, order):
    strategy, losses = STEPS[name]
    return gmd_step(model, losses, x, y, subs, order, strategy)[0]


# ---------------------------------------------------------------- converted networks
def converted_net(name: str, width: int, seed: int):
    """A MONAI network for one modality (1 channel in, 3 logits out) converted by dynamic_sharing."""
    from monai.networks.nets import BasicUNet, SegResNet

    torch.manual_seed(seed)
    if name == "segresnet":
        net = SegResNet(spatial_dims=3, init_filters=width, in_channels=1, out_channels=3)
    else:
        net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=3, features=(width,) * 2 + (2 * width,) * 2
                        + (4 * width, width))
    return dynamic_sharing(net, ("flair", "t1", "t1ce", "t2"))


def per_modality_loop(model, x, y, subs):
    """The official execution: every modality's network on every sample, separate graphs, fused per subset."""
    return subset_losses([model.forward_modality(x[:, m:m + 1], m) for m in range(model.num_modalities)], y, subs)


def recipe_path(model, x, y, subs):
    return subset_losses(model.forward_branches(x), y, subs)


def gmd_step(model, losses, x, y, subs, order, strategy):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every provider steps the same weights
    gmd = GMD(opt, order=order, strategy=strategy)

    def step():
        gmd.zero_grad()
        gmd.backward(losses(model, x, y, subs))
        gmd.step()
        return [p.grad for p in model.parameters()]
    return step, gmd


def check_grads(steps, names, tol=1e-3):
    want = [g.clone() for g in steps[names[0]]()]
    for n in names[1:]:
        for g, w in zip(steps[n](), want):
            torch.testing.assert_close(g, w, rtol=tol, atol=1e-6)


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
    parser.add_argument("--parts", default="fwd_bwd,gmd_step",
                        help="comma-separated: fwd_bwd, gmd_step, convert_fwd_bwd, convert_gmd_step, convert_dsunet3d")
    parser.add_argument("--convert-size", type=int, default=32, help="cubic side for the converted MONAI nets")
    parser.add_argument("--convert-width", type=int, default=8, help="first-level channels of the MONAI nets")
    parser.add_argument("--machine", default=None, help="machine label (default: cores and CPU model)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 on a shared box)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="what is timed: this process's CPU time (default: on a shared box the wall clock "
                             "mostly measures the scheduler) or the wall clock")
    utils.add_output_args(parser, "ds")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.step_size, args.width, args.reps, args.warmup = 16, 16, 0.25, 1, 0
        args.convert_size, args.convert_width = 16, 8
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
        subs, K, x, y, order = step_inputs(model.modalities, args.batch, args.step_size, gen)
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

    nets = ("segresnet", "basic_unet")
    if "convert_fwd_bwd" in parts:
        size = args.convert_size
        x = torch.randn(args.batch, M, *[size] * 3, generator=gen)
        target = (torch.rand(args.batch, 3, *[size] * 3, generator=gen) > 0.5).float()
        percents = [0, 25, 50, 75]
        masks = {p: missing_mask(args.batch, M, p / 100, gen) for p in percents}
        models = {n: converted_net(n, args.convert_width, args.seed) for n in nets}
        for n, net in models.items():  # checked against the per-modality execution first
            for p in percents:
                ref = masked_mean(torch.stack([net.forward_modality(x[:, m:m + 1], m) for m in range(M)], 1),
                                  masks[p])
                torch.testing.assert_close(net(x, masks[p]), ref, rtol=1e-3, atol=1e-4)

        def converted_fwd_bwd(net, present):
            def step():
                net.zero_grad(set_to_none=True)
                F.binary_cross_entropy_with_logits(net(x, present), target).backward()
            return step

        res = timed({(n, p): converted_fwd_bwd(models[n], masks[p]) for n in nets for p in percents})
        for n in nets:
            shape = f"B={args.batch},M={M},{size}^3,{n}(width={args.convert_width})"
            for p in percents:
                r = res[(n, p)]
                ratio = r["median_ms"] / res[(n, 0)]["median_ms"]
                rows.append({**common, "op": "converted_fwd_bwd", "provider": f"dynamic_sharing({n})",
                             "shape": shape, "dtype": "float32", **{k: f"{v:.1f}" for k, v in r.items()},
                             "missing": f"{p}%", "vs_official": "", "vs_all_present": f"{ratio:.3f}"})
        tables.append(utils.markdown_table(
            ["missing"] + [f"{n} ms (x 0% missing)" for n in nets],
            [[f"{p}%"] + [f"{res[(n, p)]['median_ms']:.0f} ({res[(n, p)]['median_ms'] / res[(n, 0)]['median_ms']:.2f})"
                          for n in nets] for p in percents]))

    if "convert_gmd_step" in parts:
        subs, K, x, y, order = step_inputs(model.modalities, args.batch, args.step_size, gen)
        size = args.step_size
        steps, picked = {}, {}
        for n in nets:
            model_n = converted_net(n, args.convert_width, args.seed)
            steps[(n, "per_modality_loop")], _ = gmd_step(model_n, per_modality_loop, x, y, subs, order,
                                                          "sequential")
            steps[(n, "auto")], picked[n] = gmd_step(model_n, recipe_path, x, y, subs, order, "auto")
            check_grads(steps, [(n, "per_modality_loop"), (n, "auto")])
            if "-> Branches()" not in picked[n].plan:
                raise RuntimeError(f"strategy='auto' did not pick the per-branch source on {n}: {picked[n].plan}")
        res = timed(steps)
        for n in nets:
            shape = f"B={args.batch},M={M},{size}^3,{n}(width={args.convert_width}),K={K}"
            base = res[(n, "per_modality_loop")]["median_ms"]
            for prov in ("per_modality_loop", "auto"):
                r = res[(n, prov)]
                rows.append({**common, "op": "converted_gmd_step", "provider": f"{prov}({n})", "shape": shape,
                             "dtype": "float32", **{k: f"{v:.1f}" for k, v in r.items()}, "missing": "0%",
                             "vs_official": f"{r['median_ms'] / base:.3f}", "vs_all_present": ""})
        tables.append(utils.markdown_table(
            ["net", "per-modality loop ms", "auto (branches) ms", "auto / loop"],
            [[n, f"{res[(n, 'per_modality_loop')]['median_ms']:.0f}", f"{res[(n, 'auto')]['median_ms']:.0f}",
              f"{res[(n, 'auto')]['median_ms'] / res[(n, 'per_modality_loop')]['median_ms']:.2f}"] for n in nets]))

    if "convert_dsunet3d" in parts:
        subs, K, x, y, order = step_inputs(model.modalities, args.batch, args.step_size, gen)
        size = args.step_size
        converted = dynamic_sharing(UNet3d(width=args.width), model.modalities)
        converted.net.load_state_dict(model.state_dict())
        steps = {"hand_built": gmd_step(model, recipe_path, x, y, subs, order, "auto")[0],
                 "converted": gmd_step(converted, recipe_path, x, y, subs, order, "auto")[0]}
        check_grads(steps, ["hand_built", "converted"])
        res = timed(steps)
        shape = f"B={args.batch},M={M},{size}^3,width={args.width},K={K}"
        base = res["hand_built"]["median_ms"]
        for prov in steps:
            r = res[prov]
            rows.append({**common, "op": "converted_dsunet3d_gmd_step", "provider": prov, "shape": shape,
                         "dtype": "float32", **{k: f"{v:.1f}" for k, v in r.items()}, "missing": "0%",
                         "vs_official": "", "vs_all_present": "", "ratio": f"{r['median_ms'] / base:.3f}"})
        tables.append(utils.markdown_table(
            ["provider", "GMD step ms", "x hand-built DSUNet3d"],
            [[prov, f"{res[prov]['median_ms']:.0f}", f"{res[prov]['median_ms'] / base:.2f}"] for prov in steps]))

    path = utils.append_rows(utils.csv_path(args), rows)
    print(f"\n{common['machine']}, {torch.get_num_threads()} thread(s); load average after: "
          f"{os.getloadavg()[0]:.2f}; median {args.clock} time of {args.reps} after {args.warmup} warm-up\n")
    print("\n\n".join(tables))
    print(f"\nappended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
