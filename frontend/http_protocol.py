"""uvicorn's HTTP protocol (httptools), with one write fewer per streamed response and a disconnect callback.

uvicorn writes a response's head as soon as the app sends `http.response.start`, then each body chunk: two writes
(two syscalls, two TCP segments, two wake-ups of the client) before the client has its first token, though the
generation endpoints send the head and the first chunk back to back. Here an event stream's head waits for its
first body write and both leave together. Nothing else changes: other responses are written as uvicorn writes
them, and a held head goes out before the connection closes.

A request's scope carries ON_DISCONNECT: an app that puts a function there is called when the client goes away
before the response is complete. Without it, learning of a disconnect takes a task per request that waits on
`receive()` (frontend/generation.py's DisconnectWatch does that under any other server)."""

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
        if cycle is not None and cycle.disconnected and (on_disconnect := cycle.scope.get(ON_DISCONNECT)):
            on_disconnect()
