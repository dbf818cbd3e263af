"""The TensorRT-LLM engine against the test double of its recorded API (tests/trtllm_double): the adapter in
process, the double's own contract, and `hpc launch` of TensorRT-LLM workers of 2 MPI ranks across nodes on the
local Slurm cluster (trtllm-llmapi-launch under srun --mpi=pmix)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path

import openai
import pytest

from engines.base import EngineError, EngineRequest, SamplingParams
from harness import hpc, squeue

REPO = Path(__file__).resolve().parent.parent
DOUBLE = REPO / "tests" / "trtllm_double"
CHAT = [{"role": "user", "content": "Tell me a story about a dragon."}]

sys.path.insert(0, str(DOUBLE))  # `import tensorrt_llm` finds the double in this process


def engine(model: Path, **extra):
    from engines.trtllm.engine import TrtllmEngine

    return TrtllmEngine(str(model), {"max_seq_len": 1024, "cache_transceiver_config": {"backend": "NIXL"}, **extra})


async def collect(outputs) -> list[int]:
    return [t async for o in outputs for t in o.token_ids]


def test_double_refuses_calls_off_the_recorded_surface(tiny_model):
    import tensorrt_llm
    from tensorrt_llm.llmapi import DisaggregatedParams

    from engines.trtllm.args import recorded

    with pytest.raises(TypeError, match="unexpected keyword argument 'max_num_token'"):
        tensorrt_llm.LLM(model=str(tiny_model), max_num_token=8)
    with pytest.raises(TypeError, match="missing required argument 'model'"):
        tensorrt_llm.LLM(tensor_parallel_size=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_new_tokens'"):
        tensorrt_llm.SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="Unknown request type"):
        DisaggregatedParams(request_type="prefill")
    fields = list(DisaggregatedParams.__dataclass_fields__)
    assert fields == recorded()["DisaggregatedParams"]["fields"]

    async def submit_with_a_wrong_name():
        llm = tensorrt_llm.LLM(model=str(tiny_model))
        try:
            with pytest.raises(TypeError, match="unexpected keyword argument 'stream'"):
                llm.generate_async([1, 2], stream=True)
        finally:
            llm.shutdown()

    asyncio.run(submit_with_a_wrong_name())


def test_adapter_disaggregated_equals_aggregated_and_cancels(tiny_model):
    async def run():
        loop = asyncio.get_running_loop()
        agg, prefill, decode = engine(tiny_model), engine(tiny_model), engine(tiny_model)
        for e in (agg, prefill, decode):
            e.start(loop)
        try:
            prompt, sampling = list(range(3, 40)), SamplingParams(max_tokens=12)
            whole = await collect(agg.generate(EngineRequest("a", prompt, sampling)))
            first = await prefill.prefill(EngineRequest("b", prompt, sampling))
            assert first.finish_reason is None and first.handoff and first.block_ids == []
            rest = await collect(decode.decode_handoff(EngineRequest("b", prompt, sampling), first.handoff))
            assert [first.first_token] + rest == whole and len(whole) == 12
            # The handoff is spent: TensorRT-LLM's transceiver released the context KV once read.
            again = await collect(decode.decode_handoff(EngineRequest("c", prompt, sampling), first.handoff))
            assert again == []
            # A cancel before a generation-only request's first output waits for it (its KV is still arriving),
            # then aborts: the stream ends cancelled, long before its 500 tokens.
            handoff = (await prefill.prefill(EngineRequest("g", prompt, sampling))).handoff
            stream = decode.decode_handoff(EngineRequest("g", prompt, SamplingParams(max_tokens=500)), handoff)
            first_out = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0)
            decode.cancel("g")
            outs = [await first_out] + [o async for o in stream]
            assert outs[-1].finish_reason == "cancelled" and sum(len(o.token_ids) for o in outs) < 50
            # A consumer that leaves mid-stream aborts the request in the engine.
            stream = agg.generate(EngineRequest("d", prompt, SamplingParams(max_tokens=500)))
            await stream.__anext__()
            await stream.aclose()
            assert agg._active == {}
            # A prompt over max_seq_len is refused on submit, as TensorRT-LLM does.
            with pytest.raises(EngineError, match="max_seq_len"):
                agg.generate(EngineRequest("e", list(range(2000)), sampling))
        finally:
            for e in (agg, prefill, decode):
                e.shutdown()

    asyncio.run(run())


def cat_png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def image_prompt(tiny_llava: Path, positions: int) -> tuple[list[int], int]:
    """A chat prompt with one image, its image token repeated `positions` times as the frontend lays it out."""
    from frontend.preprocess import ModelFiles

    files = ModelFiles(tiny_llava)
    ids = files.encode(files.render_chat([{"role": "user", "content": "What is it?" + files.vision.image_token}]))
    at = ids.index(files.vision.image_token_id)
    return ids[:at] + [files.vision.image_token_id] * positions + ids[at + 1:], at


def test_adapter_images_inline_encoded_and_from_files_give_the_same_tokens(tiny_llava):
    """Aggregated (TensorRT-LLM encodes the image itself), EP/D (the prefill does, the decode gets the expanded
    prompt in the handoff) and E/P/D (MultimodalEncoder, its handle opened and copied, the prefill given the
    embeddings) agree, whatever number of positions the frontend gave the image."""
    from engines.base import ImageInput
    from engines.trtllm.encoder import TrtllmEncoder

    png = cat_png()

    async def run():
        loop = asyncio.get_running_loop()
        agg, prefill, decode = engine(tiny_llava), engine(tiny_llava), engine(tiny_llava)
        encoder = TrtllmEncoder(str(tiny_llava), {"max_seq_len": 1024, "cache_transceiver_config": {}})
        for e in (agg, prefill, decode, encoder):
            e.start(loop)
        try:
            sampling = SamplingParams(max_tokens=10)
            ids, at = image_prompt(tiny_llava, 16)
            raw = [ImageInput(at, None, b"d" * 16, data=png, num_tokens=16)]
            whole = await collect(agg.generate(EngineRequest("a", ids, sampling, raw)))
            text_only = await collect(agg.generate(EngineRequest("t", ids, sampling)))
            assert len(whole) == 10 and whole != text_only  # the image changes the answer

            first = await prefill.prefill(EngineRequest("b", ids, sampling, raw))
            rest = await collect(decode.decode_handoff(EngineRequest("b", ids, sampling), first.handoff))
            assert [first.first_token] + rest == whole

            [emb] = await encoder.encode_images_async([png], [16])
            assert list(emb.shape) == [17, encoder.hidden_size]  # the model's own count, not the frontend's 16
            ids17, at17 = image_prompt(tiny_llava, 17)  # an embedding file of 17 rows: 17 positions
            for prompt, where, n in ((ids, at, 16), (ids17, at17, 17)):
                req = EngineRequest("c", prompt, sampling, [ImageInput(where, emb, b"d" * 16, num_tokens=n)])
                first = await prefill.prefill(req)
                rest = await collect(decode.decode_handoff(EngineRequest("c", prompt, sampling), first.handoff))
                assert [first.first_token] + rest == whole
        finally:
            for e in (agg, prefill, decode, encoder):
                e.shutdown()

    asyncio.run(run())


def test_adapter_refuses_images_for_a_text_model_and_the_double_unread_keys(tiny_model, tiny_llava):
    import tensorrt_llm

    from engines.base import ImageInput
    from engines.trtllm.encoder import TrtllmEncoder

    async def run():
        e = engine(tiny_model)
        e.start(asyncio.get_running_loop())
        try:
            with pytest.raises(EngineError, match="takes no images"):
                e.generate(EngineRequest("x", [1, 2, 3], SamplingParams(),
                                         [ImageInput(1, None, b"d" * 16, data=cat_png(), num_tokens=1)]))
        finally:
            e.shutdown()
        llm = tensorrt_llm.LLM(model=str(tiny_llava))
        try:  # data.py's spelling: TensorRT-LLM's LLM never reads it, so the double refuses it
            with pytest.raises(TypeError, match="multimodal_embeddings"):
                llm.generate_async({"prompt_token_ids": [1], "multimodal_embeddings": {"image": []}})
        finally:
            llm.shutdown()

    asyncio.run(run())
    with pytest.raises(EngineError, match="needs a vision-language model"):
        TrtllmEncoder(str(tiny_model), {})


def test_stats_come_from_iteration_stats(tiny_model):
    async def run():
        e = engine(tiny_model)
        e.start(asyncio.get_running_loop())
        try:
            await asyncio.sleep(0.2)
            s = e.stats()
            assert s.kv_blocks_total == 1024 and s.kv_blocks_free == 1024 and s.running == 0
        finally:
            e.shutdown()

    asyncio.run(run())


# ---- on the local Slurm cluster ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(cluster, tiny_model):
    e = {**cluster.env(), "HPC_MODEL_DIR": str(tiny_model), "PYTHONUNBUFFERED": "1",
         # The double and its trtllm-llmapi-launch on every node; python3 is this venv's, as in a container.
         "PATH": f"{Path(sys.executable).parent}:{DOUBLE / 'bin'}:{os.environ['PATH']}",
         "PYTHONPATH": str(DOUBLE), "TRTLLM_DOUBLE_STEP_MS": "20"}
    e.pop("SLURM_JOB_ID", None)
    return e


def double_answer(tiny_model: Path, max_tokens: int) -> str:
    """The double's aggregated answer to CHAT, in one process."""
    from frontend.preprocess import ModelFiles

    files = ModelFiles(tiny_model)
    ids = files.encode(files.render_chat(CHAT))

    async def run():
        e = engine(tiny_model)
        e.start(asyncio.get_running_loop())
        try:
            return await collect(e.generate(EngineRequest("ref", ids, SamplingParams(max_tokens=max_tokens))))
        finally:
            e.shutdown()

    return files.detokenizer().add(asyncio.run(run()))


