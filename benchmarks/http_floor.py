"""The HTTP floor: an empty FastAPI streaming endpoint on uvicorn, the same stack as the frontend, that answers
at once. Run as a server: `python benchmarks/http_floor.py PORT`; benchmarks/frontend.py measures its TTFT."""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

app = FastAPI()


class Body(BaseModel):
    model: str
    prompt: list[int]
    max_tokens: int = 16


@app.post("/v1/completions")
async def completions(body: Body):
    async def sse():
        yield 'data: {"choices": [{"text": "x", "finish_reason": "length"}], "usage": {"completion_tokens": 1}}\n\n'
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
