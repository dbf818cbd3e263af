"""Deployment configs: every shipped file validates; broken ones give one clear line each, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hpc.config import ConfigError, load_deployment, substitute_env

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

GOOD = """\
name: t
model: {path: /m, served_name: tiny}
cluster: {gpus_per_node: 4}
workers:
  prefill: {engine: trtllm, engine_config: eng.yaml, tensor_parallel_size: 2}
  decode: {engine: trtllm, engine_config: eng.yaml, tensor_parallel_size: 2}
"""
ENGINE = "tensor_parallel_size: 2\nmax_num_tokens: 512\ncache_transceiver_config: {backend: NIXL}\n"


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny-agg.yaml", "tiny-disagg.yaml", "tiny-mocker.yaml", "deepseek-r1-wide-ep-gb200.yaml"} <= names
    assert len(CONFIGS) >= 12


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    dep = load_deployment(path)
    for role, _ in dep.workers.items():
        dep.engine_config(role)


def write(tmp_path: Path, deployment: str, engine: str | None = ENGINE) -> Path:
    if engine is not None:
        (tmp_path / "eng.yaml").write_text(engine)
    p = tmp_path / "dep.yaml"
    p.write_text(deployment)
    return p


def test_good_config_loads(tmp_path):
    dep = load_deployment(write(tmp_path, GOOD))
    assert dep.disaggregated and dep.engine_config("prefill").max_num_tokens == 512


BROKEN = {
    "bad yaml": (GOOD.replace("name: t\n", "name: [t\n", 1), ENGINE, "invalid YAML"),
    "unknown field": (GOOD + "colour: red\n", ENGINE, "colour: unknown field"),
    "wrong type": (GOOD.replace("tensor_parallel_size: 2}", "tensor_parallel_size: two}", 1), ENGINE,
                   "workers.prefill.tensor_parallel_size: Input should be a valid integer"),
    "tp does not fit": (GOOD.replace("tensor_parallel_size: 2", "tensor_parallel_size: 3"), "tensor_parallel_size: 3\n",
                        "workers.prefill.tensor_parallel_size: 3 gives 3 GPUs per worker, which does not divide 4"),
    "missing engine config": (GOOD.replace("eng.yaml", "nope.yaml"), ENGINE, "nope.yaml: file not found"),
    "negative replicas": (GOOD.replace("tensor_parallel_size: 2}", "tensor_parallel_size: 2, replicas: -1}", 1),
                          ENGINE, "workers.prefill.replicas: Input should be greater than or equal to 0"),
    "unknown engine": (GOOD.replace("engine: trtllm", "engine: vllm", 1), ENGINE,
                       "workers.prefill.engine: Input should be 'trtllm', 'torch' or 'mocker'"),
    "missing model": ("\n".join(l for l in GOOD.splitlines() if not l.startswith("model")), ENGINE,
                      "model: required field is missing"),
    "reference engine tp for disaggregation": (GOOD.replace("engine: trtllm", "engine: torch"), ENGINE,
                                               "the reference engine runs tensor or pipeline parallel for "
                                               "aggregated workers only"),
    "prefill without decode": (GOOD.replace("  decode: {engine: trtllm, engine_config: eng.yaml, tensor_parallel_size: 2}\n",
                                            ""), ENGINE, "workers.decode: required field is missing"),
    "engine tp differs": (GOOD, "tensor_parallel_size: 4\n",
                          "tensor_parallel_size: 4 differs from workers.prefill.tensor_parallel_size: 2"),
    "unknown engine field": (GOOD, ENGINE + "max_num_tokenz: 5\n", "max_num_tokenz: unknown field"),
    "engine field wrong type": (GOOD, ENGINE + "kv_cache_config: {free_gpu_memory_fraction: 1.5}\n",
                                "kv_cache_config.free_gpu_memory_fraction: Input should be less than or equal to 1"),
    "encode without multimodal": (GOOD + "  encode: {engine: mocker}\n", ENGINE,
                                  "workers.encode: encode workers need model.modality: multimodal"),
    "not a mapping": ("- a\n- b\n", ENGINE, "expected a mapping of deployment fields"),
    "bad name": (GOOD.replace("name: t\n", "name: 'has space'\n", 1), ENGINE, "name: String should match pattern"),
    "unset variable": (GOOD.replace("/m", "${HPC_TEST_UNSET_VAR}"), ENGINE, "${HPC_TEST_UNSET_VAR} is not set"),
    "too many gpus for cluster": (GOOD.replace("{gpus_per_node: 4}", "{gpus_per_node: 4, nodes: 1}").replace(
        "tensor_parallel_size: 2}", "tensor_parallel_size: 2, replicas: 2}"), ENGINE, "cannot hold the 8 GPUs"),
    "attention dp without tp": (GOOD.replace("tensor_parallel_size: 2", "tensor_parallel_size: 1"),
                                "enable_attention_dp: true\n", "enable_attention_dp: needs tensor_parallel_size > 1"),
}


@pytest.mark.parametrize("case", sorted(BROKEN), ids=str)
def test_broken_config_names_the_problem(tmp_path, case):
    deployment, engine, expected = BROKEN[case]
    path = write(tmp_path, deployment, engine)
    with pytest.raises(ConfigError) as e:
        load_deployment(path)
    assert expected in str(e.value)
    assert all(line.startswith(str(path.parent)) for line in e.value.problems), e.value.problems


def test_env_substitution_with_defaults():
    env = {"A": "1"}
    assert substitute_env("x: ${A} y: ${B:-2} z: ${A:-9}", "f", env) == "x: 1 y: 2 z: 1"


def test_cli_validate_prints_problems_without_traceback(tmp_path):
    bad = write(tmp_path, GOOD.replace("engine: trtllm", "engine: vllm", 1))
    good = REPO / "configs" / "tiny-agg.yaml"
    out = subprocess.run([sys.executable, "-m", "hpc", "validate", str(good), str(bad)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    assert "OK" in out.stdout and "tiny-agg.yaml" in out.stdout
    assert "workers.prefill.engine" in out.stderr and "Traceback" not in out.stderr


def test_random_weights_reach_the_workers(tmp_path):
    """`model.random_weights` (benchmarks of a real shape without its weights) is read by every worker."""
    from workers.__main__ import parse

    (tmp_path / "e.yaml").write_text("device: cpu\n")
    dep = tmp_path / "d.yaml"
    dep.write_text("name: d\nmodel: {path: /models/m, random_weights: true}\ncluster: {gpus_per_node: 0}\n"
                   "workers:\n  aggregated: {engine: torch, engine_config: e.yaml}\n")
    args = ["--config", str(dep), "--role", "aggregated", "--etcd", "http://e:1", "--nats", "nats://n:1", "--insecure"]
    assert parse(args).random_weights
    dep.write_text(dep.read_text().replace(", random_weights: true", ""))
    assert not parse(args).random_weights


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_deployment(path)
    return e.value.problems


def test_engine_yaml_keys_pass_through_only_if_tensorrt_llm_has_them(tmp_path):
    ok = write(tmp_path, GOOD, ENGINE + "enable_iter_perf_stats: true\nkv_cache_config: {host_cache_size: 1000}\n")
    load_deployment(ok)  # TensorRT-LLM arguments hpc does not type go through as written
    bad = write(tmp_path, GOOD, ENGINE + "max_num_token: 8\nkv_cache_config: {free_gpu_memory_fractio: 0.5}\n"
                                         "cache_transceiver_config: {backend: NIXL, max_token_in_buffer: 8}\n")
    text = "\n".join(problems_of(bad))
    assert "eng.yaml: max_num_token: unknown field" in text and "did you mean max_num_tokens?" in text
    assert "kv_cache_config.free_gpu_memory_fractio: unknown field" in text
    assert "did you mean free_gpu_memory_fraction?" in text


def test_deployment_unknown_field_names_the_closest(tmp_path):
    text = "\n".join(problems_of(write(tmp_path, GOOD.replace("served_name", "served_nmae"))))
    assert "model.served_nmae: unknown field (did you mean served_name?)" in text


def test_maverick_tp16_on_h100_nodes_is_refused_with_the_heads_reason(tmp_path):
    maverick = (REPO / "configs" / "llama4-maverick-disagg-h200.yaml").read_text()
    for engine in ("prefill", "decode"):
        (tmp_path / f"{engine}.yaml").write_text(
            (REPO / f"configs/engines/llama4-maverick-h200/{engine}.yaml").read_text()
            .replace("tensor_parallel_size: 8", "tensor_parallel_size: 16")
            .replace("moe_expert_parallel_size: 8", "moe_expert_parallel_size: 16")
            .replace("enable_attention_dp: true", "enable_attention_dp: false"))
    cfg = tmp_path / "maverick-h100.yaml"
    cfg.write_text(maverick.replace("cluster: {gpus_per_node: 8, nodes: 2}", "cluster: {gpus_per_node: 8, nodes: 8}")
                   .replace("engines/llama4-maverick-h200/", "").replace("tensor_parallel_size: 8",
                   "tensor_parallel_size: 16").replace("expert_parallel_size: 8", "expert_parallel_size: 16"))
    text = "\n".join(problems_of(cfg))
    assert "workers.prefill.tensor_parallel_size: 16 does not divide the model's 40 attention heads" in text
    assert "workers.decode.tensor_parallel_size: 16 does not divide the model's 40 attention heads" in text


def test_expert_parallel_must_divide_the_experts(tmp_path):
    cfg = write(tmp_path, GOOD.replace("served_name: tiny}", "served_name: tiny, shape: {num_attention_heads: 8, "
                                       "num_key_value_heads: 2, num_experts: 6}}")
                .replace("tensor_parallel_size: 2}", "tensor_parallel_size: 2, expert_parallel_size: 4}"),
                ENGINE.replace("tensor_parallel_size: 2", "tensor_parallel_size: 2\nmoe_expert_parallel_size: 4"))
    text = "\n".join(problems_of(cfg))
    assert "workers.prefill.expert_parallel_size: 4 does not divide the model's 6 experts" in text


def test_disaggregated_trtllm_needs_its_cache_transceiver(tmp_path):
    text = "\n".join(problems_of(write(tmp_path, GOOD, "tensor_parallel_size: 2\n")))
    assert "eng.yaml: cache_transceiver_config: required for TensorRT-LLM prefill workers" in text


def test_model_directory_config_json_is_checked_and_wins(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    cfg = write(tmp_path, GOOD.replace("/m,", f"{model},"))
    assert "has no config.json" in "\n".join(problems_of(cfg))
    (model / "config.json").write_text('{"num_attention_heads": 6, "num_key_value_heads": 3}')
    text = "\n".join(problems_of(cfg))
    assert "tensor_parallel_size: 2 does not divide the model's 6 attention heads" not in text
    assert "tensor_parallel_size: 2 and the model's 3 KV heads do not divide one another" in text


def test_a_variant_changes_exactly_what_its_override_says(tmp_path, monkeypatch):
    from hpc import config as cfg

    monkeypatch.setattr(cfg, "VARIANTS_DIR", tmp_path / "variants")
    monkeypatch.setenv("HPC_MODEL_DIR", "/models/tiny")
    source = REPO / "configs" / "tiny-variants.yaml"
    base = load_deployment(source)
    wide = load_deployment(cfg.resolve_variant(source, "wide_prefill"))
    assert base.name == "tiny-variants" and wide.name == "tiny-variants-wide_prefill"
    b, w = base.model_dump(), wide.model_dump()
    changed = {k for k in b if b[k] != w[k]}
    assert changed == {"name", "workers"}
    assert w["workers"]["prefill"] == {**b["workers"]["prefill"], "replicas": 2,
                                       "engine_config": str(REPO / "configs/engines/tiny/mocker.yaml")}
    assert w["workers"]["decode"]["replicas"] == b["workers"]["decode"]["replicas"]
    with pytest.raises(ConfigError, match="no override_nope .variants: wide_prefill, kv_aware."):
        cfg.resolve_variant(source, "nope")
    with pytest.raises(ConfigError, match="has no `base:`"):
        cfg.resolve_variant(REPO / "configs" / "tiny-agg.yaml", "x")


def test_a_sweep_takes_variants_as_an_axis(tmp_path, monkeypatch):
    import hpc.config as cfg
    from hpc.sweep import load_sweep, variants

    monkeypatch.setattr(cfg, "VARIANTS_DIR", tmp_path / "variants")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"num_attention_heads": 4, "num_key_value_heads": 2}')
    monkeypatch.setenv("HPC_MODEL_DIR", str(tmp_path / "model"))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"name: v\nbase: {REPO}/configs/tiny-variants.yaml\n"
                     "axes: {variant: [wide_prefill, kv_aware], bench.concurrency: [1]}\n")
    points = variants(load_sweep(sweep), sweep, tmp_path / "out")
    assert [p["variant"] for p in points] == ["wide_prefill", "kv_aware"]
    first = load_deployment(tmp_path / "out" / "variants" / "0" / "deployment.yaml", check_files=False)
    second = load_deployment(tmp_path / "out" / "variants" / "1" / "deployment.yaml", check_files=False)
    assert (first.workers.prefill.replicas, first.frontend.router) == (2, "round-robin")
    assert (second.workers.prefill.replicas, second.frontend.router) == (1, "kv-aware")
