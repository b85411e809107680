"""KV block allocation with reference counts and prefix caching. Plain Python, no torch.

Every block is in exactly one of three states:
  free      ref_count 0, no hash         (holds nothing worth keeping)
  cached    ref_count 0, hash registered (evictable, reusable by a prefix hit)
  in use    ref_count > 0
The three counts are kept as blocks change state, so reading them costs nothing;
`check_invariants` counts each again from a different source (the eviction queue, the prefix-cache
registry, the sequences' tables) and requires `free + cached + in_use == num_blocks`. Blocks with
ref_count 0 sit in one queue in eviction order: free blocks at the front, then cached blocks least
recently used first. A full block's hash chains its parent's hash with its token ids, so equal hashes mean
equal prefixes, and only tokens whose K/V are final (computed and accepted) are ever hashed.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass

import xxhash

from tpserve.engine.sequence import SMALL, TARGET, Sequence


# The root of each model's hash chains: a block holds the K/V of the model that computed it, so
# the small model's blocks (tpserve.route) never match a target prefix, nor the reverse.
CHAIN_ROOTS = {TARGET: -1, SMALL: -2}


def hash_block(parent: int | None, token_ids, root: int = -1) -> int:
    data = array("q", [root if parent is None else parent & 0x7FFF_FFFF_FFFF_FFFF])
    data.extend(token_ids)
    return xxhash.xxh3_64_intdigest(data.tobytes())


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._evictable: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # hash -> block id
        self._num_cached_evictable = 0  # blocks with ref_count 0 and a registered hash
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # --- counts -------------------------------------------------------------------------------
    @property
    def num_available_blocks(self) -> int:
        """Blocks an allocation can take now (free + cached-evictable)."""
        return len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks no sequence uses that still hold a reusable prefix."""
        return self._num_cached_evictable

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence uses that hold nothing reusable."""
        return len(self._evictable) - self._num_cached_evictable

    @property
    def num_in_use_blocks(self) -> int:
        return self.num_blocks - len(self._evictable)

    def counts(self) -> dict[str, int]:
        return {"free": self.num_free_blocks, "cached": self.num_cached_blocks, "in_use": self.num_in_use_blocks,
                "total": self.num_blocks}

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix lookup and admission ----------------------------------------------------------
    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks matching the longest prefix of seq's tokens. At least one token is always
        left to compute, since the step that computes it produces the next token's logits."""
        if not self.enable_prefix_caching or seq.prompt_logprobs is not None:
            return []  # (prompt logprobs need every prompt position computed)
        route = seq.route  # the router scores the prompt's last tokens: they must be computed
        limit = seq.num_tokens - 1
        if route is not None and (start := route.tail_start(seq.model, seq.num_prompt_tokens)) is not None:
            limit = min(limit, start)
        hits, parent, root = [], None, CHAIN_ROOTS[seq.model]
        bs = self.block_size
        for i in range(limit // bs):
            h = hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs], root)
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
            parent = h
        return hits

    def admit(self, seq: Sequence, num_new_tokens: int, num_lookahead: int = 0) -> bool:
        """Give a waiting sequence its prefix-cache hits plus slots for `num_new_tokens` (capped at
        what remains after the hits) and `num_lookahead` more. Returns False, changing nothing,
        when the blocks are not there. Sets num_computed_tokens / num_cached_tokens."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        hits = self._prefix_hits(seq)
        num_cached = len(hits) * self.block_size
        num_new = min(num_new_tokens, seq.num_tokens - num_cached)
        needed = self.blocks_needed(num_cached + num_new + num_lookahead) - len(hits)
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if needed > self.num_available_blocks - reclaimed:
            return False
        for block_id in hits:
            self._take(block_id)
        seq.block_table = list(hits)
        seq.block_hashes = [self.blocks[b].hash for b in hits]
        seq.num_hashed_blocks = len(hits)
        seq.num_computed_tokens = num_cached
        seq.num_cached_tokens = num_cached
        seq.cache_model = seq.model
        self.num_queried_tokens += seq.num_tokens
        self.num_hit_tokens += num_cached
        self._grow(seq, needed)
        return True

    # --- growth, commit, release --------------------------------------------------------------
    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq's block table cover `num_tokens` positions. False (nothing changed) if short."""
        needed = self.blocks_needed(num_tokens) - len(seq.block_table)
        if needed <= 0:
            return True
        if needed > self.num_available_blocks:
            return False
        self._grow(seq, needed)
        return True

    def commit(self, seq: Sequence, num_final_tokens: int) -> None:
        """Register every full block within seq's first `num_final_tokens` tokens in the cache."""
        if not self.enable_prefix_caching or seq.cache_model != seq.model:
            return  # (a sequence that changed model mid-way holds blocks of both: none is shared)
        bs = self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        root = CHAIN_ROOTS[seq.model]
        for i in range(seq.num_hashed_blocks, num_final_tokens // bs):
            h = hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs], root)
            block = self.blocks[seq.block_table[i]]
            # The same content computed twice stays registered under the first block only.
            if h not in self._cached:
                self._cached[h] = block.block_id
                block.hash = h
            seq.block_hashes.append(h)
            seq.num_hashed_blocks += 1
            parent = h

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Release blocks past the first `num_tokens` positions (speculative rollback)."""
        keep = self.blocks_needed(num_tokens)
        assert keep >= seq.num_hashed_blocks, "rollback would drop a hashed (final) block"
        tail = seq.block_table[keep:]
        del seq.block_table[keep:]
        self._release(reversed(tail))

    def free(self, seq: Sequence) -> None:
        """Drop all of seq's blocks. The tail goes first so it is evicted before shared prefixes."""
        self._release(reversed(seq.block_table))
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0

    def _release(self, block_ids) -> None:
        for block_id in block_ids:
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} released more often than taken"
            if block.ref_count == 0:
                self._evictable[block_id] = None
                if block.hash is not None:
                    self._num_cached_evictable += 1
                else:
                    # Holds nothing reusable: hand it out before any cached block.
                    self._evictable.move_to_end(block_id, last=False)

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._evictable[block_id]
            if block.hash is not None:
                self._num_cached_evictable -= 1
        block.ref_count += 1

    def _grow(self, seq: Sequence, count: int) -> None:
        for _ in range(count):
            block_id, _ = self._evictable.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:
                self._num_cached_evictable -= 1
                if self._cached.get(block.hash) == block_id:
                    del self._cached[block.hash]
                block.hash = None
            block.ref_count = 1
            seq.block_table.append(block_id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached-but-unused block (e.g. after weights change)."""
        for block_id in list(self._evictable):
            self.blocks[block_id].hash = None
        self._cached = {h: b for h, b in self._cached.items() if self.blocks[b].ref_count > 0}
        self._num_cached_evictable = 0

    # --- checking -----------------------------------------------------------------------------
    def check_invariants(self, seqs: list[Sequence] | None = None) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent. Free blocks are counted in the
        eviction queue, cached ones in the prefix-cache registry, blocks in use in the tables of
        `seqs` (every sequence holding blocks; without them, by reference count), each on its own,
        so a block lost from every state or counted in two makes the sum differ from num_blocks;
        the kept counts must equal them. With `seqs`, reference counts must also equal the number
        of tables naming each block."""
        free = sum(1 for b in self._evictable if self.blocks[b].hash is None)
        cached = sum(1 for b in self._cached.values() if self.blocks[b].ref_count == 0)
        if seqs is not None:
            in_use = len({b for seq in seqs for b in seq.block_table})
        else:
            in_use = sum(1 for block in self.blocks if block.ref_count > 0)
        counted = {"free": free, "cached": cached, "in_use": in_use}
        assert free + cached + in_use == self.num_blocks, f"{counted} do not add up to {self.num_blocks} blocks"
        kept = {"free": self.num_free_blocks, "cached": self.num_cached_blocks, "in_use": self.num_in_use_blocks}
        assert kept == counted, f"kept counts {kept} differ from counted {counted}"
        for block in self.blocks:
            in_queue = block.block_id in self._evictable
            assert in_queue == (block.ref_count == 0), f"block {block.block_id}: ref {block.ref_count}, queued {in_queue}"
        for h, block_id in self._cached.items():
            assert self.blocks[block_id].hash == h, f"cache entry for block {block_id} is stale"
        if seqs is not None:
            refs = [0] * self.num_blocks
            for seq in seqs:
                for block_id in seq.block_table:
                    refs[block_id] += 1
            for block in self.blocks:
                assert refs[block.block_id] == block.ref_count, (
                    f"block {block.block_id}: {refs[block.block_id]} tables, ref_count {block.ref_count}")
