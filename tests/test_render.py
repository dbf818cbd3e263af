"""`hpc render` against golden files (with and without containers), shellcheck, and the script's own checks of
its overrides. UPDATE_GOLDEN=1 rewrites the golden files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden"
CASES = {  # golden name: (config, extra args)
    "tiny-disagg-3nodes": ("configs/tiny-disagg.yaml", []),
    "tiny-agg-1node": ("configs/tiny-agg.yaml", ["--nodes", "1"]),
    "maverick-gb200-container": ("configs/llama4-maverick-disagg-gb200.yaml", []),
    "gpt-oss-one-node-two-workers": ("configs/gpt-oss-120b-disagg-h100.yaml", []),
    "deepseek-wide-ep-12nodes": ("configs/deepseek-r1-wide-ep-gb200.yaml", []),
    "maverick-h200-2nodes": ("configs/llama4-maverick-disagg-h200.yaml", []),
    "scout-epd-3nodes": ("configs/llama4-scout-epd.yaml", []),
    "llava-epd-2nodes": ("configs/llava-v1.6-mistral-7b-epd.yaml", []),
    "qwen2-vl-2nodes": ("configs/qwen2-vl-7b-disagg.yaml", []),
    "llama70b-1node": ("configs/llama-3.3-70b-disagg-1node.yaml", []),
    "llama70b-2nodes": ("configs/llama-3.3-70b-disagg-2node.yaml", []),
    "tiny-trtllm-ranks-across-nodes": ("configs/tiny-trtllm.yaml", []),
    "tiny-mocker-3nodes": ("configs/tiny-mocker.yaml", []),
    "tiny-variants-base": ("configs/tiny-variants.yaml", []),
}
OVERRIDES = ("IMAGE", "MOUNTS", "MODEL_PATH", "SERVED_MODEL_NAME", "MODEL_MOUNT", "HPC_MODEL_DIR",
             "ALLOWED_LOCAL_MEDIA_PATH", "MAX_FILE_SIZE_MB")


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in OVERRIDES and not k.startswith("SLURM_JOB")}


def render(config: str, extra: list[str]) -> str:
    out = subprocess.run([sys.executable, "-m", "hpc", "render", config, *extra], cwd=REPO, env=clean_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("name", sorted(CASES))
def test_render_matches_golden_and_passes_shellcheck(name, tmp_path):
    config, extra = CASES[name]
    text = render(config, extra)
    golden = GOLDEN / f"{name}.sh"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"render of {config} changed; UPDATE_GOLDEN=1 to accept"
    script = tmp_path / "s.sh"
    script.write_text(text)
    if shutil.which("shellcheck"):
        out = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout


def test_rendered_script_refuses_overrides_it_cannot_honour(tmp_path, slurm_env):
    script = tmp_path / "s.sh"
    script.write_text(render("configs/tiny-disagg.yaml", []))
    env = {**slurm_env, "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n[1-3]"}
    for var, value, message in (("NUM_DECODE_NODES", "2", "NUM_DECODE_NODES=2 but the plan places decode workers on 1"),
                                ("NUM_PREFILL_WORKERS", "3", "NUM_PREFILL_WORKERS=3 but the plan has 1")):
        out = subprocess.run(["bash", str(script)], env={**env, var: value}, capture_output=True, text=True,
                             timeout=30, cwd=tmp_path)
        assert out.returncode == 1 and message in out.stderr
    out = subprocess.run(["bash", str(script)], env={**env, "SLURM_JOB_NODELIST": "n[1-2]"}, capture_output=True,
                         text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 1 and "needs 3 nodes; the allocation has 2" in out.stderr


def test_render_refuses_what_does_not_fit():
    out = subprocess.run([sys.executable, "-m", "hpc", "render", "configs/llama4-maverick-disagg-gb200.yaml",
                          "--nodes", "2"], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "cluster.nodes: the deployment needs 4 nodes; the allocation has 2" in out.stderr


def test_every_config_in_configs_has_a_golden():
    assert {str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*.yaml")} == {c for c, _ in CASES.values()}


def test_trtllm_workers_start_under_trtllm_llmapi_launch_with_their_ranks():
    text = render("configs/gpt-oss-120b-disagg-h100.yaml", [])
    # NVIDIA's layout: one srun step per worker, --mpi=pmix, one task per GPU, the launcher before the interpreter.
    assert 'CUDA_VISIBLE_DEVICES=0,1,2,3 step prefill-0 "${NODES[0]}" 4 --mpi=pmix' in text
    assert 'CUDA_VISIBLE_DEVICES=4,5,6,7 step decode-0 "${NODES[0]}" 4 --mpi=pmix' in text
    assert text.count('trtllm-llmapi-launch "$PYTHON" -m workers') == 2
    assert "--container-image" in text
