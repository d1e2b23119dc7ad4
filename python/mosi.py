"""CMU-MOSI / CMU-MOSEI recipe: DSSentimentNet trained with GMD (or plain joint training) on every modality subset,
evaluated on each of the 7 text/audio/vision combinations with the MMSA metrics.

    python python/mosi.py --dataset mosi --data aligned_50.pkl              # MMSA feature file (pkl or npz)
    python python/mosi.py --synthetic                                       # offline stand-in, same format
    python python/mosi.py --synthetic --config python/configs/mosi_gmd.json --seeds 0 1 2 --out runs/gmd

Each ``--config`` (default: the paired ``mosi_gmd.json`` and ``mosi_joint.json``, which differ only in ``"gmd"``) is
trained for every seed in ``--seeds``. Per (config, seed): Adam on the L1 losses of the 7 subsets (or ``subsets``
= k sampled per step), a checkpoint after every epoch (atomic; ``--resume`` continues exactly where it stopped),
model selection on the valid split by the mean L1 over the 7 subsets, then the test split evaluated with only the
subset's modalities present. Writes ``metrics.json``, ``report.md`` and ``metrics.png`` to ``--out``: per config the
mean (and std) over seeds, and a side-by-side table when several configs ran.

Why one forward pass serves all 7 objectives: DS branches do not interact before the late mean fusion, so the
prediction of a subset is the mean of its modalities' branch predictions (``forward_branches``), and a subset's
loss reaches only the parameters of its own modalities and the shared ones, exactly as running the model with
that subset present would.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import load_config, pick_device, save_figure, seed_everything, write_json, write_text
from gmd_ext import GMD, DSSentimentNet, sample_subsets, subsets
from gmd_ext.io import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from gmd_ext.data import load_mmsa, synthetic_mosi
from gmd_ext.apps.mosi.mmsa import MODALITIES
from gmd_ext.apps.mosi.metrics import METRIC_NAMES, sentiment_metrics

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIGS = [HERE / "configs" / "mosi_gmd.json", HERE / "configs" / "mosi_joint.json"]

# MMSA feature sizes and split sizes (the table); used to warn when --dataset does not match the file.
DATASETS = {
    "mosi": {"dims": (768, 5, 20), "n": (1284, 229, 686)},
    "mosei": {"dims": (768, 74, 35), "n": (16326, 1871, 4659)},
}

DEFAULTS = {
    "gmd": True,             # the one switch: GMD-merged gradients, or the plain mean of the subset losses
    "epochs": 10,
    "batch_size": 32,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "subsets": 0,            # 0: all 7 subsets every step; k in 1..7: k sampled per step (full set always in)
    "hidden": 64,
    "num_layers": 1,
    "dropout": 0.1,
    "gmd_reduction": "mean",
    "gmd_order": "random",
    "eval_batch_size": 256,
}


# ----------------------------------------------------------------------------------------------- data

def _to_tensors(split: dict) -> dict:
    """numpy split from load_mmsa -> CPU tensors: x (name -> [N,T,D] float32), lengths (name -> [N] int64), y [N]."""
    return {
        "x": {m: torch.from_numpy(split[m]) for m in MODALITIES},
        # The model needs >= 1 frame; a zero-length sequence (all padding) is read as its first, zero frame.
        "lengths": {m: torch.from_numpy(split[f"{m}_lengths"]).clamp(min=1) for m in MODALITIES},
        "y": torch.from_numpy(split["regression_labels"]),
    }


def load_data(args) -> tuple[dict, str]:
    """Returns ({split: tensors}, description of the data source)."""
    if args.synthetic:
        spec = DATASETS[args.dataset]
        n = tuple(args.synthetic_n) if args.synthetic_n else spec["n"]
        dims = tuple(args.synthetic_dims) if args.synthetic_dims else spec["dims"]
        layout = "aligned" if not args.unaligned else "unaligned"
        path = Path(args.out) / "data" / f"synthetic_{args.dataset}_{layout}_{'x'.join(map(str, n))}_" \
                                         f"{'x'.join(map(str, dims))}.pkl"
        if not path.exists():  # deterministic (seed 0), so an existing file is the same file
            synthetic_mosi.make(path, n=n, aligned=not args.unaligned, dims=dims, seed=0)
        source = f"synthetic {args.dataset}-format file ({layout}, n={n}, dims={dims}, data seed 0): {path}"
    else:
        path = Path(args.data)
        source = f"{args.dataset} features: {path}"
    raw = load_mmsa(path, nonfinite=args.nonfinite)
    dims = tuple(raw["train"][m].shape[2] for m in MODALITIES)
    sizes = tuple(raw[s]["regression_labels"].shape[0] for s in ("train", "valid", "test"))
    spec = DATASETS[args.dataset]
    if not args.synthetic and (dims != spec["dims"] or sizes != spec["n"]):
        warnings.warn(f"{path}: dims {dims} / split sizes {sizes} differ from {args.dataset.upper()}'s "
                      f"{spec['dims']} / {spec['n']}; is --dataset right?", stacklevel=2)
    return {s: _to_tensors(raw[s]) for s in ("train", "valid", "test")}, source


def _batch(data: dict, idx: torch.Tensor, device) -> tuple[dict, dict, torch.Tensor]:
    x = {m: data["x"][m].index_select(0, idx).to(device) for m in MODALITIES}
    lengths = {m: data["lengths"][m].index_select(0, idx) for m in MODALITIES}  # pack_padded wants CPU lengths
    return x, lengths, data["y"].index_select(0, idx).to(device)


# ----------------------------------------------------------------------------------------------- train / eval

@torch.no_grad()
def branch_predictions(model, data: dict, batch_size: int, device) -> torch.Tensor:
    """Per-modality predictions [N, M] for a whole split, every modality present (eval mode)."""
    model.eval()
    n = data["y"].shape[0]
    out = []
    for i in range(0, n, batch_size):
        x, lengths, _ = _batch(data, torch.arange(i, min(i + batch_size, n)), device)
        out.append(model.forward_branches(x, None, lengths).cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate_subsets(model, data: dict, batch_size: int, device) -> dict[str, dict[str, float]]:
    """MMSA metrics per modality combination, running the model with only that combination present."""
    model.eval()
    n = data["y"].shape[0]
    results = {}
    for s in subsets(MODALITIES):
        preds = []
        for i in range(0, n, batch_size):
            x, lengths, _ = _batch(data, torch.arange(i, min(i + batch_size, n)), device)
            present = s.mask.to(device).expand(len(x["text"]), -1)
            x = {m: (t if m in s else None) for m, t in x.items()}  # absent inputs are never read
            preds.append(model(x, present, lengths).cpu())
        results[s.name] = sentiment_metrics(torch.cat(preds), data["y"])
    return results


def subset_l1(branches: torch.Tensor, y: torch.Tensor, objectives) -> dict[str, torch.Tensor]:
    """L1 loss of each subset's fused prediction (mean of its branches): branches [B, M], y [B]."""
    return {s.name: F.l1_loss(branches[:, list(s.indices)].mean(1), y) for s in objectives}


