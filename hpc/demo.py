"""`make demo`: the main job on the embedded default. A local 3-node Slurm cluster, a tiny Llama model made here,
`hpc launch` of the disaggregated demo deployment (frontend on n1, prefill on n2, decode on n3), one streamed chat
request through the official openai client with its TTFT, then `hpc stop`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from hpc.slurm.localcluster import ClusterSpec, LocalCluster

REPO = Path(__file__).resolve().parent.parent
CONFIG = "configs/tiny-disagg.yaml"
console = Console()


def main() -> None:
    cluster = LocalCluster()
    with console.status("local Slurm cluster: munge, slurmctld, 3 slurmd"):
        cluster.up(ClusterSpec(nodes=3, gpus_per_node=4, cpus_per_node=4))
    console.print(f"[green]✓[/green] local Slurm cluster up: n1 n2 n3   (source {cluster.env_file} to use it)")
    model = Path(os.environ.get("HPC_MODEL_DIR", REPO / ".hpc" / "models" / "tiny-llama"))
    if not (model / "config.json").exists():
        from engines.torch.tiny import make_tiny_model

        make_tiny_model(model)
    console.print(f"[green]✓[/green] model: a tiny random-weight Llama with a BPE tokenizer in {model}")
    env = {**cluster.env(), "HPC_MODEL_DIR": str(model)}
    env.pop("SLURM_JOB_ID", None)
    hpc = [sys.executable, "-m", "hpc"]
    launched = subprocess.run(hpc + ["launch", CONFIG, "--nodes", "3", "--port", "0", "--detach"], env=env, cwd=REPO)
    if launched.returncode != 0:
        sys.exit(launched.returncode)
    try:
        state = json.loads((REPO / ".hpc" / "tiny-disagg.json").read_text())
        chat(state["frontend_url"], state)
    finally:
        subprocess.run(hpc + ["stop", "tiny-disagg"], env=env, cwd=REPO)
    console.print(f"the cluster stays up for more: `source {cluster.env_file}; .venv/bin/hpc launch {CONFIG} "
                  f"--nodes 3`; `.venv/bin/hpc localcluster down` ends it")


def chat(url: str, state: dict) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)
    t0 = time.perf_counter()  # the first request pays for loading the tokenizer and the first NIXL connection
    client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hello!"}],
                                   max_tokens=1)
    cold = time.perf_counter() - t0
    question = "Tell me a story about a dragon who learned to code."
    console.print(f"\n[bold]user:[/bold] {question}\n[bold]assistant:[/bold] ", end="")
    t0 = time.perf_counter()
    ttft, n = None, 0
    stream = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": question}],
                                            max_tokens=32, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.perf_counter() - t0
            console.print(chunk.choices[0].delta.content, end="", markup=False, highlight=False)
        if chunk.usage:
            n = chunk.usage.completion_tokens
    total = time.perf_counter() - t0
    console.print(f"\n\n(random weights, so the words are random.) TTFT [bold]{ttft * 1000:.1f} ms[/bold], "
                  f"{n} tokens in {total * 1000:.0f} ms  (the very first request took {cold * 1000:.0f} ms)")
    where = ", ".join(f"{name} on {','.join(info['nodes'])}" for name, info in state["steps"].items())
    console.print(f"where it ran: {where}; the KV cache moved from prefill to decode through NIXL\n")


if __name__ == "__main__":
    main()
