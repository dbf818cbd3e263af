"""The OpenAI-compatible frontend on live `hpc serve` stacks: the official openai client, raw HTTP errors,
disconnects, workers joining and leaving. Real etcd, NATS, NIXL, torch on CPU."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from harness import config_variant, start_worker
from hpc.config import load_deployment
from hpc.procs import Pid, free_port, stop
from hpc.runtime.client import ServingClient
from hpc.serve import LocalDeployment

REPO = Path(__file__).resolve().parent.parent
MODEL = "tiny-llama"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story about a dragon."}]


def serve(name: str, state: Path, model: Path, monkeypatch_env: dict) -> LocalDeployment:
    os.environ.update(monkeypatch_env)
    local = LocalDeployment(load_deployment(REPO / "configs" / name), state, lease_ttl=2)
    local.start()
    return local


@pytest.fixture(scope="module")
def stacks(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("fe")
    env = {"HPC_MODEL_DIR": str(tiny_model)}
    agg = serve("tiny-agg.yaml", d / "agg", tiny_model, env)
    try:
        dis = serve("tiny-disagg.yaml", d / "dis", tiny_model, env)
    except BaseException:
        agg.stop()
        raise
    yield {"agg": agg, "dis": dis, "dir": d}
    assert dis.stop() == [] and agg.stop() == []


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", timeout=60, max_retries=0)


def test_openai_client_disaggregated_equals_aggregated(stacks):
    answers = {}
    for name in ("agg", "dis"):
        c = client(stacks[name])
        r = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stream=True) if ch.choices)
        assert streamed == r.choices[0].message.content
        assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 10
        answers[name] = r.choices[0].message.content
        comp = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
        assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 6
        answers[name + "-completion"] = comp.choices[0].text
    assert answers["dis"] == answers["agg"] and answers["dis-completion"] == answers["agg-completion"]


async def test_async_client_streams_with_usage(stacks):
    c = openai.AsyncOpenAI(base_url=f"{stacks['dis'].url}/v1", api_key="unused", timeout=60, max_retries=0)
    chunks = [ch async for ch in await c.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True})]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8
    await c.close()


def http_chunks(sock, limit: float = 30) -> list[bytes]:
    """One chunked HTTP/1.1 response read off a raw socket: its body chunks as framed on the wire."""
    data, deadline = b"", time.monotonic() + limit
    while not data.endswith(b"0\r\n\r\n"):
        assert time.monotonic() < deadline, data
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower(), head
    chunks = []
    while True:
        size, body = body.split(b"\r\n", 1)
        if int(size, 16) == 0:
            return chunks
        chunks.append(body[:int(size, 16)])
        body = body[int(size, 16) + 2:]


def test_the_last_token_usage_and_done_end_the_stream_in_one_chunk(stacks):
    """Fewer writes per stream: the last delta, the usage and [DONE] go out in one chunk that ends the response,
    and the connection serves the next request."""
    url = stacks["agg"].url.removeprefix("http://")
    host, port = url.split(":")
    body = json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": 5, "stream": True, "ignore_eos": True,
                       "stream_options": {"include_usage": True, "continuous_usage_stats": True}}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n" % len(body)) + body
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        for _ in range(2):  # keep-alive: the second response proves the first one ended cleanly
            sock.sendall(request)
            chunks = http_chunks(sock)
            events = [e.removeprefix(b"data: ") for e in chunks[-1].split(b"\n\n") if e]
            assert events[-1] == b"[DONE]" and len(events) >= 3, chunks  # the first delta too if it was the last
            last, usage = json.loads(events[-3]), json.loads(events[-2])
            assert last["choices"][0]["finish_reason"] == "length" and usage["choices"] == []
            assert usage["usage"]["completion_tokens"] == 5
            assert all(b"[DONE]" not in c for c in chunks[:-1])


def test_a_streams_head_and_first_chunk_leave_in_one_write(stacks):
    """The head of an event stream waits for its first chunk (frontend/http_protocol.py): the client's first read
    holds both. A JSON response's head is written as before."""
    host, port = stacks["agg"].url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "stream": True,
                       "ignore_eos": True}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n" % len(body)) + body
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        first = sock.recv(65536)
        head, _, rest = first.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head and b"data: {" in rest, first
        while not first.endswith(b"0\r\n\r\n"):
            first += sock.recv(65536)
    r = httpx.post(f"{stacks['agg'].url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                   timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_stop_strings_cut_the_answer(stacks):
    c = client(stacks["dis"])
    full = c.completions.create(model=MODEL, prompt="Hello", max_tokens=20, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = c.completions.create(model=MODEL, prompt="Hello", max_tokens=20, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]


@pytest.mark.parametrize("body,status,needle", [
    ("{not json", 400, "malformed JSON"),
    ({"model": MODEL}, 400, "messages"),
    ({"model": "nope", "messages": CHAT}, 404, "model 'nope' does not exist"),
    ({"model": MODEL, "messages": CHAT, "n": 2}, 400, "n: only n=1"),
    ({"model": MODEL, "messages": CHAT, "logprobs": True}, 400, "logprobs"),
    ({"model": MODEL, "messages": CHAT, "temperature": 5}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 3000}]}, 400,
     "exceeds the model's context length of 2048"),
    ({"model": MODEL, "messages": CHAT, "max_tokens": 4000}, 400, "max_tokens is 4000"),
])
def test_errors_in_openai_format(stacks, body, status, needle):
    url = f"{stacks['dis'].url}/v1/chat/completions"
    r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30) \
        if isinstance(body, str) else httpx.post(url, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and "Traceback" not in r.text


def test_wrong_method_path_and_size_in_openai_format(stacks):
    url = stacks["dis"].url
    r = httpx.get(f"{url}/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "takes POST" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and "/v1/nothing" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", content=b"x" * (33 << 20), timeout=60)
    assert r.status_code == 413 and "larger than 32 MiB" in r.json()["error"]["message"]


def test_health_models_and_metrics(stacks):
    url = stacks["dis"].url
    assert httpx.get(f"{url}/health").json() == {"status": "ready", "models": {MODEL: "ready"}}
    models = httpx.get(f"{url}/v1/models").json()["data"]
    assert [m["id"] for m in models] == [MODEL]
    client(stacks["dis"]).completions.create(model=MODEL, prompt="Hi", max_tokens=2)  # something to count
    metrics = httpx.get(f"{url}/metrics").text
    assert "hpc_frontend_ttft_seconds_bucket" in metrics and 'hpc_frontend_requests_total{status="200"}' in metrics


def test_hpc_bench_against_the_frontend(stacks, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "hpc", "bench", "--url", stacks["dis"].url, "--isl", "24", "--osl",
                        "5", "--concurrency", "1,3", "--requests", "6", "--out", str(out), "--plot",
                        str(tmp_path / "bench.png"), "--client-processes", "2"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["concurrency"] for row in rows] == [1, 3] and [row["client_processes"] for row in rows] == [1, 2]
    assert all(row["errors"] == 0 and row["ttft_p50_ms"] > 0 and row["tpot_p50_ms"] > 0 and row["output_tok_s"] > 0
               for row in rows)
    assert (tmp_path / "bench.png").stat().st_size > 1000


async def wait_blocks_free(stack, deployment: str) -> list:
    async with stack.client() as sc:
        for _ in range(100):
            stats = [await sc.stats(w) for w in sc.directory.workers.values()]
            if all(s.kv_blocks_free == s.kv_blocks_total and s.running == 0 and s.held == 0 for s in stats):
                return stats
            await asyncio.sleep(0.05)
    raise AssertionError(stats)


async def test_client_disconnect_cancels_and_frees_kv(stacks):
    stack = stacks["dis"]
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=30) as c:
        async with c.stream("POST", f"{stack.url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = 0
            async for line in r.aiter_lines():
                lines += line.startswith("data: ")
                if lines == 4:
                    break  # leave mid-stream
    t0 = time.monotonic()
    stats = await wait_blocks_free(stack, "tiny-disagg")
    assert time.monotonic() - t0 < 5 and {s.role for s in stats} == {"prefill", "decode"}


@pytest.mark.parametrize("protocol", ["frontend", "uvicorn"])
async def test_a_disconnect_before_the_first_token_cancels_the_request(protocol):
    """A client that leaves while the request waits for its first token cancels the request's task: under the
    frontend's HTTP protocol through its disconnect callback (no watching task per request), under plain uvicorn
    through a task that waits on receive()."""
    import uvicorn

    from frontend.generation import DisconnectWatch
    from frontend.http_protocol import HttpProtocol

    cancelled, watches = asyncio.Event(), []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        watch = DisconnectWatch(scope, receive, send)
        watches.append(watch)
        try:
            await asyncio.sleep(30)  # a prefill that takes long
        except asyncio.CancelledError:
            cancelled.set()
            raise

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                           http=HttpProtocol if protocol == "frontend" else "httptools"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
        await writer.drain()
        while not watches:
            await asyncio.sleep(0.01)
        writer.close()
        await asyncio.wait_for(cancelled.wait(), 2)
        assert watches[0].gone and (watches[0]._watcher is None) == (protocol == "frontend")
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


async def test_keep_alive_closes_an_idle_connection_only():
    """The frontend's HTTP protocol keeps one keep-alive timer per connection: a connection that goes on sending
    requests within timeout_keep_alive stays open however long it lives; one idle for longer is closed."""
    import uvicorn

    from frontend.http_protocol import HttpProtocol

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                           http=HttpProtocol, timeout_keep_alive=1))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def request() -> bytes:
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            return head + await asyncio.wait_for(reader.readexactly(2), 2)

        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:  # past two timeouts, never idle for one
            assert (await request()).endswith(b"ok")
            answered = time.monotonic()
            await asyncio.sleep(0.3)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # idle: closed
        assert 0.9 < time.monotonic() - answered < 3
        writer.close()
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


