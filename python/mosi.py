"""CMU-MOSI / CMU-MOSEI recipe: DSSentimentNet trained with GMD (or plain joint training) on every modality subset,
evaluated on each of the 7 text/audio/vision combinations with the MMSA metrics.

    python python/mosi.py --dataset mosi --data aligned_50.pkl              # MMSA feature file (pkl or npz)
    python python/mosi.py --synthetic                                       # offline stand-in, same format
    python python/mosi.py --synthetic --config python/configs/mosi_gmd.json --seeds 0 1 2 --out runs/gmd

What is MOSI-specific lives here; the rest (configs, the GMD-or-joint step, checkpoints and exact resume, paired
comparison, plots) is the shared skeleton python/recipe.py. Each ``--config`` (default: the paired
``mosi_gmd.json`` and ``mosi_joint.json``, which differ only in ``"gmd"``) is trained for every seed in
``--seeds``. Per (config, seed): Adam on the L1 losses of the 7 subsets (or ``subsets_per_step`` = k sampled per
step), a checkpoint after every epoch (atomic; ``--resume`` continues exactly where it stopped), model selection
on the valid split by the mean L1 over the 7 subsets, then the test split evaluated with only the subset's
modalities present. Writes ``metrics.json``, ``report.md``, ``metrics.png`` and, for a GMD/joint pair,
``comparison.md`` (paired differences with bootstrap intervals over test samples) to ``--out``; an ``--out``
that is not empty is refused unless ``--resume`` (same settings) or ``--overwrite``.

Why one forward pass serves all 7 objectives: DS branches do not interact before the late mean fusion, so the
prediction of a subset is the mean of its modalities' branch predictions (``forward_branches``: one graph per
modality), and a subset's
loss reaches only the parameters of its own modalities and the shared ones, exactly as running the model with
that subset present would.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if str(Path(__file__).resolve().parent) not in sys.path:
    # `python -P` (and PYTHONSAFEPATH) leaves the script's folder off sys.path; the skeleton recipe.py lives there.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe  # noqa: E402
from gmd_ext import DSSentimentNet, subsets  # noqa: E402
from gmd_ext.apps.mosi.constants import MODALITIES  # noqa: E402
from gmd_ext.data import load_mmsa, synthetic_mosi  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIGS = [HERE / "configs" / "mosi_gmd.json", HERE / "configs" / "mosi_joint.json"]

# MMSA feature sizes and split sizes; used to warn when --dataset does not match the file.
DATASETS = {
    "mosi": {"dims": (768, 5, 20), "n": (1284, 229, 686)},
    "mosei": {"dims": (768, 74, 35), "n": (16326, 1871, 4659)},
}

Key = recipe.Key
SCHEMA = {
    **recipe.SHARED_SCHEMA,
    "subsets_per_step": Key(0, "0: all 7 modality subsets every step; k in 1..7: k sampled (the full set always in)",
                            low=0, high=7),
    "epochs": Key(10, "training epochs", low=1, high=100_000),
    "batch_size": Key(32, "samples per step", low=1, high=65_536),
    "lr": Key(1e-3, "Adam learning rate", above=0.0, high=10.0),
    "weight_decay": Key(0.0, "Adam weight decay", low=0.0, high=1.0),
    "hidden": Key(64, "DSSentimentNet hidden size", low=1, high=4096),
    "num_layers": Key(1, "GRU layers per modality", low=1, high=16),
    "dropout": Key(0.1, "dropout probability", low=0.0, below=1.0),
    "eval_batch_size": Key(256, "samples per forward at evaluation", low=1, high=65_536),
}
DEFAULTS = recipe.defaults(SCHEMA)

# What --out may hold from this recipe (--overwrite removes these, and only these; the synthetic data stays).
OUTPUTS = ("metrics.json", "report.md", "metrics.png", "comparison.md",
           *(f"*/seed*/{name}" for name in (*recipe.RUN_OUTPUTS, "result.json")))
# Metrics of the paired comparison, vectorised over bootstrap resamples (definitions as in
# gmd_ext.apps.mosi.metrics: Has0 counts truth >= 0 as positive, Non0 drops truth == 0).
PAIRED = {"Has0_acc_2": True, "Non0_acc_2": True, "MAE": False, "Corr": True}  # name -> higher is better


BENCHMARKS = {"mosi": "CMU-MOSI", "mosei": "CMU-MOSEI"}
MAX_SYNTHETIC_BYTES = 8 << 30  # twice a MOSEI-sized aligned file: the file is written, then loaded whole


# ----------------------------------------------------------------------------------------------- data

def _to_tensors(split: dict) -> dict:
    """numpy split from load_mmsa -> CPU tensors: x (name -> [N,T,D] float32), lengths (name -> [N] int64), y [N]."""
    return {
        "x": {m: torch.from_numpy(split[m]) for m in MODALITIES},
        # The model needs >= 1 frame; a zero-length sequence (all padding) is read as its first, zero frame.
        "lengths": {m: torch.from_numpy(split[f"{m}_lengths"]).clamp(min=1) for m in MODALITIES},
        "y": torch.from_numpy(split["regression_labels"]),
    }


def load_data(args) -> tuple[dict, str, str]:
    """Returns ({split: tensors}, description of the data source, data kind: "synthetic" or the benchmark)."""
    if args.synthetic:
        spec = DATASETS[args.dataset]
        n = tuple(args.synthetic_n) if args.synthetic_n else spec["n"]
        dims = tuple(args.synthetic_dims) if args.synthetic_dims else spec["dims"]
        layout = "aligned" if not args.unaligned else "unaligned"
        path = recipe.inside(args.out, "data", f"synthetic_{args.dataset}_{layout}_{'x'.join(map(str, n))}_"
                                               f"{'x'.join(map(str, dims))}.pkl")
        if not path.exists():  # deterministic (seed 0), so an existing file is the same file
            t0 = time.time()
            size = synthetic_mosi.file_size(n, aligned=not args.unaligned, dims=dims)
            print(f"writing a synthetic {args.dataset}-format file of {size / 1e6:.0f} MB to {path} ...", flush=True)
            synthetic_mosi.make(path, n=n, aligned=not args.unaligned, dims=dims, seed=0)
            print(f"  done in {time.time() - t0:.1f} s", flush=True)
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
    return ({s: _to_tensors(raw[s]) for s in ("train", "valid", "test")}, source,
            "synthetic" if args.synthetic else BENCHMARKS[args.dataset])


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
        out.append(torch.stack(model.forward_branches(x, None, lengths), 1).cpu())
    return torch.cat(out)


@torch.no_grad()
def predict_subsets(model, data: dict, batch_size: int, device) -> dict[str, torch.Tensor]:
    """Test predictions [N] per modality combination, running the model with only that combination present."""
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
        results[s.name] = torch.cat(preds)
    return results


def train_one(cfg: dict, data: dict, seed: int, run_dir: Path, device, *, resume: bool,
              stop_after: int | None = None, progress: bool = True, data_label: str = "") -> dict | None:
    """Train one (config, seed); returns its result dict, or None when stopped early by ``stop_after``."""
    from gmd_ext.metrics import sentiment_metrics

    result_path = run_dir / "result.json"
    if resume and result_path.is_file():
        recipe.load_matching(run_dir / "last.pt", cfg, seed)  # the finished run is this one
        return recipe.read_json(result_path, "the finished run's result")
    train, valid = data["train"], data["valid"]
    n = train["y"].shape[0]
    input_dims = tuple(train["x"][m].shape[2] for m in MODALITIES)
    every = subsets(MODALITIES)

    def build():
        return DSSentimentNet(MODALITIES, input_dims, cfg["hidden"], num_layers=cfg["num_layers"],
                              dropout=cfg["dropout"]).to(device)

    def batches(epoch, generator):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, cfg["batch_size"]):
            yield _batch(train, order[i:i + cfg["batch_size"]], device)

    def forward(model, batch):
        x, lengths, y = batch
        return model.forward_branches(x, None, lengths), y

    def validate(model):
        branches = branch_predictions(model, valid, cfg["eval_batch_size"], device)
        l1 = {k: float(v) for k, v in recipe.subset_losses(branches, valid["y"], F.l1_loss, every).items()}
        return float(np.mean(list(l1.values()))), {"valid_l1_subsets": l1}

    run_dir.mkdir(parents=True, exist_ok=True)
    out = recipe.fit(run_dir, cfg, seed, build_model=build, steps_per_epoch=math.ceil(n / cfg["batch_size"]),
                     batches=batches, forward=forward, loss_fn=F.l1_loss, validate=validate, mode="min",
                     resume=resume, stop_after_epochs=stop_after, progress=progress,
                     label=f"{run_dir.parent.name} seed {seed}",
                     figure_title=f"{run_dir.parent.name} seed {seed}: modality dominance during training"
                                  + (f" ({data_label})" if data_label else ""))
    if not out["finished"]:
        return None
    model = out["model"]
    model.load_state_dict(recipe.load_matching(out["checkpoint"], cfg, seed)["model"])
    preds = predict_subsets(model, data["test"], cfg["eval_batch_size"], device)
    result = {"seed": seed, "best_epoch": out["best_epoch"], "best_valid_l1": out["best_score"],
              "train_seconds": sum(h["seconds"] for h in out["history"]), "history": out["history"],
              "test": {c: sentiment_metrics(p, data["test"]["y"]) for c, p in preds.items()},
              "test_predictions": {c: p.tolist() for c, p in preds.items()}}
    recipe.write_json(result_path, result)
    return result


# ----------------------------------------------------------------------------------------------- reporting

def aggregate(results: list[dict]) -> tuple[dict, dict]:
    """Mean and std (ddof 1; 0 for one seed) over seeds of every test metric: {combination: {metric: value}}."""
    from gmd_ext.apps.mosi.metrics import METRIC_NAMES

    combos = list(results[0]["test"])
    mean, std = {}, {}
    for c in combos:
        vals = {k: np.array([r["test"][c][k] for r in results], dtype=np.float64) for k in METRIC_NAMES}
        mean[c] = {k: float(v.mean()) for k, v in vals.items()}
        std[c] = {k: float(v.std(ddof=1)) if v.size > 1 else 0.0 for k, v in vals.items()}
    return mean, std


def _metric_rows(name: str, p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One metric for each row of ``p`` / ``y`` ([B, N]): the MMSA definition, vectorised over resamples."""
    if name == "MAE":
        return np.abs(p - y).mean(1)
    if name == "Corr":
        pc, yc = p - p.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            return (pc * yc).sum(1) / np.sqrt((pc * pc).sum(1) * (yc * yc).sum(1))
    if name == "Has0_acc_2":
        return ((p >= 0) == (y >= 0)).mean(1)
    nz = y != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        return (((p > 0) == (y > 0)) & nz).sum(1) / nz.sum(1)