def train_one(cfg: dict, data: dict, seed: int, run_dir: Path, device, *, resume: bool,
              stop_after: int | None = None, progress: bool = True) -> dict | None:
    """Train one (config, seed); returns its result dict, or None when stopped early by ``stop_after``."""
    ckpt_path = run_dir / "last.pt"
    if ckpt_path.exists() and not resume:
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    seed_everything(seed)
    gen = torch.Generator().manual_seed(seed)  # batch order and subset sampling
    input_dims = tuple(data["train"]["x"][m].shape[2] for m in MODALITIES)
    model = DSSentimentNet(MODALITIES, input_dims, cfg["hidden"], num_layers=cfg["num_layers"],
                           dropout=cfg["dropout"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    gmd = GMD(opt, reduction=cfg["gmd_reduction"], order=cfg["gmd_order"], seed=seed) if cfg["gmd"] else None
    state = {"epoch": 0, "history": [], "best_score": math.inf, "best_epoch": -1, "best_model": None,
             "train_seconds": 0.0}

    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, map_location=device)
        if ck["config"] != cfg or ck["seed"] != seed:
            raise ValueError(f"{ckpt_path} was written with config {ck['config']} seed {ck['seed']}, not "
                             f"{cfg} seed {seed}; resume with the same settings or choose another --out")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if gmd is not None:
            gmd.load_state_dict(ck["gmd"])
        gen.set_state(ck["generator"])
        set_rng_state(ck["rng"])
        state = {k: ck[k] for k in state}

    train = data["train"]
    n = train["y"].shape[0]
    k = cfg["subsets"]
    every = subsets(MODALITIES)
    for epoch in range(state["epoch"], cfg["epochs"]):
        if stop_after is not None and epoch >= stop_after:
            return None
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        steps = range(0, n, cfg["batch_size"])
        total, conflicts = 0.0, []
        bar = tqdm(steps, desc=f"{run_dir.parent.name} seed {seed} epoch {epoch + 1}/{cfg['epochs']}",
                   leave=False, disable=not progress)
        for i in bar:
            x, lengths, y = _batch(train, order[i:i + cfg["batch_size"]], device)
            objectives = every if k == 0 else sample_subsets(MODALITIES, k, gen)
            losses = subset_l1(model.forward_branches(x, None, lengths), y, objectives)
            if gmd is not None:
                gmd.zero_grad()
                info = gmd.backward(losses)
                gmd.step()
                if getattr(info, "num_conflicts", None) is not None:
                    conflicts.append(float(info.num_conflicts))
            else:
                opt.zero_grad()
                # The mean, not the sum: Adam is invariant to the scale, and the mean matches GMD's shared scale.
                torch.stack(list(losses.values())).mean().backward()
                opt.step()
            loss = float(torch.stack([v.detach() for v in losses.values()]).mean())
            total += loss
            bar.set_postfix(loss=f"{loss:.3f}")
        state["train_seconds"] += time.perf_counter() - t0

        branches = branch_predictions(model, data["valid"], cfg["eval_batch_size"], device)
        valid = {name: float(v) for name, v in
                 subset_l1(branches, data["valid"]["y"], every).items()}
        score = float(np.mean(list(valid.values())))
        record = {"epoch": epoch + 1, "train_l1": total / len(steps), "valid_l1": score, "valid_l1_subsets": valid}
        if conflicts:
            record["conflicts_per_step"] = float(np.mean(conflicts))
        state["history"].append(record)
        if score < state["best_score"]:
            state.update(best_score=score, best_epoch=epoch + 1, best_model=copy.deepcopy(model.state_dict()))
        state["epoch"] = epoch + 1
        save_checkpoint(ckpt_path, model=model.state_dict(), optimizer=opt.state_dict(),
                        gmd=gmd.state_dict() if gmd is not None else None, generator=gen.get_state(),
                        rng=rng_state(), config=cfg, seed=seed, **state)
        print(f"[{run_dir.parent.name} seed {seed}] epoch {epoch + 1}: train L1 {record['train_l1']:.4f}  "
              f"valid L1 (mean of 7) {score:.4f}" + ("  *" if state["best_epoch"] == epoch + 1 else ""),
              flush=True)

    model.load_state_dict(state["best_model"])
    test = evaluate_subsets(model, data["test"], cfg["eval_batch_size"], device)
    result = {"seed": seed, "best_epoch": state["best_epoch"], "best_valid_l1": state["best_score"],
              "train_seconds": state["train_seconds"], "history": state["history"], "test": test}
    write_json(run_dir / "result.json", result)
    return result


# ----------------------------------------------------------------------------------------------- reporting

def aggregate(results: list[dict]) -> tuple[dict, dict]:
    """Mean and std (ddof 1; 0 for one seed) over seeds of every test metric: {combination: {metric: value}}."""
    combos = list(results[0]["test"])
    mean, std = {}, {}
    for c in combos:
        vals = {k: np.array([r["test"][c][k] for r in results], dtype=np.float64) for k in METRIC_NAMES}
        mean[c] = {k: float(v.mean()) for k, v in vals.items()}
        std[c] = {k: float(v.std(ddof=1)) if v.size > 1 else 0.0 for k, v in vals.items()}
    return mean, std


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4f}"


