"""A stand-in for a job process: it watches its parent as ``_job_process`` does, then waits."""

from __future__ import annotations

import time

from ls_backend.jobs import exit_with_parent


def sleeper(parent: int) -> None:
    exit_with_parent(parent, every=0.1)
    time.sleep(60)


PARENT = """
import multiprocessing, os, sys, time
sys.path.insert(0, sys.argv[1])
from tests.support.orphans import sleeper
child = multiprocessing.get_context("spawn").Process(target=sleeper, args=(os.getpid(),), daemon=True)
child.start()
print(child.pid, flush=True)
time.sleep(60)
"""