def test_launch_trtllm_workers_of_two_ranks_across_nodes(env, tiny_model):
    out = hpc(["launch", "configs/tiny-trtllm.yaml", "--nodes", "3", "--port", "0", "--detach"], env,
              timeout=240).stdout
    try:
        assert re.search(r"prefill-0\s+n1,n2 \(2 ranks GPUs 0\)", out) and re.search(r"decode-0\s+n1,n2", out), out
        state = json.loads((REPO / ".hpc" / "tiny-trtllm.json").read_text())
        client = openai.OpenAI(base_url=f"{state['frontend_url']}/v1", api_key="unused", timeout=60, max_retries=0)
        chunks = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=10, temperature=0,
                                                stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == double_answer(tiny_model, 10)
        logs = {n: hpc(["logs", n, "--deployment", "tiny-trtllm"], env).stdout for n in ("prefill-0", "decode-0")}
        for log in logs.values():  # rank 0 serves; rank 1 ran TensorRT-LLM's MPI worker and took part
            assert "loaded" in log and "on 2 rank(s)" in log
        assert "KV sent to the generation side; released" in logs["prefill-0"]
        # A prompt TensorRT-LLM refuses is that request's 400, with TensorRT-LLM's reason.
        with pytest.raises(openai.BadRequestError, match="max_seq_len"):
            client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "dragon " * 1500}],
                                           max_tokens=4)

        # Cancelling mid-stream aborts the generation on the decode worker.
        stream = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=400, temperature=0,
                                                stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        deadline = time.monotonic() + 10
        while "aborted" not in hpc(["logs", "decode-0", "--deployment", "tiny-trtllm"], env).stdout:
            assert time.monotonic() < deadline, "decode-0 never aborted the cancelled request"
            time.sleep(0.2)
    finally:
        hpc(["stop", "tiny-trtllm"], env)
    assert squeue(env) == []


