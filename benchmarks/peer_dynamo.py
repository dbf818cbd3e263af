"""hpc's frontend against NVIDIA Dynamo's, side by side, in one run: both with mocker workers that take no time.

    python benchmarks/peer_dynamo.py [--dynamo-python PATH] [--concurrency 1,16,64] [--rates 300,600]
                                     [--requests 400] [--rounds 3] [--processes N]
                                     [--client-processes N] [--nats-only]

Installs nothing. It needs Dynamo importable by `--dynamo-python` (default: this interpreter), e.g. in a venv of
its own:

    python3 -m venv dyn && dyn/bin/pip install ai-dynamo-runtime==1.6.1 && dyn/bin/pip install --no-deps \\
        ai-dynamo==1.6.1 && dyn/bin/pip install packaging pyyaml msgspec zstandard

Dynamo: etcd and NATS on loopback, `python -m dynamo.frontend` and `python -m dynamo.mocker --speedup-ratio 10000`
(its own defaults otherwise). hpc: `hpc serve`'s local stack with one aggregated mocker worker of zero simulated
time, and `--processes` frontend processes (default: frontend.processes' default for this machine), sending on
direct connections to the worker unless `--nats-only`. The same tiny
model (tokenizer), the same distinct 32-token prompts, 16 output tokens, the same load generator (`hpc bench`'s).

At each level (a concurrency: closed loop; a request rate: open loop, Poisson arrivals) the two stacks take turns,
round by round, the first alternating, so both see the same machine; each row pools its rounds. Each row also
gives the CPU time per request of the stack's processes (etcd, NATS, frontends, workers: read from /proc, whatever
their language) and of the load generator; how many requests were waiting for a first token and how many were
streaming the rest, on average (Little's law); and the TCP ACKs the kernel delayed per request. On a machine the
load saturates, a closed loop's latency is the concurrency over the throughput, so those say where the time goes;
an open loop compares latency at the same load.
Prints both tables and writes benchmarks/results/peer_dynamo.json."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ZERO, cpu_used, delayed_acks, process_cpu, table, write_result  # noqa: E402
from frontend.processes import default_processes  # noqa: E402
from hpc import bench  # noqa: E402
from hpc.config import load_deployment  # noqa: E402
from hpc.procs import Pid, free_port, stop  # noqa: E402
from hpc.serve import LocalDeployment  # noqa: E402
from hpc.services import start_etcd, start_nats  # noqa: E402

OSL, ISL = 16, 32
RATE_CAP = 512  # requests in flight at most at a request rate: far above what either stack holds at these rates


def dynamo_missing(python: str) -> str | None:
    try:
        probe = subprocess.run([python, "-c", "import dynamo.frontend, dynamo.mocker"], capture_output=True,
                               text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["not importable"])[-1]


def wait_for_model(url: str, timeout: float = 120) -> str:
    """The model name a frontend lists once a worker has registered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as r:
                data = json.load(r).get("data") or []
            if data:
                return data[0]["id"]
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no model at {url} after {timeout:.0f} s")


