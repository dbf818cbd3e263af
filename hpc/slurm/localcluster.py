"""A real multi-node Slurm cluster on one host: munge, slurmctld and one slurmd per node.

Each slurmd runs in its own mount namespace with a private /tmp, as separate machines would, and advertises fake
GPUs as GRES so `--gpus-per-node` sets CUDA_VISIBLE_DEVICES. All state lives under one directory outside /tmp
(jobs see the host's filesystem as a shared filesystem, except /tmp)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hpc.errors import HpcError
from hpc.procs import Pid, free_port, log_tail, spawn, stop, wait_until

REQUIRED = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd", "sinfo": "slurm-client",
            "unshare": "util-linux", "mount": "mount"}


# Every fake node has the same hostname, so Open MPI would take ranks on different nodes for neighbours and
# use shared memory, whose files live in each node's private /tmp. TCP over loopback is what such nodes share.
# And node names are not host names here: services advertise 127.0.0.1 (hpc.head.advertise_host).
JOB_ENV = {"OMPI_MCA_btl": "self,tcp", "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_oob_tcp_if_include": "lo",
           "HPC_ADVERTISE_HOST": "127.0.0.1"}


def default_root() -> Path:
    env = os.environ.get("HPC_LOCALCLUSTER_DIR")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "hpc" / "localcluster"


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int = 3
    gpus_per_node: int = 4
    cpus_per_node: int = 4
    memory_mb: int = 8192

    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    def validate(self) -> None:
        if not 1 <= self.nodes <= 16:
            raise HpcError(f"--nodes {self.nodes}: expected 1..16")
        if not 0 <= self.gpus_per_node <= 8:
            raise HpcError(f"--gpus-per-node {self.gpus_per_node}: expected 0..8 (fake GPUs are /dev/tty0..7)")
        if self.cpus_per_node < 1:
            raise HpcError(f"--cpus-per-node {self.cpus_per_node}: expected at least 1")


class LocalCluster:
    def __init__(self, root: Path | None = None):
        self.root = root or default_root()
        self.conf = self.root / "etc" / "slurm.conf"
        self.env_file = self.root / "env.sh"
        self.spec_file = self.root / "spec.json"
        self.munge_socket = self.root / "munge" / "sock"

    # ---- paths -------------------------------------------------------------------------------------------------
    def _pidfile(self, name: str) -> Path:
        return self.root / "run" / f"{name}.pid"

    def _log(self, name: str) -> Path:
        return self.root / "log" / f"{name}.log"

    def env(self) -> dict[str, str]:
        return {**os.environ, **JOB_ENV, "SLURM_CONF": str(self.conf)}

    def spec(self) -> ClusterSpec | None:
        try:
            return ClusterSpec(**json.loads(self.spec_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def daemons(self) -> list[str]:
        spec = self.spec()
        return ["munged", "slurmctld"] + [f"slurmd-{n}" for n in (spec.node_names() if spec else [])]

    def running(self) -> dict[str, bool]:
        out = {}
        for name in self.daemons():
            pid = Pid.load(self._pidfile(name))
            out[name] = bool(pid and pid.alive())
        return out

    # ---- up ----------------------------------------------------------------------------------------------------
    def up(self, spec: ClusterSpec, timeout: float = 60) -> None:
        spec.validate()
        if os.geteuid() != 0:
            raise HpcError("hpc localcluster needs root: slurmd runs jobs as any user and mounts a private /tmp "
                           "per node (run it as root, e.g. in a container or VM)")
        for exe, package in REQUIRED.items():
            if shutil.which(exe) is None:
                raise HpcError(f"{exe} not found; install the Debian package {package} (`make setup` does)")
        state = self.running()
        if state and all(state.values()):
            current = self.spec()
            if current != spec:
                raise HpcError(f"a local cluster is already running with {asdict(current)}; "
                               f"`hpc localcluster down` first to change it to {asdict(spec)}")
            self.wait_nodes_idle(spec, timeout)
            return
        if any(state.values()):
            self.down()  # half-up from an earlier crash: start clean
        self._write_files(spec)
        self._start_munge()
        self._start("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
        for node in spec.node_names():
            nodetmp = self.root / "nodetmp" / node
            # A private /tmp per node: PMIx creates per-job dirs there, which collide when nodes share one /tmp.
            self._start(f"slurmd-{node}", [
                "unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'mount --bind "{nodetmp}" /tmp && exec slurmd -D -f "{self.conf}" -N {node}'])
        self.wait_nodes_idle(spec, timeout)

    def _write_files(self, spec: ClusterSpec) -> None:
        for sub in ("etc", "run", "log", "state", "spool", "munge", "jobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        for node in spec.node_names():
            d = self.root / "nodetmp" / node
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o1777)
            (self.root / "spool" / node).mkdir(exist_ok=True)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        nodes = f"n[1-{spec.nodes}]" if spec.nodes > 1 else "n1"
        # One line per node: each slurmd needs its own port, since all nodes share 127.0.0.1.
        node_lines = "\n".join(
            f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={free_port()} "
            f"CPUs={spec.cpus_per_node} RealMemory={spec.memory_mb} {_gres(spec)} State=UNKNOWN"
            for node in spec.node_names())
        r = self.root
        (r / "etc" / "slurm.conf").write_text(f"""# Written by `hpc localcluster up`: {spec.nodes} nodes on this host.
