"""`hpc diagnose` on live deployments of mocker workers with timing set per worker: it names the slow prefill
worker, the overloaded one, a slow KV transfer, a full decode pool, and nothing on a healthy deployment; the
numbers it prints agree with the timing the test set. `hpc tune prefill` finds a mocker's saturation point."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import pytest

from harness import hpc, start_worker
from hpc import bench
from hpc.config import load_deployment
from hpc.serve import LocalDeployment

REPO = Path(__file__).resolve().parent.parent
VOCAB = (10, 500)


def mocker_yaml(path: Path, **timing) -> Path:
    t = {"prefill_tokens_per_s": 100000, "prefill_overhead_ms": 2, "decode_step_ms": 4, "vocab_size": 500,
         **{k: v for k, v in timing.items() if k not in ("max_batch_size", "reuse", "num_kv_blocks")}}
    path.write_text(f"mocker: {json.dumps(t)}\nmax_batch_size: {timing.get('max_batch_size', 64)}\n"
                    f"num_kv_blocks: {timing.get('num_kv_blocks', 2048)}\n"
                    f"kv_cache_config: {{enable_block_reuse: {str(timing.get('reuse', False)).lower()}}}\n")
    return path


def deploy(tmp: Path, name: str, model: Path, prefill: Path, decode: Path, replicas: int = 1,
           router: str = "round-robin") -> LocalDeployment:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(f"name: {name}\nmodel: {{path: {model}, served_name: mock}}\ncluster: {{gpus_per_node: 0}}\n"
                   f"frontend: {{router: {router}}}\nworkers:\n"
                   f"  prefill: {{engine: mocker, engine_config: {prefill}, replicas: {replicas}}}\n"
                   f"  decode: {{engine: mocker, engine_config: {decode}}}\n")
    local = LocalDeployment(load_deployment(cfg), tmp / name, lease_ttl=2)
    local.start()
    return local


def traffic(url: str, n: int, isl: int, osl: int, concurrency: int, shared_prefix: int = 0, seed: int = 0) -> None:
    rng = random.Random(seed)
    prefix = [rng.randrange(*VOCAB) for _ in range(shared_prefix)]
    prompts = [prefix + [rng.randrange(*VOCAB) for _ in range(isl - shared_prefix)] for _ in range(n)]
    results, _ = asyncio.run(bench.level(url, "mock", prompts, osl, concurrency, 120))
    assert not [r for r in results if r.error], [r.error for r in results if r.error][:1]


def diagnosis(url: str, env: dict) -> tuple[int, dict]:
    out = hpc(["diagnose", "--url", url, "--json", "--window", "120"], env, check=False)
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def run_and_diagnose(tmp: Path, name: str, model: Path, env: dict, prefill: Path, decode: Path, load,
                     **deploy_options) -> tuple[int, dict]:
    """A deployment under `load(url)`, then what `hpc diagnose --json` says of it."""
    local = deploy(tmp, name, model, prefill, decode, **deploy_options)
    try:
        load(local.url)
        return diagnosis(local.url, env)
    finally:
        local.stop()


@pytest.fixture(scope="module")
def env(tiny_model):
    import os

    return {**os.environ, "HPC_MODEL_DIR": str(tiny_model)}


def test_healthy_deployment_has_nothing_to_fix(tmp_path, tiny_model, env):
    y = mocker_yaml(tmp_path / "m.yaml")
    code, d = run_and_diagnose(tmp_path, "dx-healthy", tiny_model, env, y, y, lambda url: traffic(url, 16, 500, 4, 1),
                               replicas=2)
    assert code == 0 and d["findings"][0]["kind"] == "healthy", d["findings"]
    assert d["summary"]["requests"] == 16
    # 500 tokens at 100k tokens/s + 2 ms: about 7 ms of compute per request
    assert 5 <= d["summary"]["stages_p50_ms"]["compute"] <= 12, d["summary"]


def test_one_slow_prefill_worker_is_named_with_its_speed(tmp_path, tiny_model, env):
    fast = mocker_yaml(tmp_path / "fast.yaml")
    slow = mocker_yaml(tmp_path / "slow.yaml", prefill_tokens_per_s=25000)  # 4x slower
    local = deploy(tmp_path, "dx-slow", tiny_model, fast, fast)
    extra = start_worker(tmp_path / "logs", "prefill", tiny_model, local.etcd.url, local.nats.url, "dx-slow",
                         engine="mocker", engine_config=slow, worker_id="prefill-slow", served_name="mock",
                         extra=["--credentials", str(tmp_path / "dx-slow" / "credentials.json")])
    try:
        extra.wait_ready()
        traffic(local.url, 24, 1000, 2, 1)
        code, d = diagnosis(local.url, env)
    finally:
        assert extra.stop()
        local.stop()
    assert code == 1
    f = d["findings"][0]
    assert f["kind"] == "compute" and f["worker"] == "prefill-slow", d["findings"]
    # 1000 tokens at 25k tokens/s + 2 ms overhead = 42 ms per 1k tokens; the peer 12 ms
    assert 36 <= f["evidence"]["ms_per_1k"] <= 55 and 9 <= f["evidence"]["peers_ms_per_1k"] <= 20, f


def test_the_worker_the_router_overloads_is_named_with_its_queue(tmp_path, tiny_model, env):
    y = mocker_yaml(tmp_path / "m.yaml", prefill_tokens_per_s=50000)
    # one shared 960-token prefix: kv-aware keeps every request on the worker that served it first
    code, d = run_and_diagnose(tmp_path, "dx-hot", tiny_model, env, y, y,
                               lambda url: traffic(url, 32, 1024, 2, 2, shared_prefix=960), replicas=2,
                               router="kv-aware")
    assert code == 1
    f = next(f for f in d["findings"] if f["kind"] == "queue wait")
    assert f["worker"] is not None and f["evidence"]["share"] > 0.75, d["findings"]
    # 1024 tokens at 50k tokens/s = 22 ms each, 2 at a time on one worker: one waits for part of the other
    assert 7 <= f["evidence"]["queue_p50_ms"] <= 30, f


def test_a_slow_kv_transfer_is_named(tmp_path, tiny_model, env):
    # 256 KiB of KV per token: 512 tokens move 128 MiB per request through NIXL (DRAM, TCP on this machine)
    y = mocker_yaml(tmp_path / "m.yaml", kv_bytes_per_token=262144, num_kv_blocks=96)
    code, d = run_and_diagnose(tmp_path, "dx-kv", tiny_model, env, y, y, lambda url: traffic(url, 6, 512, 3, 1))
    assert code == 1
    f = next(f for f in d["findings"] if f["kind"] == "KV transfer")
    assert f["evidence"]["share"] >= 0.3, f
    # the bytes it names and the time it measured agree: 128 MiB / GB/s = the transfer time
    assert abs(134.2 / f["evidence"]["gbps"] - f["evidence"]["transfer_p50_ms"]) <= \
        0.35 * f["evidence"]["transfer_p50_ms"], f


@pytest.mark.parametrize("name, decode_options, kind, key, least", [
    # a decode worker that steps 2 at a time: a new request waits for running ones, several 15 ms steps
    ("dx-decode", {"decode_step_ms": 15, "max_batch_size": 2}, "decode", "decode_first_p50_ms", 30),
    # 64 + 12 tokens take 5 of its 10 KV blocks: two requests fit, the others wait 12 steps of 10 ms for room
    ("dx-kvfull", {"decode_step_ms": 10, "num_kv_blocks": 10}, "decode KV full", "kv_wait_p50_ms", 50),
])
def test_a_full_decode_worker_is_named_with_what_is_full(tmp_path, tiny_model, env, name, decode_options, kind, key,
                                                         least):
    prefill = mocker_yaml(tmp_path / "p.yaml")
    decode = mocker_yaml(tmp_path / "d.yaml", **decode_options)
    code, d = run_and_diagnose(tmp_path, name, tiny_model, env, prefill, decode,
                               lambda url: traffic(url, 16, 64, 12, 8))  # 8 long streams at once
    assert code == 1
    f = next(f for f in d["findings"] if f["kind"] == kind)
    assert f["evidence"][key] >= least, f


def test_time_outside_the_engines_is_named_with_the_side_that_holds_it():
    """TTFT that is mostly neither queue nor compute is named: in the round trip to the worker or in the frontend,
    whichever holds it. A few ms of messaging, or a TTFT that is the engine's compute, is not a finding."""
    from hpc.diagnose import diagnose

    def record(ttft: float, rtt: float, compute: float) -> dict:
        return {"ttft": ttft, "preprocess": 0.0001, "prefill_rtt": rtt, "prefill": {"queue": 0.0, "compute": compute},
                "prefill_worker": "aggregated-0", "prompt_tokens": 32}

    _, found = diagnose([record(0.020, 0.019, 0.0001)] * 10)
    assert found[0].kind == "dispatch" and "round trip to the workers" in found[0].message, found
    assert found[0].evidence["worker_round_trip_p50_ms"] == 18.9
    _, found = diagnose([record(0.020, 0.002, 0.0001)] * 10)
    assert found[0].kind == "dispatch" and "frontend.processes" in found[0].message, found
    assert diagnose([record(0.003, 0.0028, 0.0001)] * 10)[1][0].kind == "healthy"
    assert diagnose([record(0.060, 0.059, 0.050)] * 10)[1][0].kind == "healthy"
    # Event loops that waited for a CPU are named, with their share of the time; those that did not, only counted
    workers = {"aggregated-0": {"role": "aggregated", "cpu_waiting": 0.45}, "aggregated-1": {"cpu_waiting": 0.02}}
    _, found = diagnose([record(0.020, 0.019, 0.0001)] * 10, workers, {"cores": 1.1, "waiting": 0.31})
    assert found[0].kind == "dispatch", found
    assert ("short of cores: the frontend processes (the one that waited most) waited for a CPU 31% of the time, "
            "worker aggregated-0 waited for a CPU 45% of the time") in found[0].message, found[0].message
    assert "aggregated-1" not in found[0].message and found[0].evidence["cpu_waiting"]["worker aggregated-1"] == 0.02
    _, found = diagnose([record(0.020, 0.019, 0.0001)] * 10, {"aggregated-0": {"cpu_waiting": 0.05}})
    assert "short of cores" not in found[0].message


