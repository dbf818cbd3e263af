"""hpc/runtime/cpu_wait.py reads the kernel's run-queue accounting: a thread made to share its CPU with a busy
process is seen waiting for it, and one alone on its CPU is not."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from hpc.runtime.cpu_wait import SHORT_OF_CORES, CpuWait


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def measure(seconds: float) -> dict:
    watch = CpuWait()
    assert watch.share() is None  # nothing before two samples
    watch.sample()
    spin(seconds)
    watch.sample()
    return watch.share()


def test_a_thread_that_shares_its_cpu_is_seen_waiting_and_one_alone_is_not():
    cpus = sorted(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        # Both on one CPU: each runs about half the time and waits the other half.
        os.sched_setaffinity(0, {cpus[0]})
        os.sched_setaffinity(busy.pid, {cpus[0]})
        time.sleep(0.1)
        shared = measure(1.0)
        assert shared["waiting"] >= SHORT_OF_CORES and shared["running"] <= 0.8, shared
        if len(cpus) > 1:  # the busy process elsewhere: this thread runs alone
            os.sched_setaffinity(busy.pid, set(cpus[1:]))
            time.sleep(0.1)
            alone = measure(1.0)
            assert alone["waiting"] < SHORT_OF_CORES and alone["running"] >= 0.8, alone
    finally:
        os.sched_setaffinity(0, before)
        busy.kill()
        busy.wait(timeout=10)


def test_without_schedstat_there_is_nothing_to_report(tmp_path):
    watch = CpuWait()
    watch._path = str(tmp_path / "missing")
    watch.sample()
    watch.sample()
    assert watch.share() is None
