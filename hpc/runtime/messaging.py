"""NATS messaging: serve a subject, request with a streamed reply, publish. Every wait has a deadline."""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, Callable

import msgspec
import nats
from nats.aio.client import Client as NatsClient

from hpc.errors import HpcError
from hpc.runtime import direct

log = logging.getLogger(__name__)


class RequestTimeout(Exception):
    """No reply (or no next message of a stream) within the deadline."""


class PeerGone(Exception):
    """The worker a request waits on left (its etcd lease ended) before it answered."""


# Python 3.12+ can start a task at once, up to its first wait, instead of on the event loop's next turn.
_EAGER = {"eager_start": True} if sys.version_info >= (3, 12) else {}


def start_task(coro) -> asyncio.Task:
    """A task for `coro` that runs at once where Python allows (3.12+), else on the loop's next turn. On a busy
    worker a turn takes a millisecond or more, and a request's first token waited for several."""
    return asyncio.Task(coro, loop=asyncio.get_running_loop(), **_EAGER)


_GONE = object()  # queued when the worker's lease ends
_CUT = object()  # queued when the direct connection the request went on closes
_NO_RESPONDERS = object()  # queued when the server says nothing subscribes to the subject
# A Bus's replies inbox is `<inbox>.<MUX>.<stream token>`. Replies to such a subject may travel together: a worker
# sends every reply that one turn of its event loop produced for one inbox as a single `<inbox>.<MUX>.<BATCH>`
# message. Any other reply subject (nats-py's own request inbox) gets one message per reply.
MUX, BATCH = "hpc", "batch"  # stream tokens are hex numbers: never BATCH
_encode_batch = msgspec.msgpack.Encoder().encode
_decode_batch = msgspec.msgpack.Decoder(list[tuple[str, bytes]]).decode


class Reply:
    """Sends a served request's replies to its requester, in order. `await reply(data)`, or `reply.nowait(data)`
    from code that cannot await (an engine step handing over its outputs): either way the reply is queued for the
    next turn of the event loop, with every other reply of this turn."""

    __slots__ = ("_bus", "_inbox", "_token")

    def __init__(self, bus: "Bus", inbox: str, token: str | None):
        self._bus, self._inbox, self._token = bus, inbox, token

    async def __call__(self, data: bytes) -> None:
        self.nowait(data)

    def nowait(self, data: bytes) -> None:
        self._bus._queue_reply(self._inbox, self._token, data)


class _Client(NatsClient):
    """nats-py's client, where a direct subscription's messages go to a plain function inside the read loop, not
    through a queue to a callback task of their own (nats-py's `cb`). That saves a turn of the event loop per
    message received: on a busy frontend or worker a turn takes milliseconds, and a first token waits for several.
    It overrides nats-py's internals `_process_msg` and `_send_ping` (hence the pin below 3 in pyproject.toml;
    tests/test_serving.py checks both on the version installed).

    Publishing stays nats-py's, with one exception: a serving Bus writes each turn's replies itself, in one write,
    instead of leaving them to the flusher task's next turn (`write_now`). Writing each publish at once was
    measured too: a first token sooner on the 16-core host, but on two cores the extra writes and wake-ups cost more
    CPU per request than they saved (docs/benchmarks.md)."""

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, Callable[[bytes, bytes, bytes, bytes | None], None]] = {}

    async def subscribe_direct(self, subject: str, handle: Callable[[bytes, bytes, bytes, bytes | None], None]):
        """`handle(subject, reply, data, headers)` for each message, called in the read loop: it must not block."""
        sub = await self.subscribe(subject)
        self._direct[sub._id] = handle
        return sub

    def write_pending(self) -> None:
        """Write what is pending now, not on the flusher task's next turn (the flusher then finds nothing)."""
        if self._pending and self.is_connected:
            pending, self._pending, self._pending_data_size = self._pending, [], 0
            self._transport.writelines(pending)

    async def write_now(self) -> None:
        """write_pending(), then wait while the socket's buffer is full, as the flusher does. Errors are left to
        the connection's own handling, which reports them and reconnects."""
        self.write_pending()
        if self.is_connected:
            try:
                await self._transport.drain()
            except OSError:
                pass

    async def _send_ping(self, future=None) -> None:
        # nats-py writes a PING to the socket at once, ahead of commands still pending for its flusher task (the SUB
        # that serve() just made): flush()'s PONG then came back before the server had the subscription, and a
        # request sent at once got "no responders". What is pending goes first.
        self.write_pending()
        await super()._send_ping(future)

    async def _process_msg(self, sid, subject, reply, data, headers) -> None:
        handle = self._direct.get(sid)
        if handle is None:
            return await super()._process_msg(sid, subject, reply, data, headers)
        try:
            handle(subject, reply, data, headers)
        except Exception:  # one bad message must not stop the read loop
            log.exception("NATS message on %s", subject.decode(errors="replace"))


