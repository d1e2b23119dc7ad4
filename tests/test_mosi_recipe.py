"""End-to-end checks of python/mosi.py on a tiny synthetic MMSA file (a few seconds each on a 2-core CPU)."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gmd_ext import DSSentimentNet, subsets
from gmd_ext.io import load_checkpoint
from gmd_ext.apps.mosi.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "python" / "configs"
COMBOS = ["text", "audio", "vision", "text+audio", "text+vision", "audio+vision", "text+audio+vision"]


@pytest.fixture(scope="module")
def mosi():
    # A recipe run as `python python/mosi.py` has python/ on sys.path (for its skeleton python/recipe.py).
    added = str(ROOT / "python") not in sys.path
    if added:
        sys.path.insert(0, str(ROOT / "python"))
    try:
        spec = importlib.util.spec_from_file_location("mosi_recipe", ROOT / "python" / "mosi.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        if added:
            sys.path.remove(str(ROOT / "python"))


def _argv(out, *extra):
    return ["--synthetic", "--synthetic-n", "32", "16", "16", "--synthetic-dims", "16", "5", "20",
            "--epochs", "2", "--batch-size", "16", "--hidden", "8", "--threads", "1", "--no-progress",
            "--out", str(out), *extra]


def _strip_timing(summary):
    for run in summary["runs"].values():
        for r in run["seeds"]:
            r.pop("train_seconds")
            for h in r["history"]:
                h.pop("seconds")
    return summary


def test_configs_are_paired():
    gmd = json.loads((CONFIGS / "mosi_gmd.json").read_text())
    joint = json.loads((CONFIGS / "mosi_joint.json").read_text())
    diff = {k for k in gmd.keys() | joint.keys() if k != "_comment" and gmd.get(k) != joint.get(k)}
    assert diff == {"gmd"} and gmd["gmd"] is True and joint["gmd"] is False


@pytest.mark.slow
def test_end_to_end_and_resume_equals_uninterrupted(mosi, tmp_path):
    full = mosi.main(_argv(tmp_path / "full"))
    assert mosi.main(_argv(tmp_path / "cut", "--stop-after-epochs", "1")) is None
    ck = load_checkpoint(tmp_path / "cut" / "mosi_gmd" / "seed0" / "last.pt")
    assert ck["epoch"] == 1 and ck["step_state"]["gmd"] is not None and ck["seed"] == 0
    resumed = mosi.main(_argv(tmp_path / "cut", "--resume"))

    for name in ("mosi_gmd", "mosi_joint"):
        a = load_checkpoint(tmp_path / "full" / name / "seed0" / "last.pt")
        b = load_checkpoint(tmp_path / "cut" / name / "seed0" / "last.pt")
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (name, k)
    # Bit-identical continuation: every metric, history entry and best epoch agrees (timings aside).
    full, resumed = _strip_timing(full), _strip_timing(resumed)
    assert json.dumps(full["runs"]) == json.dumps(resumed["runs"])  # JSON text: NaN compares equal to NaN

    # Outputs: the 7 combinations with exactly the MMSA keys, a report table row per combination, a PNG.
    on_disk = json.loads((tmp_path / "full" / "metrics.json").read_text())
    for name in ("mosi_gmd", "mosi_joint"):
        assert list(on_disk["runs"][name]["mean"]) == COMBOS
        assert all(list(m) == list(METRIC_NAMES) for m in on_disk["runs"][name]["mean"].values())
    report = (tmp_path / "full" / "report.md").read_text()
    assert "## Side by side" in report and "data source: **synthetic**" in report and "not comparable" in report
    assert "[mosi_gmd/seed0/dominance.png](mosi_gmd/seed0/dominance.png)" in report
    assert (tmp_path / "full" / "mosi_gmd" / "seed0" / "dominance.png").is_file()
    # The paired comparison: every combination x metric, a bootstrap interval, a plain verdict.
    comparison = (tmp_path / "full" / "comparison.md").read_text()
    assert "BCa bootstrap (scipy.stats.bootstrap) over the 16 test samples" in comparison
    assert "not distinguishable in" in comparison and "Low-powered" not in comparison  # 16 samples >= 10
    assert "1 torch thread, torch" in report  # --threads 1, said in the singular
    rows = on_disk["paired"]
    assert len(rows) == 7 * 4
    for row in rows:
        g = on_disk["runs"]["mosi_gmd"]["mean"][row["combination"]][row["metric"]]
        j = on_disk["runs"]["mosi_joint"]["mean"][row["combination"]][row["metric"]]
        assert row["diff"] == pytest.approx(g - j, nan_ok=True)
        assert math.isnan(row["lo"]) or row["lo"] <= row["hi"]
    for c in COMBOS:
        assert report.count(f"| {c} |") == 3  # one table per config + the side-by-side one
    assert (tmp_path / "full" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # GMD and joint differ in their switch only, and their trained weights differ because of it.
    a = load_checkpoint(tmp_path / "full" / "mosi_gmd" / "seed0" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "full" / "mosi_joint" / "seed0" / "last.pt")["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_mean_over_seeds_and_sampled_subsets(mosi, tmp_path):
    summary = mosi.main(_argv(tmp_path, "--config", str(CONFIGS / "mosi_gmd.json"), "--seeds", "0", "1",
                              "--subsets-per-step", "3", "--epochs", "1"))
    run = summary["runs"]["mosi_gmd"]
    assert run["config"]["subsets_per_step"] == 3
    per_seed = [r["test"] for r in run["seeds"]]
    assert per_seed[0] != per_seed[1]
    for c in COMBOS:
        for k in METRIC_NAMES:
            vals = [p[c][k] for p in per_seed]
            assert run["mean"][c][k] == pytest.approx(np.mean(vals), nan_ok=True)
            assert run["std"][c][k] == pytest.approx(np.std(vals, ddof=1), nan_ok=True)


def test_refuses_to_clobber_or_resume_with_other_settings(mosi, tmp_path):
    joint = ["--config", str(CONFIGS / "mosi_joint.json"), "--epochs", "1"]
    mosi.main(_argv(tmp_path, *joint))
    before = (tmp_path / "metrics.json").read_bytes()
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        mosi.main(_argv(tmp_path, *joint))
    with pytest.raises(FileExistsError, match="--overwrite"):  # other seeds into the same --out: refused too
        mosi.main(_argv(tmp_path, *joint, "--seeds", "1"))
    assert (tmp_path / "metrics.json").read_bytes() == before
    with pytest.raises(ValueError, match=r"settings differ.*\['configs'\]"):
        mosi.main(_argv(tmp_path, *joint, "--resume", "--lr", "0.01"))
    with pytest.raises(ValueError, match=r"mosi_joint\.json: config key 'subsets_per_step' must be int in \[0, 7\], got 8"):
        mosi.main(_argv(tmp_path / "x", *joint, "--subsets", "8"))
    summary = mosi.main(_argv(tmp_path, *joint, "--seeds", "1", "--overwrite"))
    assert summary["seeds"] == [1] and not (tmp_path / "mosi_joint" / "seed0" / "last.pt").exists()


def test_resume_checks_each_checkpoint_and_names_stay_inside_out(mosi, tmp_path):
    both = ["--epochs", "2", "--stop-after-epochs", "1"]
    assert mosi.main(_argv(tmp_path, *both)) is None
    # Swapping a GMD checkpoint into the joint run is caught by the checkpoint's own config record.
    gmd, joint = (tmp_path / n / "seed0" / "last.pt" for n in ("mosi_gmd", "mosi_joint"))
    joint.write_bytes(gmd.read_bytes())
    with pytest.raises(ValueError, match=r"another config/seed \(differs in \['gmd'\]"):
        mosi.main(_argv(tmp_path, "--epochs", "2", "--resume"))
    # A config whose name would be a path outside --out ('...json' has the stem '..') is refused up front.
    bad = tmp_path / "...json"
    bad.write_text((CONFIGS / "mosi_gmd.json").read_text())
    with pytest.raises(ValueError, match="outside"):
        mosi.main(_argv(tmp_path / "o", "--config", str(bad)))
    assert not (tmp_path / "seed0").exists()


def test_subset_prediction_is_the_mean_of_its_branches(mosi):
    # The recipe trains all 7 objectives from one forward_branches call; that equals running the model with only
    # the subset present (the evaluation path).
    torch.manual_seed(0)
    model = DSSentimentNet(("text", "audio", "vision"), (16, 5, 20), 8).eval()
    x = {"text": torch.randn(6, 7, 16), "audio": torch.randn(6, 9, 5), "vision": torch.randn(6, 4, 20)}
    lengths = {"text": torch.full((6,), 7), "audio": torch.tensor([9, 1, 3, 9, 5, 2]), "vision": torch.full((6,), 4)}
    branches = model.forward_branches(x, None, lengths)
    y = torch.randn(6)
    losses = sys.modules["recipe"].subset_losses(branches, y, torch.nn.functional.l1_loss,
                                                 subsets(("text", "audio", "vision")))
    assert list(losses) == COMBOS
    for s in subsets(("text", "audio", "vision")):
        xs = {m: (t if m in s else None) for m, t in x.items()}
        direct = model(xs, s.mask.expand(6, -1), lengths)
        torch.testing.assert_close(direct, torch.stack([branches[m] for m in s.indices], 1).mean(1))
        torch.testing.assert_close(losses[s.name], (direct - y).abs().mean())


def test_figures_say_synthetic_and_cli_checks_keys(mosi, tmp_path, monkeypatch, capsys):
    titles = []
    monkeypatch.setattr(mosi.recipe, "plot_per_combination",
                        lambda path, runs, metrics, **kw: titles.append(kw["title"]))
    mosi.main(_argv(tmp_path / "run", "--epochs", "1", "--config", str(CONFIGS / "mosi_joint.json")))
    assert titles and "(synthetic data, not CMU-MOSI)" in titles[0]
    capsys.readouterr()
    # One schema: --print-config shows the resolved config, bad --set values are refused naming the key.
    assert mosi.main(_argv(tmp_path / "p", "--set", "dropout=0.5", "--print-config")) is None
    printed = json.loads(capsys.readouterr().out)
    assert printed["mosi_gmd"]["dropout"] == 0.5 and not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match=r"config key 'dropout' must be float in \[0, 1\), got 1\.0"):
        mosi.main(_argv(tmp_path / "q", "--set", "dropout=1.0"))
    with pytest.raises(ValueError, match=r"config key 'device' must be auto, cpu, cuda or cuda:N, got 'meta'"):
        mosi.main(_argv(tmp_path / "q", "--device", "meta"))
