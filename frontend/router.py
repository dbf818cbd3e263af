"""Routing policies: which worker of a role gets a request.

- round-robin: in turn (hpc.runtime.client.RoundRobin).
- least-loaded: fewest requests in flight from this frontend plus the queue and KV usage workers publish.
- kv-aware: the worker that served the longest prefix of this prompt before (its KV blocks may still be cached),
  unless it is much busier than the least-loaded one; otherwise least-loaded."""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict

from hpc.runtime.client import RoundRobin
from hpc.runtime.protocol import GenerateRequest, WorkerInfo, WorkerStats, content_ids


class LoadBoard:
    """What each worker last reported, and what this frontend has in flight on it."""

    def __init__(self, in_flight: dict[str, int] | None = None):
        self.reported: dict[str, WorkerStats] = {}
        self.in_flight = in_flight if in_flight is not None else {}  # ServingClient keeps it up to date

    def report(self, stats: WorkerStats) -> None:
        self.reported[stats.worker_id] = stats

    def load(self, worker_id: str) -> float:
        s = self.reported.get(worker_id)
        reported = 0.0
        if s is not None:
            kv_used = 1 - s.kv_blocks_free / s.kv_blocks_total if s.kv_blocks_total else 0.0
            reported = s.waiting + kv_used
        return self.in_flight.get(worker_id, 0) + reported


class LeastLoaded:
    def __init__(self, board: LoadBoard):
        self.board = board
        self._turn = itertools.count()

    def __call__(self, role: str, workers: list[WorkerInfo], req: GenerateRequest) -> WorkerInfo:
        loads = [self.board.load(w.worker_id) for w in workers]
        lowest = min(loads)
        best = [w for w, load in zip(workers, loads) if load == lowest]
        return best[next(self._turn) % len(best)]  # ties in turn, so equal workers share the work


def prefix_hashes(tokens: list[int], block: int) -> list[bytes]:
    """A chained hash per full block of the prompt: equal hashes mean equal prefixes up to that block."""
    out, h = [], b""
    for i in range(0, len(tokens) - block + 1, block):
        h = hashlib.blake2b(h + repr(tokens[i:i + block]).encode(), digest_size=12).digest()
        out.append(h)
    return out


class KvAware:
    def __init__(self, board: LoadBoard, block: int = 16, capacity: int = 200_000, max_extra_load: float = 4.0):
        self.board, self.block, self.capacity, self.max_extra_load = board, block, capacity, max_extra_load
        self.fallback = LeastLoaded(board)
        self.owner: OrderedDict[bytes, str] = OrderedDict()

    def __call__(self, role: str, workers: list[WorkerInfo], req: GenerateRequest) -> WorkerInfo:
        if role == "decode":  # the KV arrives with the request; only load matters
            return self.fallback(role, workers, req)
        hashes = prefix_hashes(content_ids(req.token_ids, req.multimodal), self.block)
        by_id = {w.worker_id: w for w in workers}
        least = self.fallback(role, workers, req)
        chosen = least
        for h in reversed(hashes):  # the longest cached prefix first
            wid = self.owner.get(h)
            if wid in by_id:
                if self.board.load(wid) <= self.board.load(least.worker_id) + self.max_extra_load:
                    chosen = by_id[wid]
                break
        for h in hashes:
            self.owner[h] = chosen.worker_id
            self.owner.move_to_end(h)
        while len(self.owner) > self.capacity:
            self.owner.popitem(last=False)
        return chosen


def make_router(name: str, board: LoadBoard):
    if name == "round-robin":
        return RoundRobin()
    if name == "least-loaded":
        return LeastLoaded(board)
    if name == "kv-aware":
        return KvAware(board)
    raise ValueError(f"unknown router {name!r} (round-robin, least-loaded, kv-aware)")
