"""DSUNet3d forward+backward with missing modalities: Dynamic Sharing vs the official execution.

Providers (same model, same weights, same inputs):
  official   every modality's branch is run (plain torch, one batch of B per modality, as the official
             ModuleParallel code does) and the missing ones are discarded by the masked mean.
  ds         DSUNet3d.forward: present pairs gathered once into one batch (the library default).
  ds_layers  DSUNet3d.forward, execution="layers": DS layers on [B, M, ...] (masked_conv / modality_group_norm).
In both DS providers absent (sample, modality) pairs are never computed.

Each step is forward + BCE-with-logits loss against a fixed random target + backward. Providers and missing
rates are interleaved in every repetition (the provider order alternates), after warm-up; the median of the
timed repetitions is reported. Appends to bench/results/ds.csv (bench/utils.py schema; --quick: bench/scratch/)
and prints a markdown table.

    python bench/bench_ds.py                 # B=2, 4 modalities, 64^3, width 0.5, 0/25/50/75 % missing
    python bench/bench_ds.py --size 32       # smaller volumes
    python bench/bench_ds.py --threads 1     # on a CPU shared with other jobs
"""
from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.nn.functional as F

import utils

from gmd_ext import DSUNet3d, masked_mean


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


def official_logits(model: DSUNet3d, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Every branch computed, the missing ones discarded by the masked mean (the official execution)."""
    branches = torch.stack([model.forward_modality(x[:, m], m) for m in range(model.num_modalities)], 1)
    return masked_mean(branches, present)


def ds_logits(model: DSUNet3d, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    model.execution = "packed"
    return model(x, present)


def ds_layers_logits(model: DSUNet3d, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    model.execution = "layers"
    return model(x, present)


PROVIDERS = {"official": official_logits, "ds": ds_logits, "ds_layers": ds_layers_logits}


def make_step(fn, model, x, present, target):
    def step():
        model.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(fn(model, x, present), target).backward()
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="cubic volume side (default 64)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--missing", default="0,25,50,75", help="comma-separated missing percentages")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per cell (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions per cell first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--providers", default="official,ds,ds_layers",
                        help=f"comma-separated subset of {','.join(PROVIDERS)} (official is always run: the ratios "
                             "are against it)")
    utils.add_output_args(parser, "ds")
    parser.add_argument("--machine", default=None,
                        help="machine label for the CSV (default: cores, CPU model, torch threads)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice). On a CPU shared with other jobs, "
                             "1 avoids OpenMP barrier stalls that slowed both providers >20x on the 2-core dev box")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.missing, args.reps, args.warmup = 16, 1, "0,50", 2, 1
    if args.size < 16 or args.batch < 1 or args.reps < 1 or args.warmup < 0:
        parser.error("need --size >= 16, --batch >= 1, --reps >= 1, --warmup >= 0")
    percents = [int(p) for p in args.missing.split(",")]
    names = ["official"] + [n for n in args.providers.split(",") if n != "official"]
    unknown = set(names) - set(PROVIDERS)
    if unknown:
        parser.error(f"unknown providers {sorted(unknown)}; choose from {list(PROVIDERS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    utils.banner()
    warnings.simplefilter("ignore", RuntimeWarning)  # the backend fallback notice, if any, is not a result
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = DSUNet3d(width=args.width)
    M = model.num_modalities
    x = torch.randn(args.batch, M, args.size, args.size, args.size, generator=gen)
    target = (torch.rand(args.batch, model.num_classes, args.size, args.size, args.size, generator=gen) > 0.5).float()
    masks = {p: missing_mask(args.batch, M, p / 100, gen) for p in percents}
    machine = args.machine or utils.machine(threads=True)
    shape = f"B={args.batch},M={M},{args.size}^3,width={args.width}"
    print(f"# DSUNet3d fwd+bwd, {shape}, {machine}, torch {torch.__version__}; "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)

    # Alternating the call order, so no provider always runs on a cache/allocator state left by the same other one.
    res = utils.time_interleaved({f"missing {p}% {name}": make_step(PROVIDERS[name], model, x, masks[p], target)
                                  for p in percents for name in names},
                                 rounds=args.reps, warmup=args.warmup, alternate=True, progress=True)
    med = {(p, name): res[f"missing {p}% {name}"]["median_ms"] for p in percents for name in names}

    common = utils.common_fields("ds", machine_name=machine)
    rows, table = [], []
    for p in percents:
        base = med[(p, "official")]
        for name in names:
            r = res[f"missing {p}% {name}"]
            rows.append({**common, "op": "dsunet3d_fwd_bwd", "provider": name, "shape": shape, "dtype": "float32",
                         **{k: f"{v:.1f}" for k, v in r.items()}, "missing": f"{p}%",
                         "ratio": f"{base / med[(p, name)]:.2f}"})
        speedups = [cell for name in names[1:] for cell in (f"{med[(p, name)]:.0f}", f"{base / med[(p, name)]:.2f}x")]
        table.append([f"{p}%", f"{base:.0f}", *speedups])
    path = utils.append_rows(utils.csv_path(args), rows)

    print(f"\nload average after: {os.getloadavg()[0]:.2f}; median of {args.reps} after {args.warmup} warm-up\n")
    header = ["missing", "official ms"] + [h for n in names[1:] for h in (f"{n} ms", f"{n} speed-up")]
    print(utils.markdown_table(header, table))
    print(f"\nappended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
