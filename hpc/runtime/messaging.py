"""NATS messaging: serve a subject, request with a streamed reply, publish. Every wait has a deadline."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

import nats
from nats.errors import TimeoutError as NatsTimeout

from hpc.errors import HpcError

log = logging.getLogger(__name__)


class RequestTimeout(Exception):
    """No reply (or no next message of a stream) within the deadline."""


class PeerGone(Exception):
    """The worker a request waits on left (its etcd lease ended) before it answered."""


Reply = Callable[[bytes], Awaitable[None]]


class Bus:
    def __init__(self, nc):
        self.nc = nc
        self._tasks: set[asyncio.Task] = set()
        self._subs = []

    @classmethod
    async def connect(cls, url: str, name: str, timeout: float = 5.0) -> "Bus":
        try:
            nc = await asyncio.wait_for(nats.connect(
                url, name=name, connect_timeout=timeout, allow_reconnect=True, reconnect_time_wait=0.5,
                max_reconnect_attempts=-1, max_outstanding_pings=3, ping_interval=5), timeout + 1)
        except (OSError, asyncio.TimeoutError, nats.errors.NoServersError) as e:
            raise HpcError(f"cannot reach NATS at {url}: {str(e) or type(e).__name__}") from None
        return cls(nc)

    async def serve(self, subject: str, handler: Callable[[bytes, Reply], Awaitable[None]]) -> None:
        """Run `handler(payload, reply)` in its own task for each message; `reply` may be called many times."""

        async def on_message(msg):
            async def reply(data: bytes) -> None:
                if msg.reply:
                    await self.nc.publish(msg.reply, data)

            task = asyncio.create_task(handler(msg.data, reply))
            self._tasks.add(task)
            task.add_done_callback(self._done)

        self._subs.append(await self.nc.subscribe(subject, cb=on_message))

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception():
            log.error("handler failed", exc_info=task.exception())

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def stop_serving(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()

    async def drain_handlers(self, timeout: float) -> int:
        """Wait for running handlers up to `timeout`; returns how many were still running (then cancelled)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        left = list(self._tasks)
        for t in left:
            t.cancel()
        return len(left)

    async def publish(self, subject: str, data: bytes) -> None:
        await self.nc.publish(subject, data)

    async def subscribe(self, subject: str, cb) -> object:
        return await self.nc.subscribe(subject, cb=cb)

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        async for reply in self.stream(subject, data, timeout, timeout):
            return reply
        raise RequestTimeout(f"no reply on {subject}")

    async def stream(self, subject: str, data: bytes, first_timeout: float, idle_timeout: float,
                     gone: asyncio.Event | None = None) -> AsyncIterator[bytes]:
        """Send `data` and yield replies until the consumer stops. The first reply must come within
        `first_timeout`, each next one within `idle_timeout`; `gone` set means the peer left: fail at once."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        try:
            await self.nc.publish(subject, data, reply=inbox)
            timeout = first_timeout
            while True:
                deadline = time.monotonic() + timeout
                while True:
                    if gone is not None and gone.is_set():
                        raise PeerGone(f"the worker serving {subject} left")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise RequestTimeout(f"no reply on {subject} within {timeout:g} s")
                    try:
                        msg = await sub.next_msg(timeout=min(left, 0.25 if gone is not None else left))
                        break
                    except NatsTimeout:
                        continue
                if msg.headers and msg.headers.get("Status") == "503":  # the server says: no subscriber
                    raise PeerGone(f"nothing serves {subject}")
                yield msg.data
                timeout = idle_timeout
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection may be closing; nothing to release then
                pass

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.nc.drain(), 5)
        except Exception:
            await self.nc.close()
