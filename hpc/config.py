"""The deployment config: pydantic models loaded from YAML, with `${VAR}` / `${VAR:-default}` substitution.

Every problem is reported as `FILE: YAML.PATH: what is wrong (what was expected)`, all of them at once."""

from __future__ import annotations

import json
import os
import re
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from hpc.errors import HpcError

ROLES = ("aggregated", "prefill", "decode", "encode")


class ConfigError(HpcError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LlmApiSection(BaseModel):
    """A part of the engine YAML in TensorRT-LLM's LLM-API names. Fields hpc reads are typed; any other key passes
    through to TensorRT-LLM if its recorded LLM API has it (engines/trtllm/recorded_api.yaml), and
    `load_engine_config` refuses the rest, naming the closest valid key."""

    model_config = ConfigDict(extra="allow", frozen=True)
    section: ClassVar[str] = ""


# ---- engine YAMLs: TensorRT-LLM LLM-API field names, so one file serves both the torch and TRT-LLM engines ----
class KvCacheConfig(LlmApiSection):
    section: ClassVar[str] = "kv_cache_config"
    free_gpu_memory_fraction: float | None = Field(None, gt=0, le=1)
    enable_block_reuse: bool | None = None
    tokens_per_block: int = Field(16, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    dtype: str | None = None


class CacheTransceiverConfig(LlmApiSection):
    section: ClassVar[str] = "cache_transceiver_config"
    backend: Literal["DEFAULT", "UCX", "NIXL", "MOONCAKE", "MPI"] = "DEFAULT"
    max_tokens_in_buffer: int | None = Field(None, ge=1)


class CudaGraphConfig(LlmApiSection):
    section: ClassVar[str] = "cuda_graph_config"
    enable_padding: bool | None = None
    max_batch_size: int | None = Field(None, ge=1)
    batch_sizes: list[int] | None = None


class MoeConfig(Strict):
    backend: str | None = None
    max_num_tokens: int | None = Field(None, ge=1)


class SpeculativeConfig(Strict):
    decoding_type: str
    num_nextn_predict_layers: int | None = Field(None, ge=1)
    max_draft_len: int | None = Field(None, ge=1)


class MockerTiming(Strict):
    """Simulated timing for the mocker engine; defaults are a Llama-3-8B prefill on one H200 (notes/gpu.md)."""

    prefill_tokens_per_s: float = Field(250_000, gt=0)
    prefill_overhead_ms: float = Field(2.0, ge=0)
    decode_step_ms: float = Field(6.0, ge=0)
    decode_ms_per_sequence: float = Field(0.02, ge=0)
    decode_ms_per_1k_context: float = Field(0.01, ge=0)
    kv_bytes_per_token: int = Field(4096, ge=0)
    vocab_size: int = Field(32000, ge=2)
    encode_ms_per_image: float = Field(0.0, ge=0)
    hidden_size: int = Field(4096, ge=1)


class EngineConfig(LlmApiSection):
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    moe_expert_parallel_size: int | None = Field(None, ge=1)
    moe_tensor_parallel_size: int | None = Field(None, ge=1)
    enable_attention_dp: bool = False
    max_num_tokens: int = Field(8192, ge=1)
    max_batch_size: int = Field(256, ge=1)
    max_seq_len: int | None = Field(None, ge=1)
    max_input_len: int | None = Field(None, ge=1)
    enable_chunked_prefill: bool = False
    disable_overlap_scheduler: bool = False
    kv_cache_config: KvCacheConfig = KvCacheConfig()
    cache_transceiver_config: CacheTransceiverConfig | None = None
    cuda_graph_config: CudaGraphConfig | None = None
    moe_config: MoeConfig | None = None
    speculative_config: SpeculativeConfig | None = None
    print_iter_log: bool | None = None
    trust_remote_code: bool | None = None
    stream_interval: int | None = Field(None, ge=1)
    backend: Literal["pytorch", "tensorrt", "_autodeploy"] | None = None
    # Reference-engine fields (ignored by TensorRT-LLM).
    dtype: Literal["auto", "float32", "float64", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_kv_blocks: int | None = Field(None, ge=1)
    mocker: MockerTiming | None = None


# ---- the deployment -------------------------------------------------------------------------------------------
class Modality(str, Enum):
    text = "text"
    multimodal = "multimodal"


class ModelShape(Strict):
    """What parallelism depends on, for checks before the model directory is reachable (config.json wins when it
    is: the text model's `num_attention_heads`, `num_key_value_heads`, and the expert count)."""

    num_attention_heads: int | None = Field(None, ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    num_experts: int | None = Field(None, ge=1)


class ModelSpec(Strict):
    path: str
    served_name: str | None = None
    tokenizer: str | None = None
    modality: Modality = Modality.text
    max_context: int | None = Field(None, ge=1)
    # Benchmarks of a real shape without its weights (vLLM's `--load-format dummy`): the torch engine builds
    # random weights from config.json; the directory still needs tokenizer.json for the frontend.
    random_weights: bool = False
    shape: ModelShape | None = None

    @property
    def name(self) -> str:
        return self.served_name or Path(self.path).name


class Container(Strict):
    image: str
    mounts: list[str] = []
    env: dict[str, str] = {}


class ServiceSpec(Strict):
    port: int = Field(0, ge=0, le=65535)


class Services(Strict):
    etcd: ServiceSpec = ServiceSpec()
    nats: ServiceSpec = ServiceSpec()


class Frontend(Strict):
    port: int = Field(8000, ge=0, le=65535)
    router: Literal["round-robin", "least-loaded", "kv-aware"] = "round-robin"
    request_timeout_s: float = Field(600, gt=0)
    # Clients must send one of these as `Authorization: Bearer KEY` (none: open). A key file (one key per line)
    # keeps them out of the config; HPC_API_KEY (comma-separated) in the frontend's environment adds more.
    api_keys: list[str] = []
    api_key_file: str | None = None
    metrics_need_key: bool = False  # /health is always open; /metrics too unless this is set
    # Processes serving the port (SO_REUSEPORT), each with its own event loop, discovery watch and NATS
    # connection; None: one per 2 cores of the head node, at most 8 (frontend/processes.py).
    processes: int | None = Field(None, ge=1, le=64)
    # Requests and replies on a TCP connection from each frontend process straight to each worker, NATS carrying
    # them only until it is open (hpc/runtime/direct.py); false: through NATS only (a cluster whose firewall
    # keeps the head node from the workers' ports).
    direct_connections: bool = True


class Cluster(Strict):
    """The hardware the deployment is written for; the plan checks it against the real allocation."""

    gpus_per_node: int = Field(4, ge=0)
    nodes: int | None = Field(None, ge=1)


class WorkerSpec(Strict):
    engine: Literal["trtllm", "torch", "mocker"]
    engine_config: str | None = None
    replicas: int = Field(1, ge=0)
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    expert_parallel_size: int = Field(1, ge=1)
    gpus_per_node: int | None = Field(None, ge=0)
    env: dict[str, str] = {}

    @property
    def gpus_per_worker(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class Workers(Strict):
    aggregated: WorkerSpec | None = None
    prefill: WorkerSpec | None = None
    decode: WorkerSpec | None = None
    encode: WorkerSpec | None = None

    def items(self) -> list[tuple[str, WorkerSpec]]:
        return [(r, getattr(self, r)) for r in ROLES if getattr(self, r) is not None]


class Transfer(Strict):
    backend: Literal["nixl"] = "nixl"
    # Within a node: "auto" is NIXL, measured faster than our CUDA-IPC copies (benchmarks/kv_transfer.py).
    intra_node: Literal["auto", "nixl", "cuda-ipc"] = "auto"
    timeout_s: float = Field(30, gt=0)
    release_after_s: float = Field(60, gt=0)


class Media(Strict):
    """Limits on images and embedding files in requests (the frontend enforces them). The environment variables
    ALLOWED_LOCAL_MEDIA_PATH and MAX_FILE_SIZE_MB, where the frontend runs, override the first two."""

    allowed_local_media_path: str | None = None  # embedding files only from here; none: local files are refused
    max_file_size_mb: float = Field(50, gt=0)  # an image (fetched or base64) or an embedding file
    max_image_pixels: int = Field(40_000_000, ge=1)  # width x height, checked before decoding
    max_images_per_request: int = Field(8, ge=1)
    fetch_timeout_s: float = Field(10, gt=0)  # an http(s) image, whole
    connect_timeout_s: float = Field(3, gt=0)
    max_redirects: int = Field(3, ge=0)
    # Image URLs that resolve to private, loopback or link-local addresses are refused, except for these hosts
    # (clusters that serve images from internal storage).
    allowed_private_hosts: list[str] = []


class Restart(Strict):
    """What the launcher does when a step dies: start it again in the same place, after `backoff_s` (doubling with
    each restart in the window, at most 30 s), at most `max` times per `window_s`; then it gives the step up."""

    max: int = Field(3, ge=0)  # 0: never restart
    window_s: float = Field(600, gt=0)
    backoff_s: float = Field(1.0, ge=0)
    # A worker whose step runs but that has been missing from etcd this long (hung, or cut off) is restarted.
    unregistered_s: float = Field(20, gt=0)


class Deployment(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    model: ModelSpec
    container: Container | None = None
    cluster: Cluster = Cluster()
    services: Services = Services()
    frontend: Frontend = Frontend()
    workers: Workers
    transfer: Transfer = Transfer()
    media: Media = Media()
    restart: Restart = Restart()

    # Set by the loader, not by the YAML: where the file lives (engine_config paths are relative to it) and the
    # engine YAMLs it read while checking, so that planning (hpc/plan.py) reads no file.
    _source: Path | None = PrivateAttr(None)
    _engines: dict[str, EngineConfig] = PrivateAttr(default_factory=dict)

    @property
    def source(self) -> Path | None:
        return self._source

    @property
    def disaggregated(self) -> bool:
        return self.workers.prefill is not None

    def engine_config_path(self, role: str) -> Path | None:
        spec = getattr(self.workers, role)
        if spec is None or spec.engine_config is None:
            return None
        p = Path(spec.engine_config)
        return p if p.is_absolute() or self._source is None else self._source.parent / p

    def engine_config(self, role: str) -> EngineConfig:
        if role not in self._engines:
            path = self.engine_config_path(role)
            self._engines[role] = load_engine_config(path) if path else EngineConfig()
        return self._engines[role]


# ---- loading --------------------------------------------------------------------------------------------------
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(text: str, source: str, env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    problems = []

    def repl(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        line = text.count("\n", 0, m.start()) + 1
        problems.append(f"{source}:{line}: ${{{name}}} is not set (set it, or write ${{{name}:-default}})")
        return m.group(0)

    out = _VAR.sub(repl, text)
    if problems:
        raise ConfigError(problems)
    return out


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    text = substitute_env(text, str(path))
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}{where}: invalid YAML: {getattr(e, 'problem', None) or e}"]) from None


def _yaml_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the model that holds the value at `loc` (for "did you mean")."""
    for part in loc[:-1]:
        if isinstance(part, int) or part not in model.model_fields:
            continue
        annotation = model.model_fields[part].annotation
        inner = [a for a in (getattr(annotation, "__args__", None) or (annotation,))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return []
        model = inner[0]
    return list(model.model_fields)


def _format(path: Path, err: ValidationError, model: type[BaseModel] | None = None) -> list[str]:
    from engines.trtllm.args import closest

    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        where = _yaml_path(loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            hint = closest(str(loc[-1]), _fields_at(model, loc)) if model and loc else None
            msg = "unknown field" + (f" (did you mean {hint}?)" if hint else "")
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] not in ("value_error",):
            msg = f"{msg} (got {e['input']!r})"
        problems.append(f"{path}: {where}: {msg}")
    return problems


def parse_model(model: type[BaseModel], path: Path, data: Any, what: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of {what} fields at the top level, got "
                           f"{type(data).__name__ if data is not None else 'an empty file'}"])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(path, e, model)) from None


def load_engine_config(path: str | Path) -> EngineConfig:
    path = Path(path)
    data = read_yaml(path)
    cfg = parse_model(EngineConfig, path, data if data is not None else {}, "engine")
    problems = _llm_api_problems(cfg, path)
    if problems:
        raise ConfigError(problems)
    return cfg


def _llm_api_problems(section: LlmApiSection, path: Path, prefix: str = "") -> list[str]:
    """Keys hpc does not type pass through to TensorRT-LLM only if its LLM API has them."""
    from engines.trtllm.args import accepted_keys, closest

    fields = type(section).model_fields
    accepted = [*fields, *accepted_keys(section.section)]
    problems = []
    for key in section.model_extra or {}:
        if key not in accepted:
            hint = closest(key, accepted)
            problems.append(f"{path}: {prefix}{key}: unknown field (TensorRT-LLM's LLM API has no such argument"
                            + (f"; did you mean {hint}?)" if hint else ")"))
    for name in fields:
        value = getattr(section, name)
        if isinstance(value, LlmApiSection):
            problems += _llm_api_problems(value, path, f"{prefix}{name}.")
    return problems


VARIANTS_DIR = Path(".hpc") / "variants"


def _merge(base: Any, override: Any) -> Any:
    """`override` on top of `base`: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in override.items()}}
    return override


def variant_names(data: Any) -> list[str]:
    return [k.removeprefix("override_") for k in data if k.startswith("override_")] if isinstance(data, dict) else []


def resolve_variant(path: str | Path, variant: str | None) -> Path:
    """A config written as `base:` plus `override_<name>:` sections (as srtctl users write them), with --variant
    NAME: the base with that override merged in, written as a plain deployment file (named NAME-VARIANT, engine
    YAML paths made absolute) that every component then reads. Without a variant: the file itself."""
    path = Path(path)
    if variant is None:
        return path
    data = read_yaml(path)
    names = variant_names(data)
    if not isinstance(data, dict) or "base" not in data:
        raise ConfigError([f"{path}: --variant {variant}: this config has no `base:` and `override_<name>:` "
                           f"sections"])
    if variant not in names:
        raise ConfigError([f"{path}: --variant {variant}: no override_{variant} (variants: "
                           f"{', '.join(names) or 'none'})"])
    tree = _merge(data["base"], data[f"override_{variant}"])
    if not isinstance(tree, dict):
        raise ConfigError([f"{path}: base: expected a mapping of deployment fields"])
    tree["name"] = f"{tree.get('name', path.stem)}-{variant}"
    for spec in (tree.get("workers") or {}).values():
        if isinstance(spec, dict) and spec.get("engine_config") and not Path(spec["engine_config"]).is_absolute():
            spec["engine_config"] = str((path.parent / spec["engine_config"]).resolve())
    out = VARIANTS_DIR / f"{tree['name']}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {path}, variant {variant} (written by hpc; edit the source, not this file)\n"
                   + yaml.safe_dump(tree, sort_keys=False))
    return out


def load_deployment(path: str | Path, check_files: bool = True) -> Deployment:
    """Load and validate a deployment; raises ConfigError listing every problem. A config of `base:` and
    `override_<name>:` sections loads as its base (resolve_variant picks a variant)."""
    path = Path(path)
    data = read_yaml(path)
    if isinstance(data, dict) and "base" in data and "name" not in data:
        data = data["base"]
    dep = parse_model(Deployment, path, data, "deployment")
    dep._source = path
    problems = check_deployment(dep, path) if check_files else []
    if problems:
        raise ConfigError(problems)
    return dep


def check_deployment(dep: Deployment, path: Path) -> list[str]:
    """Rules that span fields and files: roles that fit together, parallelism that fits the GPUs."""
    problems = []
    w = dep.workers
    roles = [r for r, _ in w.items()]
    if not roles:
        problems.append(f"{path}: workers: no workers (expected aggregated, or prefill and decode)")
    if (w.prefill is None) != (w.decode is None):
        have, need = ("prefill", "decode") if w.prefill else ("decode", "prefill")
        problems.append(f"{path}: workers.{need}: required field is missing ({have} workers need {need} workers)")
    if w.aggregated is not None and w.prefill is not None:
        problems.append(f"{path}: workers: aggregated and prefill/decode cannot be mixed in one deployment")
    if w.encode is not None and dep.model.modality != Modality.multimodal:
        problems.append(f"{path}: workers.encode: encode workers need model.modality: multimodal")
    gpn_all = dep.cluster.gpus_per_node
    needed = sum(s.replicas * s.gpus_per_worker for _, s in w.items() if s.engine != "mocker")
    if dep.cluster.nodes and gpn_all and needed > dep.cluster.nodes * gpn_all:
        problems.append(f"{path}: cluster.nodes: {dep.cluster.nodes} nodes x {gpn_all} GPUs cannot hold the "
                        f"{needed} GPUs the workers need")
    for role, spec in w.items():
        where = f"{path}: workers.{role}"
        gpn = spec.gpus_per_node if spec.gpus_per_node is not None else dep.cluster.gpus_per_node
        n = spec.gpus_per_worker
        if spec.engine != "mocker" and gpn > 0:
            if n < gpn and gpn % n:
                key = "tensor_parallel_size" if spec.pipeline_parallel_size == 1 else "pipeline_parallel_size"
                problems.append(f"{where}.{key}: {getattr(spec, key)} gives {n} GPUs per worker, which does not "
                                f"divide {gpn} GPUs per node")
            elif n > gpn and n % gpn:
                problems.append(f"{where}.tensor_parallel_size: {n} GPUs per worker is not a whole number of "
                                f"{gpn}-GPU nodes")
        if n % spec.expert_parallel_size:
            problems.append(f"{where}.expert_parallel_size: {spec.expert_parallel_size} does not divide the "
                            f"{n} GPUs of a worker")
        if spec.engine == "torch" and role != "aggregated" and spec.gpus_per_worker > 1:
            problems.append(f"{where}.tensor_parallel_size: the reference engine runs tensor or pipeline parallel "
                            f"for aggregated workers only (each rank would hold part of the KV to transfer)")
        if spec.engine == "torch" and spec.pipeline_parallel_size > 1:
            problems.append(f"{where}.pipeline_parallel_size: the reference engine has no pipeline parallelism")
        if spec.engine == "trtllm" and spec.engine_config is None:
            problems.append(f"{where}.engine_config: required for engine trtllm")
        cfg_path = dep.engine_config_path(role)
        if cfg_path is None:
            continue
        try:
            cfg = dep._engines[role] = load_engine_config(cfg_path)
        except ConfigError as e:
            problems.extend(f"{where}.engine_config: {p}" if "file not found" in p else p for p in e.problems)
            continue
        for key in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(cfg, key) != getattr(spec, key):
                problems.append(f"{cfg_path}: {key}: {getattr(cfg, key)} differs from workers.{role}.{key}: "
                                f"{getattr(spec, key)} in {path}")
        ep = cfg.moe_expert_parallel_size
        if ep is not None and ep != spec.expert_parallel_size:
            problems.append(f"{cfg_path}: moe_expert_parallel_size: {ep} differs from workers.{role}."
                            f"expert_parallel_size: {spec.expert_parallel_size} in {path}")
        if cfg.enable_attention_dp and spec.tensor_parallel_size == 1:
            problems.append(f"{cfg_path}: enable_attention_dp: needs tensor_parallel_size > 1")
        if spec.engine == "trtllm":
            problems += _trtllm_problems(role, cfg, cfg_path)
    problems += _shape_problems(dep, path)
    return problems


def _trtllm_problems(role: str, cfg: EngineConfig, cfg_path: Path) -> list[str]:
    problems = []
    if cfg.backend not in (None, "pytorch"):
        problems.append(f"{cfg_path}: backend: {cfg.backend} is not served by hpc's TensorRT-LLM adapter (it drives "
                        f"the LLM API's PyTorch backend; remove the key or set pytorch)")
    if role in ("prefill", "decode") and cfg.cache_transceiver_config is None:
        problems.append(f"{cfg_path}: cache_transceiver_config: required for TensorRT-LLM {role} workers (its cache "
                        f"transceiver moves the KV; e.g. {{backend: NIXL}})")
    return problems


def model_shape(dep: "Deployment", path: Path) -> tuple[ModelShape | None, list[str]]:
    """The model's shape from its config.json when the directory is reachable from here, else what the
    deployment declares (model.shape)."""
    model_dir = Path(dep.model.path)
    if not model_dir.is_absolute() and dep.source is not None and not model_dir.exists():
        model_dir = dep.source.parent / model_dir
    if not model_dir.is_dir():
        return dep.model.shape, []
    config = model_dir / "config.json"
    try:
        data = json.loads(config.read_text())
    except FileNotFoundError:
        return dep.model.shape, [f"{path}: model.path: {model_dir} has no config.json (expected a Hugging Face "
                                 f"model directory)"]
    except (OSError, ValueError) as e:
        return dep.model.shape, [f"{config}: cannot read it as JSON ({e})"]
    text = data.get("text_config") or data
    experts = next((text[k] for k in ("num_local_experts", "n_routed_experts", "num_experts") if k in text), None)
    heads = text.get("num_attention_heads")
    return ModelShape(num_attention_heads=heads, num_key_value_heads=text.get("num_key_value_heads", heads),
                      num_experts=experts), []


def _shape_problems(dep: "Deployment", path: Path) -> list[str]:
    """Tensor parallelism splits attention heads; expert parallelism splits experts."""
    shape, problems = model_shape(dep, path)
    if shape is None:
        return problems
    for role, spec in dep.workers.items():
        where = f"{path}: workers.{role}"
        tp, ep = spec.tensor_parallel_size, spec.expert_parallel_size
        attention_dp = dep.engine_config(role).enable_attention_dp if spec.engine_config else False
        heads, kv_heads = shape.num_attention_heads, shape.num_key_value_heads
        if tp > 1 and not attention_dp and heads and heads % tp:
            problems.append(f"{where}.tensor_parallel_size: {tp} does not divide the model's {heads} attention "
                            f"heads (choose a TP that divides {heads}, or enable_attention_dp)")
        elif tp > 1 and not attention_dp and kv_heads and kv_heads % tp and tp % kv_heads:
            problems.append(f"{where}.tensor_parallel_size: {tp} and the model's {kv_heads} KV heads do not divide "
                            f"one another (each rank needs whole KV heads, or whole copies of them)")
        if ep > 1 and shape.num_experts and shape.num_experts % ep:
            problems.append(f"{where}.expert_parallel_size: {ep} does not divide the model's {shape.num_experts} "
                            f"experts")
        if ep > 1 and shape.num_experts is None and shape.num_attention_heads:
            problems.append(f"{where}.expert_parallel_size: {ep} but the model has no experts")
    return problems


def validate_files(paths: list[Path]) -> dict[Path, list[str]]:
    """Every problem of every file; an empty list means the file is valid."""
    out = {}
    for p in paths:
        try:
            load_deployment(p)
            out[p] = []
        except ConfigError as e:
            out[p] = e.problems
    return out
