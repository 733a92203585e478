"""Running a plan: every unfinished run once, one per device at a time, pretrainings first; see
:mod:`laplacedrl.reproduce`."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from queue import Queue
from typing import Callable, Optional

from laplacedrl.reproduce.plan import PYTHON, Job, Plan

# ============ running ============
Runner = Callable[[Job, Optional[str]], int]


def subprocess_runner(job: Job, device: Optional[str]) -> int:
    """Run ``job`` in a child process (progress bars off); its output goes to
    ``<run dir>/reproduce.log``."""
    job.out.mkdir(parents=True, exist_ok=True)
    with open(job.out / "reproduce.log", "a") as logf:
        logf.write(f"$ {shlex.join(job.command(PYTHON, device) + ['--no-progress'])}\n")
        logf.flush()
        return subprocess.run(job.command(sys.executable, device) + ["--no-progress"], stdout=logf,
                              stderr=subprocess.STDOUT, env={**os.environ, **dict(job.env)}).returncode


def execute(plan: Plan, runner: Runner = subprocess_runner, devices: Optional[list] = None,
            say=print) -> dict:
    """Run every unfinished job of ``plan``, one per device at a time (``devices`` None: one at a
    time on the default device), in the order: pretrainings, the SSL runs that need none, the
    others. A run that needs a pretraining waits until it has ended, so runs without one keep the
    devices busy meanwhile; a run whose pretraining failed is not started. Returns
    ``{run dir: "finished" | "ran" | "failed" | "blocked"}``."""
    status = {}
    slots: Queue = Queue()
    for d in devices or [None]:
        slots.put(d)
    lock = threading.Lock()
    todo = [j for j in plan.jobs() if not j.done()]
    for j in plan.jobs():
        if j.done():
            status[j.out] = "finished"
    say(f"Table {plan.table.number} ({plan.scale}): {len(plan.cells)} cells, {len(plan.pretrain)} "
        f"pretrainings + {len(plan.ssl)} runs, {len(todo)} to run")
    counter = iter(range(1, len(todo) + 1))
    ended = {j.out / "ckpt.pt": threading.Event() for j in todo if j.kind == "pretrain"}

    def work(job: Job) -> None:
        if job.needs in ended:
            ended[job.needs].wait()        # queued before this job, so already running or ended
        if job.needs is not None and not job.needs.is_file():
            status[job.out] = "blocked"
            with lock:
                say(f"[{next(counter)}/{len(todo)}] skip {job.out} (its pretraining failed)")
            return
        device = slots.get()
        t0 = time.time()
        try:
            rc = runner(job, device)
        finally:
            slots.put(device)
            if job.kind == "pretrain":
                ended[job.out / "ckpt.pt"].set()
        ok = rc == 0 and job.done()
        status[job.out] = "ran" if ok else "failed"
        if ok:
            res = job.result()
            msg = f"done in {time.time() - t0:.0f}s" + (f", test top-1 {res:.2f}" if res is not None else "")
        else:
            msg = f"FAILED (exit {rc}); see {job.out / 'reproduce.log'}"
        with lock:
            say(f"[{next(counter)}/{len(todo)}] {job.kind} {job.out} {msg}")

    order = sorted(todo, key=lambda j: (j.kind != "pretrain", j.needs is not None))    # stable
    with ThreadPoolExecutor(max_workers=len(devices or [None])) as pool:
        list(pool.map(work, order))
    return status
