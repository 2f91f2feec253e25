"""Processes: the cores one may run on, and how a process of a multi-process run ends."""

from __future__ import annotations

import logging
import os
import sys

from accelerate import Accelerator, PartialState


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity (`taskset`, a cpuset, a pinned test worker) where the
    system has one, else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def leave_without_teardown(accelerator: Accelerator | PartialState) -> None:
    """End a process of a multi-process run at once, without the interpreter's teardown; call it last, after
    `end_training()`. A single process returns normally.

    torch's gloo backend can deadlock at teardown: when the DDP model is freed, the main thread (holding the GIL)
    destroys the ProcessGroupGloo and joins its worker threads, while a worker waits for the GIL to free the tensors
    of its last finished collective. Seen with torch 2.13 on a busy 2-core machine in about one run in ten: both
    ranks stuck in ~ProcessGroupGloo -> std::thread::join, the launcher waiting on them forever.
    """
    if accelerator.num_processes == 1:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
