"""The KV cache as a pool of blocks, with the prefix cache living inside it, as in vLLM.

A block is free, private (held by one sequence, no reusable content yet), or cached (it holds a full prompt block
under its chained hash; any number of sequences may share it). A cached block that no sequence holds is *idle*: it
stays reusable until its space is needed, and idle blocks are evicted least recently released first. Usage, as
`vllm:kv_cache_usage_perc` reports it, counts the blocks sequences hold; idle cached blocks count as free.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, total: int, cache_cap: int = 0) -> None:
        self.total = total
        self.cache_cap = cache_cap  # most cached blocks kept; 0 = no cap but the pool
        self.free = total  # blocks with no cached content
        self.refs: dict[bytes, int] = {}  # cached block hash -> sequences holding it
        self.idle: OrderedDict[bytes, None] = OrderedDict()  # cached blocks nobody holds, least recent first

    @property
    def available(self) -> int:
        return self.free + len(self.idle)

    @property
    def in_use(self) -> int:
        return self.total - self.available

    @property
    def usage(self) -> float:
        return self.in_use / self.total

    def longest_hit(self, hashes: list[bytes], most: int) -> list[bytes]:
        """The leading cached blocks of a prompt (at most `most`)."""
        hit = []
        for h in hashes[:most]:
            if h not in self.refs:
                break
            hit.append(h)
        return hit

    def idle_count(self, hashes: list[bytes]) -> int:
        return sum(1 for h in hashes if h in self.idle)

    def acquire(self, h: bytes) -> None:
        if self.refs[h] == 0:
            del self.idle[h]
        self.refs[h] += 1

    def release(self, h: bytes) -> None:
        self.refs[h] -= 1
        if self.refs[h] == 0:
            self.idle[h] = None  # most recently released: evicted last

    def take(self, count: int) -> None:
        """Allocate `count` private blocks, evicting idle cached blocks when no free block is left."""
        if count > self.available:
            raise RuntimeError(f"KV pool overcommitted: {count} blocks wanted, {self.available} available")
        from_free = min(count, self.free)
        self.free -= from_free
        for _ in range(count - from_free):
            self._evict_one()
            self.free -= 1

    def give_back(self, count: int) -> None:
        self.free += count

    def register(self, h: bytes) -> bool:
        """Turn one of a sequence's private blocks into the cached block `h` (which it then holds).

        False when `h` is already cached (another sequence computed the same block in the same step: its copy stays
        private, as a duplicate) or the cache is at its cap with nothing idle to evict.
        """
        if h in self.refs:
            return False
        if self.cache_cap and len(self.refs) >= self.cache_cap:
            if not self.idle:
                return False
            self._evict_one()  # its block becomes free; ours changes from private to cached, still taken
        self.refs[h] = 1
        return True

    def reset(self) -> int:
        """Forget every idle cached block (vLLM's /reset_prefix_cache); held blocks stay. Returns how many."""
        count = len(self.idle)
        for h in self.idle:
            del self.refs[h]
        self.idle.clear()
        self.free += count
        return count

    def _evict_one(self) -> None:
        h, _ = self.idle.popitem(last=False)
        del self.refs[h]
        self.free += 1
