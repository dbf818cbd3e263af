"""Requests and their replies on a TCP connection of their own, from a frontend process straight to a worker.

Through NATS a request and each batch of replies cross the NATS server: on a busy host that is one more process to
wait for, and a first token crosses it twice. So a worker also listens on a TCP port (advertised in etcd as
`WorkerInfo.direct`, on the address it reaches NATS from); each frontend process keeps one connection to each worker
it sends to. Requests go one way and replies the other, batched per event-loop turn as on NATS. NATS stays for the
rest (discovery, cancels, load reports, probes) and carries the requests while no connection is ready: a request
never waits for a connection to open, and a port that cannot be reached costs nothing but a retry now and then.

A frame is a 4-byte big-endian length and a msgpack list of (stream token, bytes). A frontend's first frame is the
deployment's secret (derived from its NATS credentials); the worker answers an empty frame when it matches and closes
the connection when it does not. Cancels go through NATS, by request id, as for requests sent there."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import socket
import struct
import time
from typing import Callable
from urllib.parse import urlsplit

import msgspec

log = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
MAX_FRAME = 256 << 20  # a longer frame is a broken peer, not a batch
CONNECT_TIMEOUT_S = 2.0
RETRY_AFTER_S = 30.0  # after a connection could not be made (or was refused), NATS alone for this long
SLOW_READER_BYTES = 64 << 20  # replies a frontend has not read: past this it is stuck, as NATS's slow consumer
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(list[tuple[str, bytes]]).decode
_ACK = _LEN.pack(1) + _encode([])


def secret_of(credentials) -> bytes:
    """What a frontend presents to a worker: a digest of the deployment's NATS credentials (who may send requests
    through NATS may send them here); a fixed value for a deployment without credentials (`--insecure`)."""
    if credentials is None:
        return b"hpc-insecure"
    return hashlib.sha256(f"hpc-direct\0{credentials.nats_user}\0{credentials.nats_password}".encode()).digest()


def local_address_towards(url: str) -> str:
    """This host's address on the route to `url`'s host (the NATS server, on the head node with the frontends):
    the one they can reach this worker on. A UDP socket's connect sends nothing."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    family, _, _, _, addr = socket.getaddrinfo(parts.hostname or "127.0.0.1", parts.port or 4222,
                                               type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        return s.getsockname()[0]


def join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def frame(items: list[tuple[str, bytes]]) -> bytes:
    body = _encode(items)
    return _LEN.pack(len(body)) + body


class _Frames(asyncio.Protocol):
    """Splits the byte stream into frames, handing each whole one to `on_frame` inside the read callback."""

    transport: asyncio.Transport

    def __init__(self):
        self._buf = bytearray()

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        at, n = 0, len(buf)
        try:
            while n - at >= 4:
                size = _LEN.unpack_from(buf, at)[0]
                if size > MAX_FRAME:
                    raise ValueError(f"a frame of {size} bytes")
                if n - at - 4 < size:
                    break
                self.on_frame(bytes(buf[at + 4:at + 4 + size]))
                at += 4 + size
        except (ValueError, msgspec.DecodeError) as e:  # not this protocol: nothing more is read from it
            log.warning("direct connection with %s: %s; closing it", self.transport.get_extra_info("peername"), e)
            self.transport.abort()
            return
        if at:
            del buf[:at]

    def on_frame(self, payload: bytes) -> None:
        raise NotImplementedError


class ServerConnection(_Frames):
    """A worker's end of one frontend process's connection. Each request goes to `start(data, conn, token)`,
    which returns its task; the worker's Bus queues the replies and writes them here once per turn (`write`).
    When the connection ends, its requests are cancelled: no one is left to read them."""

    def __init__(self, secret: bytes, start: Callable[[bytes, "ServerConnection", str], asyncio.Task | None]):
        super().__init__()
        self._secret, self._start = secret, start
        self._hello = False
        self._tasks: dict[str, asyncio.Task] = {}

    def on_frame(self, payload: bytes) -> None:
        if not self._hello:
            if not hmac.compare_digest(payload, self._secret):
                raise ValueError("a first frame that is not this deployment's secret")
            self._hello = True
            self.transport.write(_ACK)
            return
        for token, data in _decode(payload):
            task = self._start(data, self, token)
            if task is not None:
                self._tasks[token] = task
                task.add_done_callback(lambda _, token=token: self._tasks.pop(token, None))

    def write(self, replies: list[tuple[str, bytes]]) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(frame(replies))
        if self.transport.get_write_buffer_size() > SLOW_READER_BYTES:  # its streams fail, its work stops
            log.warning("direct connection with %s: %d bytes of replies unread; closing it",
                        self.transport.get_extra_info("peername"), self.transport.get_write_buffer_size())
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        self._tasks.clear()


