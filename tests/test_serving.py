"""Disaggregated serving with real processes: etcd, NATS, NIXL (DRAM), torch engine on CPU.

Prefill and decode workers are separate processes; the KV moves between them through NIXL; the result must be
token-identical to one aggregated worker."""

from __future__ import annotations

import asyncio
import random
import time

import msgspec
import pytest

from harness import MOCKER_YAML, start_worker
from hpc.runtime.client import ServingClient, ServingError
from hpc.runtime.messaging import Bus, PeerGone, RequestTimeout
from hpc.runtime.protocol import GenerateRequest, Sampling, decode_reply, encode
from hpc.services import start_etcd, start_nats

MODEL = "tiny-llama"
GREEDY = Sampling(max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("stack")
    etcd, nats = start_etcd(d / "etcd"), start_nats(d / "nats")
    workers = [start_worker(d / "logs", role, tiny_model, etcd.url, nats.url, dep)
               for role, dep in (("aggregated", "agg"), ("prefill", "dis"), ("decode", "dis"))]
    try:
        for w in workers:
            w.wait_ready()
        yield {"etcd": etcd.url, "nats": nats.url, "dir": d, "model": tiny_model}
    finally:
        assert all(w.stop() for w in workers)
        etcd.stop()
        nats.stop()


def prompts(n: int = 20, longest: int = 300) -> list[list[int]]:
    rng = random.Random(7)
    lengths = [1, longest] + [rng.randint(2, longest - 1) for _ in range(n - 2)]
    return [[rng.randint(6, 500) for _ in range(k)] for k in lengths]


async def tokens(client: ServingClient, prompt, sampling=GREEDY) -> list[int]:
    return [t async for d in client.generate(MODEL, prompt, sampling) for t in d.token_ids]


async def test_disaggregated_equals_aggregated_and_concurrency(stack):
    async with ServingClient("agg", stack["etcd"], stack["nats"]) as agg, \
            ServingClient("dis", stack["etcd"], stack["nats"]) as dis:
        ps = prompts()
        aggregated = [await tokens(agg, p) for p in ps]
        disaggregated = [await tokens(dis, p) for p in ps]
        assert disaggregated == aggregated
        assert all(len(t) == GREEDY.max_tokens for t in aggregated)
        gate = asyncio.Semaphore(8)

        async def bounded(p):
            async with gate:
                return await tokens(dis, p)

        assert await asyncio.gather(*(bounded(p) for p in ps)) == aggregated
        # The second time, the prefill worker found these prompts' blocks in its prefix cache and handed them over.
        prefill = [await dis.stats(w) for w in dis.directory.by_role("prefill", MODEL)]
        assert sum(s.reused_prompt_tokens for s in prefill) > 0
        seeded = Sampling(max_tokens=8, temperature=0.8, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
        assert await tokens(dis, ps[3], seeded) == await tokens(agg, ps[3], seeded)
        await assert_all_blocks_free(dis)


async def assert_all_blocks_free(client: ServingClient) -> None:
    for _ in range(50):  # the release notification is asynchronous: give it a moment
        stats = [await client.stats(w) for w in client.directory.workers.values()]
        if all(s.kv_blocks_free == s.kv_blocks_total and s.held == 0 for s in stats):
            break
        await asyncio.sleep(0.05)
    assert [(s.role, s.kv_blocks_free, s.held) for s in stats] == [(s.role, s.kv_blocks_total, 0) for s in stats]
    decode = [s for s in stats if s.role == "decode"]
    assert all(s.kv_transfers > 0 and s.kv_bytes > 0 for s in decode)


async def test_layout_mismatch_fails_clearly_and_frees_prefill_blocks(stack):
    bus = await Bus.connect(stack["nats"], "test")
    async with ServingClient("dis", stack["etcd"], stack["nats"]) as client:
        prefill = client.directory.by_role("prefill")[0]
        decode = client.directory.by_role("decode")[0]
        req = GenerateRequest("mismatch-1", MODEL, list(range(10, 60)), GREEDY)
        result = decode_reply(await bus.request(prefill.subject, encode(req), 30))
        for field, value in (("block_size", 32), ("dtype", "bfloat16"), ("num_layers", 3), ("num_kv_heads", 4)):
            bad_kv = msgspec.structs.replace(result.kv, layout=msgspec.structs.replace(result.kv.layout,
                                                                                        **{field: value}))
            follow = msgspec.structs.replace(req, kv=bad_kv, first_token=result.first_token)
            reply = decode_reply(await bus.request(decode.subject, encode(follow), 30))
            assert reply.code == "layout_mismatch" and f"{field}: " in reply.message, reply
        await bus.publish(client.subjects.cancel(req.request_id), b"")  # the router gives up: blocks freed
        await assert_all_blocks_free_roles(client, ("prefill", "decode"))
    await bus.close()


async def assert_all_blocks_free_roles(client, roles) -> None:
    for _ in range(50):
        stats = [await client.stats(w) for w in client.directory.workers.values() if w.role in roles]
        if all(s.kv_blocks_free == s.kv_blocks_total for s in stats):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(stats)


async def test_bad_requests_get_clear_errors(stack):
    async with ServingClient("dis", stack["etcd"], stack["nats"]) as client:
        with pytest.raises(ServingError, match="exceeds the model's context of 2048 tokens") as e:
            await tokens(client, [7] * 2045)
        assert e.value.code == "bad_request"
        with pytest.raises(ServingError, match="no worker serves model 'nope'"):
            async for _ in client.generate("nope", [1, 2]):
                pass


async def test_killed_prefill_worker_fails_fast_and_leaves_etcd(tmp_path, tiny_model):
    etcd, nats = start_etcd(tmp_path / "etcd"), start_nats(tmp_path / "nats")
    slow = tmp_path / "slow.yaml"
    slow.write_text("mocker: {prefill_tokens_per_s: 50, kv_bytes_per_token: 64}\n")  # 1000 tokens: 20 s
    prefill = start_worker(tmp_path, "prefill", tiny_model, etcd.url, nats.url, "kill", "mocker", slow)
    decode = start_worker(tmp_path, "decode", tiny_model, etcd.url, nats.url, "kill", "mocker", slow)
    try:
        prefill.wait_ready(), decode.wait_ready()
        async with ServingClient("kill", etcd.url, nats.url, first_token_timeout=60) as client:
            task = asyncio.create_task(tokens(client, list(range(1000))))
            await asyncio.sleep(1.0)
            t0 = time.monotonic()
            prefill.kill()
            with pytest.raises(PeerGone):
                await asyncio.wait_for(task, 15)
            waited = time.monotonic() - t0
            assert waited < 2 * 2 + 1, waited  # within the lease TTL (2 s) and a keepalive tick, not 60 s
            assert [w.role for w in client.directory.workers.values()] == ["decode"]
            with pytest.raises(ServingError, match="no prefill worker serves model 'tiny-llama'"):
                await tokens(client, [1, 2, 3])
    finally:
        decode.stop()
        etcd.stop()
        nats.stop()


async def test_mocker_disaggregated_moves_real_bytes(tmp_path, tiny_model):
    etcd, nats = start_etcd(tmp_path / "etcd"), start_nats(tmp_path / "nats")
    ws = [start_worker(tmp_path, role, tiny_model, etcd.url, nats.url, dep, "mocker", MOCKER_YAML)
          for role, dep in (("aggregated", "magg"), ("prefill", "mdis"), ("decode", "mdis"))]
    try:
        for w in ws:
            w.wait_ready()
        async with ServingClient("magg", etcd.url, nats.url) as agg, ServingClient("mdis", etcd.url, nats.url) as dis:
            p = list(range(500))
            assert await tokens(dis, p) == await tokens(agg, p)
            decode = dis.directory.by_role("decode")[0]
            stats = await dis.stats(decode)
            assert stats.kv_bytes == 32 * 16 * 4096  # 500 tokens -> 32 blocks of 16 tokens x 4096 bytes
    finally:
        for w in ws:
            w.stop()
        etcd.stop()
        nats.stop()


async def test_a_full_decode_kv_cache_makes_requests_wait_their_turn_not_fail(tmp_path, tiny_model):
    """The decode worker's pool holds 16 blocks: two of these requests at a time (7 blocks each). Six sent at once
    all finish with the aggregated worker's tokens, the later ones after waiting for room; one that could never fit
    fails at once, saying why."""
    etcd, nats = start_etcd(tmp_path / "etcd"), start_nats(tmp_path / "nats")
    small = tmp_path / "small.yaml"
    small.write_text("num_kv_blocks: 16\nmocker: {decode_step_ms: 6, kv_bytes_per_token: 4096}\n")
    ws = [start_worker(tmp_path, role, tiny_model, etcd.url, nats.url, dep, "mocker", config)
          for role, dep, config in (("aggregated", "kagg", MOCKER_YAML), ("prefill", "kdis", MOCKER_YAML),
                                    ("decode", "kdis", small))]
    try:
        for w in ws:
            w.wait_ready()
        async with ServingClient("kagg", etcd.url, nats.url) as agg, ServingClient("kdis", etcd.url, nats.url) as dis:
            ps = [[i] + list(range(10, 109)) for i in range(6)]  # 100 tokens + 8 new: 7 blocks of 16
            traces = [{} for _ in ps]

            async def run(p, trace):
                return [t async for d in dis.generate(MODEL, p, GREEDY, trace=trace) for t in d.token_ids]

            got = await asyncio.gather(*(run(p, t) for p, t in zip(ps, traces)))
            assert got == [await tokens(agg, p) for p in ps]
            assert max(t["decode"]["kv_wait"] for t in traces) > 0.005  # some waited for a step or more
            with pytest.raises(ServingError, match="need 18 KV blocks; this decode worker has 16"):
                await tokens(dis, list(range(10, 290)))  # 280 + 8 tokens: 18 blocks
    finally:
        for w in ws:
            w.stop()
        etcd.stop()
        nats.stop()


async def test_requests_fail_fast_without_a_server_and_time_out_without_a_reply(nats):
    bus = await Bus.connect(nats.url, "t")
    t0 = time.monotonic()
    with pytest.raises(PeerGone, match="nothing serves nobody.listens"):
        await bus.request("nobody.listens", b"x", 5)
    assert time.monotonic() - t0 < 1

    async def silent(data, reply):
        await asyncio.sleep(10)

    await bus.serve("silent", silent)
    with pytest.raises(RequestTimeout):
        await bus.request("silent", b"x", 0.5)
    assert time.monotonic() - t0 < 3
    await bus.drain_handlers(0)
    await bus.close()


async def test_a_stream_waits_its_first_timeout_then_its_idle_timeout_from_each_reply(nats):
    """Replies 0.15 s apart keep a stream with a 0.4 s idle timeout alive; 0.4 s of silence after them ends it, and a
    first reply that never comes ends it after the first timeout. The Bus's one timeout timer stops when idle."""
    server, client = await Bus.connect(nats.url, "server"), await Bus.connect(nats.url, "client")

    async def paced(data, reply):
        if data == b"go":
            for i in range(4):
                await asyncio.sleep(0.15)
                await reply(b"%d" % i)
        await asyncio.sleep(10)

    await server.serve("paced", paced)
    got, t0 = [], time.monotonic()
    with pytest.raises(RequestTimeout):
        async for batch in client.stream("paced", b"go", 5, 0.4):
            got += batch
    assert got == [b"0", b"1", b"2", b"3"]
    assert 0.95 < time.monotonic() - t0 < 2.5  # 4 x 0.15 s of replies, then the 0.4 s idle timeout (not 5 s)
    t0 = time.monotonic()
    with pytest.raises(RequestTimeout):
        async for _ in client.stream("paced", b"silent", 0.3, 5):
            pass
    assert 0.25 < time.monotonic() - t0 < 2
    await asyncio.sleep(0.3)
    assert client._sweeper is None  # the one timer for every stream's timeout stops when no stream is open
    for bus in (client, server):
        await bus.drain_handlers(0)
        await bus.close()


async def test_stream_messages_take_no_extra_turn_of_the_event_loop(nats):
    """Messages to a served subject or to the replies inbox reach their handler inside nats-py's read loop, never
    through a subscription queue and its task: this checks the internals that shortcut uses, on the nats-py
    installed."""
    server, client = await Bus.connect(nats.url, "server"), await Bus.connect(nats.url, "client")

    async def echo(data, reply):
        await reply(data)

    await server.serve("echo", echo)
    assert await client.request("echo", b"hi", 5) == b"hi"
    for bus in (server, client):
        direct = [sub for sid, sub in bus.nc._subs.items() if sid in bus.nc._direct]
        assert len(direct) == (2 if bus is server else 1)  # the served subject, the replies inbox
        assert all(sub._pending_queue.qsize() == 0 and sub._wait_for_msgs_task is None for sub in direct)
        await bus.drain_handlers(1)
        await bus.close()


async def test_a_served_subject_answers_as_soon_as_serve_returns(nats):
    """serve() returns once the server has the subscription: its SUB reaches the socket before flush()'s PING (nats-py
    2.16 writes the PING at once, ahead of commands still pending, and a request sent right away could get "no
    responders"; 2 of 90 tries here before the fix)."""
    server, client = await Bus.connect(nats.url, "server"), await Bus.connect(nats.url, "client")
    written = []
    transport = server.nc._transport
    write, writelines = transport.write, transport.writelines
    transport.write = lambda data: (written.append(bytes(data)), write(data))[1]
    transport.writelines = lambda lines: (written.extend(map(bytes, lines)), writelines(lines))[1]

    async def echo(data, reply):
        await reply(data)

    for i in range(20):
        written.clear()
        await server.serve(f"echo{i}", echo)
        wire = b"".join(written)
        assert b"SUB echo%d " % i in wire and wire.index(b"SUB echo%d " % i) < wire.rindex(b"PING"), wire
        assert await client.request(f"echo{i}", b"hi", 5) == b"hi"
    for bus in (server, client):
        await bus.drain_handlers(1)
        await bus.close()


async def test_replies_of_one_loop_turn_travel_together_and_in_order(nats):
    """Streams that a worker answers in the same turn of its event loop share one NATS message per requester; each
    stream still sees its own replies, all of them, in order. nats-py's own request inbox gets plain replies."""
    import nats as nats_py

    server, client = await Bus.connect(nats.url, "server"), await Bus.connect(nats.url, "client")
    spy = await nats_py.connect(nats.url)
    seen = []

    async def note(msg):
        seen.append(msg.subject)

    await spy.subscribe(f"{client._mux_prefix}.*", cb=note)
    await spy.flush()

    async def count_to_five(data, reply):
        for i in range(5):
            await reply(data + b":%d" % i)
            await asyncio.sleep(0)  # the other streams reply in this turn too

    await server.serve("counter", count_to_five)

    async def one_stream(n: int) -> list[bytes]:
        got = []
        async for batch in client.stream("counter", b"s%d" % n, 5, 5):
            got += batch
            if len(got) == 5:
                return got

    streams = await asyncio.gather(*(one_stream(n) for n in range(20)))
    assert streams == [[b"s%d:%d" % (n, i) for i in range(5)] for n in range(20)]
    await spy.flush()
    await asyncio.sleep(0.2)
    assert 5 <= len(seen) < 100 and any(s.endswith(".batch") for s in seen)  # 100 replies, a handful of messages
    assert (await spy.request("counter", b"p", timeout=5)).data == b"p:0"  # not a batch: a plain reply
    await spy.close()
    for bus in (server, client):
        await bus.drain_handlers(1)
        await bus.close()


def test_worker_token_counters_take_the_engines_running_totals():
    """The counters are fed from the engine's totals a few times a second, not once per token on the hot path."""
    from hpc.runtime.metrics import WorkerMetrics

    m = WorkerMetrics("aggregated", "w0")
    m.count_tokens(10, 4, 7)
    m.count_tokens(15, 4, 20)
    value = m.registry.get_sample_value
    assert (value("hpc_prompt_tokens_total"), value("hpc_prompt_tokens_reused_total"),
            value("hpc_generated_tokens_total")) == (15, 4, 20)


def test_a_settled_process_leaves_its_start_up_objects_to_no_collection():
    """After gc_pauses.settle() the collector walks none of what start-up made (a frontend's imports: tens of
    thousands of objects, 30-120 ms a full collection on two cores) and collects young objects less often."""
    import subprocess
    import sys

    probe = ("import gc, frontend.app; from hpc.runtime import gc_pauses; gc_pauses.settle(); "
             "print(gc.get_freeze_count(), gc.get_threshold()[0], len(gc.get_objects()))")
    frozen, young, walked = map(int, subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                                    check=True, timeout=120).stdout.split())
    assert frozen > 10_000 and young >= 10_000 and walked < 1_000


async def _direct_stream(client: Bus, address: str | None, data: bytes, n: int) -> list[bytes]:
    got = []
    async for batch in client.stream("counter", data, 5, 5, address=address):
        got += batch
        if len(got) == n:
            return got


async def _until_connected(client: Bus, address: str) -> None:
    """The first request opens the connection in the background (and goes through NATS)."""
    for _ in range(100):
        if client.connections.get(address) is not None:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no direct connection to {address}")


async def test_direct_connections_carry_requests_and_replies_and_fail_fast_when_cut(nats):
    """A served subject with `listen` also takes requests on its own TCP port: once a client's connection is ready,
    streams go there (no NATS message for them), in order; until then, and for a client that cannot reach the
    port, through NATS. A connection cut while streams are on it fails them at once."""
    import nats as nats_py

    server, client = await Bus.connect(nats.url, "server"), await Bus.connect(nats.url, "client")
    spy = await nats_py.connect(nats.url)
    seen = []

    async def note(msg):
        seen.append(msg.subject)

    await spy.subscribe(">", cb=note)
    await spy.flush()

    async def count(data, reply):
        for i in range(5):
            await reply(data + b":%d" % i)
            await asyncio.sleep(0)
        if data == b"hold":
            await asyncio.sleep(30)

    await server.serve("counter", count, listen=True)
    address = server.listener.address
    assert await _direct_stream(client, address, b"first", 5) == [b"first:%d" % i for i in range(5)]  # NATS
    await _until_connected(client, address)
    assert client.connections.state(address) == "open"
    await spy.flush()
    seen.clear()
    streams = await asyncio.gather(*(_direct_stream(client, address, b"s%d" % n, 5) for n in range(20)))
    assert streams == [[b"s%d:%d" % (n, i) for i in range(5)] for n in range(20)]
    await spy.flush()
    await asyncio.sleep(0.2)
    assert not [s for s in seen if "counter" in s or client._mux_prefix in s], seen

    # a port nothing listens on: NATS carries the request, the connection is tried again later, not per request
    assert await _direct_stream(client, "127.0.0.1:1", b"other", 5) == [b"other:%d" % i for i in range(5)]
    for _ in range(100):
        if client.connections.state("127.0.0.1:1") != "opening":
            break
        await asyncio.sleep(0.02)
    assert client.connections.state("127.0.0.1:1") == "failing"  # as `hpc status` shows it

    # the connection is cut mid-stream: the request fails now, not at a timeout, and the worker stops its work
    held = asyncio.ensure_future(_direct_stream(client, address, b"hold", 6))
    await asyncio.sleep(0.3)
    assert len(server._tasks) == 1
    t0 = time.monotonic()
    client.connections.get(address).transport.abort()
    with pytest.raises(PeerGone, match="direct connection"):
        await held
    assert time.monotonic() - t0 < 1
    for _ in range(50):
        if not server._tasks:
            break
        await asyncio.sleep(0.02)
    assert not server._tasks  # cancelled: no one is left to read its replies
    await spy.close()
    for bus in (server, client):
        await bus.drain_handlers(1)
        await bus.close()


async def test_a_direct_connection_without_the_deployments_secret_is_refused(nats):
    """A client whose credentials differ (so would NATS's) gets no direct connection; its requests still go where
    NATS lets them. The worker closes a connection whose first frame is not the secret, and one that sends a
    frame it cannot read."""
    from hpc.runtime import direct

    server, client = await Bus.connect(nats.url, "server"), await Bus.connect(nats.url, "client")

    async def count(data, reply):
        await reply(data + b":0")

    await server.serve("counter", count, listen=True)
    address = server.listener.address
    client.connections = direct.Connections(b"not the secret", client._deliver, client._lost)
    for _ in range(3):
        assert await _direct_stream(client, address, b"x", 1) == [b"x:0"]
        await asyncio.sleep(0.1)
    assert client.connections.get(address) is None  # refused, and not tried again at once
    assert client.connections.state(address) == "failing"
    host, port = direct.split(address)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\xff\xff\xff\xff garbage")
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the worker
    writer.close()
    for bus in (server, client):
        await bus.drain_handlers(1)
        await bus.close()


async def test_a_complete_request_sends_no_cancel_and_an_abandoned_one_does(stack):
    """The frontend stops reading at the delta that carries the finish reason and closes the stream there: that
    request is complete and must cost the workers no cancel message. One left before its end is cancelled."""
    import nats as nats_py
    from contextlib import aclosing

    async with ServingClient("agg", stack["etcd"], stack["nats"]) as client:
        spy = await nats_py.connect(stack["nats"])
        cancels = []

        async def note(msg):
            cancels.append(msg.subject)

        await spy.subscribe(client.subjects.cancel_all(), cb=note)
        await spy.flush()
        for _ in range(3):
            async with aclosing(client.generate(MODEL, [5, 6, 7], GREEDY)) as deltas:
                async for delta in deltas:
                    if delta.finish_reason:
                        break
        await client.bus.nc.flush()
        await spy.flush()
        await asyncio.sleep(0.2)
        assert cancels == []
        async with aclosing(client.generate(MODEL, [5, 6, 7], GREEDY, request_id="left-early")) as deltas:
            async for _ in deltas:
                break
        await client.bus.nc.flush()
        for _ in range(50):
            if cancels:
                break
            await asyncio.sleep(0.05)
        assert cancels == [client.subjects.cancel("left-early")]
        await spy.close()


async def test_a_request_that_arrives_after_its_cancel_is_dropped(stack):
    """Cancels travel through NATS; a request on a direct connection can arrive after its own cancel. The worker
    remembers cancels for requests it has not seen, and drops such a request on arrival."""
    async with ServingClient("agg", stack["etcd"], stack["nats"]) as client:
        worker = client.directory.by_role("aggregated", MODEL)[0]
        assert worker.direct
        await client.bus.publish(client.subjects.cancel("late-1"), b"")
        await client.bus.nc.flush()
        await asyncio.sleep(0.2)
        req = GenerateRequest("late-1", MODEL, [5, 6, 7], GREEDY)
        with pytest.raises(RequestTimeout):
            async for _ in client.bus.stream(worker.subject, encode(req), 1, 1):
                pass
        assert await tokens(client, [5, 6, 7])  # others are served


async def test_a_frontend_that_stops_reading_its_direct_connection_is_cut_off(nats, monkeypatch):
    """Replies a frontend leaves unread pile up in the worker; past a limit the worker closes the connection (as
    NATS drops a slow consumer), so the worker's memory stays bounded and the stuck streams fail."""
    from hpc.runtime import direct

    monkeypatch.setattr(direct, "SLOW_READER_BYTES", 1 << 20)
    server, client = await Bus.connect(nats.url, "server"), await Bus.connect(nats.url, "client")

    async def flood(data, reply):
        for _ in range(2000):
            await reply(b"x" * 4096)
            await asyncio.sleep(0)
        await asyncio.sleep(30)

    await server.serve("counter", flood, listen=True)
    address = server.listener.address
    client.connections.get(address)
    await _until_connected(client, address)
    conn = client.connections.get(address)
    conn.transport.pause_reading()  # a stuck frontend

    async def read_all():
        async for _ in client.stream("counter", b"go", 5, 5, address=address):
            pass

    reading = asyncio.ensure_future(read_all())
    for _ in range(200):
        await asyncio.sleep(0.02)
        if server._started and not server._tasks:
            break
    assert server._started and not server._tasks  # the worker cut it off and stopped the work
    conn.transport.resume_reading()  # it comes back to a closed connection: its stream fails
    with pytest.raises(PeerGone, match="direct connection"):
        await reading
    for bus in (server, client):
        await bus.drain_handlers(1)
        await bus.close()


async def test_an_aggregated_worker_that_dies_before_the_first_token_is_replaced_once(tmp_path, tiny_model, etcd,
                                                                                     nats, caplog):
    """The request goes to another aggregated worker, and its trace names the one that answered; the answer is the
    one any worker gives."""
    slow = tmp_path / "slow.yaml"  # 120 prompt tokens at 200 tokens/s: 0.6 s of prefill to kill the worker in
    slow.write_text("max_batch_size: 64\nmocker:\n  prefill_tokens_per_s: 200\n  decode_step_ms: 1\n")
    workers = {f"agg-{i}": start_worker(tmp_path, "aggregated", tiny_model, etcd.url, nats.url, "retry",
                                        engine="mocker", engine_config=slow, worker_id=f"agg-{i}") for i in range(2)}
    try:
        for w in workers.values():
            w.wait_ready()
        async with ServingClient("retry", etcd.url, nats.url) as client:
            while len(client.directory.by_role("aggregated", MODEL)) < 2:
                await asyncio.sleep(0.05)
            prompt, sampling = list(range(10, 130)), Sampling(max_tokens=3, ignore_eos=True)
            expected = await tokens(client, prompt, sampling)
            trace: dict = {}
            stream = client.generate(MODEL, prompt, sampling, trace=trace)
            first = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0.2)
            (victim,) = client.in_flight
            workers[victim].kill()
            got = list((await asyncio.wait_for(first, 10)).token_ids)
            async for delta in stream:
                got += delta.token_ids
            assert got == expected and trace["prefill_worker"] != victim
            assert f"{victim} left before the first token; sent to {trace['prefill_worker']}" in caplog.text
    finally:
        for w in workers.values():
            w.stop()
