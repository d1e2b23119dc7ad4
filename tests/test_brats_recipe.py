"""End-to-end checks of python/brats.py on tiny NIfTI cases (2 cases, 24³, a few steps)."""
import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from gmd_ext import DSUNet3d, subsets
from gmd_ext.io import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
MODS = ("flair", "t1", "t1ce", "t2")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


brats = _load("brats_recipe", ROOT / "python" / "brats.py")
common = sys.modules["common"]


def _write_cases(root, n=2, size=24):
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*(np.arange(size),) * 3, indexing="ij")
    for i in range(n):
        d = root / f"Case{i}"
        d.mkdir(parents=True)
        c = rng.integers(9, size - 9, 3)
        r = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        seg = np.zeros((size,) * 3, np.uint8)
        seg[r < 6] = 2
        seg[r < 4] = 4
        seg[r < 2] = 1
        brain = np.zeros_like(seg, dtype=bool)
        brain[2:-2, 2:-2, 2:-2] = True
        for k, m in enumerate(MODS):
            vol = 100 + 30 * (seg == [2, 2, 4, 2][k]) + 5 * rng.standard_normal(seg.shape)
            nib.save(nib.Nifti1Image(np.where(brain, vol, 0).astype(np.float32), np.eye(4)),
                     str(d / f"Case{i}_{m}.nii.gz"))
        nib.save(nib.Nifti1Image(seg, np.eye(4)), str(d / f"Case{i}_seg.nii.gz"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    _write_cases(root)
    return root


def _cfg(data, **kw):
    base = {"data_root": str(data), "crop_size": 16, "batch_size": 1, "width": 0.25, "epochs": 4,
            "steps_per_epoch": 1, "lr": 1e-3, "cache": True, "subsets_per_step": 4, "sw_overlap": 0.25}
    return common.load_config(None, brats.DEFAULTS, {**base, **kw})


def _params(run):
    return load_checkpoint(run / "last.pt")


def test_resume_is_bit_identical(data, tmp_path):
    """2 steps, interruption, 2 more steps == 4 uninterrupted steps, bit for bit (GMD with sampled subsets: the
    model, Adam, the schedule, GMD's order generator and the subset sampler all have to resume exactly)."""
    cfg = _cfg(data, gmd=True)
    full, part = tmp_path / "full", tmp_path / "part"
    brats.train(cfg, full)
    brats.train(cfg, part, stop_after_epochs=2)
    assert load_checkpoint(part / "last.pt")["step"] == 2
    brats.train(cfg, part, resume=True)
    a, b = _params(full), _params(part)
    assert a["step"] == b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(b["optimizer"]["state"][k][name]))
    assert a["scheduler"] == b["scheduler"]
    # The learning rate really decayed (poly schedule stepped every optimizer step).
    assert a["scheduler"]["_last_lr"][0] < 0.5 * cfg["lr"]
    assert a["gmd"]["step"] == 4 and torch.equal(a["gmd"]["generator"], b["gmd"]["generator"])
    assert (full / "monitor.csv").is_file() and (full / "dominance.png").is_file()
    # Training moved the parameters away from the seeded initialisation.
    common.seed_everything(cfg["seed"])
    init = DSUNet3d(MODS, 3, 0.25)
    assert any(not torch.equal(v, a["model"][k]) for k, v in init.state_dict().items())


def test_resume_refuses_changed_config_and_existing_run(data, tmp_path):
    cfg = _cfg(data, epochs=2, gmd=False)  # also covers the joint-training path
    brats.train(cfg, tmp_path / "r", stop_after_epochs=1)
    with pytest.raises(ValueError, match="lr"):
        brats.train({**cfg, "lr": 0.5}, tmp_path / "r", resume=True)
    with pytest.raises(FileExistsError, match="--resume"):
        brats.train(cfg, tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="last.pt"):
        brats.train(cfg, tmp_path / "none", resume=True)


def test_report_lists_all_15_combinations(data, tmp_path):
    cfg = _cfg(data, gmd=True, epochs=1, steps_per_epoch=1, subsets_per_step=15)
    run = tmp_path / "run"
    brats.train(cfg, run)
    summary = brats.run_eval(run)
    names = [s.name for s in subsets(MODS)]
    report = (run / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0][2:] for r in rows[:15]] == names and "mean over combinations" in rows[15]
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["combinations"]) == names
    assert metrics["split"] == "test" and metrics["cases"] == json.loads((run / "splits.json").read_text())["test"]
    for name in names:
        per_case = metrics["per_case"][name]
        for r in ("WT", "TC", "ET"):
            vals = [c[r] for c in per_case.values()]
            assert metrics["combinations"][name][r]["mean"] == pytest.approx(np.mean(vals))
            assert 0.0 <= min(vals) <= max(vals) <= 1.0
    assert summary["mean"]["WT"] == pytest.approx(np.mean([metrics["combinations"][n]["WT"]["mean"]
                                                            for n in names]))
    assert (run / "dice_per_combination.png").stat().st_size > 0
    table = brats.compare([run, run], tmp_path / "cmp")
    assert all(n in table for n in names) and (tmp_path / "cmp" / "comparison.png").is_file()


