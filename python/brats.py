"""BraTS 2018 with GMD + Dynamic Sharing: training, 15-combination evaluation, the offline demo.

    python python/brats.py demo [--quick]                      # phantom data, joint vs GMD, comparison table
    python python/brats.py train --config python/configs/brats_gmd.json --out runs/brats_gmd [--resume]
    python python/brats.py eval --run runs/brats_gmd           # test split, all 15 modality combinations
    python python/brats.py compare runs/brats_joint runs/brats_gmd --out runs/compare
    python python/brats.py phantom --out data/phantom --n 24 --size 64

A standard PyTorch loop on gmd_ext: DSUNet3d; one soft-Dice objective per modality subset (all 15, or k sampled
ones); GMD (``gmd.backward(losses)``) or joint training (sum of the subset losses, plain backward) chosen by the
``gmd`` switch — python/configs/brats_gmd.json and brats_joint.json differ only there. Adam with a per-step poly
or cosine schedule, atomic checkpoints every epoch (model, optimizer, scheduler, GMD, sampler and RNG state) that
``--resume`` continues exactly, the checkpoint chosen on the validation split, sliding-window evaluation on the
test split, ``report.md`` + ``metrics.json`` + PNG plots per run.

With DS every modality runs through the network on its own, so a subset's logits are the mean of its modalities'
branch logits. Evaluation computes the four branch logits once per case and fuses them for all 15 combinations
(exact, and 15x cheaper than 15 inferences).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from gmd_ext import GMD, DSUNet3d, sample_subsets, subsets  # noqa: E402
from gmd_ext.io import load_checkpoint, rng_state, save_checkpoint, set_rng_state  # noqa: E402
from gmd_ext.data import phantom  # noqa: E402
from gmd_ext.apps.brats.data import MODALITIES, BraTSDataset, find_cases  # noqa: E402
from gmd_ext.apps.brats.metrics import REGIONS, brats_dice, regions_to_labels  # noqa: E402
from gmd_ext.gmd.monitor import DominanceMonitor  # noqa: E402

DEFAULTS = {
    "data_root": "data/BraTS2018",
    "modalities": list(MODALITIES),
    "split_seed": 0,
    "split_ratios": [0.7, 0.1, 0.2],
    "cache": False,            # keep preprocessed volumes in memory (phantoms; real BraTS needs ~25 GB)
    "num_workers": 0,
    "crop_size": 128,
    "batch_size": 2,
    "width": 0.5,              # DSUNet3d channel multiplier; 0.5 is the paper's 3.25 M-parameter model
    "gmd": True,               # THE switch: GMD projection vs joint training (sum of subset losses)
    "subsets_per_step": 15,    # 15 = every modality combination; k < 15 samples k (always with the full set)
    "epochs": 300,
    "steps_per_epoch": 100,
    "lr": 3e-4,
    "weight_decay": 1e-5,
    "lr_schedule": "poly",     # poly | cosine | constant, stepped every optimizer step
    "warmup_steps": 0,
    "dice_smooth": 1.0,
    "val_every": 1,            # epochs between validations (checkpoint selection)
    "sw_overlap": 0.5,         # sliding-window overlap at evaluation; window = crop_size
    "sw_weighting": "gaussian",  # gaussian | uniform
    "sw_batch_size": 2,
    "seed": 0,
    "device": "auto",
    "backend": "auto",         # gmd_ext backend for the DS ops and GMD projection
    "monitor": True,           # dominance monitor CSV + plot (GMD runs)
}

# Demo presets: the joint and GMD runs differ only in "gmd". Chosen so the full demo (phantom generation, two
# trainings, validation and 15-combination test evaluation) stays under 15 minutes on a 2-core CPU.
DEMO = {"crop_size": 32, "batch_size": 2, "width": 0.25, "subsets_per_step": 4, "epochs": 15,
        "steps_per_epoch": 20, "lr": 3e-3, "cache": True, "sw_overlap": 0.25, "val_every": 3}
DEMO_DATA = {"n": 20, "size": 48}
QUICK = {"crop_size": 24, "batch_size": 2, "width": 0.25, "subsets_per_step": 2, "epochs": 1,
         "steps_per_epoch": 2, "lr": 3e-3, "cache": True, "sw_overlap": 0.0, "val_every": 1}
QUICK_DATA = {"n": 3, "size": 32}


# ----------------------------------------------------------------------------------------------- model side
def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of sigmoid region probabilities, one Dice per region over the whole batch, averaged.

    logits, target: ``[B, 3, D, H, W]`` float (target 0/1 per region WT, TC, ET). Returns a scalar.
    Summing over the batch ("batch Dice", as nnU-Net) keeps crops without enhancing tumour from dominating ET.
    """
    p = torch.sigmoid(logits).transpose(0, 1).flatten(1)
    t = target.transpose(0, 1).flatten(1)
    inter = (p * t).sum(1)
    denom = p.sum(1) + t.sum(1)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def subset_losses(branches: torch.Tensor, target: torch.Tensor, chosen, smooth: float = 1.0) -> dict:
    """One soft-Dice loss per subset: fuse the subset's branch logits by their mean (the DS fusion)."""
    return {s.name: soft_dice_loss(branches[:, list(s.indices)].mean(1), target, smooth) for s in chosen}