def test_tune_prefill_finds_the_known_knee_and_writes_it(tmp_path, tiny_model, env):
    """A mocker with 2 ms of overhead per prefill at 125k tokens/s: throughput N / (2 ms + N / 125k) is 98.9% of
    its best (at 65536) at 16384 tokens per forward and 89.5% at 2048. Interference only makes a size look slower,
    so noise cannot move the knee below 16384; it would take a 4% slowdown (5 ms at 16384, in the best of 5
    repeats) to move it above. At 250k tokens/s and 1 ms, 2.7 ms of noise once did."""
    y = tmp_path / "prefill.yaml"
    y.write_text("# prefill engine\nmax_num_tokens: 2048\nmocker: {prefill_tokens_per_s: 125000, "
                 "prefill_overhead_ms: 2.0, vocab_size: 500}\n")
    cfg = tmp_path / "tune.yaml"
    cfg.write_text(f"name: tune\nmodel: {{path: {tiny_model}, served_name: mock}}\ncluster: {{gpus_per_node: 0}}\n"
                   f"workers:\n  prefill: {{engine: mocker, engine_config: {y.name}}}\n"
                   f"  decode: {{engine: mocker, engine_config: {y.name}}}\n")
    sizes = "256,2048,16384,65536"
    dry = hpc(["tune", "prefill", str(cfg), "--tokens", sizes, "--dry-run", "--plot", str(tmp_path / "knee.png"),
               "--out", str(tmp_path / "tune.json"), "--isl", "1024", "--repeats", "5"], env)
    assert "smallest batch within 5% of the best throughput: 16384" in dry.stdout, dry.stdout
    assert "+max_num_tokens: 16384" in dry.stdout and "nothing written" in dry.stdout
    assert "max_num_tokens: 2048" in y.read_text()  # --dry-run writes nothing
    assert (tmp_path / "knee.png").stat().st_size > 10_000
    assert all(r["reused"] == 0 for r in json.loads((tmp_path / "tune.json").read_text())["rows"])
    hpc(["tune", "prefill", str(cfg), "--tokens", sizes, "--write", "--isl", "1024", "--repeats", "5"], env)
    text = y.read_text()
    assert text.startswith("# prefill engine\nmax_num_tokens: 16384\n") and "max_batch_size: 16" in text


