"""The HTTP floor: an empty streaming endpoint on the frontend's HTTP stack (a plain ASGI app on uvicorn, as
frontend/generation.py is) that answers at once. Run as a server: `python benchmarks/http_floor.py PORT`;
benchmarks/frontend.py measures its TTFT."""

from __future__ import annotations

import json
import sys

import uvicorn

CHUNK = b'data: {"choices": [{"text": "x", "finish_reason": "length"}], "usage": {"completion_tokens": 1}}\n\n'


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    json.loads(body)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="off", loop="uvloop",
                http="httptools", access_log=False, proxy_headers=False, server_header=False)  # as the frontend