class Listener:
    """A worker's port for frontends' direct connections, and the address it advertises."""

    def __init__(self, server: asyncio.AbstractServer, address: str):
        self.server, self.address = server, address

    @classmethod
    async def open(cls, host: str, secret: bytes,
                   start: Callable[[bytes, ServerConnection, str], asyncio.Task | None]) -> "Listener":
        server = await asyncio.get_running_loop().create_server(lambda: ServerConnection(secret, start), host, 0)
        return cls(server, join(host, server.sockets[0].getsockname()[1]))

    def close(self) -> None:
        self.server.close()


class ClientConnection(_Frames):
    """A frontend process's connection to one worker. Usable once the worker has acknowledged the hello. Requests
    sent in one turn leave in one write at its end; each reply goes to `deliver(token, data)`; when the connection
    ends, `lost(token)` for every stream still on it."""

    def __init__(self, secret: bytes, deliver: Callable[[str, bytes], None], lost: Callable[[str], None]):
        super().__init__()
        self._secret, self._deliver, self._lost = secret, deliver, lost
        self.ready = self.closed = False
        self.accepted = False  # the worker acknowledged the hello once (ready is cleared when it closes)
        self.streams: set[str] = set()
        self._pending: list[tuple[str, bytes]] = []

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.write(_LEN.pack(len(self._secret)) + self._secret)

    def on_frame(self, payload: bytes) -> None:
        if not self.ready:
            self.ready = self.accepted = True  # the worker's acknowledgement
            return
        for token, data in _decode(payload):
            self._deliver(token, data)

    def send(self, token: str, data: bytes) -> None:
        self.streams.add(token)
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append((token, data))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self.transport.is_closing():
            self.transport.write(frame(pending))

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.ready = False
        for token in list(self.streams):
            self._lost(token)
        self.streams.clear()


class Connections:
    """A frontend process's direct connections, one per worker address, opened in the background on first use."""

    def __init__(self, secret: bytes, deliver: Callable[[str, bytes], None], lost: Callable[[str], None]):
        self._secret, self._deliver, self._lost = secret, deliver, lost
        self._conns: dict[str, ClientConnection] = {}
        self._opening: dict[str, asyncio.Task] = {}
        self._failed: dict[str, float] = {}  # address -> when a retry may start

    def get(self, address: str) -> ClientConnection | None:
        """The ready connection to `address`; None while there is none (it is then being opened, unless a recent
        try failed): the caller sends through NATS meanwhile."""
        conn = self._conns.get(address)
        if conn is not None:
            if conn.ready and not conn.closed:
                return conn
            if not conn.closed:
                return None  # the hello is on its way
            del self._conns[address]
            if not conn.accepted:
                log.warning("the worker at %s closed the direct connection without accepting it (another "
                            "deployment's credentials?): its requests go through NATS; next try in %g s", address,
                            RETRY_AFTER_S)
            self._failed[address] = time.monotonic() + (0 if conn.accepted else RETRY_AFTER_S)
        if address not in self._opening and time.monotonic() >= self._failed.get(address, 0):
            self._opening[address] = asyncio.get_running_loop().create_task(self._open(address))
        return None

    def state(self, address: str) -> str:
        """For `hpc status`: "open" (ready), "failing" (the last try failed or was refused; NATS until the next),
        "opening", or "none" (never wanted yet: a connection opens on the first request to that worker)."""
        conn = self._conns.get(address)
        if conn is not None and not conn.closed:
            return "open" if conn.ready else "opening"
        if conn is not None and not conn.accepted:
            return "failing"  # refused; get() has not noted it yet
        if address in self._opening:
            return "opening"
        return "failing" if time.monotonic() < self._failed.get(address, 0) else "none"

    async def _open(self, address: str) -> None:
        try:
            host, port = split(address)
            _, conn = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                lambda: ClientConnection(self._secret, self._deliver, self._lost), host, port), CONNECT_TIMEOUT_S)
            self._conns[address] = conn
        except (OSError, asyncio.TimeoutError, ValueError) as e:
            log.warning("no direct connection to the worker at %s (%s): its requests go through NATS; next try "
                        "in %g s", address, str(e) or type(e).__name__, RETRY_AFTER_S)
            self._failed[address] = time.monotonic() + RETRY_AFTER_S
        finally:
            del self._opening[address]

    def close(self) -> None:
        for task in self._opening.values():
            task.cancel()
        for conn in self._conns.values():
            conn.transport.close()
        self._conns.clear()
