"""Pure planning: a deployment and an allocation become the steps to run. No I/O, so it is tested exhaustively.

Head node (the allocation's first): one step with etcd and NATS, one with the frontend (both CPU-only, sharing
the node with whatever else runs there). Workers: each replica gets tensor x pipeline parallel GPUs — whole nodes
for workers of a node or more, otherwise GPUs packed onto the first node with room. Workers that use no GPU (the
reference engine on CPU, the mocker) spread over the nodes after the head, one rank per node."""

from __future__ import annotations

from dataclasses import dataclass, field

from hpc.config import Deployment
from hpc.errors import HpcError

ROLE_ORDER = ("encode", "prefill", "decode", "aggregated")
TRTLLM_LAUNCHER = ("trtllm-llmapi-launch",)


class PlanError(HpcError):
    pass


@dataclass(frozen=True)
class Allocation:
    job_id: str | None
    nodes: tuple[str, ...]
    gpus_per_node: int
    created: bool = False  # we asked for it (salloc), so we release it on stop


@dataclass(frozen=True)
class Step:
    name: str  # "head", "frontend", "prefill-0", ...
    kind: str  # "head" | "frontend" | "worker"
    nodes: tuple[str, ...]
    ntasks_per_node: int = 1
    gpus: tuple[int, ...] = ()  # GPU indices on each node (the same on every node of the step)
    role: str | None = None
    replica: int = 0
    engine: str | None = None
    mpi: bool = False
    args: tuple[str, ...] = ()  # after `python -m <module>`
    module: str = ""
    env: tuple[tuple[str, str], ...] = ()
    # Runs before the interpreter on every rank: TensorRT-LLM workers start under `trtllm-llmapi-launch`, which
    # runs our command on rank 0 and TensorRT-LLM's MPI workers on the other ranks.
    launcher: tuple[str, ...] = ()

    @property
    def ntasks(self) -> int:
        return self.ntasks_per_node * len(self.nodes)


@dataclass(frozen=True)
class Plan:
    deployment: str
    config: str
    model: str
    head: str
    allocation: Allocation
    steps: tuple[Step, ...] = field(default_factory=tuple)

    def workers(self) -> list[Step]:
        return [s for s in self.steps if s.kind == "worker"]

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)


def uses_gpus(dep: Deployment, role: str) -> bool:
    spec = getattr(dep.workers, role)
    if spec.engine == "mocker":
        return False
    if spec.engine == "torch":
        return dep.engine_config(role).device != "cpu"
    return True


def needed_gpus(dep: Deployment) -> int:
    return sum(s.replicas * s.gpus_per_worker for r, s in dep.workers.items() if uses_gpus(dep, r))


def worker_gpus(dep: Deployment) -> int:
    """The GPUs the workers are written for (replicas x TP x PP per role), the denominator of throughput per GPU.
    Mocker and CPU workers count as the GPUs they stand in for."""
    return sum(s.replicas * s.gpus_per_worker for _, s in dep.workers.items())


def plan(dep: Deployment, alloc: Allocation, config_path: str, state_dir: str,
         frontend_port: int | None = None) -> Plan:
    nodes, gpn = list(alloc.nodes), alloc.gpus_per_node
    where = config_path
    if not nodes:
        raise PlanError("the allocation has no nodes")
    if dep.cluster.nodes and dep.cluster.nodes > len(nodes):
        raise PlanError(f"{where}: cluster.nodes: the deployment needs {dep.cluster.nodes} nodes; the allocation "
                        f"has {len(nodes)} ({', '.join(nodes)})")
    gpus_needed = needed_gpus(dep)
    if gpus_needed and gpus_needed > gpn * len(nodes):
        raise PlanError(f"{where}: the workers need {gpus_needed} GPUs; the allocation has {len(nodes)} nodes x "
                        f"{gpn} GPUs = {gpn * len(nodes)} (ask for {-(-gpus_needed // max(gpn, 1))} nodes)")
    head = nodes[0]
    steps = [
        Step("head", "head", (head,), module="hpc.head", args=("--state-dir", state_dir, "--deployment", dep.name)),
        Step("frontend", "frontend", (head,), module="frontend", args=(
            "--deployment", dep.name, "--host", "0.0.0.0",
            "--port", str(dep.frontend.port if frontend_port is None else frontend_port),
            "--router", dep.frontend.router, "--model", dep.model.name,
            "--request-timeout", str(dep.frontend.request_timeout_s), "--config", config_path)),
    ]
    free = {n: list(range(gpn)) for n in nodes}
    cpu_nodes = nodes[1:] or nodes
    cpu_turn = 0
    for role in ROLE_ORDER:
        spec = getattr(dep.workers, role)
        if spec is None:
            continue
        for i in range(spec.replicas):
            name = f"{role}-{i}"
            ranks = spec.gpus_per_worker
            if uses_gpus(dep, role):
                per_node_max = min(gpn, spec.gpus_per_node) if spec.gpus_per_node else gpn
                step_nodes, gpus, per_node = _place_gpus(free, ranks, per_node_max,
                                                         f"{where}: workers.{role} replica {i}")
            else:  # one rank per node, on the nodes after the head, in turn
                count = min(ranks, len(cpu_nodes))
                if ranks % count:
                    raise PlanError(f"{where}: workers.{role}: {ranks} CPU ranks do not spread evenly over "
                                    f"{count} nodes")
                step_nodes = tuple(cpu_nodes[(cpu_turn + k) % len(cpu_nodes)] for k in range(count))
                cpu_turn += count
                gpus, per_node = (), ranks // count
            steps.append(Step(name, "worker", step_nodes, per_node, gpus, role, i, spec.engine, mpi=True,
                              module="workers", args=("--config", config_path, "--role", role, "--worker-id", name),
                              env=tuple(sorted(spec.env.items())),
                              launcher=TRTLLM_LAUNCHER if spec.engine == "trtllm" else ()))
    return Plan(dep.name, config_path, dep.model.name, head, alloc, tuple(steps))


def _place_gpus(free: dict[str, list[int]], ranks: int, gpn: int, what: str):
    """`gpn`: the most GPUs a worker of this role uses on one node (the node's count, or less when the role's
    gpus_per_node says so). A worker of gpn or more GPUs takes gpn on each of ranks/gpn nodes."""
    if gpn == 0:
        raise PlanError(f"{what}: needs {ranks} GPUs; the allocation has none")
    if ranks >= gpn:  # the first nodes with gpn free GPUs: whole nodes unless the role uses part of each
        count = ranks // gpn
        roomy = [n for n, g in free.items() if len(g) >= gpn]
        if len(roomy) < count:
            raise PlanError(f"{what}: needs {count} node(s) with {gpn} free GPUs; only {len(roomy)} left")
        chosen = roomy[:count]
        taken = tuple(free[chosen[0]][:gpn])
        if any(tuple(free[n][:gpn]) != taken for n in chosen):  # one CUDA_VISIBLE_DEVICES for the whole step
            raise PlanError(f"{what}: needs the same {gpn} GPU indices free on {count} nodes")
        for n in chosen:
            free[n] = free[n][gpn:]
        return tuple(chosen), taken, gpn
    for n, g in free.items():
        if len(g) >= ranks:
            taken, free[n] = g[:ranks], g[ranks:]
            return (n,), tuple(taken), ranks
    raise PlanError(f"{what}: needs {ranks} GPUs on one node; no node has that many left")