def _gaussian_window(size: tuple, device) -> torch.Tensor:
    # nnU-Net's importance map: sigma = 1/8 of the window, so window centres dominate the overlap average.
    axes = []
    for s in size:
        t = torch.arange(s, dtype=torch.float32, device=device) - (s - 1) / 2
        axes.append(torch.exp(-0.5 * (t / (s / 8)) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (w / w.max()).clamp_min(1e-3)


def _starts(length: int, window: int, overlap: float) -> list[int]:
    if length <= window:
        return [0]
    stride = max(1, int(window * (1 - overlap)))
    n = math.ceil((length - window) / stride) + 1
    return [round(i * (length - window) / (n - 1)) for i in range(n)]


@torch.no_grad()
def sliding_window_branches(model: DSUNet3d, image: torch.Tensor, window, overlap: float = 0.5,
                            weighting: str = "gaussian", batch_size: int = 2) -> torch.Tensor:
    """Per-modality logits of a whole volume by sliding-window inference.

    Args:
        image: ``[M, D, H, W]`` float (all modalities present). window: int or 3 ints (the training crop).
        overlap: fraction of the window shared by neighbours, in [0, 1). weighting: gaussian | uniform.

    Returns:
        ``[M, 3, D, H, W]`` float32 logits. Window weighting is linear, so fusing these over a subset equals
        sliding-window inference of that subset.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"sw_overlap must be in [0, 1), got {overlap}")
    if weighting not in ("gaussian", "uniform"):
        raise ValueError(f"sw_weighting must be 'gaussian' or 'uniform', got {weighting!r}")
    window = (window,) * 3 if isinstance(window, int) else tuple(window)
    M, *shape = image.shape
    pad = [max(w - s, 0) for w, s in zip(window, shape)]
    if any(pad):
        image = F.pad(image, [q for p in reversed(pad) for q in (p // 2, p - p // 2)])
    full = image.shape[1:]
    weight = (_gaussian_window(window, image.device) if weighting == "gaussian"
              else torch.ones(window, device=image.device))
    acc = torch.zeros((M, model.num_classes, *full), device=image.device)
    norm = torch.zeros(full, device=image.device)
    corners = [(a, b, c) for a in _starts(full[0], window[0], overlap) for b in _starts(full[1], window[1], overlap)
               for c in _starts(full[2], window[2], overlap)]
    for i in range(0, len(corners), batch_size):
        chunk = corners[i:i + batch_size]
        sl = [tuple(slice(s, s + w) for s, w in zip(c, window)) for c in chunk]
        x = torch.stack([image[(slice(None), *s)] for s in sl])
        out = model.forward_branches(x).float()  # [b, M, 3, *window]
        for o, s in zip(out, sl):
            acc[(slice(None), slice(None), *s)] += o * weight
            norm[s] += weight
    acc /= norm
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, shape))
    return acc[(slice(None), slice(None), *crop)]


@torch.no_grad()
def evaluate(model: DSUNet3d, ds: BraTSDataset, cfg: dict, device, desc: str = "eval") -> dict:
    """Dice per case for every modality combination: ``{subset name: {case: {"WT", "TC", "ET"}}}``."""
    from tqdm import tqdm

    model.eval()
    combos = subsets(cfg["modalities"])
    out = {s.name: {} for s in combos}
    for i in tqdm(range(len(ds)), desc=desc, leave=False, dynamic_ncols=True):
        item = ds[i]
        br = sliding_window_branches(model, item["image"].to(device), cfg["crop_size"], cfg["sw_overlap"],
                                     cfg["sw_weighting"], cfg["sw_batch_size"])
        labels = item["labels"].to(device)
        for s in combos:
            pred = regions_to_labels(br[list(s.indices)].mean(0) > 0)  # sigmoid > 0.5
            out[s.name][item["case"]] = brats_dice(pred, labels)
    model.train()
    return out


def summarise(per_case: dict) -> dict:
    """Mean and std over cases per combination and region, plus the mean over combinations."""
    combos = {}
    for name, cases in per_case.items():
        combos[name] = {r: {"mean": float(np.mean([c[r] for c in cases.values()])),
                            "std": float(np.std([c[r] for c in cases.values()]))} for r in REGIONS}
    mean = {r: float(np.mean([c[r]["mean"] for c in combos.values()])) for r in REGIONS}
    return {"combinations": combos, "mean": mean}


# ----------------------------------------------------------------------------------------------- training
def _collate(items: list[dict]) -> dict:
    return {"image": torch.stack([it["image"] for it in items]),
            "regions": torch.stack([it["regions"] for it in items]),
            "case": [it["case"] for it in items]}


def _epoch_batches(n: int, steps: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batch indices of one epoch: seeded permutations of the training cases, concatenated as needed."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    need = steps * batch_size
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(need / n))])[:need].tolist()
    return [order[i:i + batch_size] for i in range(0, need, batch_size)]


def _datasets(cfg: dict, run_dir: Path):
    common_args = dict(modalities=cfg["modalities"], crop_size=cfg["crop_size"], split_file=run_dir / "splits.json",
                       split_seed=cfg["split_seed"], split_ratios=cfg["split_ratios"], cache=cfg["cache"])
    train = BraTSDataset(cfg["data_root"], "train", seed=cfg["seed"], **common_args)
    val = BraTSDataset(cfg["data_root"], "val", **common_args)
    return train, val


def _build(cfg: dict, device):
    model = DSUNet3d(cfg["modalities"], 3, cfg["width"], backend=cfg["backend"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    total = cfg["epochs"] * cfg["steps_per_epoch"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, common.lr_lambda(cfg["lr_schedule"], total, cfg["warmup_steps"]))
    return model, opt, sched


def _check_cfg(cfg: dict) -> None:
    for key in ("epochs", "steps_per_epoch", "batch_size", "val_every", "sw_batch_size"):
        if cfg[key] < 1:
            raise ValueError(f"config {key} must be >= 1, got {cfg[key]}")
    k = cfg["subsets_per_step"]
    total = 2 ** len(cfg["modalities"]) - 1
    if not 1 <= k <= total:
        raise ValueError(f"config subsets_per_step must be in [1, {total}], got {k}")


def train(cfg: dict, run_dir: str | Path, resume: bool = False, stop_after_epochs: int | None = None) -> Path:
    """Train one run into ``run_dir``; returns the path of the checkpoint chosen on the validation split.

    ``stop_after_epochs`` ends this invocation after that many epochs (a time-limited job); ``resume=True``
    continues from ``run_dir/last.pt`` exactly where it stopped (bit-identical on CPU: data crops depend only on
    (seed, epoch, case), and the optimizer, schedule, GMD order generator, subset sampler and global RNGs are
    restored). The dominance monitor keeps appending to ``monitor.csv``; its plot covers the steps of the last
    invocation only.
    """
    from tqdm import tqdm

    _check_cfg(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    last, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if resume:
        if not last.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {last}")
        saved = json.loads((run_dir / "config.json").read_text())
        if saved != cfg:
            diff = sorted(k for k in set(saved) | set(cfg) if saved.get(k) != cfg.get(k))
            raise ValueError(f"--resume: config differs from the run's {run_dir / 'config.json'} in {diff}")
    else:
        if last.exists():
            raise FileExistsError(f"{run_dir} already holds a run (last.pt); pass --resume or another --out")
        common.write_json(run_dir / "config.json", cfg)

    device = common.pick_device(cfg["device"])
    common.seed_everything(cfg["seed"])
    model, opt, sched = _build(cfg, device)
    combos = subsets(cfg["modalities"])
    names = [s.name for s in combos]
    monitor = None
    if cfg["gmd"] and cfg["monitor"]:
        monitor = DominanceMonitor(run_dir / "monitor.csv", objective_names=names, modalities=cfg["modalities"])
    gmd = GMD(opt, seed=cfg["seed"], backend=cfg["backend"], monitor=monitor) if cfg["gmd"] else None
    subset_gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    start_epoch, step, best, history = 0, 0, -1.0, []
    if resume:
        state = load_checkpoint(last)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if gmd is not None:
            gmd.load_state_dict(state["gmd"])
        subset_gen.set_state(state["subset_generator"])
        set_rng_state(state["rng"])
        start_epoch, step, best, history = state["epoch"], state["step"], state["best_val"], state["history"]

    train_ds, val_ds = _datasets(cfg, run_dir)
    if len(train_ds) == 0:
        raise ValueError(f"the train split of {cfg['data_root']} is empty (see {run_dir / 'splits.json'})")
    end_epoch = cfg["epochs"] if stop_after_epochs is None else min(cfg["epochs"], start_epoch + stop_after_epochs)
    k = cfg["subsets_per_step"]
    model.train()
    for epoch in range(start_epoch, end_epoch):
        train_ds.set_epoch(epoch)
        batches = _epoch_batches(len(train_ds), cfg["steps_per_epoch"], cfg["batch_size"], cfg["seed"], epoch)
        loader = torch.utils.data.DataLoader(train_ds, batch_sampler=batches, collate_fn=_collate,
                                             num_workers=cfg["num_workers"])
        t0, losses_sum = time.time(), 0.0
        bar = tqdm(loader, desc=f"{'gmd' if gmd else 'joint'} epoch {epoch + 1}/{cfg['epochs']}",
                   dynamic_ncols=True, leave=False)
        for batch in bar:
            x, y = batch["image"].to(device), batch["regions"].to(device)
            chosen = combos if k == len(combos) else sample_subsets(cfg["modalities"], k, subset_gen)
            # One packed DS forward gives every modality's branch logits; subset S fuses the mean over S.
            losses = subset_losses(model.forward_branches(x), y, chosen, cfg["dice_smooth"])
            if gmd is not None:
                gmd.zero_grad()
                gmd.backward(losses)
                gmd.step()
            else:
                opt.zero_grad(set_to_none=True)
                torch.stack(list(losses.values())).sum().backward()
                opt.step()
            sched.step()
            step += 1
            mean_loss = float(torch.stack([v.detach() for v in losses.values()]).mean())
            losses_sum += mean_loss
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        record = {"epoch": epoch + 1, "step": step, "train_loss": losses_sum / len(batches),
                  "lr": sched.get_last_lr()[0], "seconds": time.time() - t0}
        if len(val_ds) and ((epoch + 1) % cfg["val_every"] == 0 or epoch + 1 == cfg["epochs"]):
            val = summarise(evaluate(model, val_ds, cfg, device, desc="val"))
            record["val_dice"] = val["mean"]
            score = float(np.mean(list(val["mean"].values())))
            record["val_score"] = score
            if score > best:
                best = score
                save_checkpoint(best_path, model=model.state_dict(), epoch=epoch + 1, step=step, val=val["mean"])
        history.append(record)
        print(json.dumps(record), flush=True)
        save_checkpoint(last, model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                        gmd=gmd.state_dict() if gmd is not None else None, subset_generator=subset_gen.get_state(),
                        rng=rng_state(), epoch=epoch + 1, step=step, best_val=best, history=history)
    common.write_json(run_dir / "history.json", history)
    if monitor is not None and monitor.steps:
        monitor.plot(run_dir / "dominance.png")
    if gmd is not None:
        gmd.close()
    if not len(val_ds):
        print(f"note: the val split is empty; evaluation uses the last checkpoint {last}", flush=True)
        return last
    return best_path


# ----------------------------------------------------------------------------------------------- reporting
def _fmt(stat: dict) -> str:
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def write_report(run_dir: Path, cfg: dict, summary: dict, per_case: dict, meta: dict) -> None:
    """report.md (15 rows x WT/TC/ET + mean row), metrics.json and dice_per_combination.png in ``run_dir``."""
    lines = [f"# BraTS evaluation: {'GMD' if cfg['gmd'] else 'joint training'} ({run_dir.name})", "",
             f"- data: `{cfg['data_root']}`, split `{meta['split']}` ({len(meta['cases'])} case"
             f"{'' if len(meta['cases']) == 1 else 's'})",
             f"- checkpoint: `{meta['checkpoint']}` (epoch {meta['epoch']}; {meta['selection']})",
             f"- model: DSUNet3d width {cfg['width']}, crop {cfg['crop_size']}, batch {cfg['batch_size']}, "
             f"{cfg['epochs']} epochs x {cfg['steps_per_epoch']} steps, {cfg['subsets_per_step']} subsets/step, "
             f"Adam lr {cfg['lr']} ({cfg['lr_schedule']})",
             f"- inference: sliding window {cfg['crop_size']}, overlap {cfg['sw_overlap']}, {cfg['sw_weighting']} "
             f"weighting; Dice per case (sigmoid > 0.5, empty truth and prediction = 1), mean ± std over cases",
             "", "| modalities | WT | TC | ET |", "|---|---|---|---|"]
    for name, stat in summary["combinations"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(stat[r]) for r in REGIONS) + " |")
    lines.append("| **mean over combinations** | " + " | ".join(f"**{summary['mean'][r]:.4f}**" for r in REGIONS)
                 + " |")
    common.write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    common.write_json(run_dir / "metrics.json", {**meta, "config": cfg, **summary, "per_case": per_case})
    _plot_combinations(run_dir / "dice_per_combination.png", {run_dir.name: summary})


def _plot_combinations(path: Path, runs: dict) -> None:
    """Bars of mean Dice per combination, one panel per region, one bar colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(runs.values()))["combinations"])
    fig, axes = plt.subplots(1, 3, figsize=(18, 5), sharey=True)
    width = 0.8 / len(runs)
    for ax, region in zip(axes, REGIONS):
        for j, (label, summary) in enumerate(runs.items()):
            means = [summary["combinations"][n][region]["mean"] for n in names]
            stds = [summary["combinations"][n][region]["std"] for n in names]
            ax.bar(np.arange(len(names)) + (j - (len(runs) - 1) / 2) * width, means, width, yerr=stds,
                   capsize=2, label=f"{label} (mean {summary['mean'][region]:.3f})")
        ax.set_title(f"{region} Dice per modality combination")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path)


