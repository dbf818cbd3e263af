"""python -m workers --role ROLE --engine ENGINE --deployment NAME --model PATH --etcd URL --nats URL ...

With --config DEPLOYMENT.yaml, the model, served name, engine, engine YAML and transfer settings come from the
deployment (command-line values win)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import uvloop

from engines.base import EngineError
from hpc.config import EngineConfig, load_deployment, load_engine_config
from hpc.errors import HpcError
from hpc.runtime.credentials import Credentials
from workers.engines import build_engine
from workers.worker import Worker, WorkerOptions

TRTLLM_WORLD_SIZE_ENV = "tllm_mpi_size"  # set by trtllm-llmapi-launch for rank 0's command


def parse(argv=None) -> WorkerOptions:
    p = argparse.ArgumentParser(prog="python -m workers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", required=True, choices=["aggregated", "prefill", "decode", "encode"])
    p.add_argument("--config", help="deployment YAML to take defaults from")
    p.add_argument("--engine", choices=["torch", "mocker", "trtllm"])
    p.add_argument("--deployment")
    p.add_argument("--model", help="model directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--served-name")
    p.add_argument("--engine-config", help="engine YAML (TensorRT-LLM LLM-API field names)")
    p.add_argument("--etcd", default=os.environ.get("HPC_ETCD"), help="etcd URL (env HPC_ETCD)")
    p.add_argument("--nats", default=os.environ.get("HPC_NATS"), help="NATS URL (env HPC_NATS)")
    p.add_argument("--worker-id", default="")
    p.add_argument("--host", default="", help="host name peers use for this worker")
    p.add_argument("--lease-ttl", type=int, default=5)
    p.add_argument("--metrics-port", type=int, default=0, help="0: a free port, -1: no metrics server")
    p.add_argument("--transfer-timeout", type=float)
    p.add_argument("--release-after", type=float)
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("--intra-node", choices=["auto", "nixl", "cuda-ipc"])
    p.add_argument("--random-weights", action="store_true", help="random weights from config.json (benchmarks)")
    p.add_argument("--remote-encode", action="store_true", help="send images to encode workers (E/P/D; the default "
                                                                "when the deployment has workers.encode)")
    p.add_argument("--embedding-buffer-mb", type=int, default=64, help="NIXL buffer for embeddings in flight")
    p.add_argument("--encode-cache-mb", type=int, default=512, help="an encode worker's cache of embeddings")
    p.add_argument("--credentials", default=os.environ.get("HPC_CREDENTIALS"),
                   help="the deployment's credentials file (env HPC_CREDENTIALS; written by the head step)")
    p.add_argument("--insecure", action="store_true", help="connect to etcd and NATS without credentials "
                                                           "(tests, hand-run services)")
    a = p.parse_args(argv)
    dep = load_deployment(a.config) if a.config else None
    spec = getattr(dep.workers, a.role) if dep else None
    if dep and spec is None:
        p.error(f"{a.config} has no workers.{a.role}")
    engine_config = (load_engine_config(a.engine_config) if a.engine_config
                     else dep.engine_config(a.role) if dep else EngineConfig())
    missing = [name for name, value in (("--engine", a.engine or (spec and spec.engine)),
                                        ("--deployment", a.deployment or (dep and dep.name)),
                                        ("--model", a.model or (dep and dep.model.path)),
                                        ("--etcd", a.etcd), ("--nats", a.nats)) if not value]
    if missing:
        p.error(f"missing {', '.join(missing)} (or give --config)")
    model = a.model or dep.model.path
    if not a.credentials and not a.insecure:
        raise HpcError("no credentials for etcd and NATS: give --credentials FILE (HPC_CREDENTIALS), or --insecure "
                       "for services that run without authentication")
    credentials = Credentials.load(a.credentials) if a.credentials else None
    return WorkerOptions(
        role=a.role, engine=a.engine or spec.engine, deployment=a.deployment or dep.name, model_path=model,
        served_name=a.served_name or (dep.model.name if dep else os.path.basename(model.rstrip("/"))),
        etcd=a.etcd, nats=a.nats, engine_config=engine_config, worker_id=a.worker_id, host=a.host,
        lease_ttl=a.lease_ttl, metrics_port=a.metrics_port,
        transfer_timeout=a.transfer_timeout or (dep.transfer.timeout_s if dep else 30.0),
        release_after=a.release_after or (dep.transfer.release_after_s if dep else 60.0),
        drain_timeout=a.drain_timeout, intra_node=a.intra_node or (dep.transfer.intra_node if dep else "auto"),
        random_weights=a.random_weights or bool(dep and dep.model.random_weights),
        remote_encode=a.remote_encode or bool(dep and dep.workers.encode is not None and a.role in ("prefill",
                                                                                                     "aggregated")),
        embedding_buffer_mb=a.embedding_buffer_mb, encode_cache_mb=a.encode_cache_mb, credentials=credentials)


def mpi_rank() -> tuple[int, int]:
    """(rank, size) under srun or mpirun; (0, 1) when started alone."""
    for rank, size in (("SLURM_PROCID", "SLURM_NTASKS"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")):
        if rank in os.environ:
            return int(os.environ[rank]), int(os.environ.get(size, "1"))
    return 0, 1


async def follow(rank: int, size: int, worker_id: str) -> None:
    """Ranks after the first: rank 0 registers and serves; the others hold their GPUs for the engine's
    collectives (TensorRT-LLM runs its own MPI session) and end with the step."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logging.getLogger("workers").info("rank %d of %d following %s", rank, size, worker_id)
    await stop.wait()


