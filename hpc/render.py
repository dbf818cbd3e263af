"""Turns a Plan into a bash script (srun_templates/) that a person can read, change and run inside salloc."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2

from hpc.config import Deployment
from hpc.plan import Plan, Step

TEMPLATES = Path(__file__).resolve().parent.parent / "srun_templates"


@dataclass(frozen=True)
class _Worker:
    name: str
    role: str
    replica: int
    nodes: tuple[str, ...]
    node_expr: str
    ntasks_per_node: int
    gpus: tuple[int, ...]
    launcher: str  # "trtllm-llmapi-launch " before the interpreter, or ""


def _node_expr(step: Step, nodes: tuple[str, ...]) -> str:
    """Nodes by position in the allocation (${NODES[2]}), so the script runs in any allocation of that size."""
    return ",".join(f"${{NODES[{nodes.index(n)}]}}" for n in step.nodes)


def template(name: str) -> jinja2.Template:
    """A template of srun_templates/. Bash's ${#array[@]} would open a Jinja comment: comments use delimiters
    bash never writes."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                             comment_start_string="<#--", comment_end_string="--#>")
    return env.get_template(name)


def _engine_config(config: str, engine_config: str | None) -> str:
    """Engine YAML paths in a deployment are relative to it; the script runs from where it was rendered."""
    if not engine_config or Path(engine_config).is_absolute():
        return engine_config or ""
    return str(Path(config).parent / engine_config)


def render_script(dep: Deployment, plan: Plan, config: str) -> str:
    nodes = plan.allocation.nodes
    workers = [_Worker(s.name, s.role, s.replica, s.nodes, _node_expr(s, nodes), s.ntasks_per_node, s.gpus,
                       "".join(f"{word} " for word in s.launcher)) for s in plan.workers()]
    roles = [r for r, _ in dep.workers.items()]
    first = {r: next(w for w in workers if w.role == r) for r in roles if any(w.role == r for w in workers)}
    c = dep.container
    script_name = "srun_disaggregated.sh" if dep.disaggregated else "srun_aggregated.sh"
    return template("srun_disaggregated.sh.j2").render(
        script_name=script_name, plan=plan, config=config, roles=roles, workers=workers,
        replicas={r: getattr(dep.workers, r).replicas for r in roles},
        nodes_per_worker={r: len(first[r].nodes) if r in first else 1 for r in roles},
        engine_configs={r: _engine_config(config, getattr(dep.workers, r).engine_config) for r in roles},
        gpus_per_node=plan.allocation.gpus_per_node, image=c.image if c else "",
        mounts=",".join(c.mounts) if c else "", model_path=dep.model.path, modality=dep.model.modality.value,
        router=dep.frontend.router, frontend_port=plan.step("frontend").args[5])
