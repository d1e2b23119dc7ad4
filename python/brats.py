"""BraTS 2018 with GMD + Dynamic Sharing: training, 15-combination evaluation, the offline demo.

    python python/brats.py demo [--quick] [--threads N]        # phantom data, joint vs GMD, comparison table
    python python/brats.py train --config python/configs/brats_gmd.json --out runs/brats_gmd [--resume]
    python python/brats.py eval --run runs/brats_gmd [--split test]   # all 15 modality combinations
    python python/brats.py compare runs/brats_joint runs/brats_gmd --out runs/compare
    python python/brats.py phantom --out data/phantom --n 24 --size 64
    python python/brats.py dominance --run runs/brats_gmd --overwrite   # the figure again, from monitor.csv

What is BraTS-specific lives here; the rest (configs, the GMD-or-joint step, checkpoints and exact resume, paired
comparison, plots) is the shared skeleton python/recipe.py. Here: DSUNet3d (``modalities``, ``num_classes``,
``forward_branches``); one soft-Dice objective per modality subset (all 15, or k sampled); the BraTS NIfTI loader
with seeded random crops; the checkpoint chosen on the validation split by the mean Dice over all combinations;
sliding-window evaluation. python/configs/brats_gmd.json and brats_joint.json differ only in ``gmd``.

With DS every modality runs through the network on its own, so a subset's logits are the mean of its modalities'
branch logits. Evaluation computes the four branch logits once per case and fuses them for all 15 combinations
(exact, and 15x cheaper than 15 inferences).

Outputs are never silently replaced: a run folder that is not empty is refused unless ``--resume`` (same config
and seed, verified against config.json and the checkpoint) or ``--overwrite``; evaluations are named by split
(report_test.md, metrics_val.json, ...).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if str(Path(__file__).resolve().parent) not in sys.path:
    # `python -P` (and PYTHONSAFEPATH) leaves the script's folder off sys.path; the skeleton recipe.py lives there.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe  # noqa: E402
from gmd_ext import DSUNet3d, subsets  # noqa: E402
from gmd_ext.apps.brats.model import build_model  # noqa: E402
from gmd_ext.apps.brats.constants import REGION_LABELS  # noqa: E402
from gmd_ext.apps.brats.data import MODALITIES, BraTSDataset, find_cases  # noqa: E402
from gmd_ext.apps.brats.metrics import (  # noqa: E402
    BRATS_HD95_EMPTY_PENALTY_MM, REGIONS, brats_dice, brats_hd95, regions_to_labels)
from gmd_ext.data import phantom  # noqa: E402
from gmd_ext.io import load_checkpoint  # noqa: E402

Key = recipe.Key
SCHEMA = {
    **recipe.SHARED_SCHEMA,
    "subsets_per_step": Key(0, "0: all 15 modality subsets every step; k in 1..15: k sampled (the full set always in)",
                            low=0, high=15),
    "data_root": Key("data/BraTS2018", "data folder: BraTS 2018-2021, BraTS 2023 GLI or MSD Task01 layout, or "
                     "phantoms (brats.py phantom)"),
    "modalities": Key(list(MODALITIES), "modalities read, in the model's branch order", choices=MODALITIES,
                      unique=True),
    "split_seed": Key(0, "seed of the train/val/test split by case", low=0, high=2 ** 32 - 1),
    "split_ratios": Key([0.7, 0.1, 0.2], "train/val/test weights (normalised); val 0: select the last epoch",
                        low=0.0, high=1000.0, length=3),
    "cache": Key(False, "keep preprocessed volumes in memory (phantoms; real BraTS needs ~25 GB)"),
    "num_workers": Key(0, "DataLoader workers (each holds its own case in memory)", low=0, high=32),
    "crop_size": Key(128, "training crop edge in voxels (also the sliding window); >= 16 for DSUNet3d's four "
                     "poolings", low=16, high=256),
    "batch_size": Key(2, "crops per step", low=1, high=64),
    "width": Key(0.5, "DSUNet3d channel multiplier; 0.5 is the paper's 3.25 M-parameter model", above=0.0,
                 high=4.0),
    "model": Key(None, 'null: DSUNet3d; or {"name": "monai.networks.nets.SegResNet", "kwargs": {...}}: any network '
                 "for ONE modality's volume (in_channels 1, out_channels 3 and spatial_dims 3 filled in), converted "
                 "by gmd_ext.dynamic_sharing"),
    "epochs": Key(300, "training epochs", low=1, high=100_000),
    "steps_per_epoch": Key(100, "optimizer steps per epoch (batches are drawn lazily)", low=1, high=10 ** 9),
    "lr": Key(3e-4, "Adam learning rate", above=0.0, high=10.0),
    "weight_decay": Key(1e-5, "Adam weight decay", low=0.0, high=1.0),
    "lr_schedule": Key("poly", "stepped every optimizer step", choices=("poly", "cosine", "constant")),
    "dice_smooth": Key(1.0, "soft Dice smoothing (numerator and denominator)", low=0.0, high=1000.0),
    "sw_overlap": Key(0.5, "sliding-window overlap at evaluation (window = crop_size)", low=0.0, high=0.9),
    "sw_weighting": Key("gaussian", "sliding-window blending (MONAI's gaussian / constant importance map)",
                        choices=("gaussian", "uniform")),
    "sw_batch_size": Key(2, "windows per forward at evaluation", low=1, high=64),
    "seed": Key(0, "seed of initialisation, crops, subset sampling and GMD's order", low=0, high=2 ** 32 - 1),
    "device": Key("auto", "auto (CUDA when available), cpu, cuda or cuda:N", pattern=r"auto|cpu|cuda(:[0-9]{1,2})?"),
    "backend": Key("auto", "gmd_ext backend for the DS ops and the GMD projection",
                   choices=("auto", "cpp", "triton", "torch")),
}
DEFAULTS = recipe.defaults(SCHEMA)

# Demo presets: the joint and GMD runs differ only in "gmd". Chosen so the full demo (phantom generation, two
# trainings, validation and 15-combination test evaluation) fits a short session on a 2-core CPU.
DEMO = {"crop_size": 32, "batch_size": 2, "width": 0.25, "subsets_per_step": 4, "epochs": 15,
        "steps_per_epoch": 20, "lr": 3e-3, "cache": True, "sw_overlap": 0.25, "val_every": 3}
DEMO_DATA = {"n": 20, "size": 48}
QUICK = {"crop_size": 24, "batch_size": 2, "width": 0.25, "subsets_per_step": 2, "epochs": 1,
         "steps_per_epoch": 2, "lr": 3e-3, "cache": True, "sw_overlap": 0.0, "val_every": 1}
QUICK_DATA = {"n": 3, "size": 32}

# What a run folder may hold from this recipe (--overwrite removes these, and only these).
OUTPUTS = (*recipe.RUN_OUTPUTS, "splits.json", "report_*.md", "metrics_*.json", "dice_*.png")
REGION_NOTE = ("regions: " + "; ".join(
    f"{r} ({name}) = labels {{{', '.join(map(str, REGION_LABELS[r]))}}}" for r, name in
    zip(REGIONS, ("whole tumour: necrotic/non-enhancing core + edema + enhancing tumour",
                  "tumour core: necrotic/non-enhancing core + enhancing tumour", "enhancing tumour")))
               + ". Dice per case on sigmoid > 0.5.")


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


def _gaussian_window(size: tuple, device) -> torch.Tensor:
    # MONAI's gaussian importance map (monai.data.utils.compute_importance_map, sigma_scale 0.125, as nnU-Net):
    # window centres dominate the overlap average; the same arithmetic, so the blend equals MONAI's.
    w = None
    for s in size:
        t = torch.arange(-(s - 1) / 2.0, (s - 1) / 2.0 + 1, dtype=torch.float32, device=device)
        t = torch.exp(t ** 2 / (-2 * (s * 0.125) ** 2))
        w = t if w is None else w.unsqueeze(-1) * t
    return w.clamp_min(max(float(w.min()), 1e-3))


def _starts(length: int, window: int, overlap: float) -> list[int]:
    # MONAI's placement (monai.data.utils.dense_patch_slices): a grid of stride int(window * (1 - overlap)), the
    # last window moved back to end at the border.
    if length <= window:
        return [0]
    stride = max(1, int(window * (1 - overlap)))
    n = math.ceil((length - window) / stride) + 1
    return [min(i * stride, length - window) for i in range(n)]


@torch.no_grad()
def sliding_window_branches(model: DSUNet3d, image: torch.Tensor, window, overlap: float = 0.5,
                            weighting: str = "gaussian", batch_size: int = 2) -> torch.Tensor:
    """Per-modality logits of a whole volume by sliding-window inference.

    Args:
        image: ``[M, D, H, W]`` float (all modalities present). window: int or 3 ints (the training crop).
        overlap: fraction of the window shared by neighbours, in [0, 1). weighting: gaussian | uniform.

    Returns:
        ``[M, 3, D, H, W]`` float32 logits. Window weighting is linear, so fusing these over a subset equals
        sliding-window inference of that subset. Equal (placement, importance map, padding, blending order) to
        ``monai.inferers.sliding_window_inference(image[None], window, batch_size, predictor, overlap,
        mode="gaussian" | "constant")`` over the concatenated branch logits; tests/test_brats_recipe.py checks it.
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
    acc = torch.zeros((M, len(REGIONS), *full), device=image.device)
    norm = torch.zeros(full, device=image.device)
    corners = [(a, b, c) for a in _starts(full[0], window[0], overlap) for b in _starts(full[1], window[1], overlap)
               for c in _starts(full[2], window[2], overlap)]
    for i in range(0, len(corners), batch_size):
        chunk = corners[i:i + batch_size]
        sl = [tuple(slice(s, s + w) for s, w in zip(c, window)) for c in chunk]
        x = torch.stack([image[(slice(None), *s)] for s in sl])
        out = torch.stack(model.forward_branches(x), 1).float()  # [b, M, 3, *window]
        for o, s in zip(out, sl):
            acc[(slice(None), slice(None), *s)] += o * weight
            norm[s] += weight
    acc /= norm
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, shape))
    return acc[(slice(None), slice(None), *crop)]


