"""The reference engine against Hugging Face transformers on the same weights, and its scheduler's invariants."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from engines.base import BlockAllocator, EngineError, EngineRequest, KvLayout, SamplingParams
from engines.sampling import sample
from engines.torch.engine import TorchEngine, TorchEngineOptions
from engines.torch.loader import load_model
from engines.torch.model import SeqBatch
from engines.torch.tiny import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", seed=3)


def full_forward(model, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits at every position, computing the prompt in the given chunk sizes through the paged pool."""
    bs, pool = 16, torch.zeros((8,) + model.kv_block_shape(16))
    table = torch.tensor([5, 2, 7, 0])  # deliberately scattered blocks
    out, start = [], 0
    for n in chunks:
        pos = torch.arange(start, start + n)
        out.append(model(ids[start:start + n], pos, [SeqBatch(0, n, start, table)], pool, table[pos // bs], pos % bs,
                         torch.arange(n)))
        start += n
    return torch.cat(out)


def test_logits_match_transformers(model_dir):
    from transformers import AutoModelForCausalLM

    ours = load_model(model_dir, torch.device("cpu"))
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (50,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    assert torch.allclose(full_forward(ours, ids, [50]), expected, atol=1e-5)
    assert torch.allclose(full_forward(ours, ids, [17, 16, 1, 16]), expected, atol=1e-5)  # chunked prefill


def test_qwen2_biases_and_sharded_weights_load(tmp_path):
    from transformers import AutoModelForCausalLM

    d = make_tiny_model(tmp_path / "qwen", shards=3, model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                        tie_word_embeddings=True, rope_scaling=None)
    ours = load_model(d, torch.device("cpu"))
    assert ours.config.qkv_bias and (d / "model.safetensors.index.json").exists()
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.arange(2, 30)
    with torch.no_grad():
        assert torch.allclose(full_forward(ours, ids, [28]), ref(ids[None]).logits[0], atol=1e-5)


def test_bad_model_directory_names_the_file(tmp_path):
    with pytest.raises(EngineError, match="config.json: not found"):
        load_model(tmp_path, torch.device("cpu"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(EngineError, match="model_type 'gpt2' is not supported"):
        load_model(tmp_path, torch.device("cpu"))


async def collect(stream) -> list[int]:
    return [t async for out in stream for t in out.token_ids]


async def test_greedy_generation_matches_transformers_and_batching(model_dir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = TorchEngine(model_dir, TorchEngineOptions(device="cpu", max_num_tokens=48, num_blocks=128))
    engine.start(asyncio.get_running_loop())
    try:
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(2, 500, (n,), generator=g).tolist() for n in (1, 9, 33, 120)]
        sp = SamplingParams(max_tokens=6, ignore_eos=True)
        sequential = [await collect(engine.generate(EngineRequest(f"s{i}", p, sp))) for i, p in enumerate(prompts)]
        batched = await asyncio.gather(*(collect(engine.generate(EngineRequest(f"b{i}", p, sp)))
                                         for i, p in enumerate(prompts)))
        assert batched == sequential
        for p, got in zip(prompts, sequential):
            want = ref.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                pad_token_id=0)[0, len(p):].tolist()
            assert got == want
        assert engine.stats().kv_blocks_free == 128
    finally:
        engine.shutdown()


async def test_prefill_then_decode_equals_generate_and_frees_blocks(model_dir):
    engine = TorchEngine(model_dir, TorchEngineOptions(device="cpu", num_blocks=64))
    engine.start(asyncio.get_running_loop())
    try:
        prompt, sp = list(range(5, 45)), SamplingParams(max_tokens=7, temperature=0.9, top_p=0.8, seed=11)
        whole = await collect(engine.generate(EngineRequest("a", prompt, sp)))
        pre = await engine.prefill(EngineRequest("p", prompt, sp))
        assert pre.num_tokens == 40 and len(pre.block_ids) == 3 and engine.stats().held == 1
        blocks = engine.allocate("d", pre.num_tokens, sp.max_tokens)
        pool = engine.kv_pool()
        pool[blocks[:3]] = pool[pre.block_ids]
        assert engine.release("p")
        rest = await collect(engine.decode(EngineRequest("d", prompt, sp), pre.first_token, blocks, pre.num_tokens))
        assert [pre.first_token] + rest == whole
        assert engine.stats().kv_blocks_free == 64 and engine.stats().held == 0
    finally:
        engine.shutdown()


async def test_cancel_and_limits(model_dir):
    engine = TorchEngine(model_dir, TorchEngineOptions(device="cpu", num_blocks=64))
    engine.start(asyncio.get_running_loop())
    try:
        with pytest.raises(EngineError, match="exceeds the model's context of 2048"):
            engine.generate(EngineRequest("x", [3] * 2040, SamplingParams(max_tokens=20)))
        with pytest.raises(EngineError, match="outside the vocabulary"):
            engine.generate(EngineRequest("x", [10**6], SamplingParams()))
        with pytest.raises(EngineError, match="the prompt is empty"):
            engine.generate(EngineRequest("x", [], SamplingParams()))
        stream = engine.generate(EngineRequest("c", [3, 4, 5], SamplingParams(max_tokens=1000, ignore_eos=True)))
        await stream.__anext__()
        await stream.aclose()  # the consumer leaves: the engine cancels and frees
        for _ in range(100):
            if engine.stats().kv_blocks_free == 64:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().kv_blocks_free == 64 and engine.stats().running == 0
    finally:
        engine.shutdown()


def test_sampling_is_seeded_per_position():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=5)
    assert [sample(logits, p, i) for i in range(5)] == [sample(logits, p, i) for i in range(5)]
    assert sample(logits, SamplingParams(temperature=0.7, top_k=1), 0) == int(logits.argmax())
    top = set(torch.topk(logits, 3).indices.tolist())
    assert {sample(logits, SamplingParams(temperature=2.0, top_k=3, seed=s), 0) for s in range(50)} <= top


def test_allocator_prefers_adjacent_blocks():
    a = BlockAllocator(10)
    assert a.allocate("x", 3) == [0, 1, 2]
    a.allocate("y", 2)
    a.free_owner("x")
    assert a.allocate("z", 4) == [5, 6, 7, 8]  # a run, not the scattered 0, 1, 2, 5
    with pytest.raises(EngineError, match="KV cache full"):
        a.allocate("w", 10)


def test_layout_mismatch_names_the_fields():
    a = KvLayout("bfloat16", 16, 32, 8, 128, 2 << 20)
    assert a.mismatch(a) is None
    b = KvLayout("float32", 32, 32, 8, 128, 2 << 20)
    msg = a.mismatch(b)
    assert "dtype: bfloat16 here, float32 in the KV handle" in msg and "block_size: 16 here, 32" in msg


async def test_mocker_block_reuse_skips_cached_prefix_blocks():
    """A prompt that shares whole leading blocks with a recent one prefills only the rest (TensorRT-LLM's block
    reuse); with reuse off, every prompt pays in full."""
    import time

    from engines.mocker import MockerEngine, MockerOptions

    async def prefill_seconds(engine, rid, prompt):
        t0 = time.perf_counter()
        out = await engine.prefill(EngineRequest(rid, prompt, SamplingParams(max_tokens=4)))
        engine.release(rid)
        assert out.first_token >= 0
        return time.perf_counter() - t0

    shared = list(range(1, 497))  # 31 blocks of 16
    for reuse in (True, False):
        engine = MockerEngine(MockerOptions(prefill_tokens_per_s=2000, prefill_overhead_ms=0, block_reuse=reuse))
        engine.start(asyncio.get_running_loop())
        try:
            cold = await prefill_seconds(engine, "a", shared + [7] * 16)
            warm = await prefill_seconds(engine, "b", shared + [9] * 16)
            other = await prefill_seconds(engine, "c", [5] + shared[1:] + [9] * 16)  # differs in block 0
        finally:
            engine.shutdown()
        stats = engine.stats()
        assert stats.prompt_tokens == 3 * 512
        if reuse:
            assert stats.reused_prompt_tokens == 496 and warm < cold / 5 and other > cold / 2
        else:
            assert stats.reused_prompt_tokens == 0 and warm > cold / 2


def test_mocker_prefill_never_takes_less_than_its_model_on_uvloop():
    """Workers run on uvloop, whose timers count whole milliseconds: a single sleep for the modelled time ended up to
    1 ms early, and a sweep's TTFT came out below the prefill time it is made of."""
    import random

    import uvloop

    from engines.mocker import MockerEngine, MockerOptions

    async def shortest() -> float:
        engine = MockerEngine(MockerOptions(kv_bytes_per_token=4096, block_reuse=False))
        engine.start(asyncio.get_running_loop())
        rng, times = random.Random(1), []
        try:
            for i in range(40):
                req = EngineRequest(f"r{i}", [rng.randrange(10, 500) for _ in range(512)], SamplingParams(max_tokens=2))
                times.append((await engine.prefill(req)).timing["compute"])
                engine.release(req.request_id)
                await asyncio.sleep(rng.random() * 0.003)  # a different phase of the event loop's clock each time
        finally:
            engine.shutdown()
        return min(times)

    assert uvloop.run(shortest()) >= 0.002 + 512 / 250_000  # the default overhead and prefill rate


async def test_mocker_with_a_full_kv_pool_queues_requests_instead_of_failing_them():
    """8 blocks hold two of these requests at a time: six sent at once all finish, with the tokens each gets alone;
    one that could never fit fails at once."""
    from engines.mocker import MockerEngine, MockerOptions

    engine = MockerEngine(MockerOptions(prefill_overhead_ms=0, decode_step_ms=2, num_blocks=8))
    engine.start(asyncio.get_running_loop())

    async def run(i, prompt_tokens=40):  # 40 + 20 tokens: 4 blocks
        req = EngineRequest(f"r{i}", [i + 1] * prompt_tokens, SamplingParams(max_tokens=20, ignore_eos=True))
        return [t async for out in engine.generate(req) for t in out.token_ids]

    try:
        together = await asyncio.gather(*(run(i) for i in range(6)))
        assert together == [await run(i) for i in range(6)] and all(len(t) == 20 for t in together)
        assert engine.stats().kv_blocks_free == 8
        with pytest.raises(EngineError, match="KV cache full: 10 blocks needed, .* of 8"):
            await run(99, prompt_tokens=130)  # 150 tokens: 10 blocks
    finally:
        engine.shutdown()


def test_batched_decode_attention_equals_per_sequence(model_dir):
    """The decode path (every decoding sequence in one gather and one attention call per layer, contexts padded
    and masked) gives the logits of attending to each sequence alone."""
    from engines.torch.model import DecodeBatch

    model = load_model(model_dir, torch.device("cpu"), "float32")
    bs, pool = 16, torch.zeros((16,) + model.kv_block_shape(16))
    g = torch.Generator().manual_seed(5)
    seqs = [(torch.randint(2, 500, (n,), generator=g), torch.tensor(blocks)) for n, blocks in
            ((20, [3, 9]), (47, [1, 12, 4]), (5, [7]))]
    for ids, table in seqs:  # prefill all but the last token of each into the pool
        pos = torch.arange(len(ids) - 1)
        model(ids[:-1], pos, [SeqBatch(0, len(pos), 0, table)], pool, table[pos // bs], pos % bs, pos[-1:])
    last = torch.stack([ids[-1] for ids, _ in seqs])
    pos = torch.tensor([len(ids) - 1 for ids, _ in seqs])
    slots = torch.stack([table[p // bs] for (_, table), p in zip(seqs, pos)])
    alone = torch.cat([model(last[i:i + 1], pos[i:i + 1], [SeqBatch(0, 1, int(pos[i]), seqs[i][1])], pool.clone(),
                             slots[i:i + 1], pos[i:i + 1] % bs, torch.arange(1)) for i in range(3)])
    width = max(len(t) for _, t in seqs)
    table = torch.stack([torch.cat([t, t.new_zeros(width - len(t))]) for _, t in seqs])
    mask = (torch.arange(width * bs)[None, :] < (pos + 1)[:, None])[:, None, None, :]
    together = model(last, pos, [], pool.clone(), slots, pos % bs, torch.arange(3),
                     DecodeBatch(torch.arange(3), table, mask))
    assert torch.allclose(together, alone, atol=1e-5)


def test_caching_allocator_shares_caches_and_evicts_oldest():
    from engines.prefix_cache import CachingBlockAllocator, block_hashes

    a = CachingBlockAllocator(6)
    h = block_hashes(list(range(48)), 16)  # three full blocks
    blocks, cached = a.admit("r1", h, 4)
    assert cached == 0 and a.free == 2
    for b, bh in zip(blocks, h):
        a.register(b, bh)
    shared, cached = a.admit("r2", h[:2], 3)  # a second request with the same first two blocks
    assert cached == 2 and shared[:2] == blocks[:2] and a.free == 1
    a.free_owner("r1")
    assert a.free == 3  # r1's own blocks: one cached, one free; the two shared ones still held by r2
    a.free_owner("r2")
    assert a.free == 6
    again, cached = a.admit("r3", h, 3)  # all three still cached
    assert cached == 3 and again == blocks[:3]
    a.free_owner("r3")
    a.allocate("big", 6)  # takes the free blocks, then evicts the cached ones
    assert a.admit("r4", h, 1) is None  # nothing left, nothing cached
    a.free_owner("big")
    assert a.admit("r4", h, 1) == ([a.owned("r4")[0]], 0)


async def test_prefix_caching_reuses_blocks_and_changes_no_token(model_dir):
    """Prompts that share a long prefix: the later ones compute only their own part, and every answer equals the
    answer without prefix caching; afterwards every block is free or cached (free)."""
    g = torch.Generator().manual_seed(7)
    shared = torch.randint(2, 500, (70,), generator=g).tolist()
    prompts = [shared + torch.randint(2, 500, (n,), generator=g).tolist() for n in (3, 17, 40)] + [shared[:33]]
    sp = SamplingParams(max_tokens=5, ignore_eos=True)
    answers = {}
    for reuse in (False, True):
        engine = TorchEngine(model_dir, TorchEngineOptions(device="cpu", num_blocks=64, enable_block_reuse=reuse))
        engine.start(asyncio.get_running_loop())
        try:
            answers[reuse] = [await collect(engine.generate(EngineRequest(f"r{i}", p, sp)))
                              for i, p in enumerate(prompts)]
            out = await engine.prefill(EngineRequest("p", prompts[2], sp))  # a prefill worker's view: the
            assert len(out.block_ids) == 7  # shared blocks are part of the KV it hands over
            engine.release("p")
            stats = engine.stats()
        finally:
            engine.shutdown()
        assert stats.kv_blocks_free == 64
        # 4 full shared blocks (64 tokens) for the 2nd and 3rd prompt, 2 for the 4th, 6 for the repeated prefill
        assert stats.reused_prompt_tokens == (16 * (4 + 4 + 2 + 6) if reuse else 0)
    assert answers[True] == answers[False]


async def test_outputs_already_waiting_leave_as_one():
    """An engine that runs ahead of its consumer: the waiting outputs go out as one (one message, not one per
    token), with the first's timing and cached count and the last's finish."""
    from engines.base import Outputs, RequestOutputs, TokenOutput

    q = Outputs()
    q.put_nowait(TokenOutput([1], cached_tokens=16, timing={"queue": 0.1}))
    for t in (2, 3):
        q.put_nowait(TokenOutput([t]))
    cancelled = []
    stream = RequestOutputs(q, lambda: cancelled.append(True))
    first = await stream.__anext__()
    assert first.token_ids == [1, 2, 3] and first.cached_tokens == 16 and first.timing == {"queue": 0.1}
    q.put_nowait(TokenOutput([4]))
    q.put_nowait(TokenOutput([5], "length"))
    q.put_nowait(TokenOutput([99]))  # after the finish: never read
    assert [(o.token_ids, o.finish_reason) async for o in stream] == [([4, 5], "length")]
    await stream.aclose()
    assert cancelled == []


async def test_followed_outputs_reach_the_callback_inside_the_engine_step():
    """follow(): what waited goes first, then each output inside the put that made it (no task in between),
    until one finishes the request; an engine's error or the callback's ends the wait with it, and closing an
    unfinished stream cancels the request."""
    from engines.base import Outputs, RequestOutputs, TokenOutput

    q, seen, cancelled = Outputs(), [], []
    q.put_nowait(TokenOutput([1]))
    stream = RequestOutputs(q, lambda: cancelled.append(True))
    following = asyncio.create_task(stream.follow(lambda out: seen.append(out.token_ids)))
    await asyncio.sleep(0)
    assert seen == [[1]]
    q.put_nowait(TokenOutput([2]))
    assert seen == [[1], [2]]  # at once, in the engine's call
    q.put_nowait(TokenOutput([3], "length"))
    await following
    q.put_nowait(TokenOutput([99]))  # after the finish: queued, never handed over
    await stream.aclose()
    assert seen == [[1], [2], [3]] and cancelled == []

    q = Outputs()
    failing = RequestOutputs(q, lambda: cancelled.append("failing"))
    following = asyncio.create_task(failing.follow(lambda out: seen.append(out)))
    await asyncio.sleep(0)
    q.put_nowait(EngineError("the prompt is empty"))
    with pytest.raises(EngineError, match="empty"):
        await following
    await failing.aclose()
    assert cancelled == []  # the engine ended it itself

    def refuse(out):
        raise ConnectionError("NATS is gone")

    q = Outputs()
    refused = RequestOutputs(q, lambda: cancelled.append("refused"))
    following = asyncio.create_task(refused.follow(refuse))
    await asyncio.sleep(0)
    q.put_nowait(TokenOutput([1]))
    with pytest.raises(ConnectionError):
        await following
    await refused.aclose()
    assert cancelled == ["refused"]


async def test_mocker_cancelled_before_its_first_token_frees_its_blocks():
    """generate() prefills in a task of its own: a cancel while it waits for the simulated GPU ends the stream
    and gives back every block."""
    from engines.mocker import MockerEngine, MockerOptions

    engine = MockerEngine(MockerOptions(prefill_overhead_ms=200, num_blocks=64))
    engine.start(asyncio.get_running_loop())
    try:
        stream = engine.generate(EngineRequest("slow", list(range(40)), SamplingParams(max_tokens=8)))
        await asyncio.sleep(0.05)
        assert engine.stats().kv_blocks_free < 64
        engine.cancel("slow")
        assert [(o.token_ids, o.finish_reason) async for o in stream] == [([], "cancelled")]
        await asyncio.sleep(0)
        assert engine.stats().kv_blocks_free == 64 and engine.stats().running == 0
        with pytest.raises(EngineError, match="empty"):
            await collect(engine.generate(EngineRequest("empty", [], SamplingParams())))
    finally:
        engine.shutdown()


async def test_decode_steps_one_ahead_change_no_token_and_free_every_block(model_dir):
    """Greedy decode steps started before the host has read the last ones (overlap_decode): the same tokens as
    without, also where a stop token or a cancellation ends a sequence while its next step already runs, beside a
    sampled request; afterwards every block is free."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, 500, (n,), generator=g).tolist() for n in (5, 17, 40, 3, 20)]
    answers = {}
    for overlap in (False, True):
        engine = TorchEngine(model_dir, TorchEngineOptions(device="cpu", num_blocks=128, overlap_decode=overlap))
        engine.start(asyncio.get_running_loop())
        try:
            plain = await collect(engine.generate(EngineRequest("plain", prompts[0],
                                                                SamplingParams(max_tokens=12, ignore_eos=True))))
            params = [SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=(plain[4],)),
                      SamplingParams(max_tokens=1, ignore_eos=True), SamplingParams(max_tokens=2, ignore_eos=True),
                      SamplingParams(max_tokens=9, temperature=0.8, seed=3, ignore_eos=True),
                      SamplingParams(max_tokens=15, ignore_eos=True)]
            cancelled = engine.generate(EngineRequest("c", prompts[1], SamplingParams(max_tokens=1000,
                                                                                     ignore_eos=True)))
            streams = [collect(engine.generate(EngineRequest(f"r{i}", p, sp)))
                       for i, (p, sp) in enumerate(zip(prompts, params))]

            async def cancel_after_three():
                got = 0
                async for out in cancelled:
                    got += len(out.token_ids)
                    if got >= 3:
                        break
                await cancelled.aclose()

            *answers[overlap], _ = await asyncio.gather(*streams, cancel_after_three())
            for _ in range(100):
                if engine.stats().kv_blocks_free == 128:
                    break
                await asyncio.sleep(0.01)
            assert engine.stats().kv_blocks_free == 128 and engine.stats().running == 0
            assert (engine._launches > 0) == overlap
        finally:
            engine.shutdown()
        assert answers[overlap][0] == plain[:5]  # up to and with the stop token
    assert answers[True] == answers[False]
    assert [len(a) for a in answers[True]] == [5, 1, 2, 9, 15]


def test_engine_yaml_turns_the_overlap_off(model_dir):
    """`disable_overlap_scheduler: true` (TensorRT-LLM's field) makes the reference engine wait for each step."""
    from hpc.config import EngineConfig
    from workers.engines import build_engine

    assert build_engine("torch", str(model_dir), EngineConfig(device="cpu")).overlap
    assert not build_engine("torch", str(model_dir), EngineConfig(device="cpu", disable_overlap_scheduler=True)).overlap