def tensor_parallel(options: WorkerOptions, rank: int, size: int):
    """The reference engine over `size` ranks: one process group, one GPU (or CPU process) per rank."""
    import torch

    from engines.torch.parallel import init_from_mpi

    if options.engine_config.tensor_parallel_size != size:
        raise HpcError(f"{size} MPI ranks but tensor_parallel_size is {options.engine_config.tensor_parallel_size}")
    device = torch.device("cpu")
    if options.engine_config.device != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("SLURM_LOCALID", "0")))
        torch.cuda.set_device(device)
        options.engine_config = options.engine_config.model_copy(update={"device": "cuda"})
    logging.getLogger("workers").info("rank %d of %d: tensor parallel on %s", rank, size, device)
    return init_from_mpi(device)


def main(argv=None) -> None:
    logging.basicConfig(level=os.environ.get("HPC_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = parse(argv)
        rank, size = mpi_rank()
        options.mpi_size = size
        tp = None
        if options.engine == "trtllm":
            if size > 1:  # trtllm-llmapi-launch hides the MPI world from rank 0's command
                raise HpcError(f"{size} MPI ranks run this worker directly; a TensorRT-LLM worker of several ranks "
                               f"runs as `srun --mpi=pmix ... trtllm-llmapi-launch python -m workers ...`")
            options.mpi_size = int(os.environ.get(TRTLLM_WORLD_SIZE_ENV, "1"))
        if size > 1 and options.engine == "torch":
            tp = tensor_parallel(options, rank, size)
            if rank > 0:
                build_engine(options.engine, options.model_path, options.engine_config, options.random_weights,
                             tp=tp).follow()
                return
        elif rank > 0:
            asyncio.run(follow(rank, size, options.worker_id))
            return
        # uvloop, as the frontend runs: at large decode batches the worker's event loop bounds tokens per second,
        # and uvloop's own work per wake-up and write is less (docs/benchmarks.md, the token path).
        uvloop.run(Worker(options, tp=tp).run())
    except (HpcError, EngineError) as e:  # bad config, unreachable service, bad model directory
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    # Drained and closed: leave without the interpreter's teardown, where NIXL's agents can crash the process
    # (a segfault seen after a clean drain) and turn a clean exit into a failed step.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