@torch.no_grad()
def evaluate(model: DSUNet3d, ds: BraTSDataset, cfg: dict, device, desc: str = "eval", hd95: bool = True,
             progress: bool = True) -> dict:
    """Per case, for every modality combination: ``{"dice": {subset name: {case: {"WT", "TC", "ET"}}}, "hd95":
    (the same, in mm, with each case's voxel spacing; absent when ``hd95`` is False), "spacing": {case: [3]}}``."""
    from tqdm import tqdm

    model.eval()
    combos = subsets(cfg["modalities"])
    out = {"dice": {s.name: {} for s in combos}, "spacing": {}}
    if hd95:
        out["hd95"] = {s.name: {} for s in combos}
    for i in tqdm(range(len(ds)), desc=desc, leave=False, dynamic_ncols=True, disable=not progress):
        item = ds[i]
        br = sliding_window_branches(model, item["image"].to(device), cfg["crop_size"], cfg["sw_overlap"],
                                     cfg["sw_weighting"], cfg["sw_batch_size"])
        labels = item["labels"].to(device)
        spacing = item["spacing"].tolist()
        out["spacing"][item["case"]] = spacing
        for s in combos:
            pred = regions_to_labels(br[list(s.indices)].mean(0) > 0)  # sigmoid > 0.5
            out["dice"][s.name][item["case"]] = brats_dice(pred, labels)
            if hd95:
                out["hd95"][s.name][item["case"]] = brats_hd95(pred, labels, spacing=spacing)
    model.train()
    return out


