"""The cores a process may use: a process pinned to some cores (taskset, a cpuset, a pytest-xdist worker) counts
those, and its torch threads are its share of them, never the machine's."""

import os
import sys

import pytest
from conftest import run_command

PINNED = """
import os, sys
os.sched_setaffinity(0, {int(core) for core in sys.argv[1:]})
import torch
from diffusers_flat.utils.cli import share_cpu_threads
from diffusers_flat.utils.processes import usable_cores
share_cpu_threads(1)
alone = torch.get_num_threads()
share_cpu_threads(2)
print(usable_cores(), alone, torch.get_num_threads())
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this system")
def test_a_pinned_process_counts_its_cores_and_shares_them():
    cases = {(min(os.sched_getaffinity(0)),): "1 1 1"}  # one core: one thread, also for each of two processes
    if os.cpu_count() >= 2:  # the machine's first two cores (a pytest-xdist worker is itself pinned to one)
        cases[0, 1] = "2 2 1"  # two cores: two threads alone, one each when two processes share them
    for pin, expected in cases.items():
        result = run_command([sys.executable, "-c", PINNED, *map(str, pin)], timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.split() == expected.split(), pin
