"""Hostile-input cases in forked children under a memory cap (RLIMIT_AS) and a timeout, for the test_hostile_*
files: a case must end in a result or an exception, never a signal, an exhausted machine or a hang.

One runner process runs the setup code once (imports cost seconds) and forks a child per case (a fork costs
milliseconds), so each child's limits are set after the imports and apply to its case alone.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAP_BYTES = 768 << 20  # address space a child may add on top of its runner's (after importing numpy/torch)
TIMEOUT_S = 30

_RUNNER = textwrap.dedent(r"""
    import json, os, resource, signal, sys, time
    setup, cases, cap, timeout = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    scope = globals()  # the setup and the cases see this runner's imports
    exec(setup, scope)
    results = {}
    for name, code, out in cases:
        pid = os.fork()
        if pid == 0:
            try:
                vm = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
                resource.setrlimit(resource.RLIMIT_AS, (vm + cap, vm + cap))
                signal.alarm(int(timeout))
                local = dict(scope)
                try:
                    exec(code, local)
                    res = {"type": None, "result": local.get("result")}
                except BaseException as e:
                    res = {"type": type(e).__name__, "msg": str(e)[:4000]}
                with open(out, "w") as f:
                    json.dump(res, f)
            finally:
                os._exit(0)
        t0 = time.monotonic()
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - t0 > timeout + 5:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = -1
                break
            time.sleep(0.01)
        if status == -1:
            results[name] = {"status": "timeout"}
        elif os.WIFSIGNALED(status):
            results[name] = {"status": f"killed by signal {os.WTERMSIG(status)}"}
        elif not os.path.exists(out):
            results[name] = {"status": f"exit {os.WEXITSTATUS(status)} without a result"}
        else:
            results[name] = {"status": "ok", **json.load(open(out))}
    print(json.dumps(results))
""")


def run_children(setup: str, cases: dict[str, str], tmp: Path, *, cap: int = CAP_BYTES, timeout: float = TIMEOUT_S,
                 pythonpath: Path = ROOT) -> dict[str, dict]:
    """Run ``setup`` once in a fresh runner process, then each case's code in a child forked from it, seeing the
    setup's names. Returns {name: {"status": "ok", "type": None, "result": <the case's `result`>}} or, for a case
    that raised, {"status": "ok", "type": <exception class name>, "msg": ...}; a case killed by a signal, one
    that exceeded its timeout or one that exited without a result has another "status"."""
    spec = [(name, code, str(tmp / f"{name}.json")) for name, code in cases.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(pythonpath) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _RUNNER, setup, json.dumps(spec), str(cap), str(timeout)],
                          capture_output=True, text=True, env=env, cwd=tmp,
                          timeout=60 + len(cases) * (timeout + 5))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
