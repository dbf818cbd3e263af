"""The local Slurm cluster is real: srun across nodes, PMIx MPI, sbatch arrays, salloc with steps."""

from __future__ import annotations

import subprocess
import textwrap

from hpc.procs import Pid
from hpc.slurm.localcluster import ClusterSpec, LocalCluster


def sh(cmd: list[str], env: dict, timeout: float = 60) -> str:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}: {out.stderr}"
    return out.stdout


def test_srun_spans_three_nodes(slurm_env):
    out = sh(["srun", "-N3", "--ntasks-per-node=2", "bash", "-c", "echo $SLURM_PROCID $SLURMD_NODENAME"], slurm_env)
    rows = sorted(tuple(line.split()) for line in out.splitlines())
    assert [r[0] for r in rows] == [str(i) for i in range(6)]
    assert sorted({r[1] for r in rows}) == ["n1", "n2", "n3"]


def test_gpus_per_node_sets_cuda_visible_devices(slurm_env):
    out = sh(["srun", "-N2", "--gpus-per-node=2", "bash", "-c", "echo $SLURMD_NODENAME=$CUDA_VISIBLE_DEVICES"],
             slurm_env)
    assert sorted(out.split()) == ["n1=0,1", "n2=0,1"]


def test_nodes_have_private_tmp(slurm_env, work_dir):
    sh(["srun", "-N3", "bash", "-c", "echo $SLURMD_NODENAME > /tmp/hpc-node-marker"], slurm_env)
    out = sh(["srun", "-N3", "bash", "-c", "echo $SLURMD_NODENAME $(cat /tmp/hpc-node-marker)"], slurm_env)
    assert all(a == b for a, b in (line.split() for line in out.splitlines()))


def test_mpi_over_pmix_allreduce(slurm_env, work_dir, venv_python):
    script = work_dir / "mpi_hello.py"
    script.write_text(textwrap.dedent("""
        from mpi4py import MPI
        c = MPI.COMM_WORLD
        print(c.Get_rank(), c.Get_size(), c.allreduce(c.Get_rank() + 1), flush=True)
    """))
    out = sh(["srun", "--mpi=pmix", "-N3", "--ntasks-per-node=2", venv_python, str(script)], slurm_env, 120)
    rows = sorted(tuple(map(int, line.split())) for line in out.splitlines())
    assert rows == [(r, 6, 21) for r in range(6)]


def test_sbatch_array_runs_three_tasks(slurm_env, work_dir):
    out_dir = work_dir / "array"
    out_dir.mkdir()
    script = work_dir / "array.sh"
    script.write_text(f"#!/bin/bash\necho $SLURM_ARRAY_TASK_ID $SLURMD_NODENAME > {out_dir}/$SLURM_ARRAY_TASK_ID\n")
    sh(["sbatch", "--wait", "--array=0-2", "-o", f"{work_dir}/array-%a.log", str(script)], slurm_env, 120)
    assert sorted(p.name for p in out_dir.iterdir()) == ["0", "1", "2"]


def test_salloc_with_two_steps(slurm_env):
    out = sh(["salloc", "-N2", "bash", "-c",
              "srun -N2 --overlap bash -c 'echo a-$SLURMD_NODENAME' & "
              "srun -N1 --overlap bash -c 'echo b-$SLURM_JOB_NUM_NODES'; wait"], slurm_env, 120)
    words = out.split()
    assert sorted(w for w in words if w.startswith("a-")) == ["a-n1", "a-n2"]
    assert "b-2" in words


def test_up_is_idempotent_and_down_stops_every_daemon(work_dir):
    c = LocalCluster(work_dir / "cluster2")
    spec = ClusterSpec(nodes=2, gpus_per_node=1, cpus_per_node=2)
    c.up(spec)
    pids = {name: Pid.load(c._pidfile(name)) for name in c.daemons()}
    assert set(pids) == {"munged", "slurmctld", "slurmd-n1", "slurmd-n2"}
    c.up(spec)  # second up: nothing restarted
    assert {name: Pid.load(c._pidfile(name)) for name in c.daemons()} == pids
    assert c.down() == []
    assert not any(p.alive() for p in pids.values())
    leftovers = subprocess.run(["pgrep", "-f", str(c.conf)], capture_output=True, text=True).stdout
    assert leftovers == ""