def paired_rows(joint: dict, gmd: dict, y: np.ndarray) -> list[dict]:
    """GMD - joint per combination and metric: the mean over seeds of the paired difference (seeds matched by
    number), with a bootstrap interval over test samples."""
    jr = {r["seed"]: r for r in joint["seeds"]}
    pairs = [(g, jr[g["seed"]]) for g in gmd["seeds"] if g["seed"] in jr]
    if not pairs:
        raise ValueError("comparison: the GMD and joint runs share no seed")
    rows = []
    for c in gmd["mean"]:
        pg = np.array([g["test_predictions"][c] for g, _ in pairs])
        pj = np.array([j["test_predictions"][c] for _, j in pairs])
        for metric, higher in PAIRED.items():
            def stat(idx, metric=metric):
                return np.mean([_metric_rows(metric, a[idx], y[idx]) - _metric_rows(metric, b[idx], y[idx])
                                for a, b in zip(pg, pj)], axis=0)
            g = float(np.mean([g_["test"][c][metric] for g_, _ in pairs]))
            j = float(np.mean([j_["test"][c][metric] for _, j_ in pairs]))
            lo, hi = recipe.bootstrap_interval(stat, len(y))
            rows.append({"combination": c, "metric": metric, "joint": j, "gmd": g, "diff": g - j, "lo": lo,
                         "hi": hi, "higher_is_better": higher})
    return rows


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4f}"