def summarise(per_case: dict) -> dict:
    """Mean and std over cases per combination and region, plus the mean over combinations."""
    combos = {}
    for name, cases in per_case.items():
        combos[name] = {r: {"mean": float(np.mean([c[r] for c in cases.values()])),
                            "std": float(np.std([c[r] for c in cases.values()])), "n": len(cases)}
                        for r in REGIONS}
    mean = {r: float(np.mean([c[r]["mean"] for c in combos.values()])) for r in REGIONS}
    return {"combinations": combos, "mean": mean}


LAYOUT_NAMES = {"brats": "BraTS 2018-2021", "brats2023": "BraTS 2023 GLI", "msd": "MSD Task01 BrainTumour"}
BENCHMARK = "BraTS 2018"  # the paper's data set


def data_kind(root: str | Path) -> str:
    """Where the data comes from, decided from the folder: "phantom" for folders written by gmd_ext's phantom
    generator (they carry its MNI152 notice), else the release its layout identifies (``LAYOUT_NAMES``)."""
    if (Path(root) / phantom.NOTICE_FILE.name).is_file():
        return "phantom"
    return LAYOUT_NAMES[next(iter(find_cases(root).values())).layout]


# ----------------------------------------------------------------------------------------------- training
def _collate(items: list[dict]) -> dict:
    return {"image": torch.stack([it["image"] for it in items]),
            "regions": torch.stack([it["regions"] for it in items]),
            "case": [it["case"] for it in items]}


class _EpochBatches:
    """Batch indices of one epoch: seeded permutations of the training cases, concatenated as needed, drawn lazily
    (a DataLoader ``batch_sampler``), so the plan of an epoch costs O(cases) memory whatever ``steps``."""

    def __init__(self, n: int, steps: int, batch_size: int, seed: int, epoch: int):
        self.n, self.steps, self.batch_size, self.seed, self.epoch = n, steps, batch_size, seed, epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order: list[int] = []
        for _ in range(self.steps):
            while len(order) < self.batch_size:
                order += torch.randperm(self.n, generator=gen).tolist()
            yield order[:self.batch_size]
            del order[:self.batch_size]


def _epoch_batches(n: int, steps: int, batch_size: int, seed: int, epoch: int) -> _EpochBatches:
    return _EpochBatches(n, steps, batch_size, seed, epoch)


def _datasets(cfg: dict, run_dir: Path):
    common_args = dict(modalities=cfg["modalities"], crop_size=cfg["crop_size"], split_file=run_dir / "splits.json",
                       split_seed=cfg["split_seed"], split_ratios=cfg["split_ratios"], cache=cfg["cache"])
    train = BraTSDataset(cfg["data_root"], "train", seed=cfg["seed"], **common_args)
    val = BraTSDataset(cfg["data_root"], "val", **common_args)
    return train, val


def _model(cfg: dict, device) -> torch.nn.Module:
    """DSUNet3d, or the network of config key "model" converted by gmd_ext.dynamic_sharing (build_model)."""
    return build_model(cfg["model"], cfg["modalities"], len(REGIONS), width=cfg["width"],
                       backend=cfg["backend"]).to(device)


def _model_name(cfg: dict) -> str:
    spec = cfg.get("model")
    return f"DSUNet3d width {cfg['width']}" if spec is None else f"dynamic_sharing({spec['name']})"


def check_config(cfg: dict) -> None:
    """Validate every key against ``SCHEMA`` and the rules between keys, before any data is read (ValueError
    naming the key)."""
    recipe.check_config(cfg, SCHEMA, len(cfg["modalities"]))
    if sum(cfg["split_ratios"]) <= 0:
        raise ValueError(f"config key 'split_ratios' must have a positive sum, got {cfg['split_ratios']}")
    total = cfg["epochs"] * cfg["steps_per_epoch"]
    if cfg["warmup_steps"] and cfg["warmup_steps"] >= total:
        raise ValueError(f"config key 'warmup_steps' must be fewer than the run's {total} steps, got "
                         f"{cfg['warmup_steps']}")
    recipe.pick_device(cfg["device"])  # a device this machine does not have fails here, not after data loading
    if cfg["model"] is not None:
        with torch.device("meta"):  # the spec's name and kwargs checked by building it without memory
            build_model(cfg["model"], cfg["modalities"], len(REGIONS))