def run_eval(run_dir: str | Path, split: str = "test", checkpoint: str | None = None) -> dict:
    """Evaluate a trained run on ``split`` over all combinations; writes the report files; returns the summary."""
    run_dir = Path(run_dir)
    cfg = common.load_config(run_dir / "config.json", DEFAULTS)
    device = common.pick_device(cfg["device"])
    ckpt = Path(checkpoint) if checkpoint else (run_dir / "best.pt" if (run_dir / "best.pt").is_file()
                                                 else run_dir / "last.pt")
    state = load_checkpoint(ckpt)
    model = DSUNet3d(cfg["modalities"], 3, cfg["width"], backend=cfg["backend"]).to(device)
    model.load_state_dict(state["model"])
    ds = BraTSDataset(cfg["data_root"], split, modalities=cfg["modalities"], crop_size=cfg["crop_size"],
                      split_file=run_dir / "splits.json", cache=False)
    if len(ds) == 0:
        raise ValueError(f"the {split} split of {cfg['data_root']} is empty (see {run_dir / 'splits.json'})")
    per_case = evaluate(model, ds, cfg, device, desc=split)
    summary = summarise(per_case)
    selection = ("best mean Dice over all combinations on the val split" if ckpt.name == "best.pt"
                 else "last epoch (no val split)" if ckpt.name == "last.pt" else "given on the command line")
    meta = {"split": split, "cases": ds.cases, "checkpoint": str(ckpt), "epoch": state.get("epoch"),
            "selection": selection}
    write_report(run_dir, cfg, summary, per_case, meta)
    return summary


