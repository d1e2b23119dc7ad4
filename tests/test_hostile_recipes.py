"""Hostile use of the recipes (python/brats.py, python/recipe.py) and the BraTS loader's memory bound.

Where a crash or memory exhaustion is possible (a gzip bomb, a billion-step epoch plan, a full disk) the attempt runs
in a child process under a memory cap (RLIMIT_AS, set after the imports) and a timeout, and must end in the code's
own error naming the file or key: never a kill, a timeout or a silent success. The rest run in-process on tiny
NIfTI cases (16^3, one training step).
"""
import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from gmd_ext.apps.brats.data import BraTSDataError, BraTSDataset, find_cases, load_case
from gmd_ext.io import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
MODS = ("flair", "t1", "t1ce", "t2")
CAP_BYTES = 512 << 20
TIMEOUT_S = 25

if str(ROOT / "python") not in sys.path:
    sys.path.insert(0, str(ROOT / "python"))
from test_brats_recipe import _write_cases, brats, recipe  # noqa: E402  (one copy of the recipe module)


def _child(code: str, imports: str, cap: int = CAP_BYTES, timeout: float = TIMEOUT_S) -> dict:
    """Run ``code`` in a fresh interpreter whose address space may grow by ``cap`` bytes after ``imports``; the
    code sets ``result`` (a JSON-able value). Returns {"status": "ok", "result": ...} or the way it ended."""
    prelude = "\n".join([
        "import json, os, resource, signal, sys",
        f"sys.path.insert(0, {str(ROOT / 'python')!r})",
        imports,
        'vm = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")',
        f"resource.setrlimit(resource.RLIMIT_AS, (vm + {cap}, vm + {cap}))",
        "result = None", ""])
    wrapped = prelude + "try:\n" + textwrap.indent(textwrap.dedent(code), "    ") + textwrap.dedent("""
        except BaseException as e:
            result = {"error": type(e).__name__, "msg": str(e)[:3000]}
        print("RESULT " + json.dumps(result))
    """)
    try:
        proc = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=timeout + 30,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    if proc.returncode < 0:
        return {"status": f"killed by signal {-proc.returncode}", "stderr": proc.stderr[-2000:]}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return {"status": f"exit {proc.returncode} without a result", "stderr": proc.stderr[-2000:]}
    return {"status": "ok", "result": json.loads(lines[-1][len("RESULT "):])}


# ----------------------------------------------------------------------------------------------- run folder lock
_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    import recipe
    with recipe.run_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


def _hold(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), str(ROOT / "python")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_one_run_per_folder_and_stale_locks_do_not_block(tmp_path, data):
    run = tmp_path / "run"
    holder = _hold(run)
    try:
        with pytest.raises(recipe.RunInUseError, match=rf"{run} is in use by another run \(pid {holder.pid} holds"):
            with recipe.run_lock(run):
                pass
        # A second training (or --resume) into the folder is refused before it touches anything.
        cfg = recipe.load_config(None, brats.DEFAULTS, {"data_root": str(data), "crop_size": 16, "width": 0.25})
        with pytest.raises(recipe.RunInUseError, match=rf"pid {holder.pid}"):
            brats.train(cfg, run, resume=True)
        assert sorted(p.name for p in run.iterdir()) == [recipe.LOCK_NAME]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without unlocking: the kernel released its lock, so the folder is free again.
    with recipe.run_lock(run), recipe.run_lock(run):  # and re-entrant within one process (train -> eval)
        assert (run / recipe.LOCK_NAME).read_text().strip() == str(os.getpid())