def train(cfg: dict, run_dir: str | Path, resume: bool = False, stop_after_epochs: int | None = None,
          overwrite: bool = False, progress: bool = True) -> Path:
    """Train one run into ``run_dir``; returns the checkpoint chosen on the validation split (best.pt; last.pt
    when the val split is empty).

    ``stop_after_epochs`` ends this invocation after that many epochs (a time-limited job); ``resume=True``
    continues from ``run_dir/last.pt`` exactly where it stopped (bit-identical on CPU: data crops depend only on
    (seed, epoch, case), and the optimizer, schedule, GMD order generator, subset sampler and global RNGs are
    restored) after checking that config.json and the checkpoint hold this config and seed. ``overwrite=True``
    replaces an earlier run's outputs in ``run_dir``. The run holds ``run_dir``'s lock throughout: a second
    process training or evaluating into the same folder is refused.
    """
    check_config(cfg)
    recipe.check_stop_after(stop_after_epochs)
    run_dir = Path(run_dir)
    with recipe.run_lock(run_dir):
        return _train(cfg, run_dir, resume, stop_after_epochs, overwrite, progress)


def _train(cfg: dict, run_dir: Path, resume: bool, stop_after_epochs: int | None, overwrite: bool,
           progress: bool) -> Path:
    last = run_dir / "last.pt"
    if resume and not last.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {last}")
    recipe.prepare_folder(run_dir, "config.json", cfg, resume=resume, overwrite=overwrite, outputs=OUTPUTS)
    device = recipe.pick_device(cfg["device"])
    train_ds, val_ds = _datasets(cfg, run_dir)
    if len(train_ds) == 0:
        raise ValueError(f"the train split of {cfg['data_root']} is empty (see {run_dir / 'splits.json'})")
    if not len(val_ds) and cfg["split_ratios"][1] > 0:
        n = len(find_cases(cfg["data_root"]))
        print(f"warning: the val split is empty: {recipe.plural(n, 'case')} cannot fill train, val and test with "
              f"split_ratios {cfg['split_ratios']}, so no checkpoint is selected on validation and the last epoch "
              f"is evaluated (set split_ratios to [train, 0, test] to ask for that)", file=sys.stderr, flush=True)

    def batches(epoch, _generator):
        train_ds.set_epoch(epoch)
        order = _epoch_batches(len(train_ds), cfg["steps_per_epoch"], cfg["batch_size"], cfg["seed"], epoch)
        return torch.utils.data.DataLoader(train_ds, batch_sampler=order, collate_fn=_collate,
                                           num_workers=cfg["num_workers"])

    def forward(model, batch):
        # One packed DS forward gives every modality's branch logits; subset S fuses the mean over S.
        return model.forward_branches(batch["image"].to(device)), batch["regions"].to(device)

    def validate(model):
        if not len(val_ds):
            return None
        val = summarise(evaluate(model, val_ds, cfg, device, desc="val", hd95=False, progress=progress)["dice"])
        return float(np.mean(list(val["mean"].values()))), {"val_dice": val["mean"]}

    kind = data_kind(cfg["data_root"])
    out = recipe.fit(run_dir, cfg, cfg["seed"], build_model=lambda: _model(cfg, device),
                     steps_per_epoch=cfg["steps_per_epoch"], batches=batches, forward=forward,
                     loss_fn=functools.partial(soft_dice_loss, smooth=cfg["dice_smooth"]), validate=validate,
                     mode="max", resume=resume, stop_after_epochs=stop_after_epochs, backend=cfg["backend"],
                     progress=progress, label="gmd" if cfg["gmd"] else "joint",
                     figure_title=f"{run_dir.name}: modality dominance during training "
                                  f"({recipe.data_label(kind, BENCHMARK)})")
    if out["finished"] and not len(val_ds):
        print(f"note: the val split is empty; evaluation uses the last checkpoint {last}", flush=True)
    return out["checkpoint"]


# ----------------------------------------------------------------------------------------------- reporting
def eval_paths(run_dir: Path, split: str) -> dict[str, Path]:
    """The files an evaluation of ``split`` writes (named by split, so evaluations never replace each other)."""
    return {"report": run_dir / f"report_{split}.md", "metrics": run_dir / f"metrics_{split}.json",
            "plot": run_dir / f"dice_{split}.png"}


def _fmt(stat: dict, digits: int = 4) -> str:
    if stat.get("n", 2) < 2:  # one case has no spread: a "± 0" would claim one
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def hd95_note(spacings) -> str:
    """The report line that says which HD95 is reported, in which unit, with which voxel size."""
    sizes = sorted({" x ".join(f"{v:g}" for v in sp) for sp in spacings})
    return (f"HD95 in mm: MONAI's definition (`compute_hausdorff_distance`, percentile 95, undirected: the larger "
            f"of the two directed 95th percentiles of surface-voxel distances; gmd_ext.metrics.brats_hd95) with the "
            f"voxel size from each case's NIfTI header ({'; '.join(sizes)} mm). A region empty in prediction and "
            f"truth scores Dice 1, HD95 0; empty in exactly one, Dice 0 and HD95 {BRATS_HD95_EMPTY_PENALTY_MM:g} mm "
            f"(the BraTS penalty). Lower HD95 is better.")


