"""Levels, quotas, pools and page placement.

Owns the page table, one slot allocator per (level, pool group) and the pool memory. It does
not know the reuse tree: when it must drop a page the tree owns, it calls `drop_hook(page)`
first so the tree can forget it (and prune what can no longer match).
"""

from __future__ import annotations

from typing import Callable

from librt.vecs import append, vec
from mypy_extensions import i64

from ._backends._host import HostAllocation, HostBackend
from ._exceptions import OutOfPagesError
from ._page import NIL, PageTable
from ._storage._layout import StorageLayout
from ._storage._slot_allocator import SlotAllocator


def split_quota(layout: StorageLayout, quota: int, lg_weights: list[float] | None) -> list[int]:
    """Slots per pool group for a level's byte quota.

    Default: every layer group gets the same number of slots (one block of every group fits
    together). With `initial_pool_ratio` each layer group gets that share of the bytes.
    """
    pgs = layout.pool_groups
    if lg_weights is None:
        # Each pool group's share is proportional to the bytes one block of its layer groups takes.
        per_block = sum(pg.slot_size * len(pg.layer_groups) for pg in pgs)
        if per_block == 0:
            return [0 for _ in pgs]
        return [quota * len(pg.layer_groups) // per_block for pg in pgs]
    out: list[int] = []
    for pg in pgs:
        share = sum(lg_weights[g] for g in pg.layer_groups) * quota
        out.append(int(share) // pg.slot_size)
    return out


class StorageManager:
    def __init__(
        self,
        layout: StorageLayout,
        quotas: list[int],
        backend: HostBackend,
        lg_weights: list[float] | None,
    ) -> None:
        self.layout = layout
        self.backend = backend
        self.num_levels: i64 = len(quotas)
        self.num_pool_groups: i64 = len(layout.pool_groups)
        self.pages = PageTable(len(quotas), len(layout.pool_groups))
        self.allocators: list[SlotAllocator] = []
        self.allocations: list[list[HostAllocation]] = []
        self.pool_addresses: list[list[int]] = []
        self.drop_hook: Callable[[i64], None] | None = None
        self.dropped_by_group: vec[i64] = vec[i64]([0] * len(layout.layer_groups))
        for level, quota in enumerate(quotas):
            slots = split_quota(layout, quota, lg_weights)
            for pg, n in zip(layout.pool_groups, slots):
                self.allocators.append(SlotAllocator(n))
                allocs = [backend.allocate(n * rs) for rs in pg.record_sizes]
                self.allocations.append(allocs)
                self.pool_addresses.append([a.address for a in allocs])

    # ---- queries -------------------------------------------------------------------------
    def allocator(self, level: i64, pool_group: i64) -> SlotAllocator:
        return self.allocators[level * self.num_pool_groups + pool_group]

    def num_slots(self, level: i64, pool_group: i64) -> i64:
        return self.allocators[level * self.num_pool_groups + pool_group].num_slots

    def num_free(self, level: i64, pool_group: i64) -> i64:
        return len(self.allocators[level * self.num_pool_groups + pool_group].free)

    def num_evictable(self, level: i64, pool_group: i64) -> i64:
        return self.pages.evictable_count(level, pool_group)

    def num_available(self, level: i64, pool_group: i64) -> i64:
        return self.num_free(level, pool_group) + self.pages.evictable_count(level, pool_group)

    def utilization(self, level: i64, pool_group: i64) -> float:
        total = self.num_slots(level, pool_group)
        if total == 0:
            return 1.0
        return float(total - self.num_available(level, pool_group)) / float(total)

    def quota_in_force(self, level: i64) -> int:
        return sum(
            self.num_slots(level, pg) * self.layout.pool_groups[pg].slot_size
            for pg in range(self.num_pool_groups)
        )

    def slot_address(self, level: i64, pool_group: i64, pool_index: int, slot: i64) -> int:
        addr = self.pool_addresses[level * self.num_pool_groups + pool_group][pool_index]
        return addr + slot * self.layout.pool_groups[pool_group].record_sizes[pool_index]

    # ---- page life -------------------------------------------------------------------------
    def make_room(self, level: i64, pool_group: i64, n: i64) -> bool:
        """Evicts until `n` slots are free; False (nothing evicted) if that cannot be reached."""
        alloc = self.allocators[level * self.num_pool_groups + pool_group]
        if len(alloc.free) >= n:
            return True
        if len(alloc.free) + self.pages.evictable_count(level, pool_group) < n:
            return False
        while len(alloc.free) < n:
            victim = self.pages.first_victim(level, pool_group)
            assert victim != NIL
            self.drop(victim)
        return True

    def new_locked_pages(
        self, pool_group: i64, layer_group: i64, priority: i64, n: i64, out: vec[i64]
    ) -> vec[i64]:
        """Appends n fresh level-0 pages, each locked once, to `out` (the caller made room)."""
        alloc = self.allocators[pool_group]
        if len(alloc.free) < n:
            raise OutOfPagesError(f"no free slot at level 0 for pool group {pool_group}")
        pages = self.pages
        for _ in range(n):
            p = pages.new_page(0, -1, pool_group, layer_group, priority)
            pages.slot[p] = alloc.take(p)
            pages.locks[p] = 1
            out = append(out, p)
        return out

    def new_page(self, level: i64, pool_group: i64, layer_group: i64, priority: i64) -> i64:
        """A fresh page in a free slot (the caller made room first)."""
        alloc = self.allocators[level * self.num_pool_groups + pool_group]
        if len(alloc.free) == 0:
            raise OutOfPagesError(f"no free slot at level {level} for pool group {pool_group}")
        p = self.pages.new_page(level, -1, pool_group, layer_group, priority)
        self.pages.slot[p] = alloc.take(p)
        return p

    def free(self, p: i64) -> None:
        """Returns a page's slot and id (the page must be unreferenced and unlisted)."""
        pages = self.pages
        alloc = self.allocators[pages.level[p] * self.num_pool_groups + pages.pool_group[p]]
        alloc.give_back(pages.slot[p])
        pages.free_page(p)

    def drop(self, p: i64) -> None:
        """Drops an evictable page: the tree forgets it first, then its slot is freed."""
        pages = self.pages
        if pages.listed[p]:
            pages.unlink(p)
        if pages.node[p] != NIL and self.drop_hook is not None:
            self.drop_hook(p)
        self.dropped_by_group[pages.layer_group[p]] += 1
        self.free(p)

    def unref(self, p: i64) -> None:
        """Called when a page's last lock or hold went away: list it if the tree knows it, else free it."""
        pages = self.pages
        if pages.node[p] != NIL:
            pages.link(p)
        else:
            self.free(p)

    def release_lock(self, p: i64) -> None:
        pages = self.pages
        n = pages.locks[p] - 1
        pages.locks[p] = n
        if n == 0 and pages.holds[p] == 0:
            self.unref(p)

    def release_hold(self, p: i64) -> None:
        pages = self.pages
        n = pages.holds[p] - 1
        pages.holds[p] = n
        if n == 0 and pages.locks[p] == 0:
            self.unref(p)

    def add_hold(self, p: i64) -> None:
        pages = self.pages
        if pages.listed[p]:
            pages.unlink(p)
        pages.holds[p] += 1

    def add_lock(self, p: i64) -> None:
        pages = self.pages
        if pages.listed[p]:
            pages.unlink(p)
        pages.locks[p] += 1

    def copy_page(self, dst: i64, src: i64) -> None:
        """Copies every pool record of page src into page dst (same pool group)."""
        pages = self.pages
        pg = pages.pool_group[src]
        sizes = self.layout.pool_groups[pg].record_sizes
        dsts: list[int] = []
        srcs: list[int] = []
        for i in range(len(sizes)):
            dsts.append(self.slot_address(pages.level[dst], pg, i, pages.slot[dst]))
            srcs.append(self.slot_address(pages.level[src], pg, i, pages.slot[src]))
        self.backend.copy_batch(dsts, srcs, list(sizes))

    def release_memory(self) -> None:
        for allocs in self.allocations:
            for a in allocs:
                a.release()
        self.pool_addresses = [[0 for _ in a] for a in self.allocations]
