"""Sweeps: a base deployment plus axes becomes one variant per point of the Cartesian product, run as an sbatch
job array (each task launches its variant, runs `hpc bench`, writes results/<sweep>/<task>.json, stops).

    name: prefill-batch
    base: tiny-disagg.yaml          # relative to the sweep file
    nodes: 3
    axes:
      workers.prefill.replicas: [1, 2]
      engine.prefill.max_num_tokens: [256, 1024]   # a field of that role's engine YAML
      bench.concurrency: [1, 8]
    bench: {isl: 1000, osl: 100, requests: 32}
    slo: {ttft_ms: 500, itl_ms: 50}   # goodput: requests within both limits

A base written as `base:` plus `override_NAME:` sections takes `variant: NAME` (or `hpc sweep --variant NAME`), or
sweeps over its variants as an axis: `axes: {variant: [wide_prefill, kv_aware]}`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from hpc.config import ConfigError, load_deployment, parse_model, read_yaml, resolve_variant
from hpc.errors import HpcError
from hpc.plan import worker_gpus


class BenchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    isl: int = Field(1000, ge=1)
    osl: int = Field(100, ge=1)
    concurrency: str = "1,8"
    requests: int = Field(16, ge=1)


class SloSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttft_ms: float | None = Field(None, gt=0)
    itl_ms: float | None = Field(None, gt=0)


class Sweep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    base: str
    variant: str | None = None
    nodes: int = Field(1, ge=1)
    gpus_per_node: int | None = Field(None, ge=0)
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    axes: dict[str, list] = {}
    bench: BenchSpec = BenchSpec()
    slo: SloSpec = SloSpec()


def load_sweep(path: Path) -> Sweep:
    sweep = parse_model(Sweep, path, read_yaml(path), "sweep")
    for key, values in sweep.axes.items():
        if not values:
            raise ConfigError([f"{path}: axes.{key}: needs at least one value"])
        head = key.split(".")[0]
        if head not in ("workers", "engine", "bench", "frontend", "transfer", "variant"):
            raise ConfigError([f"{path}: axes.{key}: expected variant, workers.*, engine.ROLE.*, bench.*, "
                               f"frontend.* or transfer.*"])
    return sweep


def _set(tree: dict, dotted: list[str], value) -> None:
    for part in dotted[:-1]:
        tree = tree.setdefault(part, {})
    tree[dotted[-1]] = value


def variants(sweep: Sweep, sweep_path: Path, out: Path) -> list[dict]:
    """Writes results/<sweep>/variants/<i>/ (deployment.yaml, engine YAMLs, bench settings); returns the points."""
    source = (sweep_path.parent / sweep.base).resolve()
    keys = list(sweep.axes)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(sweep.axes[k] for k in keys))] or [{}]
    for i, point in enumerate(points):
        d = out / "variants" / str(i)
        d.mkdir(parents=True, exist_ok=True)
        base_path = resolve_variant(source, point.get("variant", sweep.variant))
        base = load_deployment(base_path)
        tree = yaml.safe_load(base_path.read_text())
        if "base" in tree:  # a config of variants swept without one: its base
            tree = tree["base"]
        name = f"{sweep.name}-{i}"
        tree["name"] = name
        bench = sweep.bench.model_dump()
        engines: dict[str, dict] = {}
        for key, value in point.items():
            parts = key.split(".")
            if parts[0] == "variant":
                continue
            if parts[0] == "bench":
                bench[parts[1]] = value
            elif parts[0] == "engine":
                engines.setdefault(parts[1], {})
                _set(engines[parts[1]], parts[2:], value)
            else:
                _set(tree, parts, value)
        for role, spec in tree.get("workers", {}).items():  # engine YAMLs: copies, with this point's fields
            cfg_path = base.engine_config_path(role)
            cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path else {}
            for k, v in engines.get(role, {}).items():
                cfg[k] = v
            (d / f"{role}.yaml").write_text(yaml.safe_dump(cfg or {}))
            spec["engine_config"] = f"{role}.yaml"
        if not isinstance(tree.get("model", {}).get("path"), str):
            raise HpcError(f"{base_path}: model.path must be a string")
        model_path = Path(base.model.path)
        tree["model"]["path"] = str(model_path if model_path.is_absolute() else model_path.resolve())
        (d / "deployment.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
        variant = load_deployment(d / "deployment.yaml")  # a variant that does not validate fails here
        (d / "name").write_text(name)
        for k in ("isl", "osl", "concurrency", "requests"):
            (d / k).write_text(str(bench[k]))
        (d / "gpus").write_text(str(worker_gpus(variant)))
        (d / "bench_args").write_text(" ".join(
            f"--slo-{k.replace('_', '-')} {v}" for k, v in sweep.slo.model_dump().items() if v is not None))
        (d / "point.json").write_text(json.dumps(point))
    return points


def report_rows(results: Path) -> list[dict]:
    """Every task's rows, with its point of the sweep and `variant`: the point less the concurrency, as a label
    (the tasks that differ only in concurrency form one line of a chart)."""
    rows = []
    for f in sorted(results.glob("*.json"), key=lambda p: (len(p.stem), p.stem)):
        if not f.stem.isdigit():
            continue
        data = json.loads(f.read_text())
        point = json.loads((results / "variants" / f.stem / "point.json").read_text())
        label = ", ".join(f"{k}={v}" for k, v in point.items() if k != "bench.concurrency") or "base"
        for r in data["rows"]:
            rows.append({"task": int(f.stem), **point, **r, "variant": label, "isl": data.get("isl"),
                         "osl": data.get("osl"), "date": data.get("date")})
    return rows