def write_report(run_dir: Path, cfg: dict, summary: dict, per_case: dict, meta: dict) -> None:
    """report_<split>.md (15 rows x WT/TC/ET Dice and HD95 + mean row), metrics_<split>.json, dice_<split>.png."""
    paths = eval_paths(run_dir, meta["split"])
    n = len(meta["cases"])
    k = cfg["subsets_per_step"]
    kind = data_kind(cfg["data_root"])
    lines = [f"# BraTS evaluation: {'GMD' if cfg['gmd'] else 'joint training'} ({run_dir.name}), "
             f"{meta['split']} split", "",
             f"- {recipe.data_note(kind, BENCHMARK)}",
             f"- {REGION_NOTE}",
             f"- {hd95_note(meta['spacing'].values())}",
             f"- data: `{cfg['data_root']}`, split `{meta['split']}` ({recipe.plural(n, 'case')})",
             f"- checkpoint: `{meta['checkpoint']}` (epoch {meta['epoch']}; {meta['selection']})",
             f"- model: {_model_name(cfg)}, crop {cfg['crop_size']}, batch {cfg['batch_size']}, "
             f"{recipe.plural(cfg['epochs'], 'epoch')} x {recipe.plural(cfg['steps_per_epoch'], 'step')}, "
             f"{'all 15' if k in (0, 15) else k} subsets/step, Adam lr {cfg['lr']} ({cfg['lr_schedule']}); "
             + (f"GMD ({cfg['gmd_reduction']}, {cfg['gmd_order']} order)" if cfg["gmd"]
                else f"joint training ({cfg['joint_reduction']} of the subset losses)"),
             f"- inference: sliding window {cfg['crop_size']} (MONAI's placement and blending), overlap "
             f"{cfg['sw_overlap']}, {cfg['sw_weighting']} weighting; "
             + ("mean ± std over cases" if n > 1 else "**one case: its values, no spread (no ±)**"),
             "", "| modalities | " + " | ".join(f"{r} Dice" for r in REGIONS) + " | "
             + " | ".join(f"{r} HD95 (mm)" for r in REGIONS) + " |", "|---" * (1 + 2 * len(REGIONS)) + "|"]
    dice, hd = summary["combinations"], summary["hd95"]["combinations"]
    for name in dice:
        lines.append(f"| {name} | " + " | ".join(_fmt(dice[name][r]) for r in REGIONS) + " | "
                     + " | ".join(_fmt(hd[name][r], 2) for r in REGIONS) + " |")
    lines.append("| **mean over combinations** | " + " | ".join(f"**{summary['mean'][r]:.4f}**" for r in REGIONS)
                 + " | " + " | ".join(f"**{summary['hd95']['mean'][r]:.2f}**" for r in REGIONS) + " |")
    lines += ["", f"![Dice and HD95 per modality combination]({paths['plot'].name})", ""]
    if cfg["gmd"]:
        lines += recipe.dominance_markdown(run_dir / "monitor.csv", "dominance.png", cfg["modalities"])
    recipe.write_text(paths["report"], "\n".join(lines) + "\n")
    recipe.write_json(paths["metrics"], {**meta, "config": cfg, **summary, "per_case": per_case["dice"],
                                         "per_case_hd95": per_case["hd95"]})
    _plot(paths["plot"], {run_dir.name: summary}, f"{run_dir.name}: per modality combination "
                                                   f"({meta['split']} split, {recipe.data_label(kind, BENCHMARK)})")


def _plot(path: Path, runs: dict, title: str) -> None:
    def table(key):
        parts = {lab: (s if key == "dice" else s["hd95"])["combinations"] for lab, s in runs.items()}
        return ({lab: {c: {r: v[c][r]["mean"] for r in REGIONS} for c in v} for lab, v in parts.items()},
                {lab: {c: {r: v[c][r]["std"] for r in REGIONS} for c in v} for lab, v in parts.items()})

    means, stds = table("dice")
    hd_means, hd_stds = table("hd95")
    merged = {lab: {c: {**{f"{r} Dice": means[lab][c][r] for r in REGIONS},
                        **{f"{r} HD95 (mm)": hd_means[lab][c][r] for r in REGIONS}} for c in means[lab]}
              for lab in means}
    errors = {lab: {c: {**{f"{r} Dice": stds[lab][c][r] for r in REGIONS},
                        **{f"{r} HD95 (mm)": hd_stds[lab][c][r] for r in REGIONS}} for c in stds[lab]}
              for lab in stds}
    recipe.plot_per_combination(path, merged, [f"{r} Dice" for r in REGIONS] + [f"{r} HD95 (mm)" for r in REGIONS],
                                title=title + " (bars: std over cases)", errors=errors, rows=2,
                                ylim={f"{r} Dice": (0, 1) for r in REGIONS})


