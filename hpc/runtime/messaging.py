"""NATS messaging: serve a subject, request with a streamed reply, publish. Every wait has a deadline."""

from __future__ import annotations

import asyncio
import itertools
import logging
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, Callable

import nats

from hpc.errors import HpcError

log = logging.getLogger(__name__)


class RequestTimeout(Exception):
    """No reply (or no next message of a stream) within the deadline."""


class PeerGone(Exception):
    """The worker a request waits on left (its etcd lease ended) before it answered."""


Reply = Callable[[bytes], Awaitable[None]]
_GONE = object()


async def _log_error(e: Exception) -> None:
    """nats-py would print a traceback per connection error; one line is enough (callers report failures)."""
    log.warning("NATS: %s", str(e) or type(e).__name__)


def _failure(msg, subject: str) -> PeerGone | None:
    if msg is _GONE:
        return PeerGone(f"the worker serving {subject} left")
    if msg.headers and msg.headers.get("Status") == "503":  # the server says: no subscriber
        return PeerGone(f"nothing serves {subject}")
    return None


async def _get_within(queue: asyncio.Queue, timeout: float):
    if hasattr(asyncio, "timeout"):  # Python 3.11+: no extra task per wait
        async with asyncio.timeout(timeout):
            return await queue.get()
    return await asyncio.wait_for(queue.get(), timeout)


class Bus:
    def __init__(self, nc):
        self.nc = nc
        self._tasks: set[asyncio.Task] = set()
        self._started = 0  # handlers started so far: drain_handlers watches for late arrivals
        self._subs = []
        self._mux_prefix = ""  # the replies inbox, opened by connect()
        self._streams: dict[str, asyncio.Queue] = {}
        self._counter = itertools.count()

    @classmethod
    async def connect(cls, url: str, name: str, timeout: float = 5.0, credentials=None) -> "Bus":
        auth = {"user": credentials.nats_user, "password": credentials.nats_password} if credentials else {}
        try:
            nc = await asyncio.wait_for(nats.connect(
                url, name=name, connect_timeout=timeout, allow_reconnect=True, reconnect_time_wait=0.5,
                max_reconnect_attempts=-1, max_outstanding_pings=3, ping_interval=5, error_cb=_log_error, **auth),
                timeout + 1)
        except (OSError, asyncio.TimeoutError, nats.errors.NoServersError, nats.errors.Error) as e:
            raise HpcError(f"cannot reach NATS at {url}: {str(e) or type(e).__name__}") from None
        bus = cls(nc)
        await bus._open_replies_inbox()
        return bus

    async def serve(self, subject: str, handler: Callable[[bytes, Reply], Awaitable[None]]) -> None:
        """Run `handler(payload, reply)` in its own task for each message; `reply` may be called many times."""

        async def on_message(msg):
            async def reply(data: bytes) -> None:
                if msg.reply:
                    await self.nc.publish(msg.reply, data)

            task = asyncio.create_task(handler(msg.data, reply))
            self._tasks.add(task)
            self._started += 1
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

    async def drain_handlers(self, timeout: float, quiet: float = 0.5) -> int:
        """Wait for running handlers, those that start meanwhile too, until none has started for `quiet` seconds
        (a router that has not yet seen a draining mark may still send one), up to `timeout`; returns how many
        were still running (then cancelled)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (remaining := deadline - loop.time()) > 0:
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=remaining)
                continue
            started = self._started
            await asyncio.sleep(min(quiet, remaining))
            if not self._tasks and self._started == started:
                break
        left = list(self._tasks)
        for t in left:
            t.cancel()
        return len(left)

    async def publish(self, subject: str, data: bytes) -> None:
        await self.nc.publish(subject, data)

    async def subscribe(self, subject: str, cb) -> object:
        return await self.nc.subscribe(subject, cb=cb)

    async def probe(self, subject: str, data: bytes, timeout: float) -> bool | None:
        """Whether anything serves `subject`: False when the server says no subscriber is left (it knows at once
        when a process dies: its connection closes), True on an answer, None when unsure (a timeout: busy or
        stopped, or NATS itself unreachable)."""
        try:
            await self.nc.request(subject, data, timeout=timeout)
            return True
        except nats.errors.NoRespondersError:
            return False
        except Exception:
            return None

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        async with aclosing(self.stream(subject, data, timeout, timeout)) as replies:
            async for batch in replies:
                return batch[0]
        raise RequestTimeout(f"no reply on {subject}")

    async def _open_replies_inbox(self) -> None:
        """One wildcard inbox for every stream of this connection: no SUB/UNSUB per request. Opened with the
        connection, so concurrent first requests cannot each open one."""
        prefix = self.nc.new_inbox()

        async def route(msg) -> None:
            queue = self._streams.get(msg.subject[len(prefix) + 1:])
            if queue is not None:
                queue.put_nowait(msg)

        await self.nc.subscribe(f"{prefix}.*", cb=route)
        self._mux_prefix = prefix

    async def stream(self, subject: str, data: bytes, first_timeout: float, idle_timeout: float,
                     gone: asyncio.Future | None = None) -> AsyncIterator[list[bytes]]:
        """Send `data` and yield its replies until the consumer stops: each time, every reply that has arrived,
        oldest first (a consumer that falls behind catches up in one step). The first reply must come within
        `first_timeout`, each next one within `idle_timeout`; `gone` done means the peer left: fail at once."""
        prefix = self._mux_prefix
        token = f"{next(self._counter):x}"
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[token] = queue

        def wake(_):  # the directory completes `gone` when the worker's lease ends: wake the wait at once
            queue.put_nowait(_GONE)

        if gone is not None:
            gone.add_done_callback(wake)
        try:
            await self.nc.publish(subject, data, reply=f"{prefix}.{token}")
            timeout = first_timeout
            while True:
                try:
                    msg = await _get_within(queue, timeout)
                except asyncio.TimeoutError:
                    raise RequestTimeout(f"no reply on {subject} within {timeout:g} s") from None
                arrived = [msg]
                while not queue.empty():
                    arrived.append(queue.get_nowait())
                batch = []
                for msg in arrived:
                    failure = _failure(msg, subject)
                    if failure is not None:
                        if batch:  # what came before the failure first
                            yield batch
                        raise failure
                    batch.append(msg.data)
                yield batch
                timeout = idle_timeout
        finally:
            self._streams.pop(token, None)
            if gone is not None:
                gone.remove_done_callback(wake)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.nc.drain(), 5)
        except Exception:
            await self.nc.close()
