"""Hostile kernel caches, direct op calls with an argument on `meta`, and DS op arguments whose output cannot be
allocated (issue 21; a sibling of test_hostile_inputs.py).

The kernel cache is trusted only when it is the user's own (gmd_ext/_build.py): each planted library, symbolic
link, truncated library and foreign or shared folder below is refused with a message naming it, and nothing is
built. No test compiles anything: the build step is replaced by a copy of the checkout's library with the record
a build writes (write_build_record), which is all the cache logic sees of a build. Where a case could crash the
interpreter (loading a library) or exhaust memory (a huge output), it runs in a forked child under a memory cap
and a timeout, and a signal or a timeout is a failure.
"""
import json
import os
import shutil
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gmd_ext import _backend, _build
from gmd_ext.ops._registry import triton_ops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _children import CAP_BYTES, TIMEOUT_S, run_children  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534
# The library a fake build "produces": the checkout's own (any file serves where nothing is loaded).
REAL_LIBRARY = _backend.LIBRARY if _backend.CPP_LOADED else _build.__file__

def _run_children(setup: str, cases: dict[str, str], tmp: Path, pythonpath: Path = ROOT) -> dict:
    """run_children, and no case may end by a signal (SIGBUS, segfault), the memory cap or a timeout."""
    results = run_children(setup, cases, tmp, cap=CAP_BYTES, timeout=TIMEOUT_S, pythonpath=pythonpath)
    for name, r in results.items():
        assert r["status"] == "ok", f"{name}: {r}"
    return results


# ------------------------------------------------------------------------------------------------------------
# The kernel cache, in process: build_cached with a fake build step.

def _fake_build(src_dir, work, t0, log):
    """What a build leaves in its work folder (_build._run_build): lib/gmd_ext/ with the library and the record
    BuildExt writes, and the log."""
    lib_dir = Path(work) / "lib" / "gmd_ext"
    lib_dir.mkdir(parents=True)
    lib = shutil.copy(REAL_LIBRARY, lib_dir / "_C.abi3.so")
    _build.write_build_record(str(lib), {"torch": torch.__version__})
    (Path(work) / "build.log").write_text("fake build\n")
    return 0, str(Path(work) / "build.log")


class Cache:
    """A cache root in tmp_path (GMD_EXT_CACHE_DIR), the sources of one key, and build() = build_cached with
    the build step faked; `builds` counts the builds started."""

    def __init__(self, tmp_path: Path, monkeypatch, src: Path | None = None):
        self.root = tmp_path / "cache"
        self.src = src or tmp_path / "src"
        if src is None:
            self.src.mkdir()
            (self.src / "ops.cpp").write_text("// the sources only feed the cache key here\n")
        monkeypatch.setenv("GMD_EXT_CACHE_DIR", str(self.root))
        monkeypatch.setattr(_build, "_run_build", self._count_build)
        self.key = _build.cache_key(str(self.src))
        self.folder = self.root / self.key
        self.lock = self.root / f"{self.key}.lock"
        self.builds = 0

    def _count_build(self, *args):
        self.builds += 1
        return _fake_build(*args)

    def build(self) -> str:
        with open(os.devnull, "w") as log:
            path, fd = _build.build_cached(str(self.src), log=log)
        os.close(fd)
        return path

    @property
    def library(self) -> Path:
        return self.folder / "gmd_ext" / "_C.abi3.so"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    return Cache(tmp_path, monkeypatch)


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def _refused(cache: Cache, *named: Path) -> str:
    with pytest.raises(_build.CacheError) as e:
        cache.build()
    for p in named:
        assert str(p) in str(e.value), str(e.value)
    return str(e.value)


def _foreign(path: Path) -> None:
    """Make path another user's (the tests run as root here; elsewhere the cases that need it skip)."""
    if os.geteuid() != 0:
        pytest.skip("making a folder another user's needs root")
    os.chown(path, NOBODY, NOBODY)