def _by_epoch(results: list[dict], key: str) -> str:
    per_epoch = np.array([[h.get(key, math.nan) for h in r["history"]] for r in results], dtype=np.float64)
    return ", ".join(f"{v:.3f}" for v in per_epoch.mean(0))


def write_report(out: Path, summary: dict) -> None:
    from gmd_ext.apps.mosi.metrics import METRIC_NAMES

    runs = summary["runs"]
    benchmark = BENCHMARKS[summary["dataset"]]
    lines = [f"# {summary['dataset'].upper()}: DSSentimentNet per modality combination (test split)", "",
             f"- {recipe.data_note(summary['kind'], benchmark)}",
             f"- data: {summary['source']}",
             f"- seeds: {summary['seeds']}; device: {summary['device']}; machine: {summary['machine']}",
             "- metrics as MMSA computes them (gmd_ext.metrics.sentiment_metrics); mean over seeds"
             + (" ± std" if len(summary["seeds"]) > 1 else ""), "",
             "![test metrics per modality combination](metrics.png)", ""]
    if "comparison" in summary:
        lines += [f"Paired differences GMD − joint with bootstrap intervals: [comparison.md](comparison.md). "
                  f"{summary['comparison']}", ""]
    for name, run in runs.items():
        cfg = run["config"]
        lines += [f"## {name} ({'GMD' if cfg['gmd'] else 'joint'} training)", "",
                  "config: `" + json.dumps(cfg) + "`", "",
                  f"best epochs {[r['best_epoch'] for r in run['seeds']]}, training time "
                  f"{np.mean([r['train_seconds'] for r in run['seeds']]):.1f} s per seed", "",
                  "valid L1 (mean of the 7 subsets) by epoch, mean over seeds: "
                  + _by_epoch(run["seeds"], "val_score"), ""]
        if cfg["gmd"]:
            # Conflicts between subset gradients rise as the strong modality takes over: the dominance signal.
            lines += ["GMD conflicting subset-gradient pairs per step (info.num_conflicts, of 21) by epoch, mean "
                      "over seeds: " + _by_epoch(run["seeds"], "conflicts_per_step"), ""]
            seed0 = f"seed{run['seeds'][0]['seed']}"
            lines += recipe.dominance_markdown(out / name / seed0 / "monitor.csv", f"{name}/{seed0}/dominance.png",
                                               MODALITIES)
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
    recipe.write_text(out / "report.md", "\n".join(lines))


