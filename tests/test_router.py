"""Routing policies and preprocessing helpers (pure units)."""

from __future__ import annotations

import pytest

from frontend.preprocess import Detokenizer, StopStrings
from frontend.router import KvAware, LeastLoaded, LoadBoard, prefix_hashes
from hpc.runtime.client import RoundRobin
from hpc.runtime.protocol import GenerateRequest, WorkerInfo, WorkerStats


def workers(n: int) -> list[WorkerInfo]:
    return [WorkerInfo(f"w{i}", "prefill", "m", "d", f"s{i}", "h", "torch") for i in range(n)]


def req(tokens) -> GenerateRequest:
    return GenerateRequest("r", "m", list(tokens))


def stats(wid: str, waiting: int = 0, free: int = 100) -> WorkerStats:
    return WorkerStats(wid, "prefill", waiting, 0, 0, 100, free, 0)


def test_round_robin_cycles_per_role():
    rr, ws = RoundRobin(), workers(3)
    assert [rr("prefill", ws, req([1])).worker_id for _ in range(4)] == ["w0", "w1", "w2", "w0"]
    assert rr("decode", ws, req([1])).worker_id == "w0"


def test_least_loaded_uses_in_flight_and_reports():
    board = LoadBoard({"w0": 2, "w1": 0, "w2": 0})
    board.report(stats("w1", waiting=3))
    assert LeastLoaded(board)("prefill", workers(3), req([1])).worker_id == "w2"
    board.report(stats("w2", free=0))  # KV full counts as one more request
    board.in_flight["w0"] = 0
    assert LeastLoaded(board)("prefill", workers(3), req([1])).worker_id == "w0"


def test_least_loaded_shares_ties():
    ll = LeastLoaded(LoadBoard())
    assert {ll("prefill", workers(2), req([1])).worker_id for _ in range(4)} == {"w0", "w1"}


def test_prefix_hashes_identify_shared_prefixes():
    a, b = prefix_hashes(list(range(40)), 16), prefix_hashes(list(range(32)) + [99] * 8, 16)
    assert len(a) == 2 and a == b  # two full blocks, equal
    assert prefix_hashes([5] + list(range(1, 40)), 16)[0] != a[0]


def test_kv_aware_follows_the_prefix_unless_overloaded():
    board = LoadBoard()
    kv, ws = KvAware(board, block=4, max_extra_load=2), workers(3)
    system = list(range(100, 120))
    first = kv("prefill", ws, req(system + [1, 2, 3, 4])).worker_id
    board.in_flight[first] = 1  # now busier than the others, but within the allowance
    assert kv("prefill", ws, req(system + [7, 8, 9, 10])).worker_id == first
    board.in_flight[first] = 5  # far busier: take the least loaded instead
    assert kv("prefill", ws, req(system + [11, 12, 13, 14])).worker_id != first
    assert kv("prefill", [w for w in ws if w.worker_id != first], req(system)).worker_id != first  # gone


def test_stop_strings_span_deltas():
    s = StopStrings(["STOP", "\n\n"])
    out = ""
    for piece in ["Hello wor", "ld ST", "OP and more"]:
        text, hit = s.feed(piece)
        out += text
        if hit:
            break
    assert out == "Hello world " and hit
    s = StopStrings(["xyz"])
    assert s.feed("abcx")[0] + s.feed("y")[0] + s.flush() == "abcxy"


def test_detokenizer_streams_the_same_text(tiny_model):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    ids = tok.encode("Héllo, wörld! Once upon a time 🐉 there was a model.").ids
    d = Detokenizer(tok)
    assert "".join(d.add([i]) for i in ids) == tok.decode(ids)


@pytest.mark.parametrize("takes_lists", [True, False])
def test_detokenizer_text_does_not_depend_on_grouping_and_ends_whole(tiny_model, monkeypatch, takes_lists):
    """Tokens arrive one by one or merged; an answer may end inside a multi-byte character. The same text whether
    the tokens that came together go to the library in one call or one by one (an older tokenizers)."""
    import random

    from tokenizers import Tokenizer

    monkeypatch.setattr(Detokenizer, "takes_lists", takes_lists)

    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    rng = random.Random(3)
    for trial in range(50):
        ids = [rng.randrange(tok.get_vocab_size()) for _ in range(rng.randrange(1, 40))]
        d, text, i = Detokenizer(tok), "", 0
        while i < len(ids):
            n = rng.randrange(1, 6)
            text += d.add(ids[i:i + n])
            i += n
        assert text + d.flush() == tok.decode(ids, skip_special_tokens=True), trial


def test_sse_events_stay_on_one_line():
    """JSON leaves U+2028, U+2029 and U+0085 raw; line splitters (httpx, str.splitlines) would cut the event."""
    import json

    from frontend.generation import sse_event

    event = sse_event({"text": "a\u2028b\u2029c\x85d\ne"}).decode()
    assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1
    assert json.loads(event[len("data: "):]) == {"text": "a\u2028b\u2029c\x85d\ne"}