ClusterName=hpclocal
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.daemon.pid
SlurmdPidFile={r}/run/slurmd-%n.daemon.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
# Nodes declare more CPUs and memory than one host has; take the configured values as given.
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MpiDefault=none
GresTypes=gpu
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=10
{node_lines}
PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP
""")
        (r / "etc" / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n")
        # Fake GPUs: character devices stand in for /dev/nvidia*, so Slurm sets CUDA_VISIBLE_DEVICES as usual.
        files = "/dev/tty0" if spec.gpus_per_node == 1 else f"/dev/tty[0-{spec.gpus_per_node - 1}]"
        gres = f"NodeName={nodes} Name=gpu File={files}\n" if spec.gpus_per_node else ""
        (r / "etc" / "gres.conf").write_text("AutoDetect=off\n" + gres)
        exports = {"SLURM_CONF": str(self.conf), **JOB_ENV}
        self.env_file.write_text("".join(f"export {k}={v}\n" for k, v in exports.items()))
        self.spec_file.write_text(json.dumps(asdict(spec)))

    def _start(self, name: str, argv: list[str]) -> None:
        log = self._log(name)
        popen = spawn(argv, log, env=self.env())
        pid = Pid.of(popen.pid)
        pid.save(self._pidfile(name))
        time.sleep(0.05)
        if popen.poll() is not None:
            raise HpcError(f"{name} exited at start (code {popen.returncode}). Log {log}:\n{log_tail(log)}")

    def _start_munge(self) -> None:
        m = self.root / "munge"
        self._start("munged", ["munged", "-F", "--force", f"--key-file={m / 'munge.key'}",
                               f"--socket={self.munge_socket}", f"--pid-file={m / 'munged.pid'}",
                               f"--seed-file={m / 'munged.seed'}", f"--log-file={self._log('munged')}"])
        pid = Pid.load(self._pidfile("munged"))
        wait_until(self.munge_socket.exists, 10, "munged", alive=pid.alive, log=self._log("munged"))

    def node_states(self) -> dict[str, str]:
        try:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env(), capture_output=True,
                                 text=True, timeout=5)
        except subprocess.TimeoutExpired:
            return {}
        if out.returncode != 0:
            return {}
        return dict(line.split() for line in out.stdout.splitlines() if line.strip())

    def wait_nodes_idle(self, spec: ClusterSpec, timeout: float) -> None:
        want = set(spec.node_names())

        def ready() -> bool:
            states = self.node_states()
            return want <= states.keys() and all(states[n] in ("idle", "mix", "alloc") for n in want)

        wait_until(ready, timeout, f"local cluster nodes {sorted(want)} (states: {self.node_states() or '?'})",
                   alive=lambda: all(self.running().values()), log=self._log("slurmctld"), interval=0.25)

    # ---- down --------------------------------------------------------------------------------------------------
    def down(self) -> list[str]:
        """Cancel every job, then stop exactly the daemons we started. Returns those that would not stop."""
        if self.running().get("slurmctld"):
            subprocess.run(["scancel", "--full", "--quiet", "--state=PENDING,RUNNING,SUSPENDED", "-u", "root"],
                           env=self.env(), capture_output=True, timeout=10)
            subprocess.run(["scancel", "--quiet", "-u", "root"], env=self.env(), capture_output=True, timeout=10)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.jobs():
                time.sleep(0.25)
        stuck = []
        # Nodes first, so steps end under their slurmd; munge last, since the others talk through it.
        for name in reversed(self.daemons()):
            pid = Pid.load(self._pidfile(name))
            if pid and not stop(pid):
                stuck.append(name)
            self._pidfile(name).unlink(missing_ok=True)
        return stuck

    def jobs(self) -> list[str]:
        try:
            out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env(), capture_output=True, text=True,
                                 timeout=5)
        except subprocess.TimeoutExpired:
            return []
        return out.stdout.split() if out.returncode == 0 else []


def _gres(spec: ClusterSpec) -> str:
    return f"Gres=gpu:{spec.gpus_per_node}" if spec.gpus_per_node else ""
