import csv
import math

import pytest
import torch
from torch import nn

from gmd_ext import GMD, sample_subsets, subsets
from gmd_ext.gmd.monitor import DominanceMonitor

MODS = ("a", "b", "c")


pytestmark = pytest.mark.usefixtures("one_thread")


class SubsetNet(nn.Module):
    """Per-modality encoders, mean fusion over the modalities present, shared head."""

    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleList(nn.Linear(4, 8) for _ in MODS)
        self.head = nn.Linear(8, 1)

    def loss(self, xs, y, subset):
        z = torch.stack([torch.tanh(self.enc[i](xs[i])) for i in subset.indices]).mean(0)
        return ((self.head(z) - y) ** 2).mean()


def run_steps(monitor, steps=4, k=None):
    torch.manual_seed(0)
    net = SubsetNet()
    gmd = GMD(torch.optim.SGD(net.parameters(), lr=0.1), seed=0, monitor=monitor)
    g = torch.Generator().manual_seed(0)
    xs, y = [torch.randn(16, 4) for _ in MODS], torch.randn(16, 1)
    infos = []
    for _ in range(steps):
        chosen = subsets(MODS) if k is None else sample_subsets(MODS, k, g)
        gmd.zero_grad()
        infos.append(gmd.backward({s.name: net.loss(xs, y, s) for s in chosen}))
        gmd.step()
    return infos


def test_csv_rows_match_info(tmp_path):
    path = tmp_path / "dom.csv"
    mon = DominanceMonitor(path, modalities=MODS)
    infos = run_steps(mon)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and open(path).read().count("step,") == 1  # header once
    names = [s.name for s in subsets(MODS)]
    for row, info in zip(rows, infos):
        assert int(row["step"]) == info.step and int(row["num_conflicts"]) == info.num_conflicts
        for k, n in enumerate(names):
            assert float(row[f"loss/{n}"]) == pytest.approx(info.losses[k])
            assert float(row[f"norm/{n}"]) == pytest.approx(float(info.norms[k]), rel=1e-6)
        assert float(row["cos/a|a+b"]) == pytest.approx(float(info.cosines[0, 3]), rel=1e-5, abs=1e-7)
        assert float(row["coef/a+b+c|b"]) == pytest.approx(float(info.coefficients[6, 1]), rel=1e-6)
        # dominance of "a": mean over {a, a+b, a+c} of (g_S . g_F) / |g_F|^2, from the Gramian
        G = info.gram.double()
        expected = sum(float(G[s, 6] / G[6, 6]) for s in (0, 3, 4)) / 3
        assert float(row["dominance/a"]) == pytest.approx(expected, rel=1e-6)


def test_dominance_detects_dominant_modality():
    """Gradients where every subset containing modality 'a' reproduces the full-set gradient and the others
    point in unrelated directions: D_a ~ 1, D_b ~ D_c ~ 1/3 (only a+b resp. a+c of their three agree)."""
    names = [s.name for s in subsets(MODS)]
    torch.manual_seed(0)
    g_full = torch.randn(500)
    rows = [g_full + 0.05 * torch.randn(500) if "a" in n.split("+") else torch.randn(500) for n in names]
    G = torch.stack(rows)
    info = type("Info", (), {"gram": G @ G.T, "coefficients": torch.eye(7), "losses": [0.0] * 7,
                             "names": names})()
    row = DominanceMonitor(modalities=MODS)(0, info)
    assert row["dominance/a"] == pytest.approx(1.0, abs=0.05)
    assert row["dominance/b"] == pytest.approx(1 / 3, abs=0.1) and row["dominance/c"] == pytest.approx(1 / 3, abs=0.1)


def test_sampled_subsets_leave_blank_cells(tmp_path):
    path = tmp_path / "dom.csv"
    mon = DominanceMonitor(path, objective_names=[s.name for s in subsets(MODS)], modalities=MODS)
    run_steps(mon, steps=3, k=3)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    for row in rows:
        present = [n for n in (s.name for s in subsets(MODS)) if row[f"loss/{n}"] != ""]
        assert len(present) == 3 and "a+b+c" in present