def run_eval(run_dir: str | Path, split: str = "test", checkpoint: str | None = None,
             overwrite: bool = False, progress: bool = True) -> dict:
    """Evaluate a trained run on ``split`` over all combinations; writes report_<split>.md, metrics_<split>.json
    and dice_<split>.png (refusing existing ones unless ``overwrite``); returns the summary. Holds the run
    folder's lock."""
    run_dir = Path(run_dir)
    with recipe.run_lock(run_dir):
        cfg = recipe.load_config(run_dir / "config.json", DEFAULTS)
        check_config(cfg)
        existing = [p.name for p in eval_paths(run_dir, split).values() if p.exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{run_dir} already holds an evaluation of the {split} split "
                                  f"({', '.join(existing)}); pass --overwrite to replace it")
        device = recipe.pick_device(cfg["device"])
        ckpt = Path(checkpoint) if checkpoint else (run_dir / "best.pt" if (run_dir / "best.pt").is_file()
                                                     else run_dir / "last.pt")
        state = recipe.load_matching(ckpt, cfg, cfg["seed"])  # the checkpoint belongs to this run
        model = _model(cfg, device)
        try:
            model.load_state_dict(state["model"])
        except (KeyError, RuntimeError, TypeError) as e:
            raise ValueError(f"{ckpt} is damaged or was edited ({type(e).__name__}: {str(e)[:300]})") from None
        ds = BraTSDataset(cfg["data_root"], split, modalities=cfg["modalities"], crop_size=cfg["crop_size"],
                          split_file=run_dir / "splits.json", cache=False)
        if len(ds) == 0:
            raise ValueError(f"the {split} split of {cfg['data_root']} is empty (see {run_dir / 'splits.json'})")
        per_case = evaluate(model, ds, cfg, device, desc=split, progress=progress)
        summary = {**summarise(per_case["dice"]), "hd95": summarise(per_case["hd95"])}
        selection = ("best mean Dice over all combinations on the val split" if ckpt.name == "best.pt"
                     else "last epoch (no val split)" if ckpt.name == "last.pt" else "given on the command line")
        meta = {"split": split, "cases": ds.cases, "checkpoint": str(ckpt), "epoch": state.get("epoch"),
                "selection": selection, "spacing": per_case["spacing"], "data": data_kind(cfg["data_root"])}
        write_report(run_dir, cfg, summary, per_case, meta)
        return summary


def _paired_rows(joint: dict, gmd: dict) -> list[dict]:
    """GMD - joint per combination, region and metric (Dice, HD95; and for the mean over combinations), BCa
    bootstrap over cases."""
    cases = list(joint["cases"])
    if sorted(cases) != sorted(gmd["cases"]):
        raise ValueError("compare: the two runs were evaluated on different cases; paired differences need the "
                         "same split (same data_root, split_seed and split_ratios)")
    names = list(joint["combinations"])
    rows = []
    for metric, key, higher in (("Dice", "per_case", True), ("HD95 (mm)", "per_case_hd95", False)):
        def per_case(m, name, r):
            return np.array([m[key][name][c][r] for c in cases])

        for name in [*names, "mean over combinations"]:
            for r in REGIONS:
                if name in joint["combinations"]:
                    a, b = per_case(gmd, name, r), per_case(joint, name, r)
                else:
                    a = np.mean([per_case(gmd, n, r) for n in names], axis=0)
                    b = np.mean([per_case(joint, n, r) for n in names], axis=0)
                d = a - b
                lo, hi = recipe.bootstrap_interval(lambda idx: d[idx].mean(1), len(d))
                rows.append({"combination": name, "metric": f"{r} {metric}", "joint": float(b.mean()),
                             "gmd": float(a.mean()), "diff": float(d.mean()), "lo": lo, "hi": hi,
                             "higher_is_better": higher})
    return rows


def compare(run_dirs: list[str | Path], out: str | Path, split: str = "test", overwrite: bool = False) -> str:
    """comparison.md + comparison.png of evaluated runs (each run's metrics_<split>.json): the side-by-side mean
    Dice and HD95 and, for one joint and one GMD run, the paired differences GMD - joint with BCa bootstrap
    intervals over cases. Returns the markdown."""
    out = Path(out)
    targets = [out / "comparison.md", out / "comparison.png"]
    if any(p.exists() for p in targets) and not overwrite:
        raise FileExistsError(f"{out} already holds comparison.md / comparison.png; pass --overwrite to replace them")
    loaded = []
    for d in map(Path, run_dirs):
        path = eval_paths(d, split)["metrics"]
        if not path.is_file():
            raise FileNotFoundError(f"compare: {path} does not exist; run `brats.py eval --run {d} --split {split}`")
        m = recipe.read_json(path, f"the {split} evaluation of {d}")
        if "hd95" not in m or "per_case_hd95" not in m:
            raise ValueError(f"compare: {path} was written by an older version without HD95; evaluate again: "
                             f"`brats.py eval --run {d} --split {split} --overwrite`")
        missing = sorted({"config", "cases", "combinations", "mean", "per_case", "spacing"} - set(m))
        if missing or not isinstance(m["config"], dict) or "gmd" not in m["config"]:
            raise ValueError(f"compare: {path} is damaged or was edited (missing {missing or ['config.gmd']}); "
                             f"evaluate again with --overwrite")
        loaded.append((d, m))
    modes = ["GMD" if m["config"]["gmd"] else "joint" for _, m in loaded]
    runs = {}
    for (d, m), mode in zip(loaded, modes):
        runs[mode if modes.count(mode) == 1 else f"{mode} ({d})"] = m
    labels = list(runs)
    names = list(runs[labels[0]]["combinations"])
    head = ("| modalities | " + " | ".join(f"{r} Dice {lab}" for r in REGIONS for lab in labels) + " | "
            + " | ".join(f"{r} HD95 {lab}" for r in REGIONS for lab in labels) + " |")
    lines = [head, "|---" * (1 + 2 * len(REGIONS) * len(labels)) + "|"]
    for n in names:
        cells = ([f"{runs[lab]['combinations'][n][r]['mean']:.4f}" for r in REGIONS for lab in labels]
                 + [f"{runs[lab]['hd95']['combinations'][n][r]['mean']:.2f}" for r in REGIONS for lab in labels])
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{runs[lab]['mean'][r]:.4f}**" for r in REGIONS for lab in labels)
                 + " | " + " | ".join(f"**{runs[lab]['hd95']['mean'][r]:.2f}**" for r in REGIONS for lab in labels)
                 + " |")
    table = "\n".join(lines)
    cfg0 = loaded[0][1]["config"]
    kind = data_kind(cfg0["data_root"])
    ncases = len(loaded[0][1]["cases"])
    spacings = [sp for _, m in loaded for sp in m["spacing"].values()]
    doc = [f"# GMD vs joint training: Dice and HD95 per modality combination ({split} split, "
           f"{recipe.plural(ncases, 'case')})", "",
           f"- {recipe.data_note(kind, BENCHMARK)}", f"- {REGION_NOTE}", f"- {hd95_note(spacings)}",
           "- runs: " + ", ".join(f"{lab} = `{d}`" for lab, (d, _) in zip(labels, loaded)), "",
           "## Mean over cases (Dice: higher is better; HD95 in mm: lower is better)", "", table, "",
           "![Dice and HD95 per modality combination](comparison.png)", ""]
    if sorted(modes) == ["GMD", "joint"]:
        joint, gmd = (m for _, m in sorted(loaded, key=lambda dm: dm[1]["config"]["gmd"]))
        doc += ["## Paired differences (GMD − joint)", "",
                recipe.comparison_markdown(_paired_rows(joint, gmd), n=ncases, unit=f"{split} cases")]
    text = "\n".join(doc) + "\n"
    recipe.write_text(out / "comparison.md", text)
    _plot(out / "comparison.png", runs, f"GMD vs joint training ({split} split, {recipe.data_label(kind, BENCHMARK)})")
    return text