def _by_epoch(results: list[dict], key: str) -> str:
    per_epoch = np.array([[h.get(key, math.nan) for h in r["history"]] for r in results], dtype=np.float64)
    return ", ".join(f"{v:.3f}" for v in per_epoch.mean(0))


def write_report(out: Path, summary: dict) -> None:
    runs = summary["runs"]
    lines = [f"# {summary['dataset'].upper()}: DSSentimentNet per modality combination (test split)", "",
             f"- data: {summary['source']}",
             f"- seeds: {summary['seeds']}; device: {summary['device']}; machine: {summary['machine']}",
             "- metrics as MMSA computes them (gmd_ext.metrics.sentiment_metrics); mean over seeds"
             + (" ± std" if len(summary["seeds"]) > 1 else ""), ""]
    for name, run in runs.items():
        cfg = run["config"]
        lines += [f"## {name} ({'GMD' if cfg['gmd'] else 'joint'} training)", "",
                  "config: `" + json.dumps(cfg) + "`", "",
                  f"best epochs {[r['best_epoch'] for r in run['seeds']]}, training time "
                  f"{np.mean([r['train_seconds'] for r in run['seeds']]):.1f} s per seed", "",
                  "valid L1 (mean of the 7 subsets) by epoch, mean over seeds: "
                  + _by_epoch(run["seeds"], "valid_l1"), ""]
        if cfg["gmd"]:
            # Conflicts between subset gradients rise as the strong modality takes over: the dominance signal.
            lines += ["GMD conflicting subset-gradient pairs per step (info.num_conflicts, of 21) by epoch, mean over seeds: "
                      + _by_epoch(run["seeds"], "conflicts_per_step"), ""]
        lines += ["| combination | " + " | ".join(METRIC_NAMES) + " |", "|---|" + "---|" * len(METRIC_NAMES)]
        for c, m in run["mean"].items():
            cells = [_fmt(m[k]) + (f" ± {run['std'][c][k]:.4f}" if len(run["seeds"]) > 1 else "")
                     for k in METRIC_NAMES]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    if len(runs) > 1:
        keys = ("Has0_acc_2", "Non0_acc_2", "Non0_F1_score", "Mult_acc_7", "MAE", "Corr")
        names = list(runs)
        lines += ["## Side by side", "", "Each cell: " + " / ".join(names) + ".", "",
                  "| combination | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for c in runs[names[0]]["mean"]:
            cells = [" / ".join(_fmt(runs[n]["mean"][c][k]) for n in names) for k in keys]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    write_text(out / "report.md", "\n".join(lines))


def write_plot(out: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    combos = list(next(iter(runs.values()))["mean"])
    keys = ("Non0_acc_2", "Non0_F1_score", "MAE", "Corr")
    fig, axes = plt.subplots(len(keys), 1, figsize=(10, 2.6 * len(keys)), sharex=True)
    width = 0.8 / len(runs)
    pos = np.arange(len(combos))
    for ax, key in zip(axes, keys):
        for j, (name, run) in enumerate(runs.items()):
            ax.bar(pos + (j - (len(runs) - 1) / 2) * width, [run["mean"][c][key] for c in combos], width,
                   yerr=[run["std"][c][key] for c in combos] if len(summary["seeds"]) > 1 else None, label=name)
        ax.set_ylabel(key)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[-1].set_xticks(pos, combos, rotation=30, ha="right")
    fig.suptitle(f"{summary['dataset'].upper()} test metrics per modality combination")
    save_figure(fig, out / "metrics.png")


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mosi")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="MMSA feature file (aligned_50.pkl / unaligned_50.pkl, or the same as .npz)")
    src.add_argument("--synthetic", action="store_true", help="generate and use a synthetic file in MMSA format")
    p.add_argument("--synthetic-n", type=int, nargs=3, metavar=("TRAIN", "VALID", "TEST"),
                   help="synthetic split sizes (default: the dataset's)")
    p.add_argument("--synthetic-dims", type=int, nargs=3, metavar=("TEXT", "AUDIO", "VISION"),
                   help="synthetic feature sizes (default: the dataset's)")
    p.add_argument("--unaligned", action="store_true", help="synthetic: unaligned layout (T = 50/375/500)")
    p.add_argument("--config", type=Path, nargs="+", default=DEFAULT_CONFIGS,
                   help="one or more JSON configs (default: the paired mosi_gmd.json and mosi_joint.json)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path, default=Path("runs/mosi"))
    p.add_argument("--resume", action="store_true", help="continue the runs in --out from their last checkpoint")
    p.add_argument("--device", default="auto")
    p.add_argument("--nonfinite", choices=("zero", "raise"), default="zero",
                   help="NaN/Inf features: replace with 0 and warn (MMSA's own loader zeroes -inf audio), or fail")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default). The GRU steps are tiny: on a loaded 2-core box one "
                        "thread ran a GMD step 12x faster than two (0.16 s vs 2.0 s, hidden 8, batch 16)")
    # Overrides apply to every config alike, so a GMD/joint pair stays a one-switch comparison.
    for key in ("epochs", "batch_size", "subsets", "hidden"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, dest=key)
    p.add_argument("--lr", type=float)
    p.add_argument("--stop-after-epochs", type=int, help=argparse.SUPPRESS)  # simulates an interruption (tests)
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    """Run the recipe (``argv`` as on the command line); returns the summary written to metrics.json, or None
    when ``--stop-after-epochs`` interrupted it."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process (tests); leave torch as found


def _run(args) -> dict | None:
    overrides = {k: getattr(args, k) for k in ("epochs", "batch_size", "subsets", "hidden", "lr")}
    configs = {}
    for path in args.config:
        cfg = load_config(path, DEFAULTS, overrides)
        if not 0 <= cfg["subsets"] <= 7:
            raise ValueError(f"{path}: subsets must be 0 (all 7) or k in 1..7, got {cfg['subsets']}")
        if path.stem in configs:
            raise ValueError(f"--config: two configs share the name {path.stem!r}")
        configs[path.stem] = cfg
    device = pick_device(args.device)
    data, source = load_data(args)

    runs, stopped = {}, False
    for name, cfg in configs.items():
        results = []
        for seed in args.seeds:
            r = train_one(cfg, data, seed, args.out / name / f"seed{seed}", device, resume=args.resume,
                          stop_after=args.stop_after_epochs, progress=not args.no_progress)
            stopped |= r is None
            results.append(r)
        if not stopped:
            mean, std = aggregate(results)
            runs[name] = {"config": cfg, "seeds": results, "mean": mean, "std": std}
    if stopped:
        print(f"stopped after {args.stop_after_epochs} epoch(s); continue with --resume", flush=True)
        return None
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{os.cpu_count()}-core {platform.machine()} CPU")
    summary = {"dataset": args.dataset, "source": source, "seeds": args.seeds, "device": str(device),
               "machine": f"{machine}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
               "runs": runs}
    write_json(args.out / "metrics.json", summary)
    write_report(args.out, summary)
    write_plot(args.out, summary)
    print(f"wrote {args.out / 'report.md'}, metrics.json, metrics.png", flush=True)
    return summary


if __name__ == "__main__":
    main()