def write_plot(out: Path, summary: dict) -> None:
    runs = summary["runs"]
    keys = ("Non0_acc_2", "Non0_F1_score", "MAE", "Corr")
    errors = {n: r["std"] for n, r in runs.items()} if len(summary["seeds"]) > 1 else None
    recipe.plot_per_combination(out / "metrics.png", {n: r["mean"] for n, r in runs.items()}, keys,
                                title=f"{summary['dataset'].upper()} test metrics per modality combination "
                                      f"({recipe.data_label(summary['kind'], BENCHMARKS[summary['dataset']])})"
                                      + (" (bars: std over seeds)" if errors else ""), errors=errors)


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog=recipe.keys_help(SCHEMA))
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mosi")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="MMSA feature file (aligned_50.pkl / unaligned_50.pkl, or the same as .npz)")
    src.add_argument("--synthetic", action="store_true", help="generate and use a synthetic file in MMSA format")
    p.add_argument("--synthetic-n", type=int, nargs=3, metavar=("TRAIN", "VALID", "TEST"),
                   help="synthetic split sizes (default: the dataset's; MOSI-sized aligned is ~350 MB on disk)")
    p.add_argument("--synthetic-dims", type=int, nargs=3, metavar=("TEXT", "AUDIO", "VISION"),
                   help="synthetic feature sizes (default: the dataset's)")
    p.add_argument("--unaligned", action="store_true", help="synthetic: unaligned layout (T = 50/375/500)")
    p.add_argument("--config", type=Path, nargs="+", default=DEFAULT_CONFIGS,
                   help="one or more JSON configs (default: the paired mosi_gmd.json and mosi_joint.json)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path, default=Path("runs/mosi"))
    p.add_argument("--resume", action="store_true", help="continue the runs in --out from their last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    p.add_argument("--device", default="auto")
    p.add_argument("--nonfinite", choices=("zero", "raise"), default="zero",
                   help="NaN/Inf features: replace with 0 and warn (MMSA's own loader zeroes -inf audio), or fail")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--threads", type=int, default=recipe.DEFAULT_THREADS,
                   help=recipe.THREADS_HELP + ". The GRU steps are tiny: on a loaded 2-core box one thread ran a GMD "
                        "step 12x faster than two (0.16 s vs 2.0 s, hidden 8, batch 16)")
    # Overrides apply to every config alike, so a GMD/joint pair stays a one-switch comparison.
    p.add_argument("--subsets-per-step", "--subsets", type=int, dest="subsets_per_step",
                   help="0: all 7 subsets every step; k in 1..7: k sampled per step")
    for key in ("epochs", "batch_size", "hidden"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, dest=key)
    p.add_argument("--lr", type=float)
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", default=[],
                   help="override config keys in every config (JSON values; keys below)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved and validated configs (defaults <- --config <- options) as JSON and exit")
    p.add_argument("--stop-after-epochs", type=int, help=argparse.SUPPRESS)  # simulates an interruption (tests)
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    """Run the recipe (``argv`` as on the command line); returns the summary written to metrics.json, or None
    when ``--stop-after-epochs`` interrupted it (or ``--print-config`` asked for the configs only)."""
    args = parse_args(argv)
    configs = _configs(args)
    if args.print_config:
        print(json.dumps(configs, indent=2))
        return None
    recipe.require_extras("mosi")
    note = recipe.kernel_note()
    if note:
        print(note, flush=True)
    with recipe.threads(args.threads), recipe.run_lock(args.out):
        return _run(args, configs)