async def worker_idle_within(etcd: str, nats: str, deployment: str, seconds: float) -> bool:
    async with ServingClient(deployment, etcd, nats) as sc:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            stats = [await sc.stats(w) for w in sc.directory.workers.values()]
            if stats and all(s.running == 0 and s.waiting == 0 and s.in_flight <= 1 for s in stats):
                return True  # in_flight counts the stats request itself
            await asyncio.sleep(0.05)
    return False


def test_errors_from_workers_timeout_failure_and_leaving(tmp_path, tiny_model, etcd, nats):
    """504 when a worker is too slow (request timeout 4 s), and the work stops; a client leaving during the
    prefill stops it too; 502 when the worker dies mid-request (noticed when its 2 s lease ends, before the
    timeout); 503 once the model has no workers."""
    etcd, nats = etcd.url, nats.url  # services of its own, without authentication
    port = free_port()
    fe_log = tmp_path / "frontend.log"
    with open(fe_log, "wb") as out:
        fe = subprocess.Popen([sys.executable, "-m", "frontend", "--deployment", "edge", "--etcd", etcd, "--nats",
                               nats, "--host", "127.0.0.1", "--port", str(port), "--model", MODEL,
                               "--request-timeout", "4", "--insecure"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    slow = tmp_path / "slow.yaml"
    slow.write_text("mocker: {prefill_tokens_per_s: 20, vocab_size: 500}\n")  # 120 tokens: 6 s of prefill
    worker = None
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 503:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        body = {"model": MODEL, "prompt": list(range(5, 125)), "max_tokens": 4}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        worker = start_worker(tmp_path, "aggregated", tiny_model, etcd, nats, "edge", "mocker", slow).wait_ready()
        t0 = time.monotonic()
        while MODEL not in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]:
            assert time.monotonic() - t0 < 1.0, "model not listed within a second of its worker registering"
            time.sleep(0.02)
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
        assert r.status_code == 504 and "did not answer in time" in r.json()["error"]["message"]
        assert asyncio.run(worker_idle_within(etcd, nats, "edge", 2.0)), "the timed-out request kept running"
        # A client that leaves during the 6 s prefill cancels it on the worker at once, not when it ends.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={**body, "stream": True}, timeout=httpx.Timeout(10, read=0.5))
        assert asyncio.run(worker_idle_within(etcd, nats, "edge", 2.0)), "the prefill went on after the client left"
        with httpx.Client(timeout=20) as c:
            fut_t0 = time.monotonic()
            import threading

            box = {}
            t = threading.Thread(target=lambda: box.setdefault("r", c.post(f"{url}/v1/completions", json={
                **body, "prompt": list(range(5, 65))})))  # 3 s of prefill: dies before it answers
            t.start()
            time.sleep(0.3)
            worker.kill()
            t.join(15)
        assert box["r"].status_code == 502, box["r"].text
        assert time.monotonic() - fut_t0 < 5
        t0 = time.monotonic()
        while MODEL in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]:
            assert time.monotonic() - t0 < 5, "model still listed after its last worker died"
            time.sleep(0.05)
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=10).status_code == 503
    finally:
        if worker and worker.popen.poll() is None:
            worker.stop()
        assert stop(Pid.of(fe.pid), popen=fe)


