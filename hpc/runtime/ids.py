"""Unique ids for requests and responses: a random prefix per process and a counter. A uuid4 per request was a
getrandom system call each time, 2–3% of a busy frontend's CPU."""

from __future__ import annotations

import itertools
import uuid

_PREFIX, _COUNTER = uuid.uuid4().hex[:16], itertools.count()


def unique_id() -> str:
    """24 hex digits or more, unique across processes and restarts (64 random bits per process)."""
    return f"{_PREFIX}{next(_COUNTER):08x}"