class DynamoStack:
    def __init__(self, python: str, model: Path, work: Path):
        self.etcd = self.nats = None
        self.procs = []
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        logs = work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        commands = {"frontend": ["dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(port)],
                    "mocker": ["dynamo.mocker", "--model-path", str(model), "--speedup-ratio", "10000"]}
        try:
            self.etcd = start_etcd(work / "etcd")
            self.nats = start_nats(work / "nats")
            env = {**os.environ, "ETCD_ENDPOINTS": self.etcd.url, "NATS_SERVER": self.nats.url}
            for name, args in commands.items():
                with open(logs / f"{name}.log", "w") as log:
                    self.procs.append(subprocess.Popen([python, "-m", *args, "--discovery-backend", "etcd"], env=env,
                                                       stdout=log, stderr=subprocess.STDOUT))
            self.model = wait_for_model(self.url)
            self.pids = {**{name: p.pid for name, p in zip(commands, self.procs)}, "etcd": self.etcd.popen.pid,
                         "nats": self.nats.popen.pid}
        except BaseException:  # nothing left running when Dynamo does not come up
            self.stop()
            raise

    def stop(self) -> None:
        for p in self.procs:
            stop(Pid.of(p.pid), popen=p)
        for service in (self.nats, self.etcd):
            if service is not None:
                service.stop()


def hpc_stack(model: Path, work: Path, processes: int, direct: bool = True,
              decode_step_ms: float = 0.0) -> LocalDeployment:
    work.mkdir(parents=True, exist_ok=True)
    (work / "zero.yaml").write_text(ZERO.replace("decode_step_ms: 0", f"decode_step_ms: {decode_step_ms}"))
    cfg = work / "peer-hpc.yaml"
    cfg.write_text(f"name: peer-hpc\nmodel: {{path: {model}, served_name: mock}}\ncluster: {{gpus_per_node: 0}}\n"
                   f"frontend: {{processes: {processes}, direct_connections: {str(direct).lower()}}}\n"
                   f"workers:\n  aggregated: {{engine: mocker, engine_config: zero.yaml}}\n")
    local = LocalDeployment(load_deployment(cfg), work / "hpc-state")
    local.start()
    return local


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dynamo-python", default=sys.executable)
    p.add_argument("--concurrency", default="1,16,64", help="closed-loop levels")
    p.add_argument("--rates", default="", help="open-loop levels too: requests/s, Poisson arrivals (e.g. 300,600), "
                                            f"at most {RATE_CAP} in flight")
    p.add_argument("--requests", type=int, default=400, help="per stack, level and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--processes", type=int, default=default_processes(), help="hpc frontend processes")
    p.add_argument("--nats-only", action="store_true", help="hpc's requests and replies through NATS, not on "
                   "direct connections to the worker (frontend.direct_connections: false)")
    p.add_argument("--client-processes", type=int, default=1, help="load-generating processes (hpc bench's "
                   "--client-processes): more where one is the bottleneck and cores are spare")
    p.add_argument("--decode-step-ms", type=float, default=0.0,
                   help="hpc's mocker takes this long per decode step (default 0: zero time). Dynamo's requests "
                   "take about 40 ms after their first token; about 2.7 here gives hpc's 16-token streams roughly "
                   "the same length, to compare first tokens with as many requests streaming on each side")
    p.add_argument("--name", default="peer_dynamo", help="result file name (without .json)")
    args = p.parse_args()
    missing = dynamo_missing(args.dynamo_python)
    if missing:
        print(f"Dynamo is not importable by {args.dynamo_python} ({missing}); this script installs nothing. "
              f"See its docstring for the install.", file=sys.stderr)
        sys.exit(2)
    from engines.torch.tiny import make_tiny_model  # here: --client-processes' children import this file again

    work = Path(tempfile.mkdtemp(prefix="hpc-peer-dynamo-"))
    model = make_tiny_model(work / "model")
    dyn = DynamoStack(args.dynamo_python, model, work / "dynamo")
    try:
        ours = hpc_stack(model, work / "hpc", args.processes, not args.nats_only, args.decode_step_ms)
        try:
            hpc_pids = {**{c.name: c.popen.pid for c in ours.components}, "etcd": ours.etcd.popen.pid,
                        "nats": ours.nats.popen.pid}
            via = (", NATS only" if args.nats_only else "") + (
                f", {args.decode_step_ms:g} ms decode steps" if args.decode_step_ms else "")
            stacks = {"dynamo 1.6.1": (dyn.url, dyn.model, dyn.pids),
                      f"hpc ({args.processes} frontend processes{via})": (ours.url, "mock", hpc_pids)}
            levels = [(int(c), None) for c in args.concurrency.split(",") if c]
            levels += [(RATE_CAP, float(r)) for r in args.rates.split(",") if r]
            rows = compare(stacks, levels, args)
        finally:
            ours.stop()
    finally:
        dyn.stop()
    path = write_result(args.name, rows, {"osl": OSL, "isl": ISL, "rounds": args.rounds,
                                          "cpu_cores": os.cpu_count(), "hpc_frontend_processes": args.processes,
                                          "client_processes": args.client_processes,
                                          "hpc_direct_connections": not args.nats_only,
                                          "hpc_decode_step_ms": args.decode_step_ms})
    print(table(rows, ["stack", "concurrency", "rate_req_s", "requests", "errors", "ttft_p50_ms", "ttft_p99_ms",
                       "e2e_p50_ms", "req_s", "output_tok_s", "server_cpu_ms_per_req", "client_cpu_ms_per_req",
                       "server_cores", "busiest_process", "busiest_process_cores", "client_cores",
                       "before_first_token", "after_first_token",
                       "delayed_acks_per_req", "cached_tokens"]))
    for i in range(0, len(rows), 2):
        a, b = rows[i], rows[i + 1]
        at = f"rate {a['rate_req_s']} req/s" if a["rate_req_s"] else f"concurrency {a['concurrency']}"
        print(f"{at}: {b['stack']} TTFT p50 {b['ttft_p50_ms']} ms, {b['req_s']} req/s; "
              f"{a['stack']} {a['ttft_p50_ms']} ms, {a['req_s']} req/s; req/s ratio {b['req_s'] / a['req_s']:.2f}")
    print(f"Written to {path}")


def compare(stacks: dict, levels: list[tuple[int, float | None]], args) -> list[dict]:
    """Each level is (concurrency, None): closed loop, or (cap, rate): open loop at that request rate."""
    rows = []
    for c, rate in levels:
        pooled = {name: ([], 0.0, 0.0, 0.0, 0) for name in stacks}
        spent = {name: {} for name in stacks}  # each process's CPU seconds over the rounds: pid -> (name, seconds)
        for rnd in range(args.rounds):
            order = list(stacks) if rnd % 2 == 0 else list(reversed(stacks))
            for name in order:
                url, model, pids = stacks[name]
                prompts = bench.make_prompts(args.requests, ISL, 10, 500, seed=1000 * c + int(rate or 0) + rnd)
                if rnd == 0:  # warm-up, on prompts of its own
                    bench.run_level(url, model, bench.make_prompts(20, ISL, 10, 500, seed=-1 - c), OSL, c, 60)
                before, acks = process_cpu(pids), delayed_acks()
                results, wall, client = bench.run_level(url, model, prompts, OSL, c, 60, rate, args.client_processes)
                used = cpu_used(before, process_cpu(pids))
                server = sum(cpu for _, cpu in used.values())
                for pid, (label, cpu) in used.items():
                    spent[name][pid] = (label, spent[name].get(pid, (label, 0.0))[1] + cpu)
                done, total, srv, cli, held = pooled[name]
                pooled[name] = (done + results, total + wall, srv + server, cli + client, held + delayed_acks() - acks)
        for name, (results, wall, server, client, held) in pooled.items():
            ok = max(1, sum(r.error is None for r in results))
            # the busiest single process, and the cores it used: near 1.0, a single-threaded process at its limit
            busiest, busiest_cpu = max(spent[name].values(), key=lambda item: item[1], default=("", 0.0))
            # CPU of every process of the stack (etcd, NATS, frontends, workers) and of the load generator: on a
            # saturated machine latency follows from these, whatever each stack's language
            row = {"stack": name, **bench.summarize(c, results, wall, rate=rate, client_cpu=client,
                                                    processes=args.client_processes),
                   "server_cpu_ms_per_req": round(1000 * server / ok, 3),
                   "client_cpu_ms_per_req": round(1000 * client / ok, 3), "server_cores": round(server / wall, 2),
                   "busiest_process": busiest, "busiest_process_cores": round(busiest_cpu / wall, 2),
                   "delayed_acks_per_req": round(held / ok, 2)}
            rows.append(row)
            print({k: row[k] for k in ("stack", "concurrency", "rate_req_s", "errors", "ttft_p50_ms", "ttft_p99_ms",
                                       "req_s")}, flush=True)
    return rows


if __name__ == "__main__":
    main()
