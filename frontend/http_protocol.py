"""uvicorn's HTTP protocol (httptools), with one write fewer per streamed response, a disconnect callback and one
keep-alive timer per connection.

uvicorn writes a response's head as soon as the app sends `http.response.start`, then each body chunk: two writes
(two syscalls, two TCP segments, two wake-ups of the client) before the client has its first token, though the
generation endpoints send the head and the first chunk back to back. Here an event stream's head waits for its
first body write and both leave together. Nothing else changes: other responses are written as uvicorn writes
them, and a held head goes out before the connection closes.

A request's scope carries ON_DISCONNECT: an app that puts a function there is called when the client goes away
before the response is complete. Without it, learning of a disconnect takes a task per request that waits on
`receive()` (frontend/generation.py's DisconnectWatch does that under any other server).

Keep-alive: uvicorn arms a timer when a response completes and cancels it when the next request arrives, a timer
made and cancelled per request. Here a connection keeps one timer, which when it fires closes the connection if
it has been idle for `timeout_keep_alive`, and otherwise waits again for what is left of that time."""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _HeadWithFirstChunk:
    """The transport as uvicorn sees it."""

    __slots__ = ("_transport", "_head")

    def __init__(self, transport):
        self._transport, self._head = transport, None

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif data.startswith(b"HTTP/1.1 200") and b"text/event-stream" in data:
            self._head = data  # an event stream's head: its first chunk follows in the same turn
            return
        self._transport.write(data)

    def close(self) -> None:
        if self._head is not None:
            self._transport.write(self._head)
            self._head = None
        self._transport.close()

    def __getattr__(self, name):  # everything else is the transport's
        return getattr(self._transport, name)


ON_DISCONNECT = "hpc.on_disconnect"


class HttpProtocol(HttpToolsProtocol):
    def connection_made(self, transport) -> None:
        super().connection_made(_HeadWithFirstChunk(transport))

    def on_headers_complete(self) -> None:
        self.scope[ON_DISCONNECT] = None  # before uvicorn hands the scope to the request's task
        super().on_headers_complete()

    def connection_lost(self, exc) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        if cycle is not None and cycle.disconnected and (on_disconnect := cycle.scope.get(ON_DISCONNECT)):
            on_disconnect()

    # ---- keep-alive: one timer per connection ----------------------------------------------------------------------
    _idle_since: float | None = None  # when the last response completed; None while a request is under way

    def _unset_keepalive_if_required(self) -> None:  # uvicorn calls it when data arrives: busy, the timer stays
        self._idle_since = None

    def on_response_complete(self) -> None:  # uvicorn's, but for the timer
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._keep_alive_expired)

    def _keep_alive_expired(self) -> None:
        self.timeout_keep_alive_task = None
        if self.transport.is_closing():
            return
        if self._idle_since is None:  # serving: look again a whole timeout later
            wait = self.timeout_keep_alive
        else:
            wait = self._idle_since + self.timeout_keep_alive - self.loop.time()
            if wait <= 0:
                self.timeout_keep_alive_handler()  # closes the connection
                return
        self.timeout_keep_alive_task = self.loop.call_later(wait, self._keep_alive_expired)
