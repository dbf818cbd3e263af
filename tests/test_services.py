"""Real etcd and NATS started by hpc.services: key/value, leases, request/reply, streamed replies."""

from __future__ import annotations

import asyncio
import os

import aetcd
import nats
import pytest

from hpc.errors import HpcError
from hpc.procs import batch_policy
from hpc.services import require_binary


def etcd_client(url: str) -> aetcd.Client:
    host, port = url.removeprefix("http://").split(":")
    return aetcd.Client(host=host, port=int(port), timeout=5)


async def test_etcd_put_get_and_lease_expiry(etcd):
    async with etcd_client(etcd.url) as client:
        await client.put(b"/hpc/test/a", b"1")
        assert (await client.get(b"/hpc/test/a")).value == b"1"
        lease = await client.lease(2)
        await client.put(b"/hpc/test/leased", b"x", lease=lease)
        assert await client.get(b"/hpc/test/leased") is not None
        for _ in range(60):  # etcd expires the lease within its TTL plus a tick
            await asyncio.sleep(0.1)
            if await client.get(b"/hpc/test/leased") is None:
                break
        assert await client.get(b"/hpc/test/leased") is None


async def test_nats_request_reply_and_stream(nats):
    nc = await nats_connect(nats.url)
    try:
        async def echo(msg):
            await msg.respond(b"re:" + msg.data)

        async def stream(msg):
            for i in range(3):
                await nc.publish(msg.reply, str(i).encode())
            await nc.publish(msg.reply, b"end")

        await nc.subscribe("t.echo", cb=echo)
        await nc.subscribe("t.stream", cb=stream)
        assert (await nc.request("t.echo", b"hi", timeout=2)).data == b"re:hi"
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("t.stream", b"", reply=inbox)
        got = [(await sub.next_msg(timeout=2)).data for _ in range(4)]
        assert got == [b"0", b"1", b"2", b"end"]
    finally:
        await nc.close()


def test_nats_runs_under_sched_batch_and_its_starter_does_not(nats):
    """Every thread of NATS (the Go runtime starts them after exec) has the batch policy; the thread that started
    it is back to its own."""
    with batch_policy():
        if os.sched_getscheduler(0) != os.SCHED_BATCH:
            pytest.skip("this system refuses SCHED_BATCH; NATS then runs under the default policy")
    policies = {os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{nats.popen.pid}/task")}
    assert policies == {os.SCHED_BATCH}
    assert os.sched_getscheduler(0) != os.SCHED_BATCH


async def nats_connect(url):
    return await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)


def test_missing_binary_names_the_package(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(HpcError, match="Debian package etcd-server"):
        require_binary("etcd")
