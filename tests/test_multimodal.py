"""Multimodal serving with a tiny LLaVA: the model against transformers, every hostile input a specific 4xx, the
prefix cache keyed by image content, and one image (http URL, base64, embedding file in both formats) giving the
same tokens in aggregated, EP/D and E/P/D deployments on the 3-node Slurm cluster (real NIXL in DRAM)."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import openai
import pytest
import torch

from harness import hpc, squeue
from hpc.config import load_deployment
from hpc.serve import LocalDeployment

REPO = Path(__file__).resolve().parent.parent
ENGINE_YAML = REPO / "configs" / "engines" / "tiny" / "torch.yaml"
MODEL = "tiny-llava"
MAX_BYTES = 60_000  # media.max_file_size_mb below, in bytes (about)


def png(seed: int, w: int = 100, h: int = 80) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def solid_png(w: int, h: int) -> bytes:
    """Many pixels in few bytes (what a decompression bomb is made of)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


class _Evil:
    """A pickle that would run a command when loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def media(work_dir, tiny_llava):
    """Images, embedding files (good and hostile) and an HTTP server on 127.0.0.1 that serves them."""
    from safetensors.torch import save_file

    from engines.torch.loader import load_vision
    from engines.torch.vision import ImageProcessing

    root = work_dir / "media"
    allowed = root / "allowed"
    allowed.mkdir(parents=True)
    cat, dog = png(1), png(2)
    vision = load_vision(tiny_llava, torch.device("cpu"))
    emb = vision(ImageProcessing.from_dir(tiny_llava, vision.config).pixels(cat)[None])[0]
    torch.save(emb[None].clone(), allowed / "cat.pt")  # [1, n, hidden]
    torch.save({"mm_embeddings": emb.clone(), "special_tokens": torch.tensor([1, 2])}, allowed / "cat-dict.pt")
    save_file({"mm_embeddings": emb.contiguous()}, str(allowed / "cat.safetensors"))
    torch.save(torch.zeros(16, 32), allowed / "wrong-hidden.pt")
    torch.save(torch.zeros(2, 16, 64), allowed / "wrong-rank.pt")
    torch.save({"embeddings": emb.clone()}, allowed / "no-key.pt")
    torch.save(_Evil(root / "pwned"), allowed / "evil.pt")
    (allowed / "big.pt").write_bytes(b"\0" * (MAX_BYTES * 2))
    torch.save(emb.clone(), root / "outside.pt")
    (allowed / "escape.pt").symlink_to(root / "outside.pt")
    files = {"/cat.png": cat, "/dog.png": dog, "/text": b"hello, not an image", "/trunc.png": cat[: len(cat) // 2],
             "/big.png": cat + b"\0" * MAX_BYTES * 2, "/huge-pixels.png": solid_png(1200, 1000)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/loop":
                self.send_response(302)
                self.send_header("Location", "/loop")
                self.end_headers()
                return
            if self.path == "/slow":
                time.sleep(3)
            body = files.get(self.path)
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"root": root, "allowed": allowed, "cat": cat, "dog": dog, "emb": emb,
           "http": f"http://127.0.0.1:{server.server_address[1]}", "port": server.server_address[1]}
    server.shutdown()


def config(work_dir: Path, media: dict, name: str, roles: str, engine: str = "torch",
           engine_yaml: Path = ENGINE_YAML) -> Path:
    workers = "\n".join(f"  {role}: {{engine: {engine}, engine_config: {engine_yaml}}}" for role in roles.split(","))
    path = work_dir / f"{name}.yaml"
    path.write_text(f"""name: {name}
model: {{path: "${{HPC_LLAVA_DIR}}", served_name: {MODEL}, modality: multimodal}}
cluster: {{gpus_per_node: {4 if engine == 'trtllm' else 0}}}  # TensorRT-LLM workers take a GPU each
frontend: {{port: 0}}
media:
  allowed_local_media_path: {media['allowed']}
  max_file_size_mb: {MAX_BYTES / (1 << 20)}
  max_image_pixels: 1000000
  fetch_timeout_s: 1
  max_redirects: 2
  allowed_private_hosts: ["127.0.0.1"]