# ----------------------------------------------------------------------------------------------- bytes, not voxels
def _float64_case(root: Path, name: str, size: int) -> Path:
    d = root / name
    d.mkdir(parents=True)
    vol = np.zeros((size,) * 3, np.float64)
    vol[2:-2, 2:-2, 2:-2] = 1.0 + np.arange(size - 4, dtype=np.float64)[:, None, None] % 2
    seg = np.zeros((size,) * 3, np.uint8)
    seg[size // 2, size // 2, size // 2] = 4
    blob = gzip.compress(nib.Nifti1Image(vol, np.eye(4)).to_bytes(), compresslevel=1)
    for m in MODS:
        (d / f"{name}_{m}.nii.gz").write_bytes(blob)
    nib.save(nib.Nifti1Image(seg, np.eye(4)), str(d / f"{name}_seg.nii.gz"))
    return d


def test_gzip_bomb_refused_by_decompressed_bytes(tmp_path):
    # 4 float64 files of 128^3 (16 MiB decompressed each, 0.1 MiB on disk): inside the voxel cap, beyond a 32 MiB
    # per-case bound set for the test (the default, 1 GiB, scaled down). Refused from the headers, before a byte
    # of voxel data is inflated, in a child that could not hold even one decompressed file.
    case = _float64_case(tmp_path, "Bomb", 128)
    assert sum(p.stat().st_size for p in case.iterdir()) < 1 << 20
    got = _child(f"""
        brats_data.MAX_CASE_BYTES = 32 << 20
        brats_data.load_case({str(case)!r})
        result = {{"error": None}}
    """, "import numpy, nibabel\nfrom gmd_ext.apps.brats import data as brats_data", cap=12 << 20)
    assert got["status"] == "ok", got
    assert got["result"]["error"] == "BraTSDataError", got
    assert "Bomb_" in got["result"]["msg"] and "the bound per case is 32 MiB" in got["result"]["msg"]
    assert "MAX_CASE_BYTES" in got["result"]["msg"]


def test_case_peak_is_a_small_multiple_of_the_float32_stack(tmp_path):
    # float64 files are converted chunk by chunk into the float32 stack: the peak numpy allocation of a case is the
    # stack plus the labels plus a chunk, not the four float64 volumes (which would be 2x the stack on their own).
    import tracemalloc

    case = _float64_case(tmp_path, "F64", 96)
    stack = 4 * 96 ** 3 * 4
    tracemalloc.start()
    try:
        image, labels = load_case(case)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    ref = np.asarray(nib.load(str(case / "F64_t1.nii.gz")).dataobj).astype(np.float32)
    np.testing.assert_array_equal(image[1], ref)
    assert image.dtype == np.float32 and labels.dtype == np.uint8 and int(labels.max()) == 4
    assert peak < 1.5 * stack, f"peak {peak / 2**20:.1f} MiB for a {stack / 2**20:.1f} MiB float32 stack"


def test_msd_label_keys_must_be_small_ascii_integers(tmp_path):
    for key in ("\u00b3", "99999999999999", "-1", " 1"):
        root = tmp_path / f"msd{len(key)}{key.strip() == key}{ord(key[0])}"
        (root / "imagesTr").mkdir(parents=True)
        (root / "labelsTr").mkdir()
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 4), np.float32), np.eye(4)), str(root / "imagesTr" / "c.nii.gz"))
        labels = {"0": "background", "1": "edema", "2": "non-enhancing tumour", key: "enhancing tumour"}
        (root / "dataset.json").write_text(json.dumps({"labels": labels}))
        with pytest.raises(BraTSDataError, match=r"dataset\.json: label key .* is not a label value; keys must be the "
                                                 r"integers 0\.\.255"):
            find_cases(root)


def test_split_file_moved_cases_refused(tmp_path):
    root = tmp_path / "cases"
    _write_cases(root, n=5, size=20)
    split = tmp_path / "splits.json"
    BraTSDataset(root, "train", split_file=split)
    saved = json.loads(split.read_text())
    moved = dict(saved, train=saved["train"] + saved["test"], test=[])
    split.write_text(json.dumps(moved))
    with pytest.raises(BraTSDataError, match=rf"{saved['test'][0]}' is in 'train', the seed and ratios put it in "
                                             rf"'test'"):
        BraTSDataset(root, "train", split_file=split)


# ----------------------------------------------------------------------------------------------- epoch plans
def test_billion_step_epoch_plan_is_lazy():
    got = _child("""
        plan = brats._epoch_batches(5, 10 ** 9, 2, 0, 0)
        it = iter(plan)
        result = {"len": len(plan), "first": [next(it) for _ in range(4)]}
        ref = torch.Generator().manual_seed(0)
        order = torch.cat([torch.randperm(5, generator=ref) for _ in range(2)]).tolist()
        result["ref"] = [order[i:i + 2] for i in range(0, 8, 2)]
    """, "import torch, brats", cap=128 << 20)
    assert got["status"] == "ok", got
    assert got["result"]["len"] == 10 ** 9 and got["result"]["first"] == got["result"]["ref"]


# ----------------------------------------------------------------------------------------------- config keys
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_cases")
    _write_cases(root, n=3, size=20)
    return root