def test_workers_join_and_leave_while_serving(stacks, tiny_model, tmp_path):
    stack = stacks["agg"]
    extra = start_worker(tmp_path, "aggregated", tiny_model, stack.etcd.url, stack.nats.url, "tiny-agg",
                         worker_id="aggregated-extra",
                         extra=["--credentials", str(stack.state_dir / "credentials.json")]).wait_ready()
    c = client(stack)
    ask = lambda: c.completions.create(model=MODEL, prompt="Hello there", max_tokens=4, temperature=0)  # noqa
    first = ask().choices[0].text
    assert all(ask().choices[0].text == first for _ in range(4))  # both workers answer the same
    depth = 'hpc_worker_queue_depth{worker="aggregated-extra"}'
    t0 = time.monotonic()
    while depth not in httpx.get(f"{stack.url}/metrics").text:  # load reports come every 0.25 s
        assert time.monotonic() - t0 < 3, "no queue depth for the new worker"
        time.sleep(0.1)
    assert extra.stop()  # SIGTERM: it leaves etcd first, then finishes what it has
    assert all(ask().choices[0].text == first for _ in range(4))
    assert depth not in httpx.get(f"{stack.url}/metrics").text  # a departed worker's series goes


def test_cached_tokens_equal_the_workers_reused_tokens(stacks):
    """usage.prompt_tokens_details.cached_tokens is what the prefix cache held, as the workers count it."""
    async def reused(stack) -> int:
        async with stack.client() as sc:
            for _ in range(100):
                if sc.directory.workers:
                    break
                await asyncio.sleep(0.05)
            return sum([(await sc.stats(w)).reused_prompt_tokens for w in sc.directory.workers.values()])

    shared = list(range(20, 100))  # 80 tokens: 5 full blocks of 16, all shared by a later prompt that extends them
    for name in ("agg", "dis"):
        before = asyncio.run(reused(stacks[name]))
        cached = []
        for tail in ([300, 301], [302, 303], [304]):
            r = client(stacks[name]).completions.create(model=MODEL, prompt=shared + tail, max_tokens=2)
            cached.append(r.usage.prompt_tokens_details.cached_tokens)
        stream = client(stacks[name]).completions.create(model=MODEL, prompt=shared + [305], max_tokens=2,
                                                         stream=True, stream_options={"include_usage": True})
        cached.append([c for c in stream if c.usage][-1].usage.prompt_tokens_details.cached_tokens)
        assert cached[1:] == [80, 80, 80] and sum(cached) == asyncio.run(reused(stacks[name])) - before, cached


