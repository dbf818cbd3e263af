"""The wire protocol: msgspec structs, encoded as msgpack on NATS and as JSON in etcd. Token ids, never pickles.

Versioned: a worker or frontend that sees a newer PROTOCOL_VERSION than it knows refuses the message clearly."""

from __future__ import annotations

from typing import Literal, Union

import msgspec

PROTOCOL_VERSION = 1


class Sampling(msgspec.Struct, frozen=True, omit_defaults=True):
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False


class KvLayout(msgspec.Struct, frozen=True):
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_bytes: int


class CudaIpc(msgspec.Struct, frozen=True):
    """Enough to map a peer's pool within one node (torch's CUDA IPC handle of the pool's storage)."""

    device_uuid: str
    handle: list  # the fields of torch's storage IPC share, bytes and ints


class KvHandle(msgspec.Struct, frozen=True):
    """Where a request's prefilled KV lives: the prefill worker's NIXL agent and the blocks to read."""

    agent: str
    agent_metadata: bytes  # NIXL metadata, so the reader can connect without a second round trip
    host: str
    mem_type: Literal["DRAM", "VRAM"]
    device_id: int
    pool_addr: int
    block_ids: list[int]
    num_tokens: int
    layout: KvLayout
    cuda_ipc: CudaIpc | None = None


class EmbeddingHandle(msgspec.Struct, frozen=True):
    """Embeddings an encode worker holds for a prefill worker to read through NIXL: raw bytes in staging blocks,
    addressed as a KV handle is (the layout describes blocks of bytes), then viewed as `dtype` of `shape`."""

    blocks: KvHandle
    shape: list[int]
    dtype: str
    nbytes: int


class MultimodalPart(msgspec.Struct, frozen=True):
    """One image of a request, at prompt positions offset .. offset + num_tokens - 1 (the model's image token).
    The frontend has checked it (format, size, pixels, path); `digest` names its content."""

    kind: Literal["image", "embedding_file", "embedding"]
    offset: int
    num_tokens: int
    digest: bytes
    data: bytes | None = None  # image: the encoded image
    path: str | None = None  # embedding_file: a .pt/.pth/.bin/.safetensors file on the shared filesystem
    embedding: EmbeddingHandle | None = None  # embedding: computed (or loaded) by an encode worker


class EncodeRequest(msgspec.Struct, frozen=True, tag="encode"):
    request_id: str
    model: str
    parts: list[MultimodalPart]
    version: int = PROTOCOL_VERSION


class EncodeResult(msgspec.Struct, frozen=True, tag="encoded"):
    request_id: str
    parts: list[MultimodalPart]  # kind "embedding", in the request's order


def content_ids(token_ids: list[int], parts: list[MultimodalPart]) -> list[int]:
    """The prompt as prefix caches and the kv-aware router see it: each image's positions carry a marker from its
    digest instead of the image token, so the same image matches and a different one never does."""
    if not parts:
        return token_ids
    keyed = list(token_ids)
    for part in parts:
        keyed[part.offset: part.offset + part.num_tokens] = [-1 - int.from_bytes(part.digest[:8], "little")] \
            * part.num_tokens
    return keyed


class GenerateRequest(msgspec.Struct, frozen=True, tag="generate"):
    request_id: str
    model: str
    token_ids: list[int]
    sampling: Sampling = Sampling()
    # Set by the router for a decode worker: the prefill result to continue from.
    first_token: int | None = None
    kv: KvHandle | None = None
    prefill_worker: str | None = None
    multimodal: list[MultimodalPart] = []
    # TensorRT-LLM's opaque DisaggregatedParams, carried as they are between its prefill and decode workers.
    disagg_params: bytes | None = None
    version: int = PROTOCOL_VERSION


class PrefillResult(msgspec.Struct, frozen=True, tag="prefill"):
    request_id: str
    first_token: int
    prompt_tokens: int
    finish_reason: str | None = None  # set when the first token already ends the request (no KV is held)
    kv: KvHandle | None = None
    disagg_params: bytes | None = None
    cached_tokens: int = 0  # prompt tokens whose KV the prefix cache held
    timing: dict[str, float] = {}  # seconds, measured on the worker: queue, compute, encode


