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


# A recipe run as `python python/brats.py` has python/ on sys.path (for its skeleton python/recipe.py).
if str(ROOT / "python") not in sys.path:
    sys.path.insert(0, str(ROOT / "python"))
brats = _load("brats_recipe", ROOT / "python" / "brats.py")
recipe = sys.modules["recipe"]


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
    return recipe.load_config(None, brats.DEFAULTS, {**base, **kw})


def _params(run):
    return load_checkpoint(run / "last.pt")


def _csv_steps(path):
    return [int(line.split(",")[0]) for line in path.read_text().splitlines()[1:]]


def test_resume_is_bit_identical(data, tmp_path, monkeypatch, capsys):
    """2 steps, interruption, 2 more steps == 4 uninterrupted steps, bit for bit (GMD with sampled subsets: the
    model, Adam, the schedule, GMD's order generator and the subset sampler all have to resume exactly)."""
    cfg = _cfg(data, gmd=True)
    full, part = tmp_path / "full", tmp_path / "part"
    plotted = []
    real_plot = recipe.plot_monitor_csv
    monkeypatch.setattr(recipe, "plot_monitor_csv", lambda csv, png, title="": (
        plotted.append((recipe.DominanceMonitor.from_csv(csv).steps, title)), real_plot(csv, png, title=title)))
    brats.train(cfg, full)
    # 2 cases cannot fill train, val and test: said at start-up, not silently.
    assert "warning: the val split is empty: 2 cases cannot fill train, val and test" in capsys.readouterr().err
    brats.train(cfg, part, stop_after_epochs=2)
    assert load_checkpoint(part / "last.pt")["step"] == 2
    # A kill after step 2's monitor row but before the epoch's checkpoint leaves a row the resume will redo.
    last_row = (part / "monitor.csv").read_text().splitlines()[-1]
    with open(part / "monitor.csv", "a") as f:
        f.write("2" + last_row[last_row.index(","):] + "\n")
    brats.train(cfg, part, resume=True)
    a, b = _params(full), _params(part)
    assert a["step"] == b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    opt_a, opt_b = a["step_state"]["gmd"]["optimizer"], b["step_state"]["gmd"]["optimizer"]
    for k, v in opt_a["state"].items():
        for name, t in v.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(opt_b["state"][k][name]))
    assert a["scheduler"] == b["scheduler"]
    # The learning rate really decayed (poly schedule stepped every optimizer step).
    assert a["scheduler"]["_last_lr"][0] < 0.5 * cfg["lr"]
    ga, gb = a["step_state"]["gmd"], b["step_state"]["gmd"]
    assert ga["step"] == 4 and torch.equal(ga["generator"], gb["generator"])
    assert a["config"] == cfg and a["seed"] == cfg["seed"]
    assert (full / "monitor.csv").is_file() and (full / "dominance.png").is_file()
    # The interrupted run's monitor.csv holds each step once, like the uninterrupted one.
    assert _csv_steps(part / "monitor.csv") == _csv_steps(full / "monitor.csv") == [0, 1, 2, 3]
    # After the resume the dominance figure covers all 4 steps (drawn from the whole CSV), and says the data.
    assert [n for n, _ in plotted] == [4, 2, 4]
    assert all("BraTS 2018-2021 data" in t for _, t in plotted)
    # Training moved the parameters away from the seeded initialisation.
    recipe.seed_everything(cfg["seed"])
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
    report = (run / "report_test.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0][2:] for r in rows[:15]] == names and "mean over combinations" in rows[15]
    # A reader learns what WT/TC/ET are, where the data came from, and what the dominance plot shows.
    assert "WT (whole tumour" in report and "TC (tumour core" in report and "ET (enhancing tumour)" in report
    # These NIfTI cases were not written by the phantom generator: the release is decided from their layout.
    assert "data source: **BraTS 2018-2021** data (decided from the data's layout)" in report
    assert "[dominance.png](dominance.png)" in report and "(dice_test.png)" in report
    # HD95 beside Dice, per region and combination, with its definition, unit and the header's voxel size.
    assert "| WT Dice | TC Dice | ET Dice | WT HD95 (mm) | TC HD95 (mm) | ET HD95 (mm) |" in report
    assert "MONAI's definition" in report and "(1 x 1 x 1 mm)" in report and "373.129 mm" in report
    assert "**one case: its values, no spread (no ±)**" in report and "±" not in report.split("| modalities")[1]
    metrics = json.loads((run / "metrics_test.json").read_text())
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
    from gmd_ext.metrics import brats_hd95
    case = metrics["cases"][0]
    assert set(metrics["per_case_hd95"]["flair"][case]) == {"WT", "TC", "ET"}
    assert metrics["spacing"][case] == [1.0, 1.0, 1.0]
    assert brats_hd95(torch.zeros(4, 4, 4, dtype=torch.uint8), torch.zeros(4, 4, 4, dtype=torch.uint8))["ET"] == 0
    assert (run / "dice_test.png").stat().st_size > 0
    table = brats.compare([run, run], tmp_path / "cmp")
    assert all(n in table for n in names) and (tmp_path / "cmp" / "comparison.png").is_file()
    # Evaluations are named by split and never replace each other or themselves silently.
    before = (run / "report_test.md").read_bytes()
    brats.run_eval(run, "train")  # (2 cases: the val split is empty)
    assert (run / "report_train.md").is_file() and (run / "report_test.md").read_bytes() == before
    with pytest.raises(FileExistsError, match="--overwrite"):
        brats.run_eval(run, "train")
    brats.run_eval(run, "train", overwrite=True)
    with pytest.raises(FileExistsError, match="--overwrite"):
        brats.compare([run, run], tmp_path / "cmp")


def test_resume_refuses_a_checkpoint_of_another_run(data, tmp_path):
    """A GMD last.pt dropped into a joint run's folder (config.json unchanged) is refused on --resume."""
    joint, gmd = _cfg(data, epochs=2, gmd=False), _cfg(data, epochs=2, gmd=True)
    brats.train(joint, tmp_path / "joint", stop_after_epochs=1)
    brats.train(gmd, tmp_path / "gmd", stop_after_epochs=1)
    (tmp_path / "joint" / "last.pt").write_bytes((tmp_path / "gmd" / "last.pt").read_bytes())
    with pytest.raises(ValueError, match=r"another config/seed \(differs in \['gmd'\]"):
        brats.train(joint, tmp_path / "joint", resume=True)
    with pytest.raises(ValueError, match="seed"):
        recipe.load_matching(tmp_path / "gmd" / "last.pt", gmd, seed=1)


def test_never_overwrites_a_folder_without_overwrite(data, tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "config.json").write_text('{"mine": 1}')
    (run / "report_test.md").write_text("my report")
    with pytest.raises(FileExistsError, match="not empty.*--overwrite"):
        brats.train(_cfg(data, epochs=1), run)
    assert (run / "config.json").read_text() == '{"mine": 1}'
    (run / "notes.txt").write_text("keep")
    brats.train(_cfg(data, epochs=1), run, overwrite=True)
    assert json.loads((run / "config.json").read_text())["epochs"] == 1
    assert not (run / "report_test.md").exists() and (run / "notes.txt").read_text() == "keep"


def test_paired_comparison_of_joint_and_gmd(data, tmp_path):
    runs = []
    for use_gmd in (False, True):
        run = tmp_path / ("gmd" if use_gmd else "joint")
        brats.train(_cfg(data, gmd=use_gmd, epochs=1), run)
        brats.run_eval(run)
        runs.append(run)
    text = brats.compare(runs, tmp_path / "cmp")
    assert "## Paired differences (GMD − joint)" in text and "Intervals: none: 1 test case cannot estimate the spread" in text
    rows = [line for line in text.split("## Paired differences")[1].splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 16 * 3 * 2  # 15 combinations + their mean, x WT/TC/ET, x Dice/HD95
    assert [r.split(" | ")[1] for r in rows[48:51]] == ["WT HD95 (mm)", "TC HD95 (mm)", "ET HD95 (mm)"]
    assert "**Low-powered: 1 test case (fewer than 10).**" in text  # a verdict over 1 case is flagged
    j = json.loads((runs[0] / "metrics_test.json").read_text())
    g = json.loads((runs[1] / "metrics_test.json").read_text())
    wt = rows[0].split(" | ")
    assert wt[0] == "| flair" and wt[1] == "WT Dice"
    assert float(wt[4]) == pytest.approx(g["combinations"]["flair"]["WT"]["mean"] - j["combinations"]["flair"]["WT"]
                                         ["mean"], abs=1e-4)
    # One case cannot estimate a spread: no interval, so nothing is called a difference.
    assert "not distinguishable in" in text and "data source: **BraTS 2018-2021**" in text


def test_demo_data_folder_that_is_not_a_phantom_set(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty.*no phantom.json"):
        brats.ensure_phantom(tmp_path, 2, 16)


def test_start_up_checks_name_the_fix(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else real(name, *a))
    with pytest.raises(SystemExit, match=r'nilearn.*pip install "\.\[brats\]"'):
        brats.main(["demo", "--quick"])
    monkeypatch.setattr(recipe._backend, "CPP_LOADED", False)
    monkeypatch.setattr(recipe._backend, "CPP_REASON", "the C++ extension gmd_ext._C is not built; rebuild with X")
    assert "not loaded" in recipe.kernel_note() and "rebuild with X" in recipe.kernel_note()


def test_threads_and_output_names():
    before = torch.get_num_threads()
    with recipe.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        with recipe.threads(-1):
            pass
    assert recipe.inside("out", "mosi_gmd", "seed0") == Path("out/mosi_gmd/seed0")
    for bad in ("..", "...", "../x", "a/b", ".hidden", ""):
        with pytest.raises(ValueError, match="outside"):
            recipe.inside("out", bad)


def test_bootstrap_interval_and_verdict():
    d = np.array([0.1, 0.2, 0.3, 0.4])
    lo, hi = recipe.bootstrap_interval(lambda idx: d[idx].mean(1), 4, n_boot=4000, seed=0)
    assert 0.1 <= lo < d.mean() < hi <= 0.4
    assert (lo, hi) == recipe.bootstrap_interval(lambda idx: d[idx].mean(1), 4, n_boot=4000, seed=0)
    assert recipe.verdict(lo, hi, True) == "GMD better" and recipe.verdict(lo, hi, False) == "joint better"
    assert recipe.verdict(-0.1, 0.2, True) == "not distinguishable"
    assert recipe.verdict(1e-7, 2e-7, True) == "not distinguishable"  # below the tables' precision
    assert np.isnan(recipe.bootstrap_interval(lambda idx: d[idx].mean(1), 1)).all()  # one unit: no spread


def test_sliding_window_matches_direct_inference():
    torch.manual_seed(0)
    model = DSUNet3d(MODS, 3, 0.25).eval()
    image = torch.randn(4, 20, 18, 22)
    with torch.no_grad():
        direct = torch.stack(model.forward_branches(image[None]), 1)[0]
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
    losses = recipe.subset_losses(branches, target, brats.soft_dice_loss, chosen)
    assert list(losses) == [s.name for s in chosen]
    assert float(losses["flair+t1ce"]) == pytest.approx(
        float(brats.soft_dice_loss(branches[:, [0, 2]].mean(1), target)))


def test_paired_configs_differ_only_in_gmd():
    gmd = json.loads((ROOT / "python" / "configs" / "brats_gmd.json").read_text())
    joint = json.loads((ROOT / "python" / "configs" / "brats_joint.json").read_text())
    assert gmd["gmd"] is True and joint["gmd"] is False
    assert {k: v for k, v in gmd.items() if k != "gmd"} == {k: v for k, v in joint.items() if k != "gmd"}
    recipe.load_config(ROOT / "python" / "configs" / "brats_gmd.json", brats.DEFAULTS)  # every key known
    assert {k: v for k, v in brats.DEMO.items() if k != "gmd"} == brats.DEMO  # demo presets carry no switch
    # The knobs both recipes share have one name and one default, from the skeleton.
    mosi_cfg = json.loads((ROOT / "python" / "configs" / "mosi_gmd.json").read_text())
    for key in ("gmd", "gmd_reduction", "gmd_order", "joint_reduction", "subsets_per_step"):
        assert key in gmd and key in mosi_cfg and key in recipe.SHARED_DEFAULTS


def test_lr_schedule_decays():
    f = recipe.lr_lambda("poly", 10)
    vals = [f(i) for i in range(11)]
    assert vals[0] == 1.0 and vals[-1] == 0.0 and all(a > b for a, b in zip(vals, vals[1:]))
    g = recipe.lr_lambda("cosine", 10, warmup_steps=2)
    assert g(0) == 0.5 and g(1) == 1.0 and g(10) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="poly"):
        recipe.lr_lambda("step", 10)


@pytest.mark.parametrize("weighting,mode,window,overlap", [("gaussian", "gaussian", 16, 0.5),
                                                           ("uniform", "constant", (16, 24, 20), 0.25),
                                                           ("gaussian", "gaussian", (20, 16, 16), 0.7)])
def test_sliding_window_equals_monai(weighting, mode, window, overlap):
    # Same weights, same placement, same padding: the recipe's inference is MONAI's sliding_window_inference over
    # the concatenated branch logits (the volume is smaller than the window along one axis in the second case).
    monai_inferers = pytest.importorskip("monai.inferers")
    torch.manual_seed(0)
    model = DSUNet3d(MODS, 3, 0.25).eval()
    image = torch.randn(4, 30, 11, 27)
    ours = brats.sliding_window_branches(model, image, window, overlap, weighting, batch_size=3)
    with torch.no_grad():
        ref = monai_inferers.sliding_window_inference(
            image[None], window if isinstance(window, tuple) else (window,) * 3, 3,
            lambda x: torch.cat(model.forward_branches(x), 1), overlap=overlap, mode=mode, sigma_scale=0.125)
    torch.testing.assert_close(ours, ref[0].reshape(ours.shape), rtol=1e-6, atol=1e-6)


def test_bootstrap_is_scipys_bca_by_default_and_percentile_on_request():
    from scipy import stats
    d = np.array([0.31, -0.12, 0.05, 0.44, 0.2, -0.03, 0.17, 0.09])
    for method in ("BCa", "percentile"):
        ours = recipe.bootstrap_interval(lambda idx: d[idx].mean(1), len(d), seed=3, method=method)
        ref = stats.bootstrap((d,), np.mean, n_resamples=2000, method=method, rng=np.random.default_rng(3))
        assert ours == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), rel=1e-12)
    assert recipe.bootstrap_interval(lambda idx: d[idx].mean(1), len(d)) == \
        recipe.bootstrap_interval(lambda idx: d[idx].mean(1), len(d), method="BCa")
    zero = np.zeros(6)  # two identical runs: the interval is the point, not NaN
    assert recipe.bootstrap_interval(lambda idx: zero[idx].mean(1), 6) == (0.0, 0.0)
    with pytest.raises(ValueError, match="bootstrap method"):
        recipe.bootstrap_interval(lambda idx: d[idx].mean(1), len(d), method="basic")


def test_runnable_with_safe_path_and_help_lists_keys():
    import subprocess
    out = subprocess.run([sys.executable, "-P", str(ROOT / "python" / "brats.py"), "train", "--help"],
                         capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert "--print-config" in out.stdout and "--no-progress" in out.stdout and "sw_overlap" in out.stdout
    out = subprocess.run([sys.executable, "-P", str(ROOT / "python" / "mosi.py"), "--help"], capture_output=True,
                         text=True, timeout=120, cwd="/")
    assert out.returncode == 0 and "hidden" in out.stdout and "int in [1, 4096]" in out.stdout, out.stderr


def test_missing_matplotlib_fails_before_training(data, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(ImportError, match=r"the dominance plot .* needs matplotlib.*pip install"):
        brats.train(_cfg(data, gmd=True, epochs=1), tmp_path / "run")
    assert not (tmp_path / "run" / "last.pt").exists()  # refused before the first step, not after the last