def test_tune_pd_recommends_workers_and_names_the_binding_limit(tmp_path, tiny_model, env):
    from hpc.tune import recommend

    # 10 req/s x 2000 tokens against 50k tokens/s of prefill: 0.4 workers of work -> 1 at 80% utilization; decode
    # steps of 6 ms + 0.5 ms per sequence under a 20 ms ITL: batch 28, 28 / 20 ms = 1400 tokens/s per worker;
    # 10 x 200 = 2000 tokens/s -> 2 decode workers.
    r = recommend(10, 2000, 200, 50_000, 0.045, 6, 0.5, 500, 20)
    assert (r.prefill_workers, r.decode_workers, r.decode_batch) == (1, 2, 28)
    y = tmp_path / "m.yaml"
    y.write_text("mocker: {prefill_tokens_per_s: 50000, prefill_overhead_ms: 1, decode_step_ms: 6, "
                 "decode_ms_per_sequence: 0.5, vocab_size: 500}\n")
    cfg = tmp_path / "pd.yaml"
    cfg.write_text(f"name: pd\nmodel: {{path: {tiny_model}, served_name: mock}}\ncluster: {{gpus_per_node: 0}}\n"
                   f"workers:\n  prefill: {{engine: mocker, engine_config: {y.name}}}\n"
                   f"  decode: {{engine: mocker, engine_config: {y.name}}}\n")
    out = hpc(["tune", "pd", str(cfg), "--rate", "40", "--isl", "2000", "--osl", "200", "--ttft-ms", "500",
               "--itl-ms", "20", "--sweep", str(tmp_path / "check.yaml")], env).stdout
    # 40 x 2000 / ~48k tokens/s = 1.7 workers of work -> 3 prefill; 40 x 200 / 1400 -> 6 decode
    assert "3 prefill" in out and "6 decode" in out and "binding" in out, out
    # The sweep that checks it: the recommendation and one prefill worker fewer, at the load's concurrency
    # (40 req/s x (0.5 s + 200 x 20 ms) = 180 in flight), the limits as goodput SLOs; every variant validates.
    from hpc.sweep import load_sweep, variants

    sweep = load_sweep(tmp_path / "check.yaml")
    assert sweep.axes == {"workers.prefill.replicas": [2, 3], "workers.decode.replicas": [6]}
    assert sweep.bench.concurrency == "180" and sweep.slo.ttft_ms == 500 and sweep.slo.itl_ms == 20
    assert len(variants(sweep, tmp_path / "check.yaml", tmp_path / "out")) == 2


