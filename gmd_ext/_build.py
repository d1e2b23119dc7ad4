"""How gmd_ext._C is built: the one definition of its sources, flags and build record, used by setup.py (the
ahead-of-time build) and by the on-demand build of an installed package against the running torch.

A wheel built where torch is not importable (`pip install .` with build isolation: the isolated build environment
holds no torch) is pure Python and carries the C++/CUDA sources in gmd_ext/_csrc. Its first import compiles them
once against the torch that is running and caches the result in a folder of GMD_EXT_CACHE_DIR (default
~/.cache/gmd_ext) keyed by the sources, the torch build, the Python ABI and the build switches, so another torch
gets its own build. `pip install --no-build-isolation .` (or `-e .`) builds ahead of time instead.

The cache is trusted only when it is the user's own (`import gmd_ext` runs the library it finds there): the cache
folder and every build folder in it must be owned by the user and not writable by group or others (new ones are
created 0700), and a library is loaded only when its size and SHA-256 match the record its own build wrote beside
it. Anything else is refused with a message naming the folder — never skipped for another folder, so what runs is
always where the user said. Lock and temporary files are opened without following symbolic links.

This module imports nothing from gmd_ext (setup.py loads it by path and the on-demand build runs it as a script in
a subprocess) and imports torch only inside functions.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time

NAME = "gmd_ext._C"
BUILD_INFO_FILE = "_build_info.json"
# Architectures built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible at build time; .ci/compile_cuda.sh
# compiles exactly this list.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
# Build switches that change the result of a build; part of the on-demand cache key.
SWITCHES = ("GMD_EXT_FORCE_CPU", "GMD_EXT_FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CXX", "CC")


def flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def torch_cxx_standard() -> int | None:
    """The C++ standard the installed torch's headers require, as torch's own CMake package declares it (the
    CXX_STANDARD of its `torch` target; 20 for torch 2.13 and 2.14), or None when it does not say, in which case
    torch.utils.cpp_extension adds its own default."""
    import torch.utils

    path = os.path.join(torch.utils.cmake_prefix_path, "Torch", "TorchConfig.cmake")
    try:
        with open(path) as f:
            match = re.search(r"\bCXX_STANDARD\s+(\d+)", f.read())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def want_cuda() -> bool:
    """Build the CUDA sources? Gated on a CUDA toolkit and a CUDA build of torch, never on a visible GPU (build
    hosts often have none). GMD_EXT_FORCE_CPU=1: never. GMD_EXT_FORCE_CUDA=1: required, an error if impossible."""
    import torch
    from torch.utils import cpp_extension as ce

    if flag("GMD_EXT_FORCE_CPU"):
        return False
    # (cpp_extension leaves CUDA_HOME None under a CPU build of torch, whatever toolkit is installed.)
    toolkit, cuda_torch = ce.CUDA_HOME is not None, torch.version.cuda is not None
    if flag("GMD_EXT_FORCE_CUDA") and not (toolkit and cuda_torch):
        why = ("no CUDA toolkit was found (set CUDA_HOME)" if cuda_torch else
               f"torch {torch.__version__} is a CPU build, which cannot load a library linked against torch's CUDA "
               "libraries; install a CUDA build of torch (a compile-only check of the CUDA sources against this "
               "torch's headers is `bash .ci/compile_cuda.sh` in a checkout)")
        raise RuntimeError(f"GMD_EXT_FORCE_CUDA=1 requires building the CUDA kernels, but {why}")
    return toolkit and cuda_torch


def compile_flags() -> dict[str, list[str]]:
    """The compiler flags of every build ({"cxx": [...], "nvcc": [...]}, before torch's own), shared with
    .ci/compile_cuda.sh."""
    std = torch_cxx_standard()
    std_flags = [f"-std=c++{std}"] if std else []
    # -g0 overrides the -g inherited from Python's CFLAGS: measured 37 s -> 28 s for gram_cpu.cpp and a
    # 4.4 MB -> 0.17 MB library.
    # (torch adds -DPy_LIMITED_API itself for py_limited_api=True.)
    cxx = ["-O3", "-g0", *std_flags, "-fopenmp"]
    # No --use_fast_math: it flushes fp32 subnormals to zero, so a gradient row with |g| < 1e-19 would get a zero
    # norm on CUDA and be skipped as zero-norm, unlike on the CPU (docs/design.md §3: one semantics per op).
    nvcc = ["-O3", *std_flags]
    return {"cxx": cxx, "nvcc": nvcc}


def extension(src_dir: str):
    """The gmd_ext._C extension over the sources in src_dir (csrc/ of a checkout, gmd_ext/_csrc when installed):
    C++ CPU kernels always, CUDA kernels when want_cuda()."""
    import torch
    from torch.utils import cpp_extension as ce

    with_cuda = want_cuda()
    sources = sorted(glob.glob(os.path.join(src_dir, "*.cpp")) + glob.glob(os.path.join(src_dir, "cpu", "*.cpp")))
    flags = compile_flags()
    define_macros = []
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(src_dir, "cuda", "*.cu")))
        define_macros.append(("GMD_EXT_WITH_CUDA", None))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    return (ce.CUDAExtension if with_cuda else ce.CppExtension)(
        name=NAME, sources=sources, include_dirs=[os.path.abspath(src_dir)], define_macros=define_macros,
        extra_compile_args=flags, extra_link_args=["-fopenmp"], py_limited_api=True)


def build_record(ext) -> dict:
    """What _backend checks at import: the torch the library was built for, CUDA, architectures, flags."""
    import torch

    with_cuda = ("GMD_EXT_WITH_CUDA", None) in ext.define_macros
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if with_cuda else None,
        "with_cuda": with_cuda,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "cxx_flags": ext.extra_compile_args["cxx"],
        "platform": platform.platform(),
    }


def _write_json(path: str, data: dict) -> None:
    # tmp (mkstemp: O_EXCL, never follows a planted name) + os.replace, as gmd_ext.io.atomic_write does; that
    # module cannot be imported here (see the docstring). Readable as a plain open() would make it.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _sha256_of_fd(fd: int) -> str:
    h = hashlib.sha256()
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def write_build_record(library: str, record: dict) -> None:
    """Write `record` plus the built library's file name, size and SHA-256 as the build record next to it
    (checked before an on-demand build is loaded: cached_library)."""
    fd = os.open(library, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size, sha256 = os.fstat(fd).st_size, _sha256_of_fd(fd)
    finally:
        os.close(fd)
    _write_json(os.path.join(os.path.dirname(library), BUILD_INFO_FILE),
                {**record, "library": os.path.basename(library), "size": size, "sha256": sha256})


def build_ext_class():
    """torch's BuildExtension, writing the build record next to each built library only once the build
    succeeded (a failed build leaves no record behind, in the source tree or elsewhere)."""
    from torch.utils import cpp_extension as ce

    class BuildExt(ce.BuildExtension):
        def run(self):
            super().run()
            for ext in self.extensions:
                write_build_record(self.get_ext_fullpath(ext.name), build_record(ext))

    return BuildExt


# ---- on-demand build of an installed package ------------------------------------------------------------------

class CacheError(RuntimeError):
    """The kernel cache cannot be trusted or used: the message names the file or folder and the fix."""


def cache_root() -> str:
    """The kernel cache folder: GMD_EXT_CACHE_DIR, else $XDG_CACHE_HOME/gmd_ext, else ~/.cache/gmd_ext."""
    if os.environ.get("GMD_EXT_CACHE_DIR"):
        return os.path.abspath(os.environ["GMD_EXT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gmd_ext")


def cache_key(src_dir: str) -> str:
    """A folder name that changes with the sources, the torch build, the Python ABI and the build switches."""
    import torch

    h = hashlib.sha256()
    with open(__file__, "rb") as f:  # the flags are defined here
        h.update(f.read())
    for path in sorted(glob.glob(os.path.join(src_dir, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            h.update(os.path.relpath(path, src_dir).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    h.update(json.dumps([torch.__version__, torch.version.cuda, bool(torch._C._GLIBCXX_USE_CXX11_ABI),
                         sys.implementation.cache_tag, platform.machine(),
                         {k: os.environ.get(k) for k in SWITCHES}]).encode())
    return f"torch-{torch.__version__}-{h.hexdigest()[:16]}"


def library_in(folder: str) -> str | None:
    """The built gmd_ext._C library in folder/gmd_ext/, if any (unchecked: see cached_library)."""
    found = sorted(glob.glob(os.path.join(folder, "gmd_ext", "_C.*so")))
    return found[0] if found else None


def _untrusted(st: os.stat_result, *, mode: bool = True) -> str | None:
    """Why a file or folder with this status is not the user's own (mode: nor private), or None."""
    why = []
    if st.st_uid != os.geteuid():
        why.append(f"owned by uid {st.st_uid}, not by you (uid {os.geteuid()})")
    if mode and st.st_mode & 0o022:
        who = " and ".join(w for bit, w in ((0o020, "group"), (0o002, "others")) if st.st_mode & bit)
        why.append(f"writable by {who} (mode {stat.S_IMODE(st.st_mode):o})")
    return " and ".join(why) or None


# Not "chmod 700": a folder others could write may already hold a planted library with a matching record.
_FIX = ("delete it if it is yours (the next import rebuilds into a new private folder), or set GMD_EXT_CACHE_DIR to "
        "a folder only you can write (it is created 0700); a shared cache is never trusted")


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# O_NONBLOCK: a FIFO put in a file's place must not hang the import (harmless on regular files).
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _open_private_dir(name: str, shown: str, what: str, *, dir_fd: int | None = None, follow: bool = False) -> int:
    """Open the folder `name` (relative to dir_fd when given; `shown` is its full path, for messages) and check on
    the open descriptor that it is a folder of the user's that group and others cannot write: anyone who can write
    it can plant a library that `import gmd_ext` runs. Returns the descriptor, so that what is opened next
    relative to it lies in the folder checked, whatever is renamed meanwhile. follow: the cache root may be a
    symbolic link (to a private folder); the build folders inside it may not. A missing folder raises
    FileNotFoundError; anything else refused, CacheError."""
    try:
        fd = os.open(name, _DIR | (0 if follow else os.O_NOFOLLOW), dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise CacheError(f"gmd_ext: the kernel {what} {shown} is not a folder (a symbolic link or a file was put "
                             f"in its place), so nothing in it is loaded; {_FIX}") from e
        raise CacheError(f"gmd_ext: cannot open the kernel {what} {shown} ({e})") from e
    why = _untrusted(os.fstat(fd))
    if why:
        os.close(fd)
        raise CacheError(f"gmd_ext: the kernel {what} {shown} is {why}: another user could plant a library in it "
                         f"that `import gmd_ext` would run, so it is not used; {_FIX}")
    return fd


def _private_root(root: str) -> None:
    """Create the cache root 0700 if it is missing (its parents as usual); check it either way."""
    try:
        if not os.path.lexists(root):
            os.makedirs(os.path.dirname(root), exist_ok=True)
            try:
                os.mkdir(root, 0o700)
            except FileExistsError:
                pass  # made by a concurrent import: checked below like any other
    except OSError as e:
        raise CacheError(f"gmd_ext: cannot create the kernel cache folder {root} ({e}); set GMD_EXT_CACHE_DIR to a "
                         f"folder you can write") from e
    try:
        os.close(_open_private_dir(root, root, "cache folder", follow=True))
    except FileNotFoundError as e:  # a dangling link
        raise CacheError(f"gmd_ext: the kernel cache folder {root} does not exist ({e})") from e


def _open_lock(path: str) -> int:
    """Open (create 0600) a lock file without following a symbolic link and without truncating: a planted link
    must neither redirect nor clobber its target. Returns the descriptor."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        what = "is a symbolic link, which is never followed" if e.errno == errno.ELOOP else f"cannot be opened ({e})"
        raise CacheError(f"gmd_ext: the kernel build lock {path} {what}; delete it to build or load the kernels") from e
    st = os.fstat(fd)
    why = "not a regular file" if not stat.S_ISREG(st.st_mode) else _untrusted(st, mode=False)
    if why:
        os.close(fd)
        raise CacheError(f"gmd_ext: the kernel build lock {path} is {why}; delete it to build or load the kernels")
    return fd


def cached_library(root: str, build: str) -> tuple[str, int] | None:
    """The library of the build folder `build` (a path relative to the cache folder `root`), checked, with a
    descriptor open on it; None when the folder or its library is missing (an interrupted copy).

    Checked: every folder from `root` down to `build` is the user's and not group/world writable (opened one by one
    without following links, checked on the descriptor), and the library is a regular file whose size and SHA-256
    match the record its build wrote beside it — before it is loaded, as a truncated library is mapped past its
    end and kills the process with SIGBUS. Load it through the descriptor (`load_library`): the bytes checked are
    the bytes that run, whatever is renamed meanwhile. The caller closes it. Raises CacheError otherwise."""
    folder = os.path.join(root, build)
    fix = f"delete its folder to rebuild: rm -r {folder}"
    with contextlib.ExitStack() as opened:
        def keep(fd: int) -> int:
            opened.callback(os.close, fd)
            return fd

        try:
            at, shown = keep(_open_private_dir(root, root, "cache folder", follow=True)), root
            for part in build.split(os.sep):
                shown = os.path.join(shown, part)
                at = keep(_open_private_dir(part, shown, "build folder", dir_fd=at))
            # Inside a private folder modes no longer matter (a umask of 002 makes these group-writable).
            sub = keep(os.open("gmd_ext", _DIR | os.O_NOFOLLOW, dir_fd=at))
            names = sorted(n for n in os.listdir(sub) if re.fullmatch(r"_C\..*so", n))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CacheError(f"gmd_ext: cannot read the kernel build folder {folder} ({e}); {fix}") from e
        if not names:
            return None
        lib = os.path.join(folder, "gmd_ext", names[0])
        try:
            with os.fdopen(os.open(BUILD_INFO_FILE, _FILE, dir_fd=sub)) as f:
                record = json.load(f)
            want = (str(record["library"]), int(record["size"]), str(record["sha256"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheError(f"gmd_ext: the cached gmd_ext._C ({lib}) has no valid build record "
                             f"({type(e).__name__}: {e}), so it is not loaded; {fix}") from e
        try:
            fd = os.open(names[0], _FILE, dir_fd=sub)
        except OSError as e:
            raise CacheError(f"gmd_ext: the cached gmd_ext._C ({lib}) cannot be opened ({e}); {fix}") from e
    st = os.fstat(fd)
    why = None if stat.S_ISREG(st.st_mode) else "not a regular file"
    if why is None and names[0] != want[0]:
        why = f"not the library its build recorded ({want[0]})"
    if why is None and st.st_size != want[1]:
        why = f"{st.st_size} bytes where its build recorded {want[1]} (truncated or replaced)"
    if why is None and _sha256_of_fd(fd) != want[2]:
        why = "of another SHA-256 than its build recorded (modified or replaced)"
    if why:
        os.close(fd)
        raise CacheError(f"gmd_ext: the cached gmd_ext._C ({lib}) is {why}, so it is not loaded; {fix}")
    return lib, fd


def load_library(path: str, fd: int | None = None):
    """Load the compiled library as the module gmd_ext._C (which registers the torch.ops.gmd_ext ops): through
    the open descriptor fd when given (/proc/self/fd/<fd>: exactly the file cached_library checked), else from
    path. Its __file__ is path either way."""
    import importlib.machinery
    import importlib.util

    where = f"/proc/self/fd/{fd}" if fd is not None and os.path.isdir("/proc/self/fd") else path
    loader = importlib.machinery.ExtensionFileLoader("gmd_ext._C", where)
    # (The extension loader dlopens spec.origin.)
    module = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("gmd_ext._C", loader, origin=where))
    loader.exec_module(module)
    module.__file__ = path
    sys.modules["gmd_ext._C"] = module
    return module


# A build's work folder: .<key>.<pid>.<random> (.<key>-<random> in earlier versions), removed when the build
# ends.
_WORK_FOLDER = re.compile(r"^\.(torch-.+-[0-9a-f]{16})[.-]")


def _remove_abandoned_work(root: str, key: str) -> None:
    """Delete the work folders of builds that were killed (the process died before its `finally`). A build holds
    its key's lock for as long as its work folder exists, so a work folder whose key lock is free is abandoned —
    exact, unlike a pid check, on a cache shared by several machines of the user. The caller holds `key`'s."""
    import fcntl

    for entry in os.scandir(root):
        m = _WORK_FOLDER.match(entry.name)
        if m is None or not entry.is_dir(follow_symlinks=False):
            continue
        if m.group(1) != key:
            try:
                fd = _open_lock(os.path.join(root, f"{m.group(1)}.lock"))
            except CacheError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # that build is running
            finally:
                os.close(fd)  # (closing releases the lock: it is taken only to test it)
        shutil.rmtree(entry.path, ignore_errors=True)


def build_cached(src_dir: str, log=None) -> tuple[str, int]:
    """gmd_ext._C built from src_dir against the running torch: the cached build, or a new one (a few minutes
    once; progress goes to `log`, default stderr), as (path, descriptor) from cached_library: checked to be the
    user's own and the library its build recorded; load it with load_library(path, fd), then close fd.
    Concurrent processes wait for the one that builds. Raises CacheError naming what is refused, or RuntimeError
    naming the build log when the build fails, now or in an earlier attempt."""
    import fcntl

    log = log or sys.stderr
    root = cache_root()
    key = cache_key(src_dir)
    final = os.path.join(root, key)
    _private_root(root)
    lock = _open_lock(os.path.join(root, f"{key}.lock"))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the OS if this process dies
        _remove_abandoned_work(root, key)
        found = cached_library(root, key)
        if found:
            return found
        failed_log = os.path.join(root, f"{key}.failed.log")
        if os.path.lexists(failed_log):
            raise RuntimeError(f"building the C++ kernels failed in an earlier attempt (log: {failed_log}); "
                               f"delete that log to retry")
        import torch

        print(f"gmd_ext: compiling the C++ kernels against torch {torch.__version__} (once, a few minutes; later "
              f"imports load the cached build from {final})", file=log, flush=True)
        t0 = time.perf_counter()
        work = tempfile.mkdtemp(prefix=f".{key}.{os.getpid()}.", dir=root)  # 0700
        try:
            rc, log_path = _run_build(src_dir, work, t0, log)
            built = os.path.join(work, "lib")
            if rc != 0 or library_in(built) is None:
                os.replace(log_path, failed_log)
                with open(failed_log) as f:
                    tail = "".join(f.readlines()[-15:])
                raise RuntimeError(f"building the C++ kernels failed (exit code {rc}; log: {failed_log}):\n{tail}")
            os.replace(log_path, os.path.join(built, "build.log"))
            os.chmod(built, 0o700)
            # The record was written by this build: a mismatch here is a broken build, refused like any other.
            checked = cached_library(root, os.path.join(os.path.basename(work), "lib"))
            if checked:
                os.close(checked[1])
            # (A folder without a library is an interrupted copy; one with a refused library was refused above.)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(built, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"gmd_ext: C++ kernels built in {time.perf_counter() - t0:.0f} s", file=log, flush=True)
        found = cached_library(root, key)
        if found is None:
            raise CacheError(f"gmd_ext: the kernel build folder {final} lost its library while it was built; "
                             f"import again to rebuild")
        return found
    finally:
        os.close(lock)


def _run_build(src_dir: str, work: str, t0: float, log) -> tuple[int, str]:
    """Run this file as a script in a subprocess (the build must not import gmd_ext, which is importing); echo one
    progress line per compiled source. Returns (exit code, path of the full log)."""
    log_path = os.path.join(work, "build.log")
    script = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    with open(log_path, "x") as out:  # in the fresh private work folder: a new file, never a planted one
        proc = subprocess.Popen([sys.executable, "-c", script, __file__, src_dir, os.path.join(work, "lib"),
                                 os.path.join(work, "tmp")], cwd=work, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        done = 0
        assert proc.stdout is not None  # (stdout=PIPE)
        for line in proc.stdout:
            out.write(line)
            # ninja's "[i/n] c++ ... -c <src>" once a source is compiled, or distutils' command before it is.
            src = re.search(r" -c (\S+\.(?:cpp|cu))\b", line)
            if src:
                done += 1
                print(f"gmd_ext:   {done}. {os.path.relpath(src.group(1), src_dir)} "
                      f"({time.perf_counter() - t0:.0f} s)", file=log, flush=True)
        return proc.wait(), log_path


def _main(src_dir: str, lib_dir: str, tmp_dir: str) -> None:
    from setuptools import setup

    setup(name="gmd_ext_kernels", ext_modules=[extension(src_dir)], cmdclass={"build_ext": build_ext_class()},
          script_args=["build_ext", "--build-lib", lib_dir, "--build-temp", tmp_dir])


if __name__ == "__main__":
    _main(*sys.argv[1:4])
