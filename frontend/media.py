"""Images and embedding files in chat requests: fetched, decoded and checked here, before anything is routed, so
every bad one is a 4xx that names the part and the rule.

- `http(s)://` URLs: a connect and a total timeout, at most `max_redirects` redirects (each hop checked), the size
  cap enforced while reading, hosts that resolve to private, loopback or link-local addresses refused unless
  allowed by name;
- `data:image/<png|jpeg|webp>;base64,...`: the same size cap, checked before decoding;
- an embedding file (`.pt`, `.pth`, `.bin`, `.safetensors`; a path or `file://`): only inside the allowed directory
  after symlinks and `..` are resolved, at most the size cap, read with `torch.load(weights_only=True)` (no code
  runs) or safetensors, a tensor [1, n, hidden] or [n, hidden], or a dict with `mm_embeddings` (other keys kept
  as they are, unused by the reference engine).

Every image is checked by its bytes (magic number), its pixel count (from the header, before decoding) and a full
decode (a truncated file fails here). Nothing is written to disk; a rejected part leaves nothing behind."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlparse

from hpc.runtime.embeddings import EmbeddingFileError, read_embedding

EMBEDDING_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg", b"GIF87a": "gif", b"GIF89a": "gif"}
DATA_URL_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")
DECODE_INLINE_BYTES = 256 << 10  # larger images are decoded in a thread, off the event loop


class MediaError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class MediaPolicy:
    max_bytes: int = 50 << 20
    max_pixels: int = 40_000_000
    max_items: int = 8
    allowed_local_path: str | None = None
    allowed_private_hosts: tuple[str, ...] = ()
    fetch_timeout_s: float = 10.0
    connect_timeout_s: float = 3.0
    max_redirects: int = 3

    @classmethod
    def from_config(cls, media, env: dict | None = None) -> "MediaPolicy":
        """The deployment's `media:` section, with ALLOWED_LOCAL_MEDIA_PATH and MAX_FILE_SIZE_MB overriding it."""
        env = os.environ if env is None else env
        size_mb = float(env.get("MAX_FILE_SIZE_MB") or media.max_file_size_mb)
        return cls(int(size_mb * (1 << 20)), media.max_image_pixels, media.max_images_per_request,
                   env.get("ALLOWED_LOCAL_MEDIA_PATH") or media.allowed_local_media_path,
                   tuple(media.allowed_private_hosts), media.fetch_timeout_s, media.connect_timeout_s,
                   media.max_redirects)


@dataclass(frozen=True)
class VisionInfo:
    """What the frontend needs of a vision-language model: its image token and how many positions an image
    takes, and the hidden size embedding files must have."""

    image_token_id: int
    image_token: str
    tokens_per_image: int
    hidden_size: int


@dataclass
class MediaItem:
    kind: str  # "image" | "embedding_file"
    digest: bytes
    num_tokens: int
    data: bytes | None = None
    path: str | None = None
    extra: dict = field(default_factory=dict)


# ---- images -----------------------------------------------------------------------------------------------------
def check_image(data: bytes, where: str, policy: MediaPolicy) -> None:
    """Magic bytes, pixel count from the header, then a full decode."""
    from PIL import Image, UnidentifiedImageError

    kind = next((k for magic, k in IMAGE_MAGIC.items() if data.startswith(magic)), None)
    if kind is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind = "webp"
    if kind is None:
        raise MediaError(415, f"{where}: not an image (expected PNG, JPEG, WebP or GIF bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > policy.max_pixels:
                raise MediaError(413, f"{where}: the image has {w}x{h} = {w * h} pixels; the limit is "
                                      f"{policy.max_pixels}")
            im.load()
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(400, f"{where}: the {kind} image cannot be decoded ({e})") from None


def decode_data_url(url: str, where: str, policy: MediaPolicy) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise MediaError(400, f"{where}: a data URL must be data:image/<png|jpeg|webp>;base64,<data>")
    mime = head[len("data:"): -len(";base64")].lower()
    if mime not in DATA_URL_TYPES:
        raise MediaError(415, f"{where}: data URL of type {mime or '(none)'!r}; expected one of "
                              f"{', '.join(DATA_URL_TYPES)}")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise MediaError(413, f"{where}: the image is over the {policy.max_bytes >> 20} MiB limit")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(400, f"{where}: invalid base64 ({e})") from None


def _private(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved or addr.is_multicast
            or addr.is_unspecified)


async def _check_host(url: str, where: str, policy: MediaPolicy) -> None:
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise MediaError(400, f"{where}: {u.scheme or 'no'} scheme; image URLs are http(s)://, data: or a file")
    if u.hostname in policy.allowed_private_hosts:
        return
    try:
        infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
            u.hostname, u.port or (443 if u.scheme == "https" else 80), type=socket.SOCK_STREAM), 2.0)
    except (OSError, asyncio.TimeoutError) as e:
        raise MediaError(400, f"{where}: host {u.hostname!r} does not resolve ({e or 'timeout'})") from None
    bad = sorted({info[4][0] for info in infos if _private(info[4][0])})
    if bad:
        raise MediaError(400, f"{where}: {u.hostname} resolves to a private or loopback address ({bad[0]}); "
                              f"such hosts are refused unless listed in media.allowed_private_hosts")


