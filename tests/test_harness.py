"""The test harness's own promise: every wait is bounded and a time-out kills the whole process tree, including
children that moved to sessions of their own (as torch's elastic agent starts its workers)."""

import sys
import time

import psutil
import pytest
from conftest import run_command

# A launcher that starts a worker in a new session, which inherits stdout/stderr and sleeps far past the time-out.
LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(sys.argv[1], "w").write(str(worker.pid))
time.sleep(float(sys.argv[2]))
"""


@pytest.mark.parametrize("launcher_lives", [600, 0])
def test_a_time_out_kills_workers_in_other_sessions(tmp_path, launcher_lives):
    """Whether the launcher hangs too or has already exited (its worker still holding the pipes), the call returns
    within the bound and no worker survives."""
    pid_file = tmp_path / "worker.pid"
    start = time.monotonic()
    with pytest.raises(AssertionError, match="timed out after 5 s"):
        run_command([sys.executable, "-c", LAUNCHER, str(pid_file), str(launcher_lives)], tmp_path, timeout=5)
    assert time.monotonic() - start < 30
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(worker) and psutil.Process(worker).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the worker outlived the time-out"
        time.sleep(0.1)