workers:
{workers}
""")
    return path


def chat(url: str, image_url: str, text: str = "What is in the picture?", max_tokens: int = 8):
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=30, max_retries=0)
    return c.chat.completions.create(model=MODEL, max_tokens=max_tokens, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": text},
                                     {"type": "image_url", "image_url": {"url": image_url}}]}])


def _answers(url: str, image: str) -> str | None:
    try:
        return chat(url, image).choices[0].message.content
    except openai.APIError:
        return None


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def reference(tiny_llava: Path, emb: torch.Tensor, text: str = "What is in the picture?", max_tokens: int = 8):
    """What one in-process engine answers for the cat image, from the same chat template and weights."""
    import asyncio

    from engines.base import EngineRequest, ImageInput, SamplingParams
    from engines.torch.engine import TorchEngine, TorchEngineOptions
    from frontend.preprocess import ModelFiles

    files = ModelFiles(tiny_llava)
    ids = files.encode(files.render_chat([{"role": "user", "content": text + files.vision.image_token}]))
    at = ids.index(files.vision.image_token_id)
    n = files.vision.tokens_per_image
    ids = ids[:at] + [files.vision.image_token_id] * n + ids[at + 1:]

    async def run():
        engine = TorchEngine(tiny_llava, TorchEngineOptions(device="cpu"))
        engine.start(asyncio.get_running_loop())
        req = EngineRequest("ref", ids, SamplingParams(max_tokens=max_tokens), [ImageInput(at, emb, b"x" * 16)])
        out = [t async for o in engine.generate(req) for t in o.token_ids]
        engine.shutdown()
        return out

    d = files.detokenizer()
    return d.add(asyncio.run(run())) + d.flush()


# ---- the model ----------------------------------------------------------------------------------------------------
def test_llava_matches_transformers(tiny_llava):
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

    from engines.torch.loader import load_model, load_vision
    from engines.torch.model import SeqBatch
    from engines.torch.vision import ImageProcessing

    lm, vision = load_model(tiny_llava, torch.device("cpu")), load_vision(tiny_llava, torch.device("cpu"))
    hf = LlavaForConditionalGeneration.from_pretrained(tiny_llava, dtype=torch.float32).eval()
    # Preprocessing: CLIP's processor at this tower's size gives the same pixels.
    from PIL import Image

    image = png(1)
    ours = ImageProcessing.from_dir(tiny_llava, vision.config).pixels(image)
    theirs = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})(
        images=Image.open(io.BytesIO(image)), return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(ours, theirs, atol=1e-6)
    # The language path with image embeddings: logits of every position.
    img = hf.config.image_token_index
    ids = torch.tensor([20, 21] + [img] * 16 + [22, 23, 24])
    with torch.no_grad():
        ref = hf(input_ids=ids[None], pixel_values=ours[None]).logits[0]
    n = len(ids)
    pos = torch.arange(n)
    pool = torch.zeros((4,) + lm.kv_block_shape(16))
    out = lm(ids, pos, [SeqBatch(0, n, 0, torch.tensor([0, 1]))], pool, pos // 16, pos % 16, pos, None,
             (torch.arange(2, 18), vision(ours[None])[0]))
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()


# ---- hostile inputs, and the prefix cache, on a local aggregated deployment -----------------------------------------
@pytest.fixture(scope="module")
def local(work_dir, media, tiny_llava, tiny_model):
    os.environ["HPC_LLAVA_DIR"] = str(tiny_llava)
    mm = LocalDeployment(load_deployment(config(work_dir, media, "mm-local", "aggregated")), work_dir / "mm-local",
                         lease_ttl=2)
    mm.start()
    os.environ["HPC_MODEL_DIR"] = str(tiny_model)
    text = LocalDeployment(load_deployment(REPO / "configs" / "tiny-agg.yaml"), work_dir / "text-local", lease_ttl=2)
    try:
        text.start()
    except BaseException:
        mm.stop()
        raise
    yield {"mm": mm.url, "text": text.url}
    assert mm.stop() == [] and text.stop() == []


def hostile_cases(media: dict) -> dict[str, tuple[list, int, str]]:
    """name: (content parts, status, words the message must have)."""
    a, h = media["allowed"], media["http"]

    def img(url):
        return {"type": "image_url", "image_url": {"url": url}}

    return {
        "outside the directory": ([img(str(media["root"] / "outside.pt"))], 400, "outside the allowed directory"),
        "dot-dot traversal": ([img(f"{a}/../outside.pt")], 400, "outside the allowed directory"),
        "symlink escaping": ([img(str(a / "escape.pt"))], 400, "outside the allowed directory"),
        "file over the limit": ([img(str(a / "big.pt"))], 413, "limit"),
        "pickle that runs code": ([img(str(a / "evil.pt"))], 400, "not a plain tensor file"),
        "wrong hidden size": ([img(str(a / "wrong-hidden.pt"))], 400, "hidden size 32"),
        "wrong rank": ([img(str(a / "wrong-rank.pt"))], 400, "shape [2, 16, 64]"),
        "dict without mm_embeddings": ([img(str(a / "no-key.pt"))], 400, "mm_embeddings"),
        "missing file": ([img(str(a / "nope.pt"))], 400, "no such file"),
        "not an embedding type": ([img(str(a / "cat.txt"))], 415, ".pt"),
        "file:// outside": ([img(f"file://{media['root']}/outside.pt")], 400, "outside the allowed directory"),
        "non-image body": ([img(f"{h}/text")], 415, "not an image"),
        "truncated image": ([img(f"{h}/trunc.png")], 400, "cannot be decoded"),
        "image over the size cap": ([img(f"{h}/big.png")], 413, "limit"),
        "image over the pixel cap": ([img(f"{h}/huge-pixels.png")], 413, "pixels"),
        "URL that does not answer in time": ([img(f"{h}/slow")], 400, "did not answer within 1 s"),
        "URL not found": ([img(f"{h}/missing.png")], 400, "HTTP 404"),
        "redirect loop": ([img(f"{h}/loop")], 400, "more than 2 redirects"),
        "private address": ([img(f"http://localhost:{media['port']}/cat.png")], 400, "private or loopback"),
        "unknown scheme": ([img("ftp://example.com/cat.png")], 400, "scheme"),
        "data URL of another type": ([img("data:text/plain;base64,aGVsbG8=")], 415, "text/plain"),
        "bad base64": ([img("data:image/png;base64,@@@@")], 400, "invalid base64"),
        "base64 of a non-image": ([img("data:image/png;base64," + base64.b64encode(b"hello").decode())], 415,
                                  "not an image"),
        "images and embeddings mixed": ([img(data_url(media["cat"])), img(str(a / "cat.pt"))], 400,
                                        "one kind or the other"),
        "the image token typed in the text": ([{"type": "text", "text": "look: <image>"}, img(data_url(media["cat"]))],
                                              400, "image token"),
        "image part without url": ([{"type": "image_url", "image_url": {}}], 400, "image_url.url"),
        "unknown part type": ([{"type": "audio", "audio": "x"}], 400, "audio"),
    }


def test_every_hostile_input_gets_its_4xx_within_a_second(local, media):
    import httpx

    for name, (parts, status, words) in hostile_cases(media).items():
        t0 = time.monotonic()
        r = httpx.post(f"{local['mm']}/v1/chat/completions", timeout=10, json={
            "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": parts}]})
        took = time.monotonic() - t0
        assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
        message = r.json()["error"]["message"]
        assert words in message, f"{name}: {message}"
        assert "messages[0].content" in message or name in ("images and embeddings mixed",
                                                            "the image token typed in the text"), f"{name}: {message}"
        assert took < 1.5 if name == "URL that does not answer in time" else took < 1.0, f"{name}: {took:.2f} s"
    assert not (media["root"] / "pwned").exists()  # the pickle did not run
    # An image sent to a text-only model.
    r = httpx.post(f"{local['text']}/v1/chat/completions", timeout=10, json={
        "model": "tiny-llama", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(media["cat"])}}]}]})
    assert r.status_code == 400 and "takes no images" in r.json()["error"]["message"]
    # And the deployment still answers.
    assert chat(local["mm"], data_url(media["cat"])).choices[0].finish_reason


def test_prefix_cache_reuses_the_same_image_never_a_different_one(local, media):
    text = "Describe this picture in detail, please, with many words about it."
    chat(local["mm"], data_url(media["cat"]), text)
    again = chat(local["mm"], data_url(media["cat"]), text)
    other = chat(local["mm"], data_url(media["dog"]), text)
    prompt = again.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens >= 16  # the image's blocks too
    # The dog shares the text before the image, never the image's blocks.
    from frontend.preprocess import ModelFiles

    files = ModelFiles(os.environ["HPC_LLAVA_DIR"])
    before_image = len(files.encode(files.render_chat([{"role": "user", "content": text}]))) - 1
    assert other.usage.prompt_tokens == prompt
    assert other.usage.prompt_tokens_details.cached_tokens <= before_image // 16 * 16


# ---- the same tokens in every flow, on the 3-node cluster ------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm_env(cluster, tiny_llava):
    e = {**cluster.env(), "HPC_LLAVA_DIR": str(tiny_llava), "PYTHONUNBUFFERED": "1"}
    e.pop("SLURM_JOB_ID", None)
    return e


@pytest.mark.parametrize("flow", ["aggregated", "prefill,decode", "encode,prefill,decode"])
def test_one_image_gives_the_same_tokens_in_every_flow(flow, slurm_env, work_dir, media, tiny_llava):
    name = {"aggregated": "mm-agg", "prefill,decode": "mm-epd2", "encode,prefill,decode": "mm-epd3"}[flow]
    cfg = config(work_dir, media, name, flow)
    hpc(["launch", str(cfg), "--nodes", "3", "--detach"], slurm_env)
    try:
        url = json.loads((REPO / ".hpc" / f"{name}.json").read_text())["frontend_url"]
        expected = reference(tiny_llava, media["emb"])
        a = media["allowed"]
        for source in (f"{media['http']}/cat.png", data_url(media["cat"]), str(a / "cat.pt"), str(a / "cat-dict.pt"),
                       str(a / "cat.safetensors")):
            r = chat(url, source)
            assert r.choices[0].message.content == expected, f"{flow}, {source[:40]}"
            assert r.usage.prompt_tokens > 16
        if flow.startswith("encode"):  # the encode worker dies: a clear error at once, then it is back
            from test_operations import kill, wait_for

            assert kill("--role encode --worker-id encode-0")
            t0 = time.monotonic()
            with pytest.raises(openai.APIStatusError, match="encode"):
                chat(url, data_url(media["dog"]))
            assert time.monotonic() - t0 < 5.0  # transfer.timeout_s is 30
            wait_for(lambda: _answers(url, data_url(media["cat"])) == expected, 60, "a request after the restart")
    finally:
        hpc(["stop", name], slurm_env)
    assert squeue(slurm_env) == []


def test_trtllm_epd_across_nodes_gives_the_answer_of_an_engine_that_encodes_itself(slurm_env, work_dir, media,
                                                                                   tiny_llava):
    """E/P/D on TensorRT-LLM (its test double, tests/trtllm_double): the encode worker's MultimodalEncoder, the
    embeddings over NIXL to the prefill worker, the decode worker continuing from the prefill's expanded prompt.
    The same answer as one engine given the raw image, for an http URL, base64 and the embedding file of the
    image (the double's encoder makes 17 embeddings where the frontend counts 16)."""
    import asyncio
    import sys

    from test_trtllm import DOUBLE, image_prompt

    from engines.base import EngineRequest, ImageInput, SamplingParams
    from engines.trtllm.encoder import TrtllmEncoder
    from engines.trtllm.engine import TrtllmEngine
    from frontend.preprocess import ModelFiles

    engine_yaml = work_dir / "trtllm-tp1.yaml"
    engine_yaml.write_text("max_seq_len: 1024\ncache_transceiver_config: {backend: NIXL}\n")

    async def expected_and_file():
        ids, at = image_prompt(tiny_llava, 1)
        agg = TrtllmEngine(str(tiny_llava), {"max_seq_len": 1024})
        encoder = TrtllmEncoder(str(tiny_llava), {})
        for e in (agg, encoder):
            e.start(asyncio.get_running_loop())
        try:
            req = EngineRequest("ref", ids, SamplingParams(max_tokens=8),
                                [ImageInput(at, None, b"d" * 16, data=media["cat"], num_tokens=1)])
            tokens = [t async for o in agg.generate(req) for t in o.token_ids]
            [emb] = await encoder.encode_images_async([media["cat"]])
        finally:
            agg.shutdown()
            encoder.shutdown()
        torch.save(emb, media["allowed"] / "cat-trtllm.pt")
        d = ModelFiles(tiny_llava).detokenizer()
        return d.add(tokens) + d.flush()

    expected = asyncio.run(expected_and_file())
    env = {**slurm_env, "PATH": f"{Path(sys.executable).parent}:{DOUBLE / 'bin'}:{os.environ['PATH']}",
           "PYTHONPATH": str(DOUBLE)}
    name = "mm-trtllm-epd"
    hpc(["launch", str(config(work_dir, media, name, "encode,prefill,decode", "trtllm", engine_yaml)),
         "--nodes", "3", "--detach"], env)
    try:
        url = json.loads((REPO / ".hpc" / f"{name}.json").read_text())["frontend_url"]
        for source in (f"{media['http']}/cat.png", data_url(media["cat"]), str(media["allowed"] / "cat-trtllm.pt")):
            assert chat(url, source).choices[0].message.content == expected, source[:40]
        log = hpc(["logs", "encode-0", "--deployment", name], env).stdout
        assert "multimodal encoder loaded" in log
    finally:
        hpc(["stop", name], env)
    assert squeue(env) == []