def test_plot_writes_png(tmp_path):
    mon = DominanceMonitor(modalities=MODS)
    run_steps(mon, steps=2)
    assert mon._hist_before.sum() == 2 * 21 and mon._hist_after.sum() == 2 * 21
    out = tmp_path / "fig3.png"
    mon.plot(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(p.name != "fig3.png" for p in tmp_path.iterdir())  # no temp file left behind


def test_after_projection_has_no_obtuse_pairs_against_originals():
    """Fig. 3's claim: after projection the angle histogram moves away from > 90 degrees."""
    mon = DominanceMonitor(modalities=MODS)
    infos = run_steps(mon, steps=2)
    assert any(i.num_conflicts > 0 for i in infos)
    before = (mon._hist_before[45:]).sum()  # bins >= 90 degrees
    after = (mon._hist_after[45:]).sum()
    assert after <= before


def test_monitor_bad_inputs(tmp_path):
    path = tmp_path / "dom.csv"
    path.write_text("other,header\n")
    mon = DominanceMonitor(path, modalities=MODS)
    with pytest.raises(ValueError, match="different header"):
        run_steps(mon, steps=1)
    mon = DominanceMonitor(objective_names=["x", "y"])
    with pytest.raises(ValueError, match="not among the monitor's objective_names"):
        run_steps(mon, steps=1)
    mon = DominanceMonitor(modalities=("a", "b"))
    with pytest.raises(ValueError, match="is not a subset of modalities"):
        run_steps(mon, steps=1)
    with pytest.raises(ValueError, match="no steps with finite gradients"):
        DominanceMonitor().plot(tmp_path / "x.png")
    with pytest.raises(ValueError, match="distinct non-empty strings"):
        DominanceMonitor(modalities=["a", "a"])
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="tensorboard"):
            DominanceMonitor(tensorboard_dir=tmp_path / "tb")


def test_dominance_nan_without_full_set():
    names = ["a", "b"]
    G = torch.randn(2, 10)
    info = type("Info", (), {"gram": G @ G.T, "coefficients": torch.eye(2), "losses": [0.0, 0.0], "names": names})()
    row = DominanceMonitor(modalities=MODS)(0, info)
    assert all(math.isnan(row[f"dominance/{m}"]) for m in MODS)


def test_skipped_nan_step_is_logged_but_not_plotted(tmp_path):
    names = [s.name for s in subsets(MODS)]
    G = torch.randn(7, 20)
    gram = G @ G.T
    gram[2, :] = float("nan")
    info = type("Info", (), {"gram": gram, "coefficients": torch.eye(7), "losses": [0.0] * 7, "names": names,
                             "skipped": True})()
    mon = DominanceMonitor(tmp_path / "d.csv", modalities=MODS)
    row = mon(0, info)
    assert row["skipped"] == 1 and mon.steps == 1
    with pytest.raises(ValueError, match="no steps with finite gradients"):
        mon.plot(tmp_path / "x.png")


@pytest.mark.parametrize("k", [None, 3])
def test_figure_redrawn_from_the_csv_equals_the_live_one(tmp_path, k):
    # A resumed run plots from the whole monitor.csv: the replayed accumulators must equal the live monitor's.
    path = tmp_path / "m.csv"
    live = DominanceMonitor(path, objective_names=[s.name for s in subsets(MODS)], modalities=MODS)
    run_steps(live, steps=5, k=k)
    again = DominanceMonitor.from_csv(path)
    assert again.steps == live.steps == 5 and again.objective_names == live.objective_names
    assert again.modalities == MODS
    for a, b in ((again._cos_sum, live._cos_sum), (again._cos_after_sum, live._cos_after_sum),
                 (again._cos_count, live._cos_count)):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-5, atol=1e-5)
    assert (again._hist_before == live._hist_before).all() and (again._hist_after == live._hist_after).all()
    from gmd_ext.gmd.monitor import plot_csv
    plot_csv(path, tmp_path / "d.png", title="synthetic data")
    assert (tmp_path / "d.png").stat().st_size > 0
    path.write_text(path.read_text().replace(",", ";", 1))
    with pytest.raises(ValueError, match=r"m\.csv: not a readable DominanceMonitor CSV"):
        DominanceMonitor.from_csv(path)


def test_plot_without_matplotlib_names_the_package(tmp_path, monkeypatch):
    import sys
    mon = DominanceMonitor(modalities=MODS)
    run_steps(mon, steps=1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"DominanceMonitor\.plot needs matplotlib.*pip install matplotlib"):
        mon.plot(tmp_path / "x.png")
