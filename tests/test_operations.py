"""Operating a launched deployment on the local Slurm cluster: death noticed within a second, restarts, head services
that come back, a worker given up, the live status view, run folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import openai
import pytest
from rich.console import Console

from harness import hpc, squeue
from test_slurm import chat, wait_gone

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def env(cluster, tiny_model, work_dir):
    e = {**cluster.env(), "HPC_MODEL_DIR": str(tiny_model), "PYTHONUNBUFFERED": "1"}
    e.pop("SLURM_JOB_ID", None)
    return e


def processes(pattern: str) -> list[int]:
    """PIDs of the interpreters (not the srun clients) whose command line has `pattern`."""
    out = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in map(int, out):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and not argv[0].endswith(b"srun") and pid != os.getpid():
            pids.append(pid)
    return pids


def kill(pattern: str) -> list[int]:
    pids = processes(pattern)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def status_json(env, name: str) -> dict:
    return json.loads(hpc(["status", name, "--json"], env).stdout)


def component(snap: dict, name: str) -> dict:
    return next(c for c in snap["components"] if c["name"] == name)


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout} s: {what}")


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def disagg(env):
    hpc(["launch", "configs/tiny-disagg.yaml", "--nodes", "3", "--port", "0", "--detach"], env)
    state = json.loads((REPO / ".hpc" / "tiny-disagg.json").read_text())
    yield state
    hpc(["stop", "tiny-disagg"], env)
    assert squeue(env) == []
    assert wait_gone("tiny-disagg.yaml") == []
    assert not processes("hpc.supervise tiny-disagg")


def test_decode_worker_killed_mid_stream_errors_within_a_second_and_comes_back(env, disagg):
    stream = client(disagg["frontend_url"]).chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2000, stream=True,
        extra_body={"ignore_eos": True})
    killed_at, error = None, None
    try:
        for n, _ in enumerate(stream):
            if n == 10:
                assert kill("--role decode --worker-id decode-0")
                killed_at = time.monotonic()
    except openai.APIError as e:
        error = e
    waited = time.monotonic() - killed_at
    assert error is not None and "left" in str(error), error
    assert waited < 1.0, f"the error event came {waited:.2f} s after the kill"
    print(f"error event {1000 * waited:.0f} ms after SIGKILL of decode-0")
    # The supervisor starts the step again (backoff 1 s) and the worker registers again.
    def back(s):
        c = component(s, "decode-0")
        return c["restarts"] == 1 and c["registered"] and c["state"] == "running" and s

    snap = wait_for(lambda: back(status_json(env, "tiny-disagg")), 60, "decode-0 restarted and registered again")
    assert component(snap, "decode-0")["restarts"] == 1
    assert "step ended" in component(snap, "decode-0")["last_restart"]
    assert chat(disagg["frontend_url"])
    run = Path(disagg["run_dir"])
    assert "decode-0: started again (restart 1" in (run / "restarts.log").read_text()
    assert "--- restart 1:" in (run / "logs" / "decode-0.log").read_text()


def test_etcd_and_nats_killed_come_back_and_workers_register_again(env, disagg):
    etcd_port = disagg["endpoints"]["etcd"].rsplit(":", 1)[1]
    nats_port = disagg["endpoints"]["nats"].rsplit(":", 1)[1]
    t0 = time.monotonic()
    assert kill(f"etcd --name hpc-{etcd_port}") and kill(f"-p {nats_port} ")  # this deployment's, no other

    def serves():
        try:
            return chat(disagg["frontend_url"])
        except openai.APIError:
            return None

    # Requests on the frontend's direct connections to the workers need neither while they are away
    head_log = Path(disagg["steps"]["head"]["log"])
    wait_for(lambda: all(f"HPC_RESTART {s}" in head_log.read_text() for s in ("etcd", "nats")), 30,
             "the head step restarts etcd and NATS")
    wait_for(serves, 30, "a request succeeds after etcd and NATS were killed and restarted")
    print(f"requests succeed {time.monotonic() - t0:.1f} s after SIGKILL of etcd and NATS")
    snap = status_json(env, "tiny-disagg")
    assert all(component(snap, w)["registered"] for w in ("prefill-0", "decode-0"))


def test_status_view_renders_components_load_and_the_last_minute(env, disagg):
    from hpc.launch import LaunchState
    from hpc.status import render, snapshot

    for _ in range(3):
        chat(disagg["frontend_url"])
    console = Console(record=True, width=160)
    console.print(render(snapshot(LaunchState.load("tiny-disagg"), env)))
    text = console.export_text()
    for expected in ("head", "frontend", "prefill-0", "decode-0", "running", "KV used", "last minute",
                     "TTFT p50/p99", "direct connections (", "CPU wait", "frontend event loops, last 10 s"):
        assert expected in text, text
    snap = status_json(env, "tiny-disagg")
    assert snap["supervisor"] == "running"
    assert snap["frontend"]["last_minute"]["requests"] >= 3
    direct = snap["frontend"]["last_minute"]["direct"]
    assert direct["enabled"] and direct["open"] >= 1 and direct["failing"] == 0, direct
    load = component(snap, "decode-0")["load"]
    assert load["kv_blocks_total"] > 0 and load["waiting"] == 0
    # how long the event loops waited for a CPU: the workers' from their load reports, the frontend's from /stats
    assert 0 <= load["cpu_waiting"] <= 1, load
    cpu = snap["frontend"]["last_minute"]["cpu"]
    assert cpu["cores"] > 0 and 0 <= cpu["waiting"] <= 1, cpu


def test_run_folder_keeps_config_script_plan_and_logs(env, disagg):
    run = Path(disagg["run_dir"])
    assert run.parent == REPO / "runs" and run.name.startswith("tiny-disagg-")
    for f in ("config.yaml", "script.sh", "plan.json", "run.json", "engines/prefill.yaml", "logs/frontend.log"):
        assert (run / f).exists(), f
    assert run.name in hpc(["runs"], env).stdout
    assert "HPC_WORKER_READY prefill-0" in hpc(["logs", "prefill-0"], env).stdout
    assert not list((REPO / "configs").rglob("*.log"))


def test_prefill_killed_before_its_first_token_is_retried_and_a_failing_worker_given_up(env, work_dir):
    """Two mocker prefill workers with a slow prefill: one dies mid-prefill and both requests still succeed. Then
    its engine YAML is made invalid: every restart fails at start, and after restart.max the step is given up."""
    engine = work_dir / "slow-prefill.yaml"
    engine.write_text("max_batch_size: 8\nmocker: {prefill_tokens_per_s: 200, decode_step_ms: 2}\n")
    cfg = work_dir / "ops-mocker.yaml"
    cfg.write_text(f"""name: ops-mocker
