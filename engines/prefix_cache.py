"""Prefix caching (TensorRT-LLM's block reuse, vLLM's automatic prefix caching): a KV block that holds a full block
of a known token prefix outlives its request, and the next request with the same prefix reads it instead of
computing it again."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from engines.base import BlockAllocator, KvCacheFull


def next_hash(previous: bytes, block: list[int]) -> bytes:
    return hashlib.blake2b(previous + repr(block).encode(), digest_size=12).digest()


def block_hashes(tokens: list[int], block_size: int) -> list[bytes]:
    """A chained hash per full block: equal hashes mean equal tokens up to the end of that block."""
    out: list[bytes] = []
    for i in range(0, len(tokens) - block_size + 1, block_size):
        out.append(next_hash(out[-1] if out else b"", tokens[i:i + block_size]))
    return out


class CachingBlockAllocator(BlockAllocator):
    """Reference-counted blocks. A full block of computed tokens is registered under its prefix hash; when no
    request holds it any more it stays cached instead of free. Cached blocks count as free: allocation takes truly
    free blocks first, then evicts cached ones, least recently used first."""

    def __init__(self, num_blocks: int):
        super().__init__(num_blocks)
        self._refs: dict[int, int] = {}
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def free(self) -> int:
        return len(self._free) + len(self._evictable)

    def can_allocate(self, n: int) -> bool:
        return n <= self.free

    def allocate(self, owner: str, n: int) -> list[int]:
        if n > self.free:
            raise KvCacheFull(n, self.free, self.num_blocks)
        take = min(n, len(self._free))
        ids = (self._contiguous(take) or sorted(self._free)[:take]) if take else []
        self._free.difference_update(ids)
        while len(ids) < n:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            ids.append(block)
        for b in ids:
            self._refs[b] = 1
        self._owned.setdefault(owner, []).extend(ids)
        return ids

    def admit(self, owner: str, hashes: list[bytes], n: int) -> tuple[list[int], int] | None:
        """n blocks for a request whose leading full blocks have these hashes: the cached ones shared, the rest
        new. Returns (blocks, how many were cached), or None while there is not room."""
        hit = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            hit.append(block)
        hit = hit[:n]
        idle_hits = sum(1 for b in hit if b in self._evictable)  # sharing these takes them out of `free`
        if n - len(hit) + idle_hits > self.free:
            return None
        for b in hit:
            if b in self._evictable:
                del self._evictable[b]
            self._refs[b] = self._refs.get(b, 0) + 1
        self._owned.setdefault(owner, []).extend(hit)
        return hit + self.allocate(owner, n - len(hit)), len(hit)

    def register(self, block: int, block_hash: bytes) -> None:
        """`block` now holds the full block that `block_hash` names (the first such block is kept)."""
        if block_hash not in self._block_of and block not in self._hash_of:
            self._block_of[block_hash] = block
            self._hash_of[block] = block_hash

    def free_owner(self, owner: str) -> int:
        ids = self._owned.pop(owner, [])
        for b in ids:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                del self._refs[b]
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.add(b)
        return len(ids)