def test_dashboard_reads_only_metrics_hpc_exports():
    import re

    dash = json.loads((REPO / "dashboards" / "hpc-serving.json").read_text())
    exported = set()
    for f in ("frontend/app.py", "hpc/runtime/metrics.py"):
        exported |= set(re.findall(r'"(hpc_[a-z_]+)"', (REPO / f).read_text()))
    for p in dash["panels"]:
        for t in p["targets"]:
            for name in re.findall(r"hpc_[a-z_]+", t["expr"]):
                base = re.sub(r"_(bucket|total|count|sum)$", "", name)
                assert base in exported, f"{p['title']}: {name} is not a metric hpc exports"


def test_stages_go_out_as_otlp_spans_when_an_endpoint_is_set(tmp_path, tiny_model, monkeypatch):
    import http.server
    import threading

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[bytes] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    y = mocker_yaml(tmp_path / "m.yaml")
    local = deploy(tmp_path, "dx-otlp", tiny_model, y, y)
    try:
        traffic(local.url, 2, 200, 3, 1)
        deadline = time.monotonic() + 15
        while not received and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        local.stop()
        server.shutdown()
    spans = []
    for body in received:
        req = ExportTraceServiceRequest.FromString(body)
        spans += [s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    names = {s.name for s in spans}
    assert {"request", "preprocess", "prefill", "queue", "compute", "kv_transfer", "decode first step"} <= names, names
    root = next(s for s in spans if s.name == "request")
    children = [s for s in spans if s.trace_id == root.trace_id and s is not root]
    assert all(c.parent_span_id == root.span_id for c in children) and len(children) >= 6
    assert all(root.start_time_unix_nano <= c.start_time_unix_nano for c in children)
