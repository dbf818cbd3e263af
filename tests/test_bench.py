"""`hpc bench` and `hpc report` without a cluster: what counts as a token, goodput, the chart's data, the aiperf
export. The streams come from a real local HTTP server that answers the way the cases need."""

from __future__ import annotations

import asyncio
import json
import subprocess
from contextlib import asynccontextmanager
import sys
from pathlib import Path

import pytest
from aiohttp import web

from hpc import bench as b

REPO = Path(__file__).resolve().parent.parent


def sse(*events) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def chunk(text: str, usage: int | None = None) -> dict:
    return {"choices": [{"index": 0, "text": text}], **({"usage": {"completion_tokens": usage}} if usage else {})}


STREAMS = {  # what each fake server sends for any completion
    "no-token": sse({"choices": [{"index": 0, "text": "", "finish_reason": "stop"}],
                     "usage": {"completion_tokens": 0}}),
    "empty-text-tokens": sse(chunk("", 1), chunk("", 2), chunk("hi", 3),
                             {"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens_details":
                                                       {"cached_tokens": 16}}}),
    "text-only": sse(chunk("a"), chunk("b")),
}


@asynccontextmanager
async def http_server(handle, route: str):
    """A real HTTP server on loopback that answers POSTs to `route` with `handle`; yields its URL."""
    app = web.Application()
    app.router.add_post(route, handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
def server():
    """A real HTTP server on loopback; the path picks the stream."""
    async def handle(request: web.Request) -> web.StreamResponse:
        kind = request.match_info["kind"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(STREAMS[kind])
        return resp

    async def run(kind: str) -> b.Result:
        async with http_server(handle, "/{kind}/v1/completions") as url, b.streaming_client(f"{url}/{kind}",
                                                                                            10) as client:
            return await b.one(client, "m", list(range(32)), 3)

    return lambda kind: asyncio.run(run(kind))


def test_a_stream_without_a_token_is_an_error_not_a_zero_sample(server):
    r = server("no-token")
    assert r.error == "the stream ended without a generated token" and r.ttft is None
    row = b.summarize(1, [r], 1.0)
    assert row["errors"] == 1 and row["ttft_min_ms"] is None


def test_tokens_with_empty_text_are_timed_as_tokens(server):
    r = server("empty-text-tokens")
    assert r.error is None and r.timing == "tokens" and r.output_tokens == 3 and len(r.itl) == 2
    assert r.ttft > 0 and r.cached_tokens == 16


def test_a_server_without_usage_per_chunk_is_timed_by_text_and_says_so(server):
    r = server("text-only")
    assert r.error is None and r.timing == "text" and len(r.itl) == 1
    assert b.summarize(1, [r], 1.0)["timing"] == "text"


def test_goodput_counts_only_requests_within_both_limits():
    def req(ttft_ms, tpot_ms, tokens=11):
        return b.Result(ttft=ttft_ms / 1000, e2e=(ttft_ms + tpot_ms * (tokens - 1)) / 1000, output_tokens=tokens,
                        prompt_tokens=100, cached_tokens=25)

    results = [req(100, 10), req(100, 30), req(600, 10), req(600, 30), b.Result(error="HTTP 500")]
    row = b.summarize(4, results, wall=2.0, gpus=4, slo=b.Slo(ttft_ms=500, itl_ms=20))
    assert row["goodput_req_s"] == 0.5  # only the first: one request in 2 s
    assert row["req_s"] == 2.0 and row["errors"] == 1 and row["reused_share"] == 0.25
    assert row["output_tok_s_per_gpu"] == round(44 / 2 / 4, 1)
    assert b.summarize(4, results, 2.0, slo=b.Slo(ttft_ms=500))["goodput_req_s"] == 1.0


def fixed_sweep(tmp_path: Path) -> Path:
    """A sweep's results folder: 2 variants x 2 concurrencies, as `hpc sweep` writes them."""
    results = tmp_path / "conc"
    for task, (replicas, conc, tok_s, ttft) in enumerate([(1, 4, 800, 40), (1, 16, 1500, 120),
                                                           (2, 4, 900, 30), (2, 16, 2100, 60)]):
        d = results / "variants" / str(task)
        d.mkdir(parents=True)
        (d / "point.json").write_text(json.dumps({"workers.prefill.replicas": replicas, "bench.concurrency": conc}))
        row = {"concurrency": conc, "requests": 64, "errors": 0, "output_tok_s": tok_s, "req_s": 1.0,
               "gpus": 2 + replicas, "output_tok_s_per_gpu": round(tok_s / (2 + replicas), 1), "goodput_req_s": 1.0,
               "reused_share": 0.0, "ttft_p50_ms": ttft, "ttft_p99_ms": 2 * ttft, "tpot_p50_ms": 6.0,
               "itl_p50_ms": 6.0, "e2e_p50_ms": 300.0}
        (results / f"{task}.json").write_text(json.dumps({"isl": 512, "osl": 32, "date": "2026-11-24",
                                                          "rows": [row]}))
    return results


def test_report_draws_one_series_per_variant(tmp_path):
    from hpc.sweep import report_rows

    rows = report_rows(fixed_sweep(tmp_path))
    drawn = b.plot(rows, tmp_path / "chart.png", "sweep conc", svg=True)
    assert drawn == {"workers.prefill.replicas=1": [(266.7, 40), (500.0, 120)],
                     "workers.prefill.replicas=2": [(225.0, 30), (525.0, 60)]}
    assert b.pareto([p for pts in drawn.values() for p in pts]) == [(225.0, 30), (266.7, 40), (525.0, 60)]
    assert (tmp_path / "chart.png").stat().st_size > 10_000 and (tmp_path / "chart.svg").exists()


def test_report_command_prints_the_variants(tmp_path):
    results = fixed_sweep(tmp_path)
    out = subprocess.run([sys.executable, "-m", "hpc", "report", str(results), "--plot", str(tmp_path / "r.png")],
                         capture_output=True, text=True, timeout=60, cwd=REPO, env={"COLUMNS": "250", "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert "workers.prefill.replicas=2" in out.stdout and (tmp_path / "r.png").exists()


def test_aiperf_export_has_its_field_names(tmp_path):
    ok = b.Result(ttft=0.05, e2e=0.25, output_tokens=11, prompt_tokens=64, itl=[0.02] * 10)
    path = b.export_aiperf(tmp_path, [ok, b.Result(error="HTTP 503")], 2.0, 8, "m", "http://x", "hpc bench ...")
    agg = json.loads(path.read_text())
    assert agg["time_to_first_token"]["unit"] == "ms" and agg["time_to_first_token"]["p50"] == 50.0
    assert agg["inter_token_latency"]["avg"] == pytest.approx(20.0) and agg["request_count"]["avg"] == 2.0
    assert agg["error_summary"][0]["count"] == 1 and agg["output_token_throughput"]["avg"] == 5.5
    records = [json.loads(line) for line in (path.parent / "profile_export.jsonl").read_text().splitlines()]
    assert records[0]["metrics"]["output_sequence_length"] == {"value": 11, "unit": "tokens"}
    assert records[1]["metrics"] is None and records[1]["error"]["message"] == "HTTP 503"


def test_request_rate_arrivals_are_a_seeded_poisson_process():
    due = b.arrivals(20000, 500.0, seed=3)
    assert due == b.arrivals(20000, 500.0, seed=3) and due[0] == 0.0 and due == sorted(due)
    assert abs(due[-1] / (len(due) - 1) - 1 / 500) < 0.05 / 500  # mean gap 1/rate
    gaps = [y - x for x, y in zip(due, due[1:])]
    assert abs(sum(g < 1 / 500 for g in gaps) / len(gaps) - (1 - 2.718281828 ** -1)) < 0.02  # exponential gaps


def test_at_a_request_rate_requests_go_out_on_schedule_not_after_the_last_answer():
    """Open loop: 30 requests at 300/s against a server that takes 0.3 s each: sent on their arrival times (a
    closed loop of 4 would take 2.4 s), each timed from its send, and how late each left is recorded."""
    async def handle(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse(chunk("a", 1), chunk("b", 2)))
        return resp

    async def run():
        async with http_server(handle, "/v1/completions") as url:
            return await b.level(url, "m", [list(range(8))] * 30, 2, 64, 10, rate=300.0)

    results, wall = asyncio.run(run())
    assert all(r.error is None for r in results)
    assert wall < 1.2 and min(r.ttft for r in results) >= 0.29
    row = b.summarize(64, results, wall, rate=300.0)
    assert row["rate_req_s"] == 300.0 and row["late_p99_ms"] < 100


def test_several_load_generating_processes_share_the_prompts_the_concurrency_and_the_rate():
    """Two processes: every prompt sent once, at most the concurrency in flight across both, all timed; at a rate
    the two Poisson schedules differ (a seed each) and together keep the rate."""
    in_flight, most, seen = [0], [0], []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append((await request.json())["prompt"][0])
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        await asyncio.sleep(0.05)
        in_flight[0] -= 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse(chunk("a", 1), chunk("b", 2)))
        return resp

    prompts = [[i, 1, 2] for i in range(24)]

    async def run(**kw):
        async with http_server(handle, "/v1/completions") as url:
            return await asyncio.to_thread(b.run_level, url, "m", prompts, 2, 4, 10, processes=2, **kw)

    results, wall, cpu = asyncio.run(run())
    assert sorted(seen) == list(range(24)) and all(r.error is None and r.ttft > 0.04 for r in results)
    assert most[0] == 4 and 0.25 < wall < 2 and cpu > 0  # 24 requests of 50 ms, 4 at a time: 0.3 s
    row = b.summarize(4, results, wall, client_cpu=cpu, processes=2)
    assert row["client_processes"] == 2 and 0 < row["client_cores"] < 1
    # 4 streams, each waiting 50 ms for its first token and then getting the rest at once: most of the 4 wait
    assert 2.5 < row["before_first_token"] <= 4 and row["after_first_token"] < 0.5

    seen.clear()
    results, wall, _ = asyncio.run(run(rate=100.0))
    assert sorted(seen) == list(range(24)) and all(r.error is None for r in results)
    assert 0.1 < wall < 1.0  # 24 arrivals at 100/s: about 0.24 s, and the last takes 50 ms


def test_load_generating_processes_that_finish_apart_are_all_waited_for():
    """One process's share takes 2.5 s, the other's none: the first to finish is not taken for a dead one."""
    async def handle(request: web.Request) -> web.StreamResponse:
        if (await request.json())["prompt"][0] == 1:
            await asyncio.sleep(2.5)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse(chunk("a", 1)))
        return resp

    async def run():
        async with http_server(handle, "/v1/completions") as url:
            return await asyncio.to_thread(b.run_level, url, "m", [[0], [1]], 1, 2, 10, processes=2)

    results, wall, _ = asyncio.run(run())
    assert all(r.error is None for r in results) and len(results) == 2 and wall > 2.4


def stream_with(handle, kind: str = "x", idle_timeout: float = 10, requests: int = 1) -> list[b.Result]:
    """`requests` completions, one after another over the load generator's client, from a real server that
    answers with `handle`."""
    async def run():
        async with http_server(handle, "/{kind}/v1/completions") as url, b.streaming_client(f"{url}/{kind}",
                                                                                            idle_timeout) as client:
            return [await b.one(client, "m", list(range(8)), 3) for _ in range(requests)]

    return asyncio.run(run())


def test_each_event_is_timed_when_its_bytes_arrive_even_split_across_reads():
    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        first, second = sse(chunk("a", 1)), sse(chunk("b", 2), {"choices": [], "usage": {"completion_tokens": 2}})
        await resp.write(first[:10])  # half an event: nothing to time yet
        await asyncio.sleep(0.05)
        await resp.write(first[10:first.index(b"data: [DONE]")])
        await asyncio.sleep(0.3)
        await resp.write(second)
        return resp

    [r] = stream_with(handle)
    assert r.error is None and r.output_tokens == 2 and r.timing == "tokens"
    assert 0.05 <= r.ttft < 0.3 and len(r.itl) == 1 and 0.3 <= r.itl[0] < 0.6


def test_requests_reuse_one_keep_alive_connection():
    peers = []

    async def handle(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(STREAMS["empty-text-tokens"])
        return resp

    results = stream_with(handle, requests=3)
    assert all(r.error is None and r.output_tokens == 3 for r in results)
    assert len(peers) == 3 and len(set(peers)) == 1


def test_an_http_error_a_silent_server_and_a_cut_stream_are_errors_that_say_which():
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "no such model"}}, status=404)

    async def silent(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse(chunk("a", 1))[:-len("data: [DONE]\n\n")])
        await asyncio.sleep(5)
        return resp

    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse(chunk("a", 1))[:-len("data: [DONE]\n\n")])
        request.transport.close()
        return resp

    [r] = stream_with(refuse)
    assert r.error.startswith("HTTP 404: ") and "no such model" in r.error
    [r] = stream_with(silent, idle_timeout=0.3)
    assert "no data for 0.3 s" in r.error and r.ttft is not None and r.e2e < 3
    [r] = stream_with(cut)
    assert "closed the connection" in r.error
