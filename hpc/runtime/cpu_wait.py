"""How long a process's event-loop thread waited for a CPU, from the kernel's own accounting
(/proc/self/task/TID/schedstat: nanoseconds on a CPU, nanoseconds runnable but waiting, time slices).

On a host with more busy processes than cores, or in a Slurm step given too few CPUs, a request's time goes into
that wait: into no stage a process can time itself, since it is not running. `hpc status` and `hpc diagnose` show
it beside the stages."""

from __future__ import annotations

import threading
import time
from collections import deque

# A thread that waits for a CPU this share of the time or more is short of cores: each of its steps (a request's
# turn, a token's) takes that much longer than its own work, whatever the engines do.
SHORT_OF_CORES = 0.2


class CpuWait:
    """Samples of one thread's schedstat; `share()` over the last `window_s`. Made on the thread to watch."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._path = f"/proc/self/task/{threading.get_native_id()}/schedstat"
        self._samples: deque[tuple[float, int, int]] = deque()

    def sample(self) -> None:
        try:
            with open(self._path) as f:
                on_cpu, waiting = (int(x) for x in f.read().split()[:2])
        except (OSError, ValueError):  # not Linux, or no schedstat: nothing to report
            return
        now = time.monotonic()
        self._samples.append((now, on_cpu, waiting))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()

    def share(self) -> dict | None:
        """{"running": the share of the time on a CPU, "waiting": the share spent runnable but waiting for one}
        since the oldest sample in the window (the rest was idle); None before two samples."""
        if len(self._samples) < 2:
            return None
        (t0, cpu0, wait0), (t1, cpu1, wait1) = self._samples[0], self._samples[-1]
        if t1 - t0 <= 0:
            return None
        seconds = (t1 - t0) * 1e9
        return {"running": round(min(1.0, (cpu1 - cpu0) / seconds), 3),
                "waiting": round(min(1.0, (wait1 - wait0) / seconds), 3)}