def test_new_cache_is_private_and_reused(cache):
    lib = cache.build()
    assert lib == str(cache.library) and cache.builds == 1
    assert _mode(cache.root) == 0o700 and _mode(cache.folder) == 0o700 and _mode(cache.lock) == 0o600
    record = json.loads((cache.folder / "gmd_ext" / _build.BUILD_INFO_FILE).read_text())
    assert record["size"] == cache.library.stat().st_size and len(record["sha256"]) == 64
    assert cache.build() == lib and cache.builds == 1  # loaded from the cache, checked, not rebuilt


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_shared_cache_root_is_refused(cache, mode):
    cache.root.mkdir()
    os.chmod(cache.root, mode)
    msg = _refused(cache, cache.root)
    assert "writable by" in msg and "GMD_EXT_CACHE_DIR" in msg
    assert cache.builds == 0 and not cache.lock.exists()


def test_cache_root_that_cannot_be_created_is_named(cache, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("GMD_EXT_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    msg = _refused(cache, tmp_path / "a_file" / "cache")
    assert "cannot create" in msg and cache.builds == 0


def test_foreign_cache_root_is_refused(cache, monkeypatch):
    if os.geteuid() == 0:
        cache.root.mkdir(mode=0o700)
        _foreign(cache.root)
        root = cache.root
    else:  # the root folder is another user's (root's), private or not
        root = Path("/")
        monkeypatch.setenv("GMD_EXT_CACHE_DIR", "/")
    msg = _refused(cache, root)
    assert f"owned by uid {root.stat().st_uid}" in msg and cache.builds == 0


def test_library_planted_in_a_shared_cache_is_not_loaded(cache):
    # An attacker who can write the cache folder puts a library (and a matching record) where the key says.
    cache.build()
    os.chmod(cache.root, 0o777)
    _refused(cache, cache.root)
    os.chmod(cache.root, 0o700)
    os.chmod(cache.folder, 0o777)
    _refused(cache, cache.folder)
    os.chmod(cache.folder, 0o700)
    _foreign(cache.folder)
    msg = _refused(cache, cache.folder)
    assert f"owned by uid {NOBODY}" in msg


def test_library_without_its_build_record_is_not_loaded(cache):
    # A library where no build of ours put it: in a private folder, but without the record a build writes.
    (cache.folder / "gmd_ext").mkdir(parents=True)
    os.chmod(cache.root, 0o700)
    os.chmod(cache.folder, 0o700)
    shutil.copy(REAL_LIBRARY, cache.library)
    msg = _refused(cache, cache.library, cache.folder)
    assert "no valid build record" in msg and "delete its folder to rebuild" in msg and cache.builds == 0


def test_replaced_or_truncated_library_is_not_loaded(cache):
    cache.build()
    data = cache.library.read_bytes()
    cache.library.write_bytes(data[: len(data) // 2])
    msg = _refused(cache, cache.library, cache.folder)
    assert "truncated or replaced" in msg and "delete its folder to rebuild" in msg
    cache.library.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit changed
    msg = _refused(cache, cache.library)
    assert "another SHA-256" in msg
    os.remove(cache.library)
    os.symlink(REAL_LIBRARY, cache.library)  # a link to the right bytes is still not the built file
    _refused(cache, cache.library)
    assert cache.builds == 1


def test_symlinked_build_folder_is_refused(cache, tmp_path):
    cache.build()
    elsewhere = tmp_path / "elsewhere"
    shutil.move(cache.folder, elsewhere)
    os.symlink(elsewhere, cache.folder)
    msg = _refused(cache, cache.folder)
    assert "not a folder" in msg and cache.builds == 1


def test_symlinked_lock_is_refused_and_its_target_untouched(cache, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    cache.root.mkdir(mode=0o700)
    os.symlink(target, cache.lock)
    msg = _refused(cache, cache.lock)
    assert "symbolic link" in msg
    assert target.read_text() == "keep me" and cache.builds == 0
    os.remove(cache.lock)
    os.link(target, cache.lock)  # a hard link to the user's own file is locked, never truncated
    cache.build()
    assert target.read_text() == "keep me"


def test_work_folder_of_a_killed_build_is_removed(cache):
    # The importer is killed (SIGKILL, no `finally`) mid-build; the next import removes its work folder.
    started = cache.root / "started"

    def hang(src_dir, work, t0, log):
        (Path(work) / "partial.o").write_bytes(b"\0" * 100)
        started.write_text(work)
        time.sleep(60)

    pid = os.fork()
    if pid == 0:
        try:
            _build._run_build = hang
            cache.build()
        finally:
            os._exit(1)
    t0 = time.monotonic()
    while not started.exists() and time.monotonic() - t0 < 20:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    work = Path(started.read_text())
    assert work.is_dir() and work.name.startswith(f".{cache.key}.{pid}.")
    # A running build of another key (its lock held) keeps its work folder; an abandoned one of another key goes.
    other, held = "torch-0.0-0123456789abcdef", "torch-0.0-fedcba9876543210"
    (cache.root / f".{other}.1.abc").mkdir()
    (cache.root / f".{held}.1.abc").mkdir()
    lock = _build._open_lock(str(cache.root / f"{held}.lock"))
    try:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)
        cache.build()
    finally:
        os.close(lock)
    assert not work.exists() and not (cache.root / f".{other}.1.abc").exists()
    assert (cache.root / f".{held}.1.abc").is_dir() and cache.builds == 1


@pytest.mark.skipif(not _backend.CPP_LOADED, reason="loads the checkout's built library")
def test_the_library_loaded_is_the_one_checked(cache, tmp_path):
    # The library is loaded through the descriptor its check read: replaced on disk after the check (a race on a
    # parent folder others can rename), the checked bytes still run, and the process is not handed the new file.
    cache.build()
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"\0" * 64)
    code = textwrap.dedent(f"""
        import os, sys, torch
        build = sys.modules["gmd_ext._build"]
        os.environ["GMD_EXT_CACHE_DIR"] = {str(cache.root)!r}
        path, fd = build.build_cached({str(cache.src)!r})
        os.replace({str(junk)!r}, path)
        module = build.load_library(path, fd)
        result = [module.__file__, torch.ops.gmd_ext.gram(torch.ones(2, 3)).tolist()]
    """)
    res = _run_children(_IMPORT_SETUP.format(build=_build.__file__), {"swapped": code}, tmp_path)["swapped"]
    assert res["type"] is None, res
    assert res["result"] == [str(cache.library), [[3.0, 3.0], [3.0, 3.0]]], res
    assert cache.library.read_bytes() == b"\0" * 64  # the swap happened


def _installed_copy(tmp_path: Path) -> Path:
    """The package as a wheel installs it without a library (pure Python + the sources in _csrc), in a folder of
    its own: no setup.py beside it, so it builds on demand (gmd_ext/_backend.py)."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "gmd_ext", site / "gmd_ext", ignore=shutil.ignore_patterns(
        "_C*", _build.BUILD_INFO_FILE, "_csrc", "__pycache__"))
    (site / "gmd_ext" / "_csrc").mkdir()
    (site / "gmd_ext" / "_csrc" / "ops.cpp").write_text("// the sources only feed the cache key here\n")
    return site


# The runner loads the copy's _build with a build step that fails loudly, so no case can start a real build.
_IMPORT_SETUP = textwrap.dedent("""
    import importlib.util
    import torch
    # An editable install of the checkout maps gmd_ext.* to the checkout through a finder of its own.
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    spec = importlib.util.spec_from_file_location("gmd_ext._build", {build!r})
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    def _no_build(*args):
        raise SystemExit("a real build was started")
    build._run_build = _no_build
    sys.modules["gmd_ext._build"] = build
""")
_IMPORT_CASE = textwrap.dedent("""
    import os
    os.environ["GMD_EXT_CACHE_DIR"] = {root!r}
    import gmd_ext
    from gmd_ext import _backend
    result = {{"package": gmd_ext.__file__, "loaded": _backend.CPP_LOADED, "reason": _backend.CPP_REASON,
               "library": _backend.LIBRARY}}
""")


@pytest.mark.skipif(not _backend.CPP_LOADED, reason="loads the checkout's built library from a cache")
def test_import_of_an_installed_package_loads_only_a_trusted_cache(tmp_path, monkeypatch):
    # `import gmd_ext` of an installed package, each in a forked child: a good cache loads; a truncated library
    # (mapped past its end it would be a SIGBUS) and a library in a shared cache are refused with their folder.
    site = _installed_copy(tmp_path)
    caches = {}
    for name in ("good", "truncated", "shared"):
        caches[name] = Cache(tmp_path / name, monkeypatch, src=site / "gmd_ext" / "_csrc")
        caches[name].build()
    lib = caches["truncated"].library
    lib.write_bytes(lib.read_bytes()[:4096])
    os.chmod(caches["shared"].root, 0o777)
    monkeypatch.delenv("GMD_EXT_CACHE_DIR")
    cases = {name: _IMPORT_CASE.format(root=str(c.root)) for name, c in caches.items()}
    res = _run_children(_IMPORT_SETUP.format(build=str(site / "gmd_ext" / "_build.py")), cases, tmp_path,
                        pythonpath=site)
    for name, r in res.items():
        assert r["type"] is None, f"{name}: {r}"
        assert r["result"]["package"] == str(site / "gmd_ext" / "__init__.py"), r
    good = res["good"]["result"]
    assert good["loaded"] and good["library"] == str(caches["good"].library), good
    truncated = res["truncated"]["result"]
    assert not truncated["loaded"] and str(lib) in truncated["reason"], truncated
    assert "truncated or replaced" in truncated["reason"] and "delete its folder to rebuild" in truncated["reason"]
    shared = res["shared"]["result"]
    assert not shared["loaded"] and str(caches["shared"].root) in shared["reason"], shared
    assert "writable by group and others" in shared["reason"], shared


# ------------------------------------------------------------------------------------------------------------
# Direct op calls: every fake refuses tensor arguments on several devices.

def _op_examples() -> dict:
    """Valid CPU arguments of every gmd_ext op (tiny shapes)."""
    K, N = 3, 8
    G, c, shared = torch.randn(K, N), torch.randn(K), torch.rand(N) > 0.5
    gram = G @ G.T
    perms = torch.stack([torch.randperm(K) for _ in range(K)])
    A = torch.randn(2, K)
    B, M, C, S = 2, 3, 4, 5
    x, present = torch.randn(B, M, C, S), torch.tensor([[True, False, True], [True, True, False]])
    w, b = torch.randn(M, C), torch.randn(M, C)
    index = torch.tensor([0, 3, 4, 2])  # pairs b * M + m, modality-major
    counts = [2, 1, 1]
    cw, cb = torch.randn(M, 2, C, 3), torch.randn(M, 2)
    conv = ([1], [1], [1])
    mean, rstd = torch.zeros(B, M, 2), torch.ones(B, M, 2)
    gn_bwd = (torch.randn_like(x), x, w, b, present, mean, rstd, 2, "relu")
    rows = torch.randn(4, C, S)
    return {
        "gram": (G,), "gram_triton": (G,),
        "pcgrad_coefficients": (gram, perms), "pcgrad_coefficients_triton": (gram, perms),
        "combine": (G, c, shared, 0.5, 1.0), "combine_triton": (G, c, shared, 0.5, 1.0),
        "combine_rows": (G, A), "combine_rows_triton": (G, A),
        "pack_pairs": (x.flatten(0, 1), index),
        "scatter_pairs": (x.flatten(0, 1)[:4], index, B * M),
        "masked_conv": (x, cw, cb, index, counts, *conv),
        "masked_conv_backward": (torch.randn(B, M, 2, S), x, cw, cb, index, counts, *conv, [True, True, True]),
        "modality_group_norm_fwd": (x, w, b, present, 2, 1e-5, "relu"),
        "modality_group_norm_fwd_triton": (x, w, b, present, 2, 1e-5, "relu"),
        "modality_group_norm_bwd": (*gn_bwd, [True, True, True]),
        "modality_group_norm_bwd_triton": gn_bwd,
        "conv_rows_backward": (torch.randn(4, 2, S), rows, cw[0], *conv, True),
    }


def _registered_ops() -> list[str]:
    triton_ops()  # the Triton ops register on first use
    return sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("gmd_ext::"))


def test_every_op_refuses_one_argument_on_meta():
    # The dispatcher runs an op's fake as soon as one argument is on meta: without the device check it returned
    # memory allocated like the CPU arguments and never written. Every registered gmd_ext op, found by name, so
    # a new op without an example here fails this test.
    examples = _op_examples()
    ops = _registered_ops()
    assert "gram" in ops or not _backend.CPP_LOADED
    missing = [op for op in ops if op not in examples]
    assert not missing, f"add example arguments for {missing}"
    for op in ops:
        fn, args = getattr(torch.ops.gmd_ext, op), examples[op]
        fn(*args)  # the example is valid: the errors below come from the meta argument alone
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        for i in tensors if len(tensors) > 1 else ():  # (one tensor on meta is all of them: the next case)
            moved = list(args)
            moved[i] = args[i].to("meta")
            with pytest.raises(ValueError, match=rf"gmd_ext::{op}: all tensor arguments must be on one device"):
                fn(*moved)
        out = fn(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])  # all on meta: shapes only
        outs = out if isinstance(out, tuple) else (out,)
        assert all(o is None or o.device.type == "meta" for o in outs), op


# ------------------------------------------------------------------------------------------------------------
# DS op arguments that cannot be served: each a clear error naming the argument, in a child under a memory cap.

_OPS_SETUP = "import torch\nimport gmd_ext\nfrom gmd_ext.ops import ds_ops\n"
_OP_CASES = {
    "masked_conv_huge_padding": (
        "import torch, gmd_ext\n"
        "gmd_ext.masked_conv(torch.zeros(2, 2, 3, 5), torch.zeros(4, 3, 3), padding=10**12)",
        "ValueError", ["padding=(1000000000000,)", "128000000000192 bytes", "physical memory"]),
    "masked_conv_huge_padding_3d": (
        "import torch, gmd_ext\n"
        "gmd_ext.masked_conv(torch.zeros(1, 1, 1, 2, 2, 2), torch.zeros(1, 1, 1, 1, 1), padding=(0, 10**6, 10**6))",
        "ValueError", ["padding=(0, 1000000, 1000000)", "bytes"]),
    "masked_conv_no_modality_per_modality_weight": (
        "import torch, gmd_ext\n"
        "gmd_ext.masked_conv(torch.zeros(2, 0, 3, 5), torch.zeros(0, 4, 3, 3))",
        "ValueError", ["x must have at least one modality", "M = x.shape[1]"]),
    "masked_conv_no_modality_shared_weight": (
        "import torch, gmd_ext\n"
        "gmd_ext.masked_conv(torch.zeros(2, 0, 3, 5), torch.zeros(4, 3, 3))",
        "ValueError", ["x must have at least one modality"]),
    "group_norm_no_modality": (
        "import torch, gmd_ext\n"
        "gmd_ext.modality_group_norm(torch.zeros(2, 0, 4, 5), torch.zeros(0, 4), torch.zeros(0, 4), num_groups=2,"
        " backend='torch')",
        "ValueError", ["x must have at least one modality"]),
    "masked_conv_large_but_possible_padding": (  # a large padding that fits still runs
        "import torch, gmd_ext\n"
        "result = list(gmd_ext.masked_conv(torch.ones(1, 1, 1, 3), torch.ones(1, 1, 1), padding=1000).shape)",
        None, [[1, 1, 1, 2003]]),
}


def test_ds_op_arguments_that_cannot_be_served(tmp_path):
    res = _run_children(_OPS_SETUP, {name: code for name, (code, _, _) in _OP_CASES.items()}, tmp_path)
    for name, (_, etype, needles) in _OP_CASES.items():
        r = res[name]
        assert r["type"] == etype, f"{name}: {r}"
        for needle in needles:
            assert (needle in r["msg"]) if etype else r["result"] == needle, f"{name}: {r}"


@pytest.mark.skipif(not _backend.CPP_LOADED, reason="the C++ op")
def test_direct_op_calls_with_outputs_that_cannot_fit_name_the_argument(tmp_path):
    # The C++ ops check before allocating (csrc/ds_common.h check_output_fits), so a direct call bypassing the
    # Python front gets the same kind of error, not an allocator's that names no argument.
    cases = {
        "scatter": "import torch\n"
                   "torch.ops.gmd_ext.scatter_pairs(torch.zeros(2, 3), torch.tensor([0, 1]), 10**15)",
        "conv": "import torch\n"
                "torch.ops.gmd_ext.masked_conv(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 3), None,\n"
                "    torch.tensor([0]), [1], [1], [10**12], [1])",
    }
    res = _run_children(_OPS_SETUP, cases, tmp_path)
    assert res["scatter"]["type"] == "ValueError", res
    assert "num_pairs = 1000000000000000" in res["scatter"]["msg"] and "bytes" in res["scatter"]["msg"], res
    assert res["conv"]["type"] == "ValueError", res
    assert "padding [1000000000000]" in res["conv"]["msg"] and "bytes" in res["conv"]["msg"], res
