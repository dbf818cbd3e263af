"""Shared fixtures: a real local Slurm cluster, real etcd and NATS, a work directory jobs can see."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from hpc.services import start_etcd, start_nats
from hpc.slurm.localcluster import ClusterSpec, LocalCluster

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def work_dir() -> Path:
    """Outside /tmp: each fake node has a private /tmp, and jobs must see what tests write, as on a shared FS."""
    d = REPO / ".hpc" / "test-work" / uuid.uuid4().hex[:8]
    d.mkdir(parents=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster() -> LocalCluster:
    c = LocalCluster(REPO / ".hpc" / "testcluster")
    c.up(ClusterSpec(nodes=3, gpus_per_node=4, cpus_per_node=4))
    yield c
    assert c.down() == []


@pytest.fixture(scope="session")
def slurm_env(cluster) -> dict:
    return cluster.env()


@pytest.fixture
def etcd(tmp_path):
    s = start_etcd(tmp_path / "etcd")
    yield s
    assert s.stop()


@pytest.fixture
def nats(tmp_path):
    s = start_nats(tmp_path / "nats")
    yield s
    assert s.stop()


@pytest.fixture(scope="session")
def venv_python() -> str:
    """The interpreter jobs run: this one, which lives outside /tmp in the repo's .venv."""
    import sys

    return sys.executable


@pytest.fixture(scope="session")
def tiny_model(work_dir) -> Path:
    from engines.torch.tiny import make_tiny_model

    return make_tiny_model(work_dir / "models" / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llava(work_dir) -> Path:
    from engines.torch.tiny import make_tiny_llava

    return make_tiny_llava(work_dir / "models" / "tiny-llava")
