"""The load generator's HTTP/1.1 client: keep-alive connections that hand each server-sent event to a callback the
moment its bytes are read, stamped with that moment.

Why not aiohttp here: it wakes the request's task once per line, and the line's time is when that task runs, not
when the bytes came. With 64 streams on 2 cores the generator's own queue went into every latency it measured, and
it spent as much CPU per request as a frontend process. Here the parsing (httptools, uvicorn's parser) runs in the
socket's read callback: one wake-up per request. Plain HTTP and HTTPS; a response that is not 200 is read whole."""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Callable
from urllib.parse import urlsplit

import httptools

OnEvent = Callable[[bytes, float], None]  # (the event's data, after "data: "; perf_counter() when it was read)


class HttpFailure(Exception):
    """The connection failed, closed or went quiet before the response ended."""


class _Exchange(asyncio.Protocol):
    """One connection, one request at a time."""

    def __init__(self, idle_timeout: float):
        self.idle_timeout = idle_timeout
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reusable = True
        self._done: asyncio.Future | None = None
        self._on_event: OnEvent | None = None
        self._status = 0
        self._body = bytearray()  # a non-200 body; or an event's bytes that have not all arrived
        self._now = 0.0  # perf_counter() at the last read
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.reusable = False
        self._finish(HttpFailure(f"the server closed the connection ({exc or 'EOF'}) before the response ended"))

    def send(self, request: bytes, on_event: OnEvent) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        self._done, self._on_event, self._status = loop.create_future(), on_event, 0
        self._body.clear()
        self._now = time.perf_counter()
        if self._timer is None:  # one timer per connection, kept across its requests: none made per request
            self._timer = loop.call_later(self.idle_timeout, self._check_idle)
        self.transport.write(request)
        return self._done

    def _check_idle(self) -> None:
        """The read timeout, as a socket's: the time since the last bytes, not since the request. Between
        requests the timer stops."""
        self._timer = None
        if self._done is None:
            return
        quiet = time.perf_counter() - self._now
        if quiet >= self.idle_timeout:
            self._fail(HttpFailure(f"no data for {self.idle_timeout:g} s"))
        else:
            self._timer = asyncio.get_running_loop().call_later(self.idle_timeout - quiet, self._check_idle)

    def data_received(self, data: bytes) -> None:
        self._now = time.perf_counter()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(HttpFailure(f"bad HTTP from the server: {e}"))

    # httptools' callbacks
    def on_headers_complete(self) -> None:
        self._status = self.parser.get_status_code()
        self.reusable = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self._status != 200:
            self._body += body
            return
        if self._body:  # the rest of an event split across reads
            self._body += body
            body = bytes(self._body)
            self._body.clear()
        start = 0
        while (end := body.find(b"\n", start)) >= 0:
            if body.startswith(b"data: ", start) and self._done is not None:
                try:
                    self._on_event(body[start + 6:end], self._now)
                except Exception as e:  # the caller's: its error ends the request
                    self._fail(e)
            start = end + 1
        if start < len(body):
            self._body += body[start:]

    def on_message_complete(self) -> None:
        self._finish((self._status, bytes(self._body) if self._status != 200 else b""))

    def _fail(self, error: Exception) -> None:
        """End the request with `error`; the connection, in an unknown state, goes."""
        self.reusable = False
        self.transport.close()
        self._finish(error)

    def _finish(self, outcome) -> None:
        if not self.reusable and self._timer is not None:  # the connection goes: its timer with it
            self._timer.cancel()
            self._timer = None
        done, self._done = self._done, None
        if done is not None and not done.done():
            if isinstance(outcome, BaseException):
                done.set_exception(outcome)
            else:
                done.set_result(outcome)


class StreamingClient:
    """POSTs to one server over keep-alive connections: one per request in flight, reused by the next (the caller
    bounds the concurrency)."""

    def __init__(self, url: str, headers: dict[str, str], connect_timeout: float, idle_timeout: float):
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        self.host, self.port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if u.scheme == "https" else None
        self.base = u.path.rstrip("/")
        self.head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": u.netloc, **headers}.items())
        self.connect_timeout, self.idle_timeout = connect_timeout, idle_timeout
        self._idle: list[_Exchange] = []

    async def post(self, path: str, body: bytes, on_event: OnEvent) -> tuple[int, bytes]:
        """The response's status and, unless it is 200, its body; a 200's events went to `on_event`."""
        ex = self._idle.pop() if self._idle else None
        if ex is None or ex.transport.is_closing():
            try:
                _, ex = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                    lambda: _Exchange(self.idle_timeout), self.host, self.port, ssl=self.ssl), self.connect_timeout)
            except asyncio.TimeoutError:
                raise HttpFailure(f"no connection to {self.host}:{self.port} within {self.connect_timeout:g} s")
        request = (f"POST {self.base}{path} HTTP/1.1\r\n{self.head}Content-Length: {len(body)}\r\n\r\n").encode() + body
        try:
            outcome = await ex.send(request, on_event)
        except BaseException:
            ex.transport.close()
            raise
        if ex.reusable:
            self._idle.append(ex)
        else:
            ex.transport.close()
        return outcome

    def close(self) -> None:
        for ex in self._idle:
            ex.transport.close()
        self._idle.clear()

    async def __aenter__(self) -> "StreamingClient":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()