def compare(run_dirs: list[str | Path], out: str | Path) -> str:
    """Side-by-side table and plot of evaluated runs (reads each run's metrics.json); returns the markdown."""
    out = Path(out)
    loaded = [(d, json.loads((d / "metrics.json").read_text())) for d in map(Path, run_dirs)]
    modes = ["GMD" if m["config"]["gmd"] else "joint" for _, m in loaded]
    runs = {}
    for (d, m), mode in zip(loaded, modes):
        runs[mode if modes.count(mode) == 1 else f"{mode} ({d})"] = m
    labels = list(runs)
    names = list(runs[labels[0]]["combinations"])
    head = "| modalities | " + " | ".join(f"{r} {lab}" for r in REGIONS for lab in labels) + " |"
    lines = [head, "|---" * (1 + len(REGIONS) * len(labels)) + "|"]
    for n in names:
        cells = [f"{runs[lab]['combinations'][n][r]['mean']:.4f}" for r in REGIONS for lab in labels]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{runs[lab]['mean'][r]:.4f}**" for r in REGIONS for lab in labels)
                 + " |")
    table = "\n".join(lines)
    common.write_text(out / "comparison.md", "# GMD vs joint training, Dice per modality combination (test split)"
                      "\n\n" + table + "\n")
    _plot_combinations(out / "comparison.png", runs)
    return table


