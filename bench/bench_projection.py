"""Projection throughput: gmd_ext (C++ kernels; torch-composed Gramian path) vs the official pairwise loop, torchjd's
PCGrad aggregator and the one-read-pass memory floor over the same K×N buffer.

    python bench/bench_projection.py            # K ∈ {2, 7, 15, 31}, N ∈ {1M, 2M, 8M}; fp32 (+ bf16 for ours)
    python bench/bench_projection.py --quick    # a smoke run in seconds, rows to bench/scratch/projection.csv

Appends to bench/results/projection.csv (bench/utils.py schema) and prints a markdown table (ratios: ours / floor,
and peer / ours).
The pairwise loop costs ~K² passes with a host sync each: it runs at N <= 2M only (--pairwise-max-n).
"""
from __future__ import annotations

import argparse

import torch
import utils

import gmd_ext
from gmd_ext import _backend
from gmd_ext.gmd.projection import make_perms
from gmd_ext.ops import reference


def providers(G, perms, pairwise_ok):
    fns = {"floor (one read pass)": lambda: G.sum()}
    if _backend.available("cpp", G.device)[0]:
        fns["gmd_ext cpp"] = lambda: gmd_ext.project_conflicts(G, order=perms, backend="cpp")
    fns["gmd_ext torch"] = lambda: gmd_ext.project_conflicts(G, order=perms, backend="torch")
    if G.dtype == torch.float32:
        try:
            from torchjd.aggregation import PCGrad

            agg = PCGrad()
            fns["torchjd PCGrad"] = lambda: agg(G)
        except ImportError:
            pass
        if pairwise_ok:
            fns["pairwise loop"] = lambda: reference.pairwise_pcgrad(G, perms, compute_dtype=None)
    return fns


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--K", type=int, nargs="+", default=[2, 7, 15, 31])
    p.add_argument("--N", type=int, nargs="+", default=[2**20, 2 * 2**20, 8 * 2**20])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--pairwise-max-n", type=int, default=2 * 2**20)
    p.add_argument("--device", default="cpu")
    utils.add_output_args(p, "projection")
    args = p.parse_args(argv)
    if args.quick:
        args.K, args.N, args.rounds = [2, 15], [2**16], 3

    utils.banner()
    common = utils.common_fields("projection", device=args.device)
    print(f"# projection benchmark on {common['machine']}, {common['threads']} threads")
    rows, table = [], []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for N in args.N:
            for K in args.K:
                G = torch.randn(K, N, generator=torch.Generator().manual_seed(K), device=args.device).to(dtype)
                perms = make_perms("random", K, torch.Generator().manual_seed(0), device=args.device)
                fns = providers(G, perms, N <= args.pairwise_max_n)
                res = utils.time_interleaved(fns, rounds=args.rounds, device=args.device)
                floor = res["floor (one read pass)"]["median_ms"]
                ours_name = "gmd_ext cpp" if "gmd_ext cpp" in res else "gmd_ext torch"
                ours = res[ours_name]["median_ms"]
                for name, r in res.items():
                    rows.append({**common, "op": "project_conflicts", "provider": name, "shape": f"{K}x{N}",
                                 "dtype": dtype_name, **{k: round(v, 4) for k, v in r.items()}, "K": K, "N": N,
                                 "x_floor": round(r["median_ms"] / floor, 3),
                                 "x_ours": round(r["median_ms"] / ours, 3)})
                def ratio(name):
                    return res[name]["median_ms"] / ours if name in res else "—"
                table.append([K, N, dtype_name, floor, ours, ours / floor,
                              res["gmd_ext torch"]["median_ms"] / floor, ratio("torchjd PCGrad"),
                              ratio("pairwise loop")])
                print(f"K={K:3d} N={N:9d} {dtype_name:8s} " + "  ".join(
                    f"{n}={r['median_ms']:.2f}ms" for n, r in res.items()), flush=True)
    path = utils.append_rows(utils.csv_path(args), rows)
    print()
    print(f"Machine: {common['machine']}; ours = "
          f"{'C++ kernels' if _backend.CPP_LOADED else 'the torch fallback (C++ kernels NOT loaded, see above)'}; "
          f"median of {args.rounds} interleaved rounds.")
    print(utils.markdown_table(
        ["K", "N", "dtype", "floor ms", "ours ms", "ours/floor", "torch-path/floor", "torchjd/ours",
         "pairwise/ours"], table))
    print(f"\nappended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