def test_sliding_window_matches_direct_inference():
    torch.manual_seed(0)
    model = DSUNet3d(MODS, 3, 0.25).eval()
    image = torch.randn(4, 20, 18, 22)
    with torch.no_grad():
        direct = model.forward_branches(image[None])[0]
    # One window covering the whole (padded) volume is exact inference; check the crop-back after padding.
    got = brats.sliding_window_branches(model, image, (20, 18, 22), 0.5, "uniform")
    torch.testing.assert_close(got, direct)
    # Overlapping windows give a weighted average of window predictions, within the convolution's context.
    many = brats.sliding_window_branches(model, image, 16, 0.5, "gaussian")
    assert many.shape == direct.shape and torch.isfinite(many).all()
    # Subset fusion of branch logits is the model's own fused output for that subset.
    present = torch.tensor([[True, False, True, False]])
    with torch.no_grad():
        fused = model(image[None], present)[0]
    torch.testing.assert_close(direct[[0, 2]].mean(0), fused, rtol=1e-5, atol=1e-5)


def test_soft_dice_and_subset_losses():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4)
    target = (torch.rand(2, 3, 4, 4, 4) > 0.5).float()
    p = torch.sigmoid(logits).numpy()
    t = target.numpy()
    ref = np.mean([1 - (2 * (p[:, c] * t[:, c]).sum() + 1) / (p[:, c].sum() + t[:, c].sum() + 1) for c in range(3)])
    assert float(brats.soft_dice_loss(logits, target)) == pytest.approx(ref, rel=1e-5)
    branches = torch.randn(2, 4, 3, 4, 4, 4)
    chosen = subsets(MODS)
    losses = brats.subset_losses(branches, target, chosen)
    assert list(losses) == [s.name for s in chosen]
    assert float(losses["flair+t1ce"]) == pytest.approx(
        float(brats.soft_dice_loss(branches[:, [0, 2]].mean(1), target)))


def test_paired_configs_differ_only_in_gmd():
    gmd = json.loads((ROOT / "python" / "configs" / "brats_gmd.json").read_text())
    joint = json.loads((ROOT / "python" / "configs" / "brats_joint.json").read_text())
    assert gmd["gmd"] is True and joint["gmd"] is False
    assert {k: v for k, v in gmd.items() if k != "gmd"} == {k: v for k, v in joint.items() if k != "gmd"}
    common.load_config(ROOT / "python" / "configs" / "brats_gmd.json", brats.DEFAULTS)  # every key known
    assert {k: v for k, v in brats.DEMO.items() if k != "gmd"} == brats.DEMO  # demo presets carry no switch


def test_lr_schedule_decays():
    f = common.lr_lambda("poly", 10)
    vals = [f(i) for i in range(11)]
    assert vals[0] == 1.0 and vals[-1] == 0.0 and all(a > b for a, b in zip(vals, vals[1:]))
    g = common.lr_lambda("cosine", 10, warmup_steps=2)
    assert g(0) == 0.5 and g(1) == 1.0 and g(10) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="poly"):
        common.lr_lambda("step", 10)