model: {{path: "${{HPC_MODEL_DIR}}", served_name: mock-llama}}
cluster: {{gpus_per_node: 0}}
frontend: {{port: 0}}
restart: {{max: 2, backoff_s: 0.2, window_s: 600}}
workers:
  prefill: {{engine: mocker, engine_config: {engine.name}, replicas: 2}}
  decode: {{engine: mocker, engine_config: {engine.name}}}
""")
    hpc(["launch", str(cfg), "--nodes", "3", "--detach"], env)
    try:
        url = json.loads((REPO / ".hpc" / "ops-mocker.json").read_text())["frontend_url"]
        c = client(url)
        answers, errors = [], []

        def ask():
            try:  # ~120 prompt tokens at 200 tokens/s: over half a second of prefill
                answers.append(c.completions.create(model="mock-llama", prompt="one two three " * 40,
                                                    max_tokens=4).choices[0].finish_reason)
            except openai.APIError as e:
                errors.append(e)

        for _ in range(2):  # the decode worker reads KV from both prefill workers (and knows their agents)
            assert c.completions.create(model="mock-llama", prompt="before", max_tokens=3).choices[0].finish_reason
        threads = [threading.Thread(target=ask) for _ in range(2)]  # round-robin: one on each prefill worker
        for t in threads:
            t.start()
        time.sleep(0.3)  # both requests are in their prefill by now
        assert kill("--role prefill --worker-id prefill-0")
        for t in threads:
            t.join(60)
        assert errors == [] and answers == ["length", "length"]
        assert "prefill-0 left before the first token; sent to prefill-1" in hpc(
            ["logs", "frontend", "--deployment", "ops-mocker"], env).stdout

        def back(s):
            c = component(s, "prefill-0")
            return c["restarts"] == 1 and c["registered"] and c["state"] == "running"

        wait_for(lambda: back(status_json(env, "ops-mocker")), 60, "prefill-0 back")
        for _ in range(4):  # both prefill workers in turn: the decode worker reads KV from the restarted one
            assert c.completions.create(model="mock-llama", prompt="after the restart", max_tokens=3
                                        ).choices[0].finish_reason == "length"
        engine.write_text("max_batch_size: 0\n")  # every start of a worker now fails on its engine YAML
        assert kill("--role prefill --worker-id prefill-0")
        snap = wait_for(lambda: (s := status_json(env, "ops-mocker")) and component(s, "prefill-0")["given_up"]
                        and s, 60, "prefill-0 given up")
        gone = component(snap, "prefill-0")
        assert gone["state"] == "given up" and gone["restarts"] == 2  # one good restart, one that failed
        assert "max_batch_size" in gone["tail"], gone["tail"]
        assert "given up" in hpc(["status", "ops-mocker"], env).stdout
        assert c.completions.create(model="mock-llama", prompt="still served",
                                    max_tokens=2).choices[0].finish_reason == "length"
    finally:
        hpc(["stop", "ops-mocker"], env)
    # its allocation is gone (the module's tiny-disagg deployment may still run beside it)
    assert not [job for job in squeue(env) if "hpc.ops" in job]
    assert wait_gone("ops-mocker.yaml") == []