async def fetch(url: str, where: str, policy: MediaPolicy) -> bytes:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=policy.fetch_timeout_s, sock_connect=policy.connect_timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for _ in range(policy.max_redirects + 1):
                await _check_host(url, where, policy)
                async with session.get(url, allow_redirects=False) as r:
                    if r.status in (301, 302, 303, 307, 308) and "Location" in r.headers:
                        url = urljoin(url, r.headers["Location"])
                        continue
                    if r.status != 200:
                        raise MediaError(400, f"{where}: the image URL answered HTTP {r.status}")
                    if (r.content_length or 0) > policy.max_bytes:
                        raise MediaError(413, f"{where}: the image is {r.content_length} bytes; the limit is "
                                              f"{policy.max_bytes}")
                    body = bytearray()
                    async for chunk in r.content.iter_chunked(1 << 16):
                        body += chunk
                        if len(body) > policy.max_bytes:  # stop reading at the cap
                            raise MediaError(413, f"{where}: the image is over the {policy.max_bytes >> 20} MiB "
                                                  f"limit")
                    return bytes(body)
            raise MediaError(400, f"{where}: more than {policy.max_redirects} redirects")
    except MediaError:
        raise
    except asyncio.TimeoutError:
        raise MediaError(400, f"{where}: the image URL did not answer within {policy.fetch_timeout_s:g} s") from None
    except aiohttp.ClientError as e:
        raise MediaError(400, f"{where}: the image URL could not be fetched ({e})") from None


# ---- embedding files ----------------------------------------------------------------------------------------------
def local_path(url: str, where: str, policy: MediaPolicy) -> Path:
    """The real path of an embedding file, inside the allowed directory, of an accepted type and size."""
    raw = url[len("file://"):] if url.startswith("file://") else url
    if not policy.allowed_local_path:
        raise MediaError(400, f"{where}: local embedding files are off (set media.allowed_local_media_path or "
                              f"ALLOWED_LOCAL_MEDIA_PATH)")
    if not raw.lower().endswith(EMBEDDING_SUFFIXES):
        raise MediaError(415, f"{where}: an embedding file is {', '.join(EMBEDDING_SUFFIXES)}")
    root = Path(os.path.realpath(policy.allowed_local_path))
    real = Path(os.path.realpath(raw if os.path.isabs(raw) else os.path.join(root, raw)))
    if os.path.commonpath([root, real]) != str(root):
        raise MediaError(400, f"{where}: the file is outside the allowed directory (after resolving links and "
                              f"'..')")
    try:
        size = real.stat().st_size
    except OSError:
        raise MediaError(400, f"{where}: no such file in the allowed directory") from None
    if not real.is_file():
        raise MediaError(400, f"{where}: not a regular file")
    if size > policy.max_bytes:
        raise MediaError(413, f"{where}: the file is {size} bytes; the limit is {policy.max_bytes}")
    return real


def _digest_file(path: Path) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


# ---- a request's parts ---------------------------------------------------------------------------------------------
async def load(url: str, where: str, policy: MediaPolicy, vision: VisionInfo) -> MediaItem:
    if url.startswith("data:"):
        data = decode_data_url(url, where, policy)
    elif url.startswith(("http://", "https://")):
        data = await fetch(url, where, policy)
    elif "://" in url and not url.startswith("file://"):
        raise MediaError(400, f"{where}: scheme {url.split('://')[0]!r}; expected http(s)://, data: or a file")
    else:
        path = local_path(url, where, policy)
        try:
            tensor, extra = await asyncio.to_thread(read_embedding, path, vision.hidden_size)
        except EmbeddingFileError as e:
            raise MediaError(400, f"{where}: {e}") from None
        digest = await asyncio.to_thread(_digest_file, path)
        return MediaItem("embedding_file", digest, int(tensor.shape[0]), path=str(path), extra=extra)
    if len(data) > DECODE_INLINE_BYTES:
        await asyncio.to_thread(check_image, data, where, policy)
    else:
        check_image(data, where, policy)
    return MediaItem("image", hashlib.blake2b(data, digest_size=16).digest(), vision.tokens_per_image, data=data)


async def load_all(urls: list[tuple[str, str]], policy: MediaPolicy, vision: VisionInfo | None,
                   model: str) -> list[MediaItem]:
    """(where, url) of each image part, in order -> the checked items. All images or all embedding files."""
    if not urls:
        return []
    if vision is None:
        raise MediaError(400, f"{urls[0][0]}: model {model!r} takes no images (its config.json has no "
                              f"vision_config)")
    if len(urls) > policy.max_items:
        raise MediaError(400, f"{len(urls)} images; at most {policy.max_items} per request")
    tasks = [asyncio.create_task(load(url, where, policy, vision)) for where, url in urls]
    try:
        items = await asyncio.gather(*tasks)
    finally:  # the first failure answers the request: the other fetches stop now
        for t in tasks:
            t.cancel()
    if len({item.kind for item in items}) > 1:
        raise MediaError(400, "images and embedding files in one request: send one kind or the other")
    return list(items)