class TokenDelta(msgspec.Struct, frozen=True, tag="tokens", omit_defaults=True):
    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    cached_tokens: int = 0  # on a request's first delta: prompt tokens the prefix cache held
    # On a request's first delta, seconds measured on the worker: queue and compute (aggregated), or the KV transfer
    # and the wait for the first decode step (decode). Durations on one host each: never a difference of clocks.
    timing: dict[str, float] = {}


class ErrorReply(msgspec.Struct, frozen=True, tag="error"):
    request_id: str
    code: Literal["bad_request", "unavailable", "timeout", "layout_mismatch", "internal", "cancelled"]
    message: str


class StatsRequest(msgspec.Struct, frozen=True, tag="stats"):
    pass


class WorkerStats(msgspec.Struct, frozen=True, tag="worker_stats"):
    worker_id: str
    role: str
    waiting: int
    running: int
    held: int
    kv_blocks_total: int
    kv_blocks_free: int
    in_flight: int
    kv_transfers: int = 0
    kv_bytes: int = 0
    kv_seconds: float = 0.0
    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0  # of those, tokens whose KV the prefix cache held (block reuse)
    generated_tokens: int = 0  # output tokens since start (decode tokens/s from two reports)
    # The share of the last seconds the event-loop thread was runnable but waited for a CPU (hpc/runtime/cpu_wait.py):
    # a busy host, or a Slurm step with too few CPUs. None: not known.
    cpu_waiting: float | None = None


Request = Union[GenerateRequest, StatsRequest, EncodeRequest]
Reply = Union[PrefillResult, TokenDelta, ErrorReply, WorkerStats, EncodeResult]


class WorkerInfo(msgspec.Struct, frozen=True):
    """What a worker registers in etcd at /hpc/<deployment>/workers/<role>/<id>, under its lease."""

    worker_id: str
    role: str
    model: str
    deployment: str
    subject: str
    host: str
    engine: str
    model_path: str = ""  # where the frontend finds the tokenizer and chat template (a shared filesystem)
    mpi_size: int = 1
    gpus: list[str] = []
    nixl_agent: str | None = None
    layout: KvLayout | None = None
    max_batch_size: int = 0
    metrics_url: str | None = None
    draining: bool = False  # set while it finishes its requests before leaving: routed to no more
    direct: str | None = None  # host:port for frontends' direct connections (hpc/runtime/direct.py)
    version: int = PROTOCOL_VERSION


_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_encoder = msgspec.msgpack.Encoder()


def encode(msg) -> bytes:
    return _encoder.encode(msg)


def decode_request(data: bytes) -> GenerateRequest | StatsRequest:
    return _request_decoder.decode(data)


# PrefillResult | TokenDelta | ErrorReply | WorkerStats from bytes: the decoder's own method, called once per token
# by a frontend (a wrapper function was one Python call more each time).
decode_reply = _reply_decoder.decode


def encode_json(msg) -> bytes:
    return msgspec.json.encode(msg)


def decode_worker_info(data: bytes) -> WorkerInfo:
    return msgspec.json.decode(data, type=WorkerInfo)


class Subjects:
    """NATS subjects of one deployment."""

    def __init__(self, deployment: str):
        self.prefix = f"hpc.{deployment}"

    def worker(self, role: str, worker_id: str) -> str:
        return f"{self.prefix}.{role}.{worker_id}.generate"

    def cancel(self, request_id: str) -> str:
        return f"{self.prefix}.cancel.{request_id}"

    def cancel_all(self) -> str:
        return f"{self.prefix}.cancel.*"

    def load(self, worker_id: str) -> str:
        return f"{self.prefix}.load.{worker_id}"

    def load_all(self) -> str:
        return f"{self.prefix}.load.*"


class Keys:
    """etcd keys of one deployment."""

    def __init__(self, deployment: str):
        self.root = f"/hpc/{deployment}/"

    def worker(self, role: str, worker_id: str) -> str:
        return f"{self.root}workers/{role}/{worker_id}"

    def model(self, model: str, worker_id: str) -> str:
        return f"{self.root}models/{model}/{worker_id}"

    @property
    def workers(self) -> str:
        return f"{self.root}workers/"
