"""Property: whatever is done to the shipped config, `check` answers with problem lines.

Never a traceback, never more than 5 s or 256 MB: in process (load_config under
tracemalloc) for most examples, and as real `python -m proxy check` subprocesses for a few.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings

from proxy.config import Config, ConfigInvalid, load_config
from tests.support.mutate import ROOT, mutated_config

LIMIT_SECONDS = 5.0
LIMIT_BYTES = 256 * 1024 * 1024

def deterministic(max_examples: int, *, shrink: bool = True) -> settings:
    """Modest, reproducible runs: the same examples on every machine and in CI."""
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(
        max_examples=max_examples,
        phases=phases,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def check_in_process(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "proxy.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        tracemalloc.start()
        began = time.thread_time()  # CPU time: other processes on the machine do not count
        try:
            config = load_config(str(path), env={"XDG_STATE_HOME": tmp})
        except ConfigInvalid as exc:
            assert exc.problems
            for problem in exc.problems:
                assert str(problem).startswith(f"{path}"), problem
                assert "Traceback" not in problem.message
        else:
            assert isinstance(config, Config) and config.routes
        finally:
            elapsed = time.thread_time() - began
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert elapsed < LIMIT_SECONDS, elapsed
        assert peak < LIMIT_BYTES, peak


@deterministic(60)
@given(mutated_config())
def test_load_config_answers_every_mutation_with_problems(text: str) -> None:
    check_in_process(text)


# `python -m proxy check CONFIG`, reporting the process's own peak RSS (VmHWM) at exit.
# rusage's maxrss cannot tell: Linux carries the parent's RSS at fork over into the child's.
_MEASURED_CHECK = """
import atexit, runpy, sys
hwm_path = sys.argv[1]
def _report():
    with open("/proc/self/status") as fh:
        kib = next(line.split()[1] for line in fh if line.startswith("VmHWM:"))
    with open(hwm_path, "w") as out:
        out.write(kib)
atexit.register(_report)
sys.argv = ["proxy", "check", "--config", sys.argv[2]]
runpy.run_module("proxy", run_name="__main__", alter_sys=True)
"""


@deterministic(4, shrink=False)  # each example is a process start
@given(mutated_config())
def test_check_subprocess_exits_0_or_2_without_traceback(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "proxy.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        hwm_file = Path(tmp) / "hwm"
        with open(Path(tmp) / "out", "w+") as out, open(Path(tmp) / "err", "w+") as err:
            proc = subprocess.Popen(
                [sys.executable, "-c", _MEASURED_CHECK, str(hwm_file), str(path)],
                stdout=out,
                stderr=err,
                cwd=ROOT,
                env={"PATH": "/usr/bin:/bin", "XDG_STATE_HOME": tmp},
            )
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        peak_kib = int(hwm_file.read_text())
    # CPU time, not wall time: a loaded CI machine must not make this flaky.
    cpu = usage.ru_utime + usage.ru_stime
    assert proc.returncode in (0, 2), stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert stderr == ""
    lines = stdout.splitlines()
    assert lines and all(line.startswith(str(path)) for line in lines), lines
    assert cpu < LIMIT_SECONDS, cpu  # interpreter start-up included
    assert peak_kib * 1024 < LIMIT_BYTES