def _configs(args) -> dict[str, dict]:
    """The configs of this invocation, resolved and validated at start-up: {config name: config}."""
    for seed in args.seeds:
        if not 0 <= seed < 2 ** 32:
            raise ValueError(f"--seeds must be integers in [0, 2**32 - 1], got {seed}")
    overrides = {**recipe.parse_set(args.set),
                 **{k: getattr(args, k) for k in ("epochs", "batch_size", "subsets_per_step", "hidden", "lr")}}
    configs = {}
    for path in args.config:
        cfg = recipe.load_config(path, DEFAULTS, overrides)
        try:
            recipe.check_config(cfg, SCHEMA, len(MODALITIES))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        if path.stem in configs:
            raise ValueError(f"--config: two configs share the name {path.stem!r}")
        recipe.inside(args.out, path.stem)  # a config's name becomes a folder of --out
        configs[path.stem] = cfg
    recipe.pick_device(args.device)
    recipe.check_stop_after(args.stop_after_epochs)
    if args.synthetic:
        spec = DATASETS[args.dataset]
        size = synthetic_mosi.file_size(tuple(args.synthetic_n or spec["n"]), aligned=not args.unaligned,
                                        dims=tuple(args.synthetic_dims or spec["dims"]))
        if size > MAX_SYNTHETIC_BYTES:
            raise ValueError(f"--synthetic-n / --synthetic-dims ask for a {size / 2**30:.1f} GiB synthetic file, "
                             f"beyond {MAX_SYNTHETIC_BYTES >> 30} GiB (a MOSEI-sized one is 4.0 GB); it is written to "
                             f"disk and then held in memory")
    return configs


def _run(args, configs: dict[str, dict]) -> dict | None:
    manifest = {"dataset": args.dataset, "data": args.data, "synthetic": args.synthetic,
                "synthetic_n": args.synthetic_n, "synthetic_dims": args.synthetic_dims, "unaligned": args.unaligned,
                "nonfinite": args.nonfinite, "configs": configs, "seeds": args.seeds}
    recipe.prepare_folder(args.out, "run.json", manifest, resume=args.resume, overwrite=args.overwrite,
                          outputs=OUTPUTS)
    device = recipe.pick_device(args.device)
    data, source, kind = load_data(args)

    runs, stopped = {}, False
    for name, cfg in configs.items():
        results = []
        for seed in args.seeds:
            r = train_one(cfg, data, seed, recipe.inside(args.out, name, f"seed{seed}"), device, resume=args.resume,
                          stop_after=args.stop_after_epochs, progress=not args.no_progress,
                          data_label=recipe.data_label(kind, BENCHMARKS[args.dataset]))
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
    summary = {"dataset": args.dataset, "source": source, "kind": kind, "seeds": args.seeds, "device": str(device),
               "machine": f"{machine}, {recipe.plural(torch.get_num_threads(), 'torch thread')}, "
                          f"torch {torch.__version__}",
               "runs": runs}
    modes = {name: run["config"]["gmd"] for name, run in runs.items()}
    if sorted(modes.values()) == [False, True]:
        joint, gmd = (runs[n] for n in sorted(modes, key=modes.get))
        rows = paired_rows(joint, gmd, data["test"]["y"].numpy().astype(np.float64))
        text = recipe.comparison_markdown(rows, n=len(data["test"]["y"]), unit="test samples",
                                          detail=f"; differences averaged over seeds {args.seeds}")
        summary["comparison"] = text.strip().splitlines()[-1]
        benchmark = BENCHMARKS[args.dataset]
        recipe.write_text(args.out / "comparison.md",
                          f"# {args.dataset.upper()}: GMD vs joint training per modality combination (test split)\n\n"
                          f"- {recipe.data_note(kind, benchmark)}\n- data: {source}\n- seeds: {args.seeds}\n\n"
                          + text)
        summary["paired"] = rows
    recipe.write_json(args.out / "metrics.json", summary)
    write_report(args.out, summary)
    write_plot(args.out, summary)
    print(f"wrote {args.out / 'report.md'}, metrics.json, metrics.png"
          + (", comparison.md" if "comparison" in summary else ""), flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(recipe.cli_errors(Path(sys.argv[0]).name, main))