# ----------------------------------------------------------------------------------------------- demo
def ensure_phantom(root: Path, n: int, size: int, seed: int = 0) -> None:
    """Generate the phantom set into ``root`` unless it already holds exactly these cases."""
    want = {phantom.case_name(seed, i) for i in range(n)}
    have = set(find_cases(root)) if root.is_dir() and any(root.iterdir()) else set()
    marker = root / "phantom.json"
    same = marker.is_file() and json.loads(marker.read_text()) == {"n": n, "size": size, "seed": seed}
    if have == want and same:
        return
    if have - want:
        raise FileExistsError(f"{root} holds other cases ({sorted(have - want)[:3]}...); pass another --data")
    t0 = time.time()
    print(f"writing {n} phantom cases ({size}^3) to {root} ...", flush=True)
    phantom.make_cases(root, n, size=size, seed=seed)
    common.write_json(marker, {"n": n, "size": size, "seed": seed})
    print(f"  done in {time.time() - t0:.1f} s", flush=True)


def demo(out: str | Path = "runs/demo", data: str | Path | None = None, quick: bool = False) -> str:
    """Phantom data -> joint and GMD training -> 15-combination evaluation -> comparison table (printed)."""
    t0 = time.time()
    preset, spec = (QUICK, QUICK_DATA) if quick else (DEMO, DEMO_DATA)
    data = Path(data) if data else Path("data") / ("phantom-quick" if quick else "phantom")
    ensure_phantom(data, spec["n"], spec["size"])
    out = Path(out) / ("quick" if quick else "full")
    runs = []
    for use_gmd in (False, True):
        cfg = common.load_config(None, DEFAULTS, {**preset, "data_root": str(data), "gmd": use_gmd})
        run_dir = out / ("gmd" if use_gmd else "joint")
        if (run_dir / "last.pt").exists():
            # Reuse (or finish) an earlier demo run only when it was made with these very settings.
            if json.loads((run_dir / "config.json").read_text()) != cfg:
                raise FileExistsError(f"{run_dir} holds a run with other settings; remove it or pass another --out")
            if load_checkpoint(run_dir / "last.pt")["epoch"] < cfg["epochs"]:
                train(cfg, run_dir, resume=True)
        else:
            train(cfg, run_dir)
        summary = run_eval(run_dir)
        print(f"{run_dir.name}: mean Dice over 15 combinations " +
              ", ".join(f"{r} {summary['mean'][r]:.4f}" for r in REGIONS), flush=True)
        runs.append(run_dir)
    table = compare(runs, out)
    print("\n" + table + "\n")
    print(f"demo finished in {time.time() - t0:.0f} s; reports in {out}/{{joint,gmd}}/report.md, "
          f"comparison in {out}/comparison.md", flush=True)
    return table


