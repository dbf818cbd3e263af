"""A shared cluster: per-deployment credentials for NATS and etcd (a client without them, or with another
deployment's, can neither read nor write), API keys on the frontend, a second `hpc serve` of a running deployment
refused at once, and malformed or hostile requests each answered with the right 4xx within a second."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nats
import openai
import pytest

from harness import config_variant
from hpc.config import load_deployment
from hpc.runtime import discovery
from hpc.runtime.credentials import Credentials
from hpc.serve import LocalDeployment

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def two(tmp_path_factory, tiny_model):
    """Two deployments on this machine, each with its own services and secrets; the first has API keys."""
    d = tmp_path_factory.mktemp("sec")
    os.environ["HPC_MODEL_DIR"] = str(tiny_model)
    keyfile = d / "keys"
    keyfile.write_text("# one key per line\nsk-file-key\n")
    cfg = config_variant("tiny-agg", "keyed", d, f"frontend: {{api_keys: [sk-config-key], api_key_file: {keyfile}}}\n")
    a = LocalDeployment(load_deployment(cfg), d / "a", lease_ttl=2)
    a.start()
    b = LocalDeployment(load_deployment(REPO / "configs" / "tiny-disagg.yaml"), d / "b", lease_ttl=2)
    try:
        b.start()
    except BaseException:
        a.stop()
        raise
    yield a, b
    assert a.stop() == [] and b.stop() == []


async def nats_refuses(url: str, **auth) -> str:
    try:
        nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0, **auth)
    except Exception as e:
        return str(e) or type(e).__name__
    await nc.close()
    return ""


async def etcd_result(url: str, creds, key: str, write: bool = False) -> str:
    client = discovery.etcd_client(url, 3, creds)
    try:
        if write:
            await asyncio.wait_for(client.put(key.encode(), b"x"), 3)
        else:
            await asyncio.wait_for(client.get(key.encode()), 3)
        return "ok"
    except Exception as e:
        return str(e) or type(e).__name__
    finally:
        await client.close()


def test_nats_and_etcd_refuse_clients_without_the_deployments_credentials(two):
    a, b = two
    mine, theirs = a.credentials, b.credentials
    # NATS: no credentials, wrong ones, another deployment's: refused; its own: accepted.
    assert "Authorization" in asyncio.run(nats_refuses(a.nats.url))
    assert "Authorization" in asyncio.run(nats_refuses(a.nats.url, user=theirs.nats_user,
                                                       password=theirs.nats_password))
    assert "Authorization" in asyncio.run(nats_refuses(a.nats.url, user=mine.nats_user, password="guess"))
    assert asyncio.run(nats_refuses(a.nats.url, user=mine.nats_user, password=mine.nats_password)) == ""
    # etcd: reading and writing the deployment's keys needs its user; and that user reaches only its prefix.
    prefix = f"/hpc/{a.dep.name}/workers/"
    for creds in (None, theirs):
        assert asyncio.run(etcd_result(a.etcd.url, creds, prefix)) != "ok"
        assert asyncio.run(etcd_result(a.etcd.url, creds, prefix + "intruder", write=True)) != "ok"
    assert asyncio.run(etcd_result(a.etcd.url, mine, prefix)) == "ok"
    assert "permission denied" in asyncio.run(etcd_result(a.etcd.url, mine, "/hpc/other/x", write=True))
    # The secrets: a file of mode 600, on no command line.
    path = a.state_dir / "credentials.json"
    assert path.stat().st_mode & 0o777 == 0o600 and Credentials.load(path) == mine
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes()
        except OSError:
            continue
        assert mine.nats_password.encode() not in args and mine.etcd_password.encode() not in args


def test_api_keys(two):
    a, _ = two
    r = httpx.post(f"{a.url}/v1/chat/completions", json={"model": "tiny-llama", "messages": [
        {"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(f"{a.url}/v1/models", timeout=5).status_code == 401
    assert httpx.get(f"{a.url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
    assert httpx.get(f"{a.url}/health", timeout=5).status_code == 200  # open
    assert httpx.get(f"{a.url}/metrics", timeout=5).status_code == 200  # open unless metrics_need_key
    for key in ("sk-config-key", "sk-file-key"):
        c = openai.OpenAI(base_url=f"{a.url}/v1", api_key=key, timeout=30, max_retries=0)
        assert c.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=2).choices[0].finish_reason


def test_a_second_serve_of_a_running_deployment_is_refused_at_once(tmp_path, tiny_model):
    env = {**os.environ, "HPC_MODEL_DIR": str(tiny_model), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen([sys.executable, "-m", "hpc", "serve", "configs/tiny-agg.yaml"], cwd=REPO, env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "ready:" not in log.read_text():
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        t0 = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "hpc", "serve", "configs/tiny-agg.yaml"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=30)
        assert time.monotonic() - t0 < 10
        assert second.returncode == 1 and f"already served" in second.stderr and str(first.pid) in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGINT)
        first.wait(timeout=30)


def hostile_requests(model: str) -> list[tuple[str, dict, object, int]]:
    """(name, {method, path, headers}, body, expected status): at least 50 of them."""
    chat = "/v1/chat/completions"
    post = {"method": "POST", "path": chat}
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        ("empty body", post, b"", 400), ("not JSON", post, b"{nope", 400), ("JSON array", post, b"[1,2]", 400),
        ("JSON string", post, b'"hi"', 400), ("JSON null", post, b"null", 400), ("truncated JSON", post,
                                                                                   b'{"model": "x", "mess', 400),
        ("invalid UTF-8", post, b'{"model": "\xff\xfe"}', 400), ("no model", post, {"messages": msgs}, 400),
        ("no messages", post, {"model": model}, 400), ("empty messages", post, {"model": model, "messages": []}, 400),
        ("messages not a list", post, {"model": model, "messages": "hi"}, 400),
        ("message without role", post, {"model": model, "messages": [{"content": "hi"}]}, 400),
        ("unknown role", post, {"model": model, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
        ("content a number", post, {"model": model, "messages": [{"role": "user", "content": 5}]}, 400),
        ("unknown model", post, {"model": "nope", "messages": msgs}, 404),
        ("model a number", post, {"model": 5, "messages": msgs}, 400),
        ("max_tokens 0", post, {"model": model, "messages": msgs, "max_tokens": 0}, 400),
        ("max_tokens negative", post, {"model": model, "messages": msgs, "max_tokens": -1}, 400),
        ("max_tokens a string", post, {"model": model, "messages": msgs, "max_tokens": "many"}, 400),
        ("max_tokens over the context", post, {"model": model, "messages": msgs, "max_tokens": 10 ** 9}, 400),
        ("temperature 5", post, {"model": model, "messages": msgs, "temperature": 5}, 400),
        ("temperature negative", post, {"model": model, "messages": msgs, "temperature": -1}, 400),
        ("top_p 0", post, {"model": model, "messages": msgs, "top_p": 0}, 400),
        ("top_p 2", post, {"model": model, "messages": msgs, "top_p": 2}, 400),
        ("top_k negative", post, {"model": model, "messages": msgs, "top_k": -3}, 400),
        ("n 2", post, {"model": model, "messages": msgs, "n": 2}, 400),
        ("logprobs", post, {"model": model, "messages": msgs, "logprobs": True}, 400),
        ("penalty", post, {"model": model, "messages": msgs, "presence_penalty": 1}, 400),
        ("tools", post, {"model": model, "messages": msgs, "tools": [{"type": "function"}]}, 400),
        ("json response_format", post, {"model": model, "messages": msgs, "response_format": {"type": "json_object"}},
         400),
        ("5 stop strings", post, {"model": model, "messages": msgs, "stop": ["a", "b", "c", "d", "e"]}, 400),
        ("1000 stop strings", post, {"model": model, "messages": msgs, "stop": ["x"] * 1000}, 400),
        ("a 10k stop string", post, {"model": model, "messages": msgs, "stop": "s" * 10000}, 400),
        ("stop a number", post, {"model": model, "messages": msgs, "stop": 7}, 400),
        ("stream a string", post, {"model": model, "messages": msgs, "stream": "yes please"}, 400),
        ("stream_options not an object", post, {"model": model, "messages": msgs, "stream_options": 3}, 400),
        ("image part for a text model", post, {"model": model, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400),
        ("unknown content part", post, {"model": model, "messages": [{"role": "user", "content": [
            {"type": "video", "video": "x"}]}]}, 400),
        ("content part not an object", post, {"model": model, "messages": [{"role": "user", "content": [3]}]}, 400),
        ("prompt over the context in characters", post, {"model": model, "messages": [
            {"role": "user", "content": "word " * 200_000}]}, 400),
        ("NUL bytes and odd unicode", post, {"model": model, "messages": [{"role": "user", "content": "\u0000\ud83d"}],
                                             "max_tokens": 0}, 400),
        ("body over 32 MiB", post, b"x" * (33 << 20), 413),
        ("GET on chat", {"method": "GET", "path": chat}, None, 405),
        ("PUT on chat", {"method": "PUT", "path": chat}, b"{}", 405),
        ("DELETE on completions", {"method": "DELETE", "path": "/v1/completions"}, None, 405),
        ("completion without prompt", {"method": "POST", "path": "/v1/completions"}, {"model": model}, 400),
        ("completion empty prompt", {"method": "POST", "path": "/v1/completions"}, {"model": model, "prompt": ""},
         400),
        ("completion several prompts", {"method": "POST", "path": "/v1/completions"},
         {"model": model, "prompt": ["a", "b"]}, 400),
        ("completion token ids out of vocabulary", {"method": "POST", "path": "/v1/completions"},
         {"model": model, "prompt": [10 ** 9], "max_tokens": 2}, 400),
        ("completion prompt a dict", {"method": "POST", "path": "/v1/completions"},
         {"model": model, "prompt": {"a": 1}}, 400),
        ("completion echo", {"method": "POST", "path": "/v1/completions"}, {"model": model, "prompt": "a",
                                                                           "echo": True}, 400),
        ("unknown path", {"method": "GET", "path": "/v1/engines"}, None, 404),
        ("path traversal", {"method": "GET", "path": "/../../etc/passwd"}, None, 404),
        ("wrong content type, valid JSON", {**post, "headers": {"content-type": "text/plain"}},
         {"model": "nope", "messages": msgs}, 404),
    ]
    return cases


def test_fifty_hostile_requests_each_get_their_4xx_within_a_second(two):
    _, b = two  # no API keys on this one
    cases = hostile_requests("tiny-llama")
    assert len(cases) >= 50
    with httpx.Client(base_url=b.url, timeout=10) as c:
        for name, req, body, status in cases:
            t0 = time.monotonic()
            content = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            r = c.request(req["method"], req["path"], content=content, headers=req.get("headers"))
            took = time.monotonic() - t0
            assert r.status_code == status, f"{name}: {r.status_code} {r.text[:200]}"
            err = r.json().get("error", {})
            assert err.get("message") and err.get("code") == status, f"{name}: {r.text[:200]}"
            assert took < 1.0, f"{name}: {took:.2f} s"
        ok = openai.OpenAI(base_url=f"{b.url}/v1", api_key="unused", timeout=30, max_retries=0)
        assert ok.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3).choices[0].finish_reason