async def _log_error(e: Exception) -> None:
    """nats-py would print a traceback per connection error; one line is enough (callers report failures)."""
    log.warning("NATS: %s", str(e) or type(e).__name__)


def _failure(item, subject: str) -> PeerGone | None:
    if item is _GONE:
        return PeerGone(f"the worker serving {subject} left")
    if item is _CUT:
        return PeerGone(f"the direct connection to the worker serving {subject} closed")
    if item is _NO_RESPONDERS:
        return PeerGone(f"nothing serves {subject}")
    return None


SWEEP_SECONDS = 0.1  # how often a Bus looks for streams whose wait is over: how late a timeout may fire


class _Inbox:
    """One stream's replies until its task takes them: a list and the task's wake-up, no more. An asyncio.Queue
    did the same with several calls per item: a frontend spends 12% less CPU per token without it (docs/benchmarks.md,
    the token path). No timer of its own: the Bus's sweep fails a wait whose deadline has passed. A timer made and
    cancelled per token (asyncio.timeout) cost the frontend about a tenth of its CPU per token, and even one timer
    per stream a few per cent of its CPU per request."""

    __slots__ = ("items", "_waiter", "_deadline")

    def __init__(self):
        self.items: list = []
        self._waiter: asyncio.Future | None = None
        self._deadline = 0.0

    def put(self, item) -> None:
        self.items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self, timeout: float) -> list:
        """Everything that has arrived, oldest first, waiting up to `timeout` (and at most SWEEP_SECONDS more) for
        the first; TimeoutError else."""
        if not self.items:
            loop = asyncio.get_running_loop()
            self._deadline = loop.time() + timeout
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self.items = self.items, []
        return items

    def expire(self, now: float) -> None:
        """Fail the wait if its deadline has passed."""
        if self._waiter is not None and now >= self._deadline and not self._waiter.done():
            self._waiter.set_exception(asyncio.TimeoutError())