@pytest.mark.parametrize("item,key", [
    ("width=1000", "width"), ("width=NaN", "width"), ("crop_size=100000", "crop_size"), ("crop_size=1e5", "crop_size"),
    ("device=meta", "device"), ("split_ratios=[NaN,0.1,0.2]", "split_ratios"), ("split_ratios=[0,0,0]", "split_ratios"),
    ("seed=-1", "seed"), ("seed=1e23", "seed"), ("seed=100000000000", "seed"), ("modalities=[]", "modalities"),
    ("modalities=[\"flair\",\"flair\"]", "modalities"), ("lr=Infinity", "lr"), ("lr=0", "lr"),
    ("sw_overlap=1.0", "sw_overlap"), ("steps_per_epoch=0", "steps_per_epoch"), ("num_workers=1000", "num_workers"),
    ("batch_size=1000000", "batch_size"), ("epochs=0", "epochs"), ("dice_smooth=-1", "dice_smooth"),
    ("sw_batch_size=0", "sw_batch_size"), ("backend=fast", "backend"), ("subsets_per_step=16", "subsets_per_step"),
    ("warmup_steps=100000", "warmup_steps"), ("data_root=", "data_root"),
])
def test_every_set_key_checked_at_start_up(tmp_path, capsys, item, key):
    out = tmp_path / "run"
    assert brats.main(["train", "--out", str(out), "--set", item]) == 2
    err = capsys.readouterr().err
    assert f"'{key}'" in err and "error:" in err and "Traceback" not in err
    assert not out.exists()  # refused before the folder, the data or the model were touched


