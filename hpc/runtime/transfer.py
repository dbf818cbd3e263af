"""Moving KV blocks between workers: NIXL (UCX) by default, or CUDA IPC within a node when asked for.

The engine's pool is one tensor [num_blocks, block_bytes] with all layers of a block adjacent, and allocators hand
out adjacent blocks, so a request's KV is usually one contiguous byte range: one NIXL descriptor. NIXL pays a few
microseconds per descriptor, so merging runs of adjacent blocks is what keeps transfers at link speed. The CUDA-IPC
path maps the peer's pool once and copies each run with cudaMemcpy; measured slower than NIXL within one GPU, it
is kept for links where it may win (intra_node: cuda-ipc). Both paths end with a NIXL notification that tells the prefill worker it
may free the blocks; the prefill worker also frees them after a timeout, so a lost notification costs memory for a
while, never a hung request."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass

import numpy as np

from hpc.errors import HpcError
from hpc.runtime.protocol import CudaIpc, KvHandle, KvLayout

log = logging.getLogger(__name__)
RELEASE = b"release:"


class TransferError(Exception):
    pass


@dataclass(frozen=True)
class TransferResult:
    bytes: int
    seconds: float
    path: str  # "nixl" | "cuda-ipc"
    segments: int

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def segments(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, count) for runs where both block id lists advance by one together."""
    if len(src) != len(dst):
        raise TransferError(f"{len(src)} source blocks but {len(dst)} destination blocks")
    out: list[list[int]] = []
    for s, d in zip(src, dst):
        if out and s == out[-1][0] + out[-1][2] and d == out[-1][1] + out[-1][2]:
            out[-1][2] += 1
        else:
            out.append([s, d, 1])
    return [tuple(x) for x in out]


def ensure_cuda_context(device: int) -> None:
    """NIXL/UCX must find a CUDA context when the agent is created, or GPU transfers fall back to staging through
    TCP at about 0.5 GB/s instead of hundreds (measured on H200s). Call this before KvTransfer on a GPU."""
    import torch

    torch.cuda.set_device(device)
    torch.zeros(1, device=f"cuda:{device}")


def _device_uuid(index: int) -> str:
    import torch

    return str(torch.cuda.get_device_properties(index).uuid)