def test_load_failure_on_rank_one_ends_the_launch_with_its_error(env):
    t0 = time.monotonic()
    out = hpc(["launch", "configs/tiny-trtllm.yaml", "--nodes", "3", "--port", "0", "--detach"],
              {**env, "TRTLLM_DOUBLE_FAIL_RANK": "1"}, check=False)
    took = time.monotonic() - t0
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    line = [ln for ln in out.stderr.splitlines() if "failed:" in ln]
    assert line and "rank 1: RuntimeError: CUDA out of memory" in line[0], out.stderr
    assert took < 90
    deadline = time.monotonic() + 20
    while squeue(env) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert squeue(env) == []


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_engine_yaml_becomes_llm_arguments_the_recorded_api_accepts(config, monkeypatch):
    from tensorrt_llm._recorded import api, bind

    from engines.trtllm.args import llm_kwargs
    from hpc.config import load_deployment

    monkeypatch.setenv("HPC_MODEL_DIR", "/models/tiny")
    dep = load_deployment(config)
    for role, spec in dep.workers.items():
        if spec.engine == "trtllm":
            kwargs = llm_kwargs(dep.engine_config(role).model_dump(exclude_unset=True))
            bind("LLM.__init__", api()["LLM"]["__init__"], (), {"model": dep.model.path, **kwargs},
                 extra=api()["LLM"]["llm_args"])