def test_help_lists_keys_and_print_config(capsys):
    with pytest.raises(SystemExit):
        brats.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "sw_overlap" in text and "float in [0, 0.9]" in text and "width" in text and "float in (0, 4]" in text
    assert brats.main(["train", "--out", "unused", "--set", "width=0.25", "lr=0.01", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {**brats.DEFAULTS, "width": 0.25, "lr": 0.01} and not Path("unused").exists()


# ----------------------------------------------------------------------------------------------- damaged run files
@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A finished one-epoch joint run (joint: no engine involved; the resume checks are the recipe's)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    cfg = recipe.load_config(None, brats.DEFAULTS, {
        "data_root": str(data), "crop_size": 16, "batch_size": 1, "width": 0.25, "epochs": 2, "steps_per_epoch": 1,
        "cache": True, "sw_overlap": 0.0, "gmd": False, "subsets_per_step": 2})
    brats.train(cfg, run, stop_after_epochs=1, progress=False)
    return run, cfg


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


@pytest.mark.parametrize("edit,why", [
    (lambda ck: ck.update(epoch=10 ** 6), r"epoch 1000000 is not in 0\.\.2"),
    (lambda ck: ck.update(step=7), r"step 7 is not epoch 1 x 1"),
    (lambda ck: ck["model"].pop(next(iter(ck["model"]))), r"Missing key"),
    (lambda ck: ck.update(history="oops"), r"history does not hold one record per epoch"),
    (lambda ck: ck.pop("step_state"), r"KeyError: 'step_state'"),
    (lambda ck: ck.update(generators={"data": torch.zeros(3, dtype=torch.uint8)}), r"\(\w+Error"),
    (lambda ck: ck.update(rng={"python": 1}), r"ValueError"),
    (lambda ck: ck.update(best_epoch=5, best_score=1.0), r"best epoch 5"),
])
def test_tampered_checkpoint_named(trained, tmp_path, edit, why):
    run, cfg = trained
    run = _copy(run, tmp_path)
    ck = load_checkpoint(run / "last.pt")
    edit(ck)
    save_checkpoint(run / "last.pt", **ck)
    with pytest.raises(ValueError, match=rf"(?s){run / 'last.pt'} is damaged or was edited .*{why}"):
        brats.train(cfg, run, resume=True, progress=False)


def test_damaged_run_files_on_resume_named(trained, tmp_path):
    run, cfg = trained
    run = _copy(run, tmp_path)
    (run / "monitor.csv").write_text("step,skipped\nnot-a-number,0\n")
    with pytest.raises(ValueError, match=rf"{run / 'monitor.csv'} \(the run's dominance monitor CSV\) is damaged"):
        brats.train(cfg, run, resume=True, progress=False)
    (run / "monitor.csv").unlink()
    (run / "config.json").write_text('{"lr": ')
    with pytest.raises(ValueError, match=rf"{run / 'config.json'} \(the run's settings\) is damaged"):
        brats.train(cfg, run, resume=True, progress=False)
    # The command line reads the run's config.json itself on --resume: the error names it, without a traceback.
    assert brats.main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2


def test_non_empty_out_refused_without_traceback(trained, tmp_path, capsys):
    run, _ = trained
    assert brats.main(["train", "--out", str(run), "--set", "width=0.25", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite" in err and "Traceback" not in err


def test_phantom_refuses_a_non_empty_out(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert brats.main(["phantom", "--out", str(tmp_path), "--n", "1", "--size", "16"]) == 2
    assert "is not empty (holds keep.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert brats.main(["phantom", "--out", str(tmp_path), "--n", "1", "--size", "16", "--overwrite"]) == 0
    assert len(find_cases(tmp_path)) == 1 and (tmp_path / "keep.txt").read_text() == "mine"


def test_full_disk_checkpoint_error_names_the_file(tmp_path):
    # RLIMIT_FSIZE makes every write beyond 64 KiB fail (EFBIG) as a full disk would (ENOSPC).
    target = tmp_path / "run" / "last.pt"
    got = _child(f"""
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
        save_checkpoint({str(target)!r}, model={{"w": torch.zeros(1 << 20)}})
        result = {{"error": None}}
    """, "import torch\nfrom gmd_ext.io import save_checkpoint")
    assert got["status"] == "ok", got
    assert got["result"]["error"] == "OSError", got
    assert str(target) in got["result"]["msg"]
    assert not target.exists() and not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]


def test_dominance_subcommand_redraws_from_the_csv(tmp_path, data, capsys):
    run = tmp_path / "gmd"
    cfg = recipe.load_config(None, brats.DEFAULTS, {
        "data_root": str(data), "crop_size": 16, "batch_size": 1, "width": 0.25, "epochs": 1, "steps_per_epoch": 2,
        "cache": True, "sw_overlap": 0.0, "subsets_per_step": 3})
    brats.train(cfg, run, progress=False)
    assert brats.main(["dominance", "--run", str(run)]) == 2  # dominance.png exists: not replaced silently
    assert "dominance.png exists" in capsys.readouterr().err
    assert brats.main(["dominance", "--run", str(run), "--out", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"


def test_mosi_one_run_per_out_and_errors_without_traceback(tmp_path):
    out = tmp_path / "mosi"
    argv = ["--synthetic", "--synthetic-n", "8", "4", "4", "--synthetic-dims", "4", "2", "3", "--epochs", "1",
            "--hidden", "4", "--no-progress", "--out", str(out)]
    holder = _hold(out)
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "python" / "mosi.py"), *argv], capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"mosi.py: error: {out} is in use by another run (pid {holder.pid}" in proc.stderr
    assert "Traceback" not in proc.stderr and sorted(p.name for p in out.iterdir()) == [recipe.LOCK_NAME]


@pytest.mark.parametrize("argv,message", [
    (["phantom", "--out", "{tmp}/p", "--size", "100000"], "size must be an int >= 16 and <= 256"),
    (["phantom", "--out", "{tmp}/p", "--n", "0"], "n must be an int >= 1"),
    (["demo", "--quick", "--threads", "100000", "--out", "{tmp}/d"], "--threads must be an int in [0, 256]"),
    (["train", "--out", "{tmp}/t", "--stop-after-epochs", "-1", "--set", "data_root=\"{tmp}\""],
     "--stop-after-epochs must be an int >= 1"),
])
def test_cli_bounds_named(tmp_path, capsys, argv, message):
    assert brats.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_mosi_synthetic_size_bounded_at_start_up(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("mosi_recipe_hostile", ROOT / "python" / "mosi.py")
    mosi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mosi)
    with pytest.raises(ValueError, match=r"--synthetic-n / --synthetic-dims ask for a \d+\.\d GiB synthetic file"):
        mosi.main(["--synthetic", "--synthetic-n", "1000000000", "10", "10", "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()


def test_config_files_bounded_and_named(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(recipe.MAX_JSON_BYTES + 1)  # sparse: no disk used
    for path, why in ((deep, "RecursionError"), (big, "more than the 64 MiB")):
        assert brats.main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert f"config file {path} is not valid JSON" in err and why in err and "Traceback" not in err
