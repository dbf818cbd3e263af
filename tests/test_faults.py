"""The fault suite, on the local Slurm cluster: a stopped (SIGSTOP) worker, a KV read that never happens (the
notification that frees the blocks is never sent), the frontend killed, and 256 concurrent streams while a worker
is added and another drained. Each: the affected requests end with an error within their deadline, none hangs,
later requests succeed, and no KV block stays taken. (Killed workers, etcd and NATS: tests/test_operations.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import openai
import pytest

from harness import config_variant, hpc, squeue
from hpc import bench
from test_operations import client, component, kill, processes, status_json, wait_for
from test_slurm import chat, wait_gone

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def env(cluster, tiny_model):
    e = {**cluster.env(), "HPC_MODEL_DIR": str(tiny_model), "PYTHONUNBUFFERED": "1"}
    e.pop("SLURM_JOB_ID", None)
    return e


async def held_and_free(state: dict) -> list:
    """Every worker's KV blocks, through the deployment's own credentials."""
    from hpc.runtime.client import ServingClient
    from hpc.runtime.credentials import Credentials

    creds = Credentials.load(state["endpoints"]["credentials"])
    async with ServingClient(state["deployment"], state["endpoints"]["etcd"], state["endpoints"]["nats"],
                             credentials=creds) as sc:
        for _ in range(50):
            if sc.directory.workers:
                break
            await asyncio.sleep(0.1)
        return [await sc.stats(w) for w in sc.directory.workers.values()]


def all_blocks_free(state: dict, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = asyncio.run(held_and_free(state))
        if stats and all(s.kv_blocks_free == s.kv_blocks_total and s.held == 0 and s.running == 0 for s in stats):
            return True
        time.sleep(0.5)
    return False


def test_a_stopped_decode_worker_fails_its_stream_in_time_and_serves_again_when_continued(env):
    hpc(["launch", "configs/tiny-disagg.yaml", "--nodes", "3", "--port", "0", "--detach"], env)
    try:
        state = json.loads((REPO / ".hpc" / "tiny-disagg.json").read_text())
        stream = client(state["frontend_url"]).chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=1500, stream=True,
            extra_body={"ignore_eos": True})
        stopped, error = [], None
        t0 = None
        try:
            for n, _ in enumerate(stream):
                if n == 5:
                    stopped = processes("--role decode --worker-id decode-0")
                    for pid in stopped:
                        os.kill(pid, signal.SIGSTOP)
                    t0 = time.monotonic()
        except openai.APIError as e:
            error = e
        waited = time.monotonic() - t0
        assert stopped and error is not None and "left" in str(error), error
        assert waited < 12, f"{waited:.1f} s: the lease is 5 s; the request timeout 600 s"
        print(f"stopped decode worker: error event {waited:.1f} s after SIGSTOP")
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)  # it finds its lease gone and registers again
        wait_for(lambda: _serves(state["frontend_url"]), 30, "requests succeed after SIGCONT")
        assert all_blocks_free(state)
    finally:
        hpc(["stop", "tiny-disagg"], env)
    assert wait_gone("tiny-disagg.yaml") == []


def _serves(url: str) -> bool:
    try:
        return bool(chat(url))
    except openai.APIError:
        return False


def test_kv_never_read_is_freed_after_release_after_and_a_dead_kv_owner_fails_the_decode(env, work_dir):
    """A prefill result whose KV no decode worker reads (so no NIXL notification): the prefill worker frees the
    blocks after transfer.release_after_s. A decode request whose KV owner is gone: a clean error, no hang."""
    cfg = config_variant("tiny-disagg", "release", work_dir, "transfer: {release_after_s: 2, timeout_s: 5}\n")
    hpc(["launch", str(cfg), "--nodes", "3", "--port", "0", "--detach"], env)
    try:
        state = json.loads((REPO / ".hpc" / "release.json").read_text())
        result = asyncio.run(prefill_only(state))
        assert result.kv is not None
        held = [s for s in asyncio.run(held_and_free(state)) if s.role == "prefill"][0]
        assert held.held == 1 and held.kv_blocks_free < held.kv_blocks_total
        t0 = time.monotonic()
        assert all_blocks_free(state, timeout=10)
        print(f"unread KV freed {time.monotonic() - t0:.1f} s after the check (release_after_s 2)")
        # The decode side of a handle whose owner has died: the read fails within transfer.timeout_s, cleanly.
        assert kill("--role prefill --worker-id prefill-0")
        t0 = time.monotonic()
        error = asyncio.run(decode_from(state, result))
        assert error and time.monotonic() - t0 < 8, error
        wait_for(lambda: _serves(state["frontend_url"]), 60, "requests succeed once prefill-0 is back")
        assert all_blocks_free(state)
    finally:
        hpc(["stop", "release"], env)
    assert wait_gone("release.yaml") == []


async def prefill_only(state: dict):
    from hpc.runtime.client import ServingClient
    from hpc.runtime.credentials import Credentials
    from hpc.runtime.protocol import GenerateRequest, Sampling

    creds = Credentials.load(state["endpoints"]["credentials"])
    async with ServingClient(state["deployment"], state["endpoints"]["etcd"], state["endpoints"]["nats"],
                             credentials=creds) as sc:
        while not sc.directory.by_role("prefill"):
            await asyncio.sleep(0.1)
        req = GenerateRequest("unread-1", "tiny-llama", list(range(40, 120)), Sampling(max_tokens=8, ignore_eos=True))
        _, result = await sc._prefill(req, {})
        return result


async def decode_from(state: dict, result) -> str | None:
    from hpc.runtime.client import ServingClient, ServingError
    from hpc.runtime.credentials import Credentials
    from hpc.runtime.messaging import PeerGone, RequestTimeout
    from hpc.runtime.protocol import GenerateRequest, Sampling

    creds = Credentials.load(state["endpoints"]["credentials"])
    async with ServingClient(state["deployment"], state["endpoints"]["etcd"], state["endpoints"]["nats"],
                             credentials=creds) as sc:
        while not sc.directory.by_role("decode"):
            await asyncio.sleep(0.1)
        req = GenerateRequest("orphan-1", "tiny-llama", list(range(40, 120)), Sampling(max_tokens=8, ignore_eos=True),
                              first_token=result.first_token, kv=result.kv, prefill_worker="prefill-0")
        try:
            async for _ in sc._replies(sc.directory.by_role("decode")[0], req):
                pass
        except (ServingError, PeerGone, RequestTimeout) as e:
            return str(e)
        return None


def test_frontend_killed_comes_back_on_its_port(env):
    hpc(["launch", "configs/tiny-agg.yaml", "--nodes", "2", "--port", "0", "--detach"], env)
    try:
        state = json.loads((REPO / ".hpc" / "tiny-agg.json").read_text())
        assert kill("-m frontend --deployment tiny-agg")
        t0 = time.monotonic()
        wait_for(lambda: _serves(state["frontend_url"]), 30, "the frontend back on the same URL")
        print(f"frontend back and serving {time.monotonic() - t0:.1f} s after SIGKILL")
        assert component(status_json(env, "tiny-agg"), "frontend")["restarts"] == 1
    finally:
        hpc(["stop", "tiny-agg"], env)
    assert wait_gone("tiny-agg.yaml") == []


def test_256_streams_while_a_worker_is_added_and_another_drained(env):
    hpc(["launch", "configs/tiny-mocker.yaml", "--nodes", "3", "--port", "0", "--detach"], env)
    try:
        state = json.loads((REPO / ".hpc" / "tiny-mocker.json").read_text())
        rng = random.Random(7)
        prompts = [[rng.randrange(10, 500) for _ in range(64)] for _ in range(1536)]
        outcome = {}

        def load():
            outcome["results"], outcome["wall"] = asyncio.run(bench.level(state["frontend_url"], "mock-llama",
                                                                          prompts, 32, 256, 120))

        t = threading.Thread(target=load)
        t.start()
        time.sleep(2)
        hpc(["scale", "prefill", "+1", "--deployment", "tiny-mocker"], env)
        hpc(["scale", "decode", "-1", "--deployment", "tiny-mocker"], env)
        t.join(240)
        assert not t.is_alive(), "requests hung"
        results = outcome["results"]
        errors = [r.error for r in results if r.error]
        row = bench.summarize(256, results, outcome["wall"])
        print(f"256 streams, {len(results)} requests over {outcome['wall']:.1f} s while prefill-2 joined and "
              f"decode-1 drained: {len(errors)} errors, TTFT p99 {row['ttft_p99_ms']} ms, E2E p99 "
              f"{row['e2e_p99_ms']} ms")
        assert len(results) == len(prompts) and errors == [], errors[:3]
        assert all_blocks_free(state)
    finally:
        hpc(["stop", "tiny-mocker"], env)
    assert squeue(env) == []