class Bus:
    def __init__(self, nc, credentials=None, url: str = ""):
        self.nc = nc
        self.url = url
        self._tasks: set[asyncio.Task] = set()
        self._started = 0  # handlers started so far: drain_handlers watches for late arrivals
        self._subs = []
        self._mux_prefix = ""  # the replies inbox, opened by connect()
        self._streams: dict[str, _Inbox] = {}
        self._sweeper: asyncio.TimerHandle | None = None  # runs while streams are open
        self._counter = itertools.count()
        self._outbox: dict[str, list[tuple[str | None, bytes]]] = {}  # replies waiting to go out, by inbox
        self._sending: asyncio.Task | None = None
        self._secret = direct.secret_of(credentials)
        self.listener: direct.Listener | None = None  # a worker's port for direct connections (hpc/runtime/direct.py)
        self.connections = direct.Connections(self._secret, self._deliver, self._lost)

    @classmethod
    async def connect(cls, url: str, name: str, timeout: float = 5.0, credentials=None) -> "Bus":
        auth = {"user": credentials.nats_user, "password": credentials.nats_password} if credentials else {}
        nc = _Client()
        try:
            await asyncio.wait_for(nc.connect(
                url, name=name, connect_timeout=timeout, allow_reconnect=True, reconnect_time_wait=0.5,
                max_reconnect_attempts=-1, max_outstanding_pings=3, ping_interval=5, error_cb=_log_error, **auth),
                timeout + 1)
        except (OSError, asyncio.TimeoutError, nats.errors.NoServersError, nats.errors.Error) as e:
            raise HpcError(f"cannot reach NATS at {url}: {str(e) or type(e).__name__}") from None
        bus = cls(nc, credentials, url)
        await bus._open_replies_inbox()
        return bus

    async def serve(self, subject: str, handler: Callable[[bytes, Reply], Awaitable[None]],
                    listen: bool = False) -> None:
        """Run `handler(payload, reply)` in its own task for each message, started at once where Python allows
        (3.12+); `reply` may be called many times. With `listen`, requests also come on direct connections
        (`self.listener.address`; hpc/runtime/direct.py)."""

        def start(data: bytes, reply: Reply) -> asyncio.Task | None:
            task = start_task(handler(data, reply))  # the handler runs now, inside the read loop, to its first wait
            self._started += 1
            if task.done():
                return None
            self._tasks.add(task)
            task.add_done_callback(self._done)
            return task

        def on_message(subject: bytes, reply_to: bytes, data: bytes, headers) -> None:
            inbox, _, token = reply_to.decode().rpartition(".")
            # A Bus's inbox takes replies together; any other (nats-py's request inbox) one message per reply
            mux = inbox.endswith("." + MUX)
            start(data, Reply(self, inbox, token) if mux else Reply(self, reply_to.decode(), None))

        self._subs.append(await self.nc.subscribe_direct(subject, on_message))
        await self.nc.flush(timeout=5)  # the server has the subscription before anyone learns of it
        if listen:
            try:
                self.listener = await direct.Listener.open(
                    direct.local_address_towards(self.url), self._secret,
                    lambda data, conn, token: start(data, Reply(self, conn, token)))
            except OSError as e:  # served through NATS alone, as before direct connections
                log.warning("no port for direct connections (%s): requests come through NATS only", e)

    def _queue_reply(self, inbox: str | None, token: str | None, data: bytes) -> None:
        """Queue a reply for the next turn of the event loop. Every stream that one engine step served replies in
        this turn: they go out as one message per inbox, so NATS and the frontend handle one message per step
        and frontend, not one per token. Nothing waits longer than that turn. A `token` of None: `inbox` is a
        plain reply subject, one message per reply."""
        if not inbox:  # a request that wants no reply
            return
        if self.nc.is_closed:
            raise nats.errors.ConnectionClosedError
        self._outbox.setdefault(inbox, []).append((token, data))
        if self._sending is None:
            self._sending = asyncio.create_task(self._send_replies())

    async def _send_replies(self) -> None:
        # One sender at a time, looping until nothing is queued: a publish that waits for the socket must not let
        # a later reply overtake an earlier one.
        try:
            while self._outbox:
                outbox, self._outbox = self._outbox, {}
                for inbox, replies in outbox.items():
                    try:
                        if type(inbox) is direct.ServerConnection:  # a frontend's direct connection
                            inbox.write(replies)
                        elif replies[0][0] is None:
                            for _, data in replies:
                                await self.nc.publish(inbox, data)
                        elif len(replies) == 1:
                            await self.nc.publish(f"{inbox}.{replies[0][0]}", replies[0][1])
                        else:
                            await self.nc.publish(f"{inbox}.{BATCH}", _encode_batch(replies))
                    except Exception as e:  # the requester's idle timeout reports the loss
                        log.warning("replies to %s lost: %s", inbox, str(e) or type(e).__name__)
                # This turn's replies leave in one write now, not on the flusher task's next turn: on a worker
                # whose turns take a millisecond, that turn was a millisecond more before every token.
                await self.nc.write_now()
        finally:
            self._sending = None

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception():
            log.error("handler failed", exc_info=task.exception())

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def stop_serving(self) -> None:
        if self.listener is not None:
            self.listener.close()
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
        prefix = f"{self.nc.new_inbox()}.{MUX}"

        start = len(prefix) + 1

        def route(subject: bytes, _reply: bytes, data: bytes, headers: bytes | None) -> None:
            token = subject[start:].decode()
            if token == BATCH:
                for token, data in _decode_batch(data):
                    if (inbox := self._streams.get(token)) is not None:
                        inbox.put(data)
            elif (inbox := self._streams.get(token)) is not None:
                # nats-py's no-responders status, raw: "NATS/1.0 503" (the server sends it when nothing subscribes)
                inbox.put(_NO_RESPONDERS if headers and headers[9:12] == b"503" else data)

        await self.nc.subscribe_direct(f"{prefix}.*", route)
        self._mux_prefix = prefix

    def _deliver(self, token: str, data: bytes) -> None:  # a reply on a direct connection
        if (inbox := self._streams.get(token)) is not None:
            inbox.put(data)

    def _lost(self, token: str) -> None:  # a direct connection ended with this stream on it
        if (inbox := self._streams.get(token)) is not None:
            inbox.put(_CUT)

    def _sweep(self) -> None:
        """The streams' timeouts, all in one timer: each stream's wait ends with TimeoutError once its deadline has
        passed. Stops when no stream is open; the next stream starts it again."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for inbox in list(self._streams.values()):
            inbox.expire(now)
        self._sweeper = loop.call_later(SWEEP_SECONDS, self._sweep) if self._streams else None

    async def stream(self, subject: str, data: bytes, first_timeout: float, idle_timeout: float,
                     gone: asyncio.Future | None = None, address: str | None = None) -> AsyncIterator[list[bytes]]:
        """Send `data` and yield its replies until the consumer stops: each time, every reply that has arrived,
        oldest first (a consumer that falls behind catches up in one step). The first reply must come within
        `first_timeout`, each next one within `idle_timeout`; `gone` done means the peer left: fail at once.
        `address`: the peer's direct port, used once a connection to it is ready (NATS until then)."""
        prefix = self._mux_prefix
        token = f"{next(self._counter):x}"
        inbox = self._streams[token] = _Inbox()
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)

        def wake(_):  # the directory completes `gone` when the worker's lease ends: wake the wait at once
            inbox.put(_GONE)

        if gone is not None:
            gone.add_done_callback(wake)
        conn = self.connections.get(address) if address else None
        try:
            if conn is not None:
                conn.send(token, data)
            else:
                await self.nc.publish(subject, data, reply=f"{prefix}.{token}")
            timeout = first_timeout
            while True:
                try:
                    arrived = await inbox.take(timeout)
                except asyncio.TimeoutError:
                    raise RequestTimeout(f"no reply on {subject} within {timeout:g} s") from None
                for i, item in enumerate(arrived):
                    if type(item) is not bytes and (failure := _failure(item, subject)) is not None:
                        if i:  # what came before the failure first
                            yield arrived[:i]
                        raise failure
                yield arrived
                timeout = idle_timeout
        finally:
            self._streams.pop(token, None)
            if conn is not None:
                conn.streams.discard(token)
            if gone is not None:
                gone.remove_done_callback(wake)

    async def close(self) -> None:
        if self._sending is not None:  # the last replies first
            await asyncio.wait([self._sending], timeout=5)
        self.connections.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        try:
            await asyncio.wait_for(self.nc.drain(), 5)
        except Exception:
            await self.nc.close()