def test_a_huge_prompt_is_refused_at_once_and_stalls_no_other_request(stacks):
    """A prompt that cannot fit the context is refused before it is tokenized; a large one that can is tokenized
    off the event loop. Either way the other requests go on."""
    url = f"{stacks['agg'].url}/v1/completions"
    huge = {"model": MODEL, "prompt": "dragon " * 300_000, "max_tokens": 2}  # 2.1 M characters
    large = {"model": MODEL, "prompt": "dragon " * 8_000, "max_tokens": 2}  # 56 k characters: fits 2048 x 32
    small = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}

    async def timed(client, body):
        t0 = time.perf_counter()
        r = await client.post(url, json=body)
        return r, time.perf_counter() - t0

    async def run():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(timed(client, huge), timed(client, large),
                                        *(timed(client, small) for _ in range(4)))

    (h, h_s), (big, _), *smalls = asyncio.run(run())
    assert h.status_code == 400 and "characters" in h.json()["error"]["message"] and h_s < 1.0
    assert big.status_code == 400 and "exceeds the model's context length" in big.json()["error"]["message"]
    assert all(r.status_code == 200 and s < 1.0 for r, s in smalls), [(r.status_code, s) for r, s in smalls]


def test_stop_sequences_are_bounded(stacks):
    r = httpx.post(f"{stacks['agg'].url}/v1/completions", timeout=10,
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "stop": [str(i) for i in range(5)]})
    assert r.status_code == 400 and "at most 4 stop sequences" in r.json()["error"]["message"]
    r = httpx.post(f"{stacks['agg'].url}/v1/completions", timeout=10,
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "stop": ["x" * 300]})
    assert r.status_code == 400 and "at most 256 characters" in r.json()["error"]["message"]


