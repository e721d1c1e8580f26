"""Page state, stored flat: one entry per page in unboxed int vectors, no object per page.

A page is one block's data for one layer group. It keeps its id for life (seeds for colder
tiers move it between levels without changing the id). Its state follows from its counters:
LOCKED (locks > 0: an active cache uses it), HELD (holds > 0: a suspended cache owns it),
DROPPABLE (only the reuse tree knows it: node >= 0). A page with none of these is freed at once.
Evictable pages sit in intrusive doubly linked lists, one per (level, pool group, priority), so
eviction takes the lowest priority first, then the least recently released, in O(1).
"""

from __future__ import annotations

from typing import Final

from librt.vecs import append, pop, vec
from mypy_extensions import i64

from ._common import NUM_PRIORITIES

NIL: Final = -1


class PageTable:
    def __init__(self, num_levels: int, num_pool_groups: int, initial_ids: int = 0) -> None:
        """`initial_ids` page ids exist (free) from the start: a fresh page then takes a free id
        (a dozen stores) instead of growing a dozen vectors. The storage manager passes the
        number of level-0 slots, which a busy manager's page table reaches anyway."""
        self.num_pool_groups: i64 = num_pool_groups
        k = initial_ids
        self.level: vec[i64] = vec[i64]([NIL] * k)
        self.slot: vec[i64] = vec[i64]([NIL] * k)
        self.pool_group: vec[i64] = vec[i64]([0] * k)
        self.layer_group: vec[i64] = vec[i64]([0] * k)
        self.locks: vec[i64] = vec[i64]([0] * k)
        self.holds: vec[i64] = vec[i64]([0] * k)
        # Reuse-tree node id that owns the page, or NIL for a page private to caches.
        self.node: vec[i64] = vec[i64]([NIL] * k)
        self.priority: vec[i64] = vec[i64]([0] * k)
        self.prev: vec[i64] = vec[i64]([NIL] * k)
        self.next: vec[i64] = vec[i64]([NIL] * k)
        # 1 while the page is in an evictable list.
        self.listed: vec[i64] = vec[i64]([0] * k)
        # >0 while something (a resume in flight, a batch claim) must not see the page move.
        self.pinned: vec[i64] = vec[i64]([0] * k)
        # Popped from the end: the lowest free id comes first.
        self.free_ids: vec[i64] = vec[i64](range(k - 1, -1, -1))
        self.num_live: i64 = 0
        n = num_levels * num_pool_groups * NUM_PRIORITIES
        self.heads: vec[i64] = vec[i64]([NIL] * n)
        self.tails: vec[i64] = vec[i64]([NIL] * n)
        self.listed_count: vec[i64] = vec[i64]([0] * (num_levels * num_pool_groups))
        # Listed pages that are HELD (they can only move colder, never be dropped).
        self.held_listed_count: vec[i64] = vec[i64]([0] * (num_levels * num_pool_groups))

    def new_page(self, level: i64, slot: i64, pool_group: i64, layer_group: i64, priority: i64) -> i64:
        n = len(self.free_ids)
        if n > 0:
            self.free_ids, p = pop(self.free_ids)
            self.level[p] = level
            self.slot[p] = slot
            self.pool_group[p] = pool_group
            self.layer_group[p] = layer_group
            self.locks[p] = 0
            self.holds[p] = 0
            self.node[p] = NIL
            self.priority[p] = priority
            self.prev[p] = NIL
            self.next[p] = NIL
            self.listed[p] = 0
            self.pinned[p] = 0
        else:
            p = len(self.level)
            self.level = append(self.level, level)
            self.slot = append(self.slot, slot)
            self.pool_group = append(self.pool_group, pool_group)
            self.layer_group = append(self.layer_group, layer_group)
            self.locks = append(self.locks, 0)
            self.holds = append(self.holds, 0)
            self.node = append(self.node, NIL)
            self.priority = append(self.priority, priority)
            self.prev = append(self.prev, NIL)
            self.next = append(self.next, NIL)
            self.listed = append(self.listed, 0)
            self.pinned = append(self.pinned, 0)
        self.num_live += 1
        return p

    def free_page(self, p: i64) -> None:
        self.slot[p] = NIL
        self.level[p] = NIL
        self.node[p] = NIL
        self.free_ids = append(self.free_ids, p)
        self.num_live -= 1

    def is_live(self, p: i64) -> bool:
        return self.level[p] != NIL

    def list_index(self, p: i64) -> i64:
        return (self.level[p] * self.num_pool_groups + self.pool_group[p]) * NUM_PRIORITIES + self.priority[p]

    def link(self, p: i64) -> None:
        """Appends p to the tail (most recently released end) of its evictable list."""
        k = self.level[p] * self.num_pool_groups + self.pool_group[p]
        li = k * NUM_PRIORITIES + self.priority[p]  # list_index(p), inline: the release hot path
        tail = self.tails[li]
        self.prev[p] = tail
        self.next[p] = NIL
        if tail == NIL:
            self.heads[li] = p
        else:
            self.next[tail] = p
        self.tails[li] = p
        self.listed[p] = 1
        self.listed_count[k] += 1
        if self.holds[p] > 0:
            self.held_listed_count[k] += 1

    def unlink(self, p: i64) -> None:
        li = self.list_index(p)
        pr = self.prev[p]
        nx = self.next[p]
        if pr == NIL:
            self.heads[li] = nx
        else:
            self.next[pr] = nx
        if nx == NIL:
            self.tails[li] = pr
        else:
            self.prev[nx] = pr
        self.prev[p] = NIL
        self.next[p] = NIL
        self.listed[p] = 0
        k = self.level[p] * self.num_pool_groups + self.pool_group[p]
        self.listed_count[k] -= 1
        if self.holds[p] > 0:
            self.held_listed_count[k] -= 1

    def first_victim(self, level: i64, pool_group: i64, allow_held: bool) -> i64:
        """Lowest priority, least recently released evictable page of (level, pool group);
        HELD pages are skipped unless `allow_held`."""
        base = (level * self.num_pool_groups + pool_group) * NUM_PRIORITIES
        for prio in range(NUM_PRIORITIES):
            h = self.heads[base + prio]
            while h != NIL:
                if allow_held or self.holds[h] == 0:
                    return h
                h = self.next[h]
        return NIL

    def first_held_victim(self, level: i64, pool_group: i64) -> i64:
        """Like first_victim, but only HELD pages."""
        base = (level * self.num_pool_groups + pool_group) * NUM_PRIORITIES
        for prio in range(NUM_PRIORITIES):
            h = self.heads[base + prio]
            while h != NIL:
                if self.holds[h] > 0:
                    return h
                h = self.next[h]
        return NIL

    def held_evictable_count(self, level: i64, pool_group: i64) -> i64:
        return self.held_listed_count[level * self.num_pool_groups + pool_group]

    def evictable_count(self, level: i64, pool_group: i64) -> i64:
        return self.listed_count[level * self.num_pool_groups + pool_group]