def plot_dominance(run_dir: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Draw the dominance figure of a GMD run from its whole ``monitor.csv`` (every step, across resumes), titled
    with the data's provenance; ``out`` defaults to ``<run>/dominance.png`` (replaced only with ``overwrite``)."""
    run_dir = Path(run_dir)
    cfg = recipe.load_config(run_dir / "config.json", DEFAULTS)
    out = Path(out) if out else run_dir / "dominance.png"
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to draw it again")
    label = recipe.data_label(data_kind(cfg["data_root"]), BENCHMARK)
    recipe.plot_monitor_csv(run_dir / "monitor.csv", out,
                            title=f"{run_dir.name}: modality dominance during training ({label})")
    return out


# ----------------------------------------------------------------------------------------------- demo
def ensure_phantom(root: Path, n: int, size: int, seed: int = 0) -> None:
    """Generate the phantom set into ``root`` unless it already holds exactly these cases.

    Raises:
        FileExistsError: ``root`` is not empty and is not a phantom folder of the demo (or was made with other
            settings).
    """
    want = {phantom.case_name(seed, i) for i in range(n)}
    spec = {"n": n, "size": size, "seed": seed}
    marker = root / "phantom.json"
    if root.is_dir() and any(root.iterdir()):
        if marker.is_file():
            saved = recipe.read_json(marker, "the demo's phantom settings")
            if saved != spec:
                raise FileExistsError(f"demo --data {root}: holds phantom cases made with {saved}, not {spec}; "
                                      f"pass another --data")
            if set(find_cases(root)) == want:
                return
        else:
            # Without the marker (written last) the folder is only ours if it holds an interrupted generation.
            extra = sorted({p.name for p in root.iterdir()} - want - {phantom.NOTICE_FILE.name})
            if extra:
                raise FileExistsError(f"demo --data {root}: the folder is not empty ({', '.join(extra[:3])}"
                                      f"{', ...' if len(extra) > 3 else ''}) and holds no demo phantom set (no "
                                      f"phantom.json); pass an empty or new folder, where the demo will write "
                                      f"{n} phantom cases")
    t0 = time.time()
    print(f"writing {n} phantom cases ({size}^3) to {root} ...", flush=True)
    phantom.make_cases(root, n, size=size, seed=seed, overwrite=True)  # the checks above made sure it is ours
    recipe.write_json(marker, spec)
    print(f"  done in {time.time() - t0:.1f} s", flush=True)


def demo(out: str | Path = "runs/demo", data: str | Path | None = None, quick: bool = False,
         overwrite: bool = False, progress: bool = True) -> str:
    """Phantom data -> joint and GMD training -> 15-combination evaluation -> comparison (printed).

    A rerun continues (or reuses) the runs in ``out`` when they were made with the same settings."""
    t0 = time.time()
    preset, spec = (QUICK, QUICK_DATA) if quick else (DEMO, DEMO_DATA)
    data = Path(data) if data else Path("data") / ("phantom-quick" if quick else "phantom")
    ensure_phantom(data, spec["n"], spec["size"])
    out = Path(out) / ("quick" if quick else "full")
    runs = []
    for use_gmd in (False, True):
        cfg = recipe.load_config(None, DEFAULTS, {**preset, "data_root": str(data), "gmd": use_gmd})
        run_dir = out / ("gmd" if use_gmd else "joint")
        has_run = (run_dir / "last.pt").is_file()
        # A folder holding only our config.json is a run killed in its first epoch: start it again.
        restart = (not has_run and (run_dir / "config.json").is_file()
                   and recipe.read_json(run_dir / "config.json", "the run's settings") == cfg)
        try:
            train(cfg, run_dir, resume=has_run and not overwrite, overwrite=overwrite or restart, progress=progress)
        except ValueError as e:
            raise FileExistsError(f"{run_dir} holds a run with other settings ({e}); pass --overwrite or another "
                                  f"--out") from e
        metrics = eval_paths(run_dir, "test")["metrics"]
        saved = recipe.read_json(metrics, "the test evaluation") if metrics.is_file() and not overwrite else {}
        # An evaluation written before HD95 was reported is redone; a current one is reused.
        summary = saved if "hd95" in saved else run_eval(run_dir, overwrite=True, progress=progress)
        print(f"{run_dir.name}: mean over 15 combinations: Dice " +
              ", ".join(f"{r} {summary['mean'][r]:.4f}" for r in REGIONS) + "; HD95 " +
              ", ".join(f"{r} {summary['hd95']['mean'][r]:.1f} mm" for r in REGIONS), flush=True)
        runs.append(run_dir)
    text = compare(runs, out, overwrite=True)  # derived from the two runs above only
    print("\n" + text)
    print(f"demo finished in {time.time() - t0:.0f} s; reports in {out}/{{joint,gmd}}/report_test.md, "
          f"comparison in {out}/comparison.md", flush=True)
    return text


# ----------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="phantom data, joint vs GMD, comparison table")
    d.add_argument("--quick", action="store_true",
                   help="CI-sized run (3 phantoms, 2 steps per run): 30 s wall, 10.5 s CPU on a shared 2-core box "
                        "(the full demo: 7 min on an idle 2-core box with --threads 0; README)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--data", default=None, help="phantom folder (default data/phantom or data/phantom-quick)")
    t = sub.add_parser("train", help="train one run (and evaluate it on the test split)",
                       epilog=recipe.keys_help(SCHEMA), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", default=None, help="JSON config (python/configs/brats_gmd.json ...)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    t.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override config keys (JSON values; keys below)")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved and validated config (defaults <- --config <- --set) as JSON and exit")
    t.add_argument("--stop-after-epochs", type=int, default=None, help="end this invocation after N epochs")
    t.add_argument("--no-eval", action="store_true", help="skip the test evaluation after training")
    e = sub.add_parser("eval", help="evaluate a run over all modality combinations")
    e.add_argument("--run", required=True)
    e.add_argument("--split", default="test", choices=["test", "val", "train"])
    e.add_argument("--checkpoint", default=None)
    c = sub.add_parser("compare", help="side-by-side table, paired differences and plot of evaluated runs")
    c.add_argument("runs", nargs="+")
    c.add_argument("--out", required=True)
    c.add_argument("--split", default="test", choices=["test", "val", "train"])
    m = sub.add_parser("dominance", help="draw a GMD run's dominance figure again from its whole monitor.csv")
    m.add_argument("--run", required=True, help="run folder holding monitor.csv")
    m.add_argument("--out", default=None, help="PNG to write (default: <run>/dominance.png)")
    g = sub.add_parser("phantom", help="write BraTS-layout phantom cases")
    g.add_argument("--out", required=True)
    g.add_argument("--n", type=int, default=20)
    g.add_argument("--size", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    for q in (d, t, e, c, g, m):
        q.add_argument("--overwrite", action="store_true", help="replace earlier outputs instead of refusing")
    for q in (d, t, e):
        q.add_argument("--threads", type=int, default=recipe.DEFAULT_THREADS, help=recipe.THREADS_HELP)
        q.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = p.parse_args(argv)
    return recipe.cli_errors(p.prog, functools.partial(_run, args))


def _run(args) -> None:
    if args.cmd == "train":
        out = Path(args.out)
        cfg = recipe.load_config(args.config, DEFAULTS, recipe.parse_set(args.set))
        if args.resume and args.config is None and not args.set and (out / "config.json").is_file():
            cfg = recipe.load_config(out / "config.json", DEFAULTS)
        check_config(cfg)
        if args.print_config:
            print(json.dumps(cfg, indent=2))
            return
    recipe.require_extras("brats")
    note = recipe.kernel_note()
    if note:
        print(note, flush=True)
    progress = not getattr(args, "no_progress", False)
    with recipe.threads(getattr(args, "threads", 0)):
        if args.cmd == "demo":
            demo(args.out, args.data, args.quick, overwrite=args.overwrite, progress=progress)
        elif args.cmd == "train":
            train(cfg, out, resume=args.resume, stop_after_epochs=args.stop_after_epochs, overwrite=args.overwrite,
                  progress=progress)
            report = eval_paths(out, "test")["report"]
            if not args.no_eval and load_checkpoint(out / "last.pt")["epoch"] >= cfg["epochs"]:
                if not report.is_file():
                    run_eval(out, progress=progress)
                print(report.read_text(encoding="utf-8"))
        elif args.cmd == "eval":
            run_eval(args.run, args.split, args.checkpoint, overwrite=args.overwrite, progress=progress)
            print(eval_paths(Path(args.run), args.split)["report"].read_text(encoding="utf-8"))
        elif args.cmd == "compare":
            print(compare(args.runs, args.out, args.split, overwrite=args.overwrite))
        elif args.cmd == "phantom":
            phantom.make_cases(args.out, args.n, size=args.size, seed=args.seed, overwrite=args.overwrite)
        elif args.cmd == "dominance":
            plot_dominance(args.run, args.out, overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