def test_several_frontend_processes_share_the_port_and_one_view(tmp_path, tiny_model):
    """frontend.processes: 3 on one port (SO_REUSEPORT): fresh connections spread over the processes, /stats and
    /metrics count every process's requests, and stopping the frontend leaves no process behind."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = config_variant("tiny-mocker", "multi-fe", tmp_path, "frontend: {processes: 3}\n")
    os.environ["HPC_MODEL_DIR"] = str(tiny_model)
    local = LocalDeployment(load_deployment(cfg), tmp_path / "state", lease_ttl=2)

    def children() -> list[str]:  # this deployment's (their command line names its config), not another's
        return subprocess.run(["pgrep", "-f", f"frontend .*{tmp_path}.*--child"], capture_output=True,
                              text=True).stdout.split()

    local.start()
    try:
        def ask(i):  # a new connection each time, as many clients make them
            r = httpx.post(f"{local.url}/v1/completions", json={"model": "mock-llama", "prompt": f"hello {i}",
                                                                 "max_tokens": 4}, timeout=30)
            return r.status_code

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(ask, range(60))) == [200] * 60
        stats = httpx.get(f"{local.url}/stats", timeout=10).json()
        assert stats["requests"] == 60 and len(stats["processes"]) == 3 and sum(stats["processes"]) == 60
        assert sum(1 for n in stats["processes"] if n) >= 2, stats  # the kernel spread the connections
        # each process that served requests reached the worker on its own direct connection
        assert stats["direct"]["open"] >= 2 and stats["direct"]["failing"] == 0, stats["direct"]
        # the event loops' CPU, pooled: the cores they used, and the most any of them waited for a CPU
        assert stats["cpu"]["cores"] > 0 and 0 <= stats["cpu"]["waiting"] <= 1, stats["cpu"]
        workers = httpx.get(f"{local.url}/stats/workers", timeout=10).json()
        assert all(0 <= w["cpu_waiting"] <= 1 for w in workers.values()), workers
        assert len(httpx.get(f"{local.url}/stats/requests", timeout=10).json()["requests"]) == 60
        metrics = httpx.get(f"{local.url}/metrics", timeout=10).text
        assert 'hpc_frontend_requests_total{status="200"} 60.0' in metrics
        assert "hpc_frontend_ttft_seconds_count 60.0" in metrics
        assert len(children()) == 3
    finally:
        assert local.stop() == []
    assert children() == [], "frontend processes left behind"


def test_metrics_of_several_processes_merge_into_one_exposition():
    """Counters and histograms summed, `_created` the earliest, a worker's queue depth (heard by every process)
    the largest; the result parses as Prometheus text."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from frontend.processes import merge_metrics

    texts = []
    for served, depth in ((3, 2), (5, 7)):
        r = CollectorRegistry()
        Counter("hpc_frontend_requests", "Requests", ["status"], registry=r).labels("200").inc(served)
        h = Histogram("hpc_frontend_ttft_seconds", "TTFT", registry=r, buckets=(0.01, 0.1))
        for _ in range(served):
            h.observe(0.05)
        Gauge("hpc_worker_queue_depth", "Depth", ["worker"], registry=r).labels("w0").set(depth)
        texts.append(generate_latest(r).decode())
    merged = {s.name + str(sorted(s.labels.items())): s.value
              for fam in text_string_to_metric_families(merge_metrics(texts)) for s in fam.samples}
    assert merged["hpc_frontend_requests_total[('status', '200')]"] == 8
    assert merged["hpc_frontend_ttft_seconds_count[]"] == 8
    assert merged["hpc_frontend_ttft_seconds_bucket[('le', '0.1')]"] == 8
    assert merged["hpc_worker_queue_depth[('worker', 'w0')]"] == 7


def test_the_lock_free_histogram_exposes_what_prometheus_clients_does():
    """LoopHistogram (the frontend's per-request histograms) gives the same `_bucket`, `_count` and `_sum` samples
    as prometheus_client's Histogram for the same observations, labelled or not, values on a bound included."""
    import random

    from prometheus_client import CollectorRegistry, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from hpc.runtime.metrics import LoopHistogram

    def samples(registry):
        return {(s.name, tuple(sorted(s.labels.items()))): round(s.value, 9)
                for fam in text_string_to_metric_families(generate_latest(registry).decode()) for s in fam.samples
                if not s.name.endswith("_created")}

    rng = random.Random(5)
    values = [rng.choice((0.001, 0.01, 2.0, 100.0)) if i % 5 == 0 else rng.expovariate(50) for i in range(500)]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    buckets = (0.001, 0.002, 0.005, 0.01, 0.1, 1, 10)
    loop = LoopHistogram("hpc_t_seconds", "T", registry=ours, buckets=buckets)
    staged = LoopHistogram("hpc_s_seconds", "S", ("stage", "worker"), registry=ours, buckets=buckets)
    reference = Histogram("hpc_t_seconds", "T", registry=theirs, buckets=buckets)
    reference_staged = Histogram("hpc_s_seconds", "S", ["stage", "worker"], registry=theirs, buckets=buckets)
    for i, v in enumerate(values):
        loop.observe(v)
        reference.observe(v)
        staged.labels("ttft", f"w{i % 3}").observe(v)
        reference_staged.labels("ttft", f"w{i % 3}").observe(v)
    assert samples(ours) == samples(theirs)
    assert samples(ours)[("hpc_t_seconds_count", ())] == 500
    with pytest.raises(ValueError):
        staged.labels("ttft")