class KvTransfer:
    """One per worker: the engine's KV pool registered with NIXL once, at start."""

    def __init__(self, name: str, pool, layout: KvLayout, host: str | None = None, intra_node: str = "auto",
                 progress_thread: bool | None = None):
        # NIXL's progress thread busy-polls a whole CPU core. On GPU nodes it stays on: a VRAM READ did not finish
        # without it while the owner was not polling (H200). For DRAM pools (CPU workers, the mocker, tests on small
        # machines) it is off, and the agent is progressed by our polls: the reader polls its transfer, the owner
        # polls for notifications (workers/worker.py housekeeping).
        progress_thread = pool.is_cuda if progress_thread is None else progress_thread
        try:
            from nixl._api import nixl_agent, nixl_agent_config
        except ImportError:
            raise HpcError("NIXL is not installed: pip install nixl (the `gpu` or `test` extra)") from None
        if pool.dim() != 2 or not pool.is_contiguous():
            raise TransferError("the KV pool must be a contiguous [num_blocks, block_bytes] tensor")
        self.name = name
        self.pool = pool
        self.layout = layout
        self.block_bytes = pool.shape[1]
        self.host = host or socket.gethostname()
        self.intra_node = intra_node
        self.mem_type = "VRAM" if pool.is_cuda else "DRAM"
        self.device_id = pool.device.index if pool.is_cuda else 0
        if pool.is_cuda:
            # UCX turns its cuda_ipc READ off when it sees no NVLink (one GPU, or PCIe), and VRAM then goes
            # through TCP at 0.5 GB/s (measured on a one-GPU H200). Turn it on unless the user chose otherwise.
            os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")
        self.agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"]))
        self._reg = self.agent.register_memory(pool)
        self._metadata = self.agent.get_agent_metadata()
        self._remotes: dict[str, bytes] = {}  # peer agent name -> the metadata it was added with
        self._ipc_peers: dict[str, object] = {}
        self.cuda_ipc = self._export_ipc() if pool.is_cuda and intra_node != "nixl" else None
        self.transfers = 0
        self.bytes_moved = 0
        self.seconds = 0.0

    # ---- the prefill side ------------------------------------------------------------------------------------
    def handle(self, block_ids: list[int], num_tokens: int) -> KvHandle:
        return KvHandle(agent=self.name, agent_metadata=self._metadata, host=self.host, mem_type=self.mem_type,
                        device_id=self.device_id, pool_addr=self.pool.data_ptr(), block_ids=list(block_ids),
                        num_tokens=num_tokens, layout=self.layout, cuda_ipc=self.cuda_ipc)

    def released(self) -> list[str]:
        """Request ids whose blocks a reader has finished with."""
        out = []
        for msgs in self.agent.get_new_notifs().values():
            out.extend(m[len(RELEASE):].decode() for m in msgs if m.startswith(RELEASE))
        return out

    def _export_ipc(self) -> CudaIpc | None:
        try:
            share = self.pool.untyped_storage()._share_cuda_()
        except Exception as e:  # some platforms have no CUDA IPC; NIXL still works
            log.warning("CUDA IPC unavailable (%s); intra-node KV goes through NIXL", e)
            return None
        return CudaIpc(device_uuid=_device_uuid(self.device_id), handle=list(share))

    # ---- the decode side -------------------------------------------------------------------------------------
    def path_for(self, handle: KvHandle) -> str:
        # "auto" is NIXL: on an H200 it read a 4k-token Llama-3-8B KV at 89% of a device copy, faster than our
        # CUDA-IPC copies (56%) (benchmarks/results/kv_transfer-h200-1gpu.json). CUDA IPC stays selectable.
        if (self.intra_node == "cuda-ipc" and handle.cuda_ipc is not None and self.pool.is_cuda
                and handle.host == self.host and self._local_index(handle.cuda_ipc.device_uuid) is not None):
            return "cuda-ipc"
        return "nixl"

    async def read(self, handle: KvHandle, local_blocks: list[int], request_id: str, timeout: float,
                   path: str | None = None) -> TransferResult:
        """Copy the handle's blocks into `local_blocks`, then tell the owner it may free them.
        `path` forces "nixl" or "cuda-ipc" (benchmarks); by default it is chosen from where the two pools are."""
        if handle.layout.block_bytes != self.block_bytes:
            raise TransferError(f"block of {handle.layout.block_bytes} bytes in the KV handle, "
                                f"{self.block_bytes} here")
        runs = segments(handle.block_ids, local_blocks)
        try:
            remote = self._add_remote(handle)
        except Exception as e:  # NIXL's own errors (bindings exceptions) become ours
            raise TransferError(f"cannot reach {handle.agent}: {type(e).__name__}: {e}") from None
        t0 = time.perf_counter()
        path = path or self.path_for(handle)
        if path == "cuda-ipc":
            await self._read_ipc(handle, runs, timeout)
            self.agent.send_notif(remote, RELEASE + request_id.encode())
        else:
            await self._read_nixl(handle, runs, remote, request_id, timeout)
        seconds = time.perf_counter() - t0
        nbytes = len(local_blocks) * self.block_bytes
        self.transfers += 1
        self.bytes_moved += nbytes
        self.seconds += seconds
        return TransferResult(nbytes, seconds, path, len(runs))

    def _add_remote(self, handle: KvHandle) -> str:
        """The peer's agent, added once; added again when its metadata changed (a worker restarted under the same
        name has new memory registrations)."""
        known = self._remotes.get(handle.agent)
        if known != handle.agent_metadata:
            if known is not None:
                self.agent.remove_remote_agent(handle.agent)
            self.agent.add_remote_agent(handle.agent_metadata)
            self._remotes[handle.agent] = handle.agent_metadata
        return handle.agent

    async def _read_nixl(self, handle: KvHandle, runs, remote: str, request_id: str, timeout: float) -> None:
        bb = self.block_bytes
        local = np.array([(self.pool.data_ptr() + d * bb, n * bb, self.device_id) for _, d, n in runs],
                         dtype=np.uint64)
        far = np.array([(handle.pool_addr + s * bb, n * bb, handle.device_id) for s, _, n in runs], dtype=np.uint64)
        try:
            xfer = self.agent.initialize_xfer("READ", self.agent.get_xfer_descs(local, self.mem_type),
                                              self.agent.get_xfer_descs(far, handle.mem_type), remote,
                                              RELEASE + request_id.encode())
        except Exception as e:
            raise TransferError(f"NIXL READ from {remote} refused: {type(e).__name__}: {e}") from None
        try:
            state = self.agent.transfer(xfer)
            deadline = time.monotonic() + timeout
            spins = 0
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TransferError(f"KV read from {remote} did not finish within {timeout:g} s")
                # Yield at once for the first polls (small transfers finish in microseconds), then back off by a
                # millisecond, an epoll wait's resolution (uvloop rounds shorter sleeps to none: a busy spin).
                await asyncio.sleep(0 if spins < 200 else 0.001)
                spins += 1
                state = self.agent.check_xfer_state(xfer)
            if state != "DONE":
                raise TransferError(f"KV read from {remote} failed (NIXL state {state})")
        finally:
            self.agent.release_xfer_handle(xfer)

    def _local_index(self, uuid: str) -> int | None:
        import torch

        for i in range(torch.cuda.device_count()):
            if _device_uuid(i) == uuid:
                return i
        return None

    def _peer_pool(self, handle: KvHandle):
        import torch

        peer = self._ipc_peers.get(handle.agent)
        if peer is None:
            fields = list(handle.cuda_ipc.handle)
            fields[0] = self._local_index(handle.cuda_ipc.device_uuid)  # the device as numbered in this process
            storage = torch.UntypedStorage._new_shared_cuda(*fields)
            flat = torch.empty(0, dtype=torch.uint8, device=f"cuda:{fields[0]}").set_(storage)
            peer = flat[: flat.numel() // self.block_bytes * self.block_bytes].view(-1, self.block_bytes)
            self._ipc_peers[handle.agent] = peer
        return peer

    async def _read_ipc(self, handle: KvHandle, runs, timeout: float) -> None:
        import torch

        peer = self._peer_pool(handle)
        stream = torch.cuda.current_stream(self.pool.device)
        with torch.cuda.stream(stream):
            for s, d, n in runs:
                self.pool[d: d + n].copy_(peer[s: s + n], non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
        try:
            await asyncio.wait_for(asyncio.to_thread(done.synchronize), timeout)
        except asyncio.TimeoutError:
            raise TransferError(f"KV copy from {handle.agent} did not finish within {timeout:g} s") from None

    def close(self) -> None:
        try:
            self.agent.deregister_memory(self._reg)
        except Exception:
            pass