# ----------------------------------------------------------------------------------------------- CLI
def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="phantom data, joint vs GMD, comparison table")
    d.add_argument("--quick", action="store_true", help="CI-sized run (< 2 minutes)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--data", default=None, help="phantom folder (default data/phantom or data/phantom-quick)")
    t = sub.add_parser("train", help="train one run (and evaluate it on the test split)")
    t.add_argument("--config", default=None, help="JSON config (python/configs/brats_gmd.json ...)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    t.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override config keys (JSON values)")
    t.add_argument("--stop-after-epochs", type=int, default=None, help="end this invocation after N epochs")
    t.add_argument("--no-eval", action="store_true", help="skip the test evaluation after training")
    e = sub.add_parser("eval", help="evaluate a run over all modality combinations")
    e.add_argument("--run", required=True)
    e.add_argument("--split", default="test", choices=["test", "val", "train"])
    e.add_argument("--checkpoint", default=None)
    c = sub.add_parser("compare", help="side-by-side table and plot of evaluated runs")
    c.add_argument("runs", nargs="+")
    c.add_argument("--out", required=True)
    g = sub.add_parser("phantom", help="write BraTS-layout phantom cases")
    g.add_argument("--out", required=True)
    g.add_argument("--n", type=int, default=20)
    g.add_argument("--size", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.cmd == "demo":
        demo(args.out, args.data, args.quick)
    elif args.cmd == "train":
        cfg = common.load_config(args.config, DEFAULTS, _parse_set(args.set))
        if args.resume:
            saved = common.load_config(Path(args.out) / "config.json", DEFAULTS)
            cfg = saved if args.config is None and not args.set else cfg
        train(cfg, args.out, resume=args.resume, stop_after_epochs=args.stop_after_epochs)
        state = load_checkpoint(Path(args.out) / "last.pt")
        if not args.no_eval and state["epoch"] >= cfg["epochs"]:
            run_eval(args.out)
            print(Path(args.out, "report.md").read_text())
    elif args.cmd == "eval":
        run_eval(args.run, args.split, args.checkpoint)
        print(Path(args.run, "report.md").read_text())
    elif args.cmd == "compare":
        print(compare(args.runs, args.out))
    elif args.cmd == "phantom":
        phantom.make_cases(args.out, args.n, size=args.size, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
