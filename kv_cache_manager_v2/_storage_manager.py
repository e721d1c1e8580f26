"""Levels, quotas, pools and page placement.

Owns the page table, one slot allocator per (level, pool group) and the memory behind every
level: host memory (level 0 on the host backend, and the host tier) or files (the disk tier).
It does not know the reuse tree: when it must drop a page the tree owns, it calls
`drop_hook(page)` first so the tree can forget it (and prune what can no longer match).

Eviction (SPEC 4.6): when level L needs room, listed pages leave it lowest priority first, then
least recently released. DROPPABLE and HELD pages move one level colder (which may cascade);
only the last level drops, and only DROPPABLE pages. A page keeps its id when it moves.
"""

from __future__ import annotations

import logging
from typing import Callable, Final, Protocol

from librt.vecs import append, vec
from mypy_extensions import i64

from ._backends._host import HostAllocation, HostBackend
from ._exceptions import OutOfPagesError
from ._page import NIL, PageTable
from ._storage._layout import StorageLayout
from ._storage._slot_allocator import SlotAllocator

LOG: Final = logging.getLogger("kv_cache_manager_v2")

# Level of a page whose bytes were lost (failed checksum or write); its id lives on until the
# caches that hold it let go.
LEVEL_LOST: Final = -2
KIND_MEMORY: Final = 0
KIND_DISK: Final = 1
# Host levels reserve address space for this many times their initial quota (at least
# HOST_RESERVE_MIN bytes), so a quota can grow without moving any pool base address.
HOST_RESERVE_FACTOR: Final = 4
HOST_RESERVE_MIN: Final = 64 << 20
# The page table starts with one free page id per level-0 slot, up to this many (about 100 MB
# of vectors; past it, ids are added one by one as pages are created).
PREALLOCATED_PAGE_IDS_MAX: Final = 1 << 20


class DiskStore(Protocol):
    """What the storage manager needs of a disk level (see _backends/_disk.py)."""

    def write(self, slots: list[int], src_addrs: list[list[int]]) -> list[bool]: ...
    def read(self, slots: list[int], dst_addrs: list[list[int]]) -> list[bool]: ...
    def invalidate(self, slots: list[int]) -> None: ...
    def resize(self, num_slots: int) -> None: ...
    def close(self) -> None: ...


def split_quota(layout: StorageLayout, quota: int, lg_weights: list[float] | None, floors: list[int] | None = None) -> list[int]:
    """Slots per pool group for a level's byte quota.

    `floors` (slots per pool group) are granted first; the rest is split by `lg_weights`
    (each layer group's share of the bytes) or, without weights, so that every layer group gets
    the same number of slots.
    """
    pgs = layout.pool_groups
    base = floors if floors is not None else [0] * len(pgs)
    rest = quota - sum(base[i] * pgs[i].slot_size for i in range(len(pgs)))
    if rest < 0:
        rest = 0
    out: list[int] = []
    if lg_weights is None:
        # Each pool group's share is proportional to the bytes one block of its layer groups takes.
        per_block = sum(pg.slot_size * len(pg.layer_groups) for pg in pgs)
        if per_block == 0:
            return [0 for _ in pgs]
        for i, pg in enumerate(pgs):
            out.append(base[i] + rest * len(pg.layer_groups) // per_block)
        return out
    for i, pg in enumerate(pgs):
        share = sum(lg_weights[g] for g in pg.layer_groups) * rest
        out.append(base[i] + int(share) // pg.slot_size)
    return out


class LevelStore:
    """The memory of one level: host allocations per (pool group, pool), or disk files."""

    def __init__(self, kind: int, reserved_slots: list[int]) -> None:
        self.kind: i64 = kind
        self.reserved_slots = reserved_slots
        self.host: list[list[HostAllocation]] = []
        self.addresses: list[list[int]] = []
        self.disk: list[DiskStore] = []


class StorageManager:
    def __init__(
        self,
        layout: StorageLayout,
        quotas: list[int],
        kinds: list[int],
        backend: HostBackend,
        lg_weights: list[float] | None,
        floors: list[int] | None = None,
        disk_factory: Callable[[list[int], int], DiskStore] | None = None,
    ) -> None:
        self.layout = layout
        self.backend = backend
        self.num_levels: i64 = len(quotas)
        self.last_level: i64 = len(quotas) - 1
        self.num_pool_groups: i64 = len(layout.pool_groups)
        # Slots per pool group of every level (constraints are floors on level 0 only).
        level_slots = [
            split_quota(layout, quota, lg_weights, floors if level == 0 else None) for level, quota in enumerate(quotas)
        ]
        level0_slots = sum(level_slots[0]) if quotas else 0
        self.pages = PageTable(len(quotas), len(layout.pool_groups), min(level0_slots, PREALLOCATED_PAGE_IDS_MAX))
        self.allocators: list[SlotAllocator] = []
        self.levels: list[LevelStore] = []
        self.pool_addresses: list[list[int]] = []
        self.lg_weights = lg_weights
        self.floors = floors
        self.drop_hook: Callable[[i64], None] | None = None
        self.lost_hook: Callable[[i64], None] | None = None
        g = len(layout.layer_groups)
        self.dropped_by_group: vec[i64] = vec[i64]([0] * g)
        self.onboarded_by_group: vec[i64] = vec[i64]([0] * g)
        # Pages brought to level 0, by (source level, layer group): index level * G + lg.
        self.onboarded_from_level: vec[i64] = vec[i64]([0] * (len(quotas) * g))
        self.offloaded_by_group: vec[i64] = vec[i64]([0] * g)
        self.lost_pages: i64 = 0
        # The disk level's index, or -1 (checked on every free, so kept as a plain int).
        self.disk_level: i64 = -1
        for i, kind in enumerate(kinds):
            if kind == KIND_DISK:
                self.disk_level = i
        self.failed_writes: i64 = 0
        self._logged_write_failure = False
        for level, quota in enumerate(quotas):
            slots = level_slots[level]
            kind = kinds[level]
            if kind == KIND_MEMORY:
                reserve = split_quota(
                    layout, max(quota * HOST_RESERVE_FACTOR, HOST_RESERVE_MIN), lg_weights, floors if level == 0 else None
                )
                reserve = [max(r, s) for r, s in zip(reserve, slots)]
                store = LevelStore(kind, reserve)
                for pg, n, used in zip(layout.pool_groups, reserve, slots):
                    allocs = [backend.allocate(n * rs) for rs in pg.record_sizes]
                    for a, rs in zip(allocs, pg.record_sizes):
                        a.populate(0, used * rs)
                    store.host.append(allocs)
                    store.addresses.append([a.address for a in allocs])
                    self.pool_addresses.append([a.address for a in allocs])
            else:
                assert disk_factory is not None
                store = LevelStore(kind, list(slots))
                for pg, n in zip(layout.pool_groups, slots):
                    store.disk.append(disk_factory(list(pg.record_sizes), n))
                    store.addresses.append([0 for _ in pg.record_sizes])
                    self.pool_addresses.append([0 for _ in pg.record_sizes])
            self.levels.append(store)
            for n in slots:
                self.allocators.append(SlotAllocator(n))

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

    def capacity(self, level: i64, pool_group: i64) -> i64:
        """Slots that eviction could make free at `level`: free, DROPPABLE, and HELD pages as far
        as the colder levels together can take them (they pass through in rounds)."""
        free = self.num_free(level, pool_group)
        listed = self.pages.evictable_count(level, pool_group)
        held = self.pages.held_evictable_count(level, pool_group)
        if level == self.last_level or held == 0:
            return free + listed - held
        return free + listed - held + min(held, self._room_below(level, pool_group))

    def _room_below(self, level: i64, pool_group: i64) -> i64:
        """Slots the levels colder than `level` can give to HELD pages (free or DROPPABLE)."""
        room: i64 = 0
        for m in range(level + 1, self.num_levels):
            room += (
                self.num_free(m, pool_group)
                + self.pages.evictable_count(m, pool_group)
                - self.pages.held_evictable_count(m, pool_group)
            )
        return room

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

    def _slot_addresses(self, level: i64, pool_group: i64, slot: i64) -> list[int]:
        sizes = self.layout.pool_groups[pool_group].record_sizes
        bases = self.pool_addresses[level * self.num_pool_groups + pool_group]
        return [bases[i] + slot * sizes[i] for i in range(len(sizes))]

    # ---- listing ------------------------------------------------------------------------------
    def relist(self, p: i64) -> None:
        """Puts p in (or takes it out of) its evictable list according to its state."""
        pages = self.pages
        want = (
            pages.locks[p] == 0
            and pages.pinned[p] == 0
            and pages.level[p] >= 0
            and (
                (pages.holds[p] == 0 and pages.node[p] != NIL)
                or (pages.holds[p] > 0 and pages.level[p] < self.last_level)
            )
        )
        if pages.listed[p]:
            pages.unlink(p)
        if want:
            pages.link(p)

    def pin(self, p: i64) -> None:
        pages = self.pages
        if pages.listed[p]:
            pages.unlink(p)
        pages.pinned[p] += 1

    def unpin(self, p: i64) -> None:
        pages = self.pages
        pages.pinned[p] -= 1
        if (
            pages.pinned[p] == 0
            and pages.locks[p] == 0
            and pages.holds[p] == 0
            and pages.node[p] == NIL
            and pages.level[p] >= 0
        ):
            self.free(p)  # the tree let go of it while it was pinned
            return
        self.relist(p)

    # ---- page life -------------------------------------------------------------------------
    def make_room(self, level: i64, pool_group: i64, n: i64) -> bool:
        """Evicts until `n` slots are free at `level`; False if that cannot be reached (checked
        before anything moves, except that a failed disk write of a HELD page also fails it).

        Works in rounds: each round moves as many victims one level colder as that level can
        take at once (a small host tier passes pages on to disk), and drops DROPPABLE victims
        that cannot go colder."""
        alloc = self.allocators[level * self.num_pool_groups + pool_group]
        if len(alloc.free) >= n:
            return True
        if self.capacity(level, pool_group) < n:
            return False
        pages = self.pages
        while len(alloc.free) < n:
            short = n - len(alloc.free)
            below_now: i64 = self.capacity(level + 1, pool_group) if level < self.last_level else 0
            movers: list[i64] = []
            droppers: list[i64] = []
            while len(movers) + len(droppers) < short:
                allow = below_now > len(movers)
                v = pages.first_victim(level, pool_group, allow)
                if v == NIL:
                    break
                self.pin(v)
                if allow:
                    movers.append(v)
                else:
                    droppers.append(v)
            if not movers and not droppers:
                return False
            if movers and not self._move_down(movers, level, pool_group):
                for v in droppers:
                    self.unpin(v)
                return False
            for v in droppers:
                pages.pinned[v] -= 1
                self.drop(v)
        return True

    def _move_down(self, movers: list[i64], level: i64, pool_group: i64) -> bool:
        """Moves pinned pages from `level` to `level + 1` in one batch; unpins them."""
        pages = self.pages
        ok = self.make_room(level + 1, pool_group, len(movers))
        if not ok:
            for v in movers:
                self.unpin(v)
            return False
        dst_alloc = self.allocators[(level + 1) * self.num_pool_groups + pool_group]
        taken: list[int] = []
        for v in movers:
            taken.append(dst_alloc.take(v))
        # Pair the taken slots, ascending, with the movers in the order of their current slots:
        # runs of neighbours stay neighbours, so the copy merges them and a disk level writes
        # them with few calls. The movers keep their (eviction) order for everything else.
        taken.sort()
        by_slot = sorted(range(len(movers)), key=lambda i: pages.slot[movers[i]])
        dst_slots = [0] * len(movers)
        for j in range(len(by_slot)):
            i = by_slot[j]
            dst_slots[i] = taken[j]
            dst_alloc.slot_page[taken[j]] = movers[i]
        results = self._copy_slots(pool_group, level, [pages.slot[v] for v in movers], level + 1, dst_slots)
        all_ok = True
        for i in range(len(movers)):
            v = movers[i]
            if results[i]:
                self._place(v, level + 1, dst_slots[i])
                self.offloaded_by_group[pages.layer_group[v]] += 1
                self.unpin(v)
                continue
            # The write failed: the copy below is worthless.
            dst_alloc.give_back(dst_slots[i])
            self.failed_writes += 1
            if not self._logged_write_failure:
                LOG.warning("kv_cache_manager_v2: a page write to level %d failed; see failed_writes", level + 1)
                self._logged_write_failure = True
            pages.pinned[v] -= 1
            if pages.holds[v] == 0 and pages.locks[v] == 0:
                self.drop(v)  # DROPPABLE: may be dropped (counted)
            else:
                self.relist(v)  # HELD: stays where it was
                all_ok = False
        return all_ok

    def _place(self, p: i64, level: i64, slot: i64) -> None:
        """Records that p now lives in `slot` of `level` (its old slot is freed)."""
        pages = self.pages
        old = self.allocators[pages.level[p] * self.num_pool_groups + pages.pool_group[p]]
        old_slot = pages.slot[p]
        if self.levels[pages.level[p]].kind == KIND_DISK:
            self.levels[pages.level[p]].disk[pages.pool_group[p]].invalidate([old_slot])
        old.give_back(old_slot)
        pages.level[p] = level
        pages.slot[p] = slot

    def _copy_slots(self, pool_group: i64, src_level: i64, src_slots: list[int], dst_level: i64, dst_slots: list[int]) -> list[bool]:
        """Copies whole slots between levels in one batch; per-slot success."""
        n = len(src_slots)
        src_kind = self.levels[src_level].kind
        dst_kind = self.levels[dst_level].kind
        if src_kind == KIND_MEMORY and dst_kind == KIND_MEMORY:
            sizes = self.layout.pool_groups[pool_group].record_sizes
            dsts: list[int] = []
            srcs: list[int] = []
            lens: list[int] = []
            # Pool-major order so consecutive slots of one pool merge into one memmove.
            for i in range(len(sizes)):
                for k in range(n):
                    dsts.append(self.slot_address(dst_level, pool_group, i, dst_slots[k]))
                    srcs.append(self.slot_address(src_level, pool_group, i, src_slots[k]))
                    lens.append(sizes[i])
            self.backend.copy_batch(dsts, srcs, lens)
            return [True] * n
        if dst_kind == KIND_DISK and src_kind == KIND_MEMORY:
            addrs = [self._slot_addresses(src_level, pool_group, s) for s in src_slots]
            return self.levels[dst_level].disk[pool_group].write(dst_slots, addrs)
        if src_kind == KIND_DISK and dst_kind == KIND_MEMORY:
            addrs = [self._slot_addresses(dst_level, pool_group, s) for s in dst_slots]
            return self.levels[src_level].disk[pool_group].read(src_slots, addrs)
        # Disk to disk (compacting a shrinking disk level): bounce through host memory.
        sizes = self.layout.pool_groups[pool_group].record_sizes
        slot_bytes = sum(sizes)
        bounce = self.backend.allocate(n * slot_bytes)
        try:
            addrs = []
            for k in range(n):
                base = bounce.address + k * slot_bytes
                row: list[int] = []
                off = 0
                for rs in sizes:
                    row.append(base + off)
                    off += rs
                addrs.append(row)
            disk = self.levels[src_level].disk[pool_group]
            got = disk.read(src_slots, addrs)
            # Never write what failed its checksum: it would come back as valid.
            good = [k for k in range(n) if got[k]]
            put = self.levels[dst_level].disk[pool_group].write([dst_slots[k] for k in good], [addrs[k] for k in good])
            out = [False] * n
            for j in range(len(good)):
                out[good[j]] = put[j]
            return out
        finally:
            bounce.release()

    def promote(self, plist: list[i64], target: i64, all_or_nothing: bool) -> tuple[bool, list[i64]]:
        """Brings pages up to level `target` in one batch per source level.

        All-or-nothing: room for every page is made first (False, nothing moved, if it cannot
        be). Otherwise as many as room allows, warmest first. Returns (all moved, lost pages):
        pages whose bytes failed their checksum are marked lost (their tree entry dropped).
        """
        pages = self.pages
        npg = self.num_pool_groups
        todo: list[i64] = [p for p in plist if pages.level[p] > target]
        if not todo:
            return True, []
        need = [0] * npg
        for p in todo:
            need[pages.pool_group[p]] += 1
        for p in plist:
            self.pin(p)
        try:
            if all_or_nothing:
                for pg in range(npg):
                    if need[pg] > 0 and self.capacity_for(target, pg, plist) < need[pg]:
                        return False, []
                for pg in range(npg):
                    short = need[pg] - self.num_free(target, pg)
                    if short > 0:
                        # Trade places with HELD pages first: our pages one level down may block
                        # the only way colder (a full host tier), and a swap frees that path.
                        k = min(short, self.swappable(target, pg, plist))
                        if k > 0:
                            need[pg] -= self._swap_up(target, pg, plist, k)
                    if need[pg] > 0 and not self.make_room(target, pg, need[pg]):
                        return False, []
                todo = [p for p in plist if pages.level[p] > target]
            else:
                # Best effort: as many as room allows, pages from the warmest levels first.
                todo.sort(key=lambda q: pages.level[q])
                chosen: list[i64] = []
                for pg in range(npg):
                    room = min(need[pg], self.capacity(target, pg))
                    if room > 0:
                        self.make_room(target, pg, room)
                    room = min(room, self.num_free(target, pg))
                    for p in todo:
                        if room > 0 and pages.pool_group[p] == pg:
                            chosen.append(p)
                            room -= 1
                todo = chosen
            lost: list[i64] = []
            # Group by (pool group, source level) so each group is one batched copy.
            groups: dict[tuple[int, int], list[i64]] = {}
            for p in todo:
                groups.setdefault((pages.pool_group[p], pages.level[p]), []).append(p)
            for (pg, src), members in groups.items():
                alloc = self.allocators[target * npg + pg]
                dst_slots = [alloc.take(p) for p in members]
                results = self._copy_slots(pg, src, [pages.slot[p] for p in members], target, dst_slots)
                for i in range(len(members)):
                    p = members[i]
                    if results[i]:
                        self._place(p, target, dst_slots[i])
                        if target == 0:
                            self.onboarded_by_group[pages.layer_group[p]] += 1
                            self.onboarded_from_level[src * len(self.layout.layer_groups) + pages.layer_group[p]] += 1
                    else:
                        alloc.give_back(dst_slots[i])
                        self.mark_lost(p)
                        lost.append(p)
            moved_all = all(pages.level[p] <= target for p in plist if pages.level[p] >= 0)
            return moved_all and not lost, lost
        finally:
            for p in plist:
                self.unpin(p)

    def _ours_below(self, level: i64, pool_group: i64, plist: list[i64]) -> i64:
        """Pages of `plist` one level below `level` that could trade places with HELD pages of
        `level` (both levels in memory)."""
        below = level + 1
        if below >= self.num_levels or self.levels[level].kind != KIND_MEMORY or self.levels[below].kind != KIND_MEMORY:
            return 0
        pages = self.pages
        return sum(1 for p in plist if pages.level[p] == below and pages.pool_group[p] == pool_group)

    def swappable(self, level: i64, pool_group: i64, plist: list[i64]) -> i64:
        return min(self._ours_below(level, pool_group, plist), self.pages.held_evictable_count(level, pool_group))

    def capacity_for(self, level: i64, pool_group: i64, plist: list[i64]) -> i64:
        """capacity(), when the pinned pages of `plist` are coming up to `level`: a HELD page
        there can also leave by trading places with one of them."""
        free = self.num_free(level, pool_group)
        listed = self.pages.evictable_count(level, pool_group)
        held = self.pages.held_evictable_count(level, pool_group)
        if held == 0:
            return free + listed
        room = self._ours_below(level, pool_group, plist)
        if level < self.last_level:
            room += self._room_below(level, pool_group)
        return free + listed - held + min(held, room)

    def _swap_up(self, level: i64, pool_group: i64, plist: list[i64], k: i64) -> i64:
        """Trades the slots of up to k pages of `plist` on level+1 with HELD victims on `level`,
        through one bounce buffer (the victims keep their identity and move colder). Returns how
        many pages came up."""
        pages = self.pages
        below = level + 1
        ours = [p for p in plist if pages.level[p] == below and pages.pool_group[p] == pool_group][:k]
        victims: list[i64] = []
        while len(victims) < len(ours):
            v = pages.first_held_victim(level, pool_group)
            if v == NIL:
                break
            self.pin(v)
            victims.append(v)
        ours = ours[: len(victims)]
        n = len(ours)
        if n == 0:
            return 0
        sizes = self.layout.pool_groups[pool_group].record_sizes
        slot_bytes = sum(sizes)
        bounce = self.backend.allocate(n * slot_bytes)
        try:
            dsts: list[int] = []
            srcs: list[int] = []
            lens: list[int] = []
            for j in range(n):
                off = bounce.address + j * slot_bytes
                for i in range(len(sizes)):
                    dsts.append(off)
                    srcs.append(self.slot_address(level, pool_group, i, pages.slot[victims[j]]))
                    lens.append(sizes[i])
                    off += sizes[i]
            self.backend.copy_batch(dsts, srcs, lens)  # victims -> bounce
            self._copy_slots(pool_group, below, [pages.slot[p] for p in ours], level, [pages.slot[v] for v in victims])
            dsts = []
            srcs = []
            lens = []
            for j in range(n):
                off = bounce.address + j * slot_bytes
                for i in range(len(sizes)):
                    srcs.append(off)
                    dsts.append(self.slot_address(below, pool_group, i, pages.slot[ours[j]]))
                    lens.append(sizes[i])
                    off += sizes[i]
            self.backend.copy_batch(dsts, srcs, lens)  # bounce -> our old slots
        finally:
            bounce.release()
        up = self.allocators[level * self.num_pool_groups + pool_group]
        down = self.allocators[below * self.num_pool_groups + pool_group]
        for j in range(n):
            x = ours[j]
            v = victims[j]
            sx = pages.slot[x]
            sv = pages.slot[v]
            up.slot_page[sv] = x
            down.slot_page[sx] = v
            pages.level[x] = level
            pages.slot[x] = sv
            pages.level[v] = below
            pages.slot[v] = sx
            if level == 0:
                self.onboarded_by_group[pages.layer_group[x]] += 1
                self.onboarded_from_level[below * len(self.layout.layer_groups) + pages.layer_group[x]] += 1
            self.offloaded_by_group[pages.layer_group[v]] += 1
            self.unpin(v)
        return n

    def mark_lost(self, p: i64) -> None:
        """The bytes of p are gone: free its slot, let the tree forget it; the id stays while held."""
        pages = self.pages
        if pages.listed[p]:
            pages.unlink(p)
        if pages.node[p] != NIL and self.drop_hook is not None:
            self.drop_hook(p)
        level = pages.level[p]
        if self.levels[level].kind == KIND_DISK:
            self.levels[level].disk[pages.pool_group[p]].invalidate([pages.slot[p]])
        self.allocators[level * self.num_pool_groups + pages.pool_group[p]].give_back(pages.slot[p])
        pages.level[p] = LEVEL_LOST
        pages.slot[p] = NIL
        self.lost_pages += 1
        self.dropped_by_group[pages.layer_group[p]] += 1
        if pages.locks[p] == 0 and pages.holds[p] == 0:
            pages.free_page(p)

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
        level = pages.level[p]
        if level >= 0:
            if level == self.disk_level:
                self.levels[level].disk[pages.pool_group[p]].invalidate([pages.slot[p]])
            alloc = self.allocators[level * self.num_pool_groups + pages.pool_group[p]]
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
        if pages.node[p] != NIL and pages.level[p] >= 0:
            if pages.listed[p]:
                pages.unlink(p)
            if pages.pinned[p] == 0:
                pages.link(p)
        else:
            if pages.listed[p]:
                pages.unlink(p)
            self.free(p)

    def release_lock(self, p: i64) -> None:
        pages = self.pages
        n = pages.locks[p] - 1
        pages.locks[p] = n
        if n == 0:
            if pages.holds[p] == 0:
                self.unref(p)
            elif self.last_level > 0:
                self.relist(p)

    def release_all_reversed(self, plist: vec[i64], locked: bool) -> None:
        """release_lock() (or, not `locked`, release_hold()) of every page of plist, last first:
        what close() does. A page other caches still use only loses a count here, without a
        call: on a shared prefix that is most pages."""
        pages = self.pages
        counts = pages.locks if locked else pages.holds
        for b in range(len(plist) - 1, -1, -1):
            p = plist[b]
            if p == NIL:
                continue
            n = counts[p]
            if n > 1 and not pages.listed[p]:
                counts[p] = n - 1  # still referenced by that kind: nothing else changes
            elif (
                locked
                and n == 1
                and pages.holds[p] == 0
                and pages.node[p] != NIL
                and pages.level[p] >= 0
                and pages.pinned[p] == 0
                and not pages.listed[p]
            ):
                # The last reference to a page the tree knows: it becomes evictable (what
                # release_lock -> unref would do, without the two calls).
                counts[p] = 0
                pages.link(p)
            elif locked:
                self.release_lock(p)
            else:
                self.release_hold(p)

    def release_hold(self, p: i64) -> None:
        pages = self.pages
        listed = pages.listed[p]
        if listed:
            pages.unlink(p)
        n = pages.holds[p] - 1
        pages.holds[p] = n
        if n == 0 and pages.locks[p] == 0:
            self.unref(p)
        elif listed or self.last_level > 0:
            self.relist(p)

    def add_hold(self, p: i64) -> None:
        pages = self.pages
        if pages.listed[p]:
            pages.unlink(p)
        pages.holds[p] += 1
        if self.last_level > 0 and pages.locks[p] == 0:
            self.relist(p)

    def lock_to_hold(self, p: i64) -> None:
        """Suspend: one lock of p becomes a hold."""
        pages = self.pages
        pages.locks[p] -= 1
        pages.holds[p] += 1
        if self.last_level > 0 and pages.locks[p] == 0:
            self.relist(p)

    def holds_to_locks(self, plist: vec[i64]) -> None:
        """Resume: one hold of every page of plist (on level 0; NIL entries skipped) becomes a
        lock; a held page listed as evictable leaves its list."""
        pages = self.pages
        holds = pages.holds
        locks = pages.locks
        for p in plist:
            if p == NIL:
                continue
            if pages.listed[p]:
                pages.unlink(p)
            holds[p] -= 1
            locks[p] += 1

    def copy_page(self, dst: i64, src: i64) -> None:
        """Copies every pool record of page src into page dst (both in memory levels)."""
        pages = self.pages
        pg = pages.pool_group[src]
        ok = self._copy_slots(pg, pages.level[src], [pages.slot[src]], pages.level[dst], [pages.slot[dst]])
        assert ok[0]

    # ---- quota changes ----------------------------------------------------------------------
    def resize_level(self, level: i64, quota: int) -> bool:
        """Changes a level's quota (no page may be LOCKED). Shrinking first evicts what no longer
        fits (colder, or dropped if DROPPABLE); False and no change when HELD pages cannot fit."""
        store = self.levels[level]
        slots = split_quota(self.layout, quota, self.lg_weights, self.floors if level == 0 else None)
        npg = self.num_pool_groups
        for pg in range(npg):
            if store.kind == KIND_MEMORY and slots[pg] > store.reserved_slots[pg]:
                raise ValueError(
                    f"quota: level {level} can grow to at most "
                    f"{sum(store.reserved_slots[i] * self.layout.pool_groups[i].slot_size for i in range(npg))} "
                    "bytes (address space reserved at construction)"
                )
            alloc = self.allocators[level * npg + pg]
            shrink = alloc.num_slots - slots[pg]
            if shrink > 0 and self.capacity(level, pg) < shrink:
                return False
        for pg in range(npg):
            alloc = self.allocators[level * npg + pg]
            shrink = alloc.num_slots - slots[pg]
            if shrink > 0 and not self.make_room(level, pg, shrink):
                return False
        for pg in range(npg):
            alloc = self.allocators[level * npg + pg]
            new_n = slots[pg]
            if new_n < alloc.num_slots:
                self._compact(level, pg, new_n)
            old_n = alloc.num_slots
            alloc.resize(new_n)
            if store.kind == KIND_DISK:
                store.disk[pg].resize(new_n)
            elif new_n < old_n:
                self._release_tail(level, pg, new_n)
            else:
                for i, a in enumerate(store.host[pg]):
                    rs = self.layout.pool_groups[pg].record_sizes[i]
                    a.populate(old_n * rs, new_n * rs)
        return True

    def _compact(self, level: i64, pg: i64, new_n: i64) -> None:
        """Moves pages living in slots >= new_n into free slots below it (same level)."""
        pages = self.pages
        alloc = self.allocators[level * self.num_pool_groups + pg]
        movers = [alloc.slot_page[s] for s in range(new_n, alloc.num_slots) if alloc.slot_page[s] != NIL]
        if not movers:
            return
        low_free = sorted(s for s in alloc.free if s < new_n)
        assert len(low_free) >= len(movers)
        dst = low_free[: len(movers)]
        alloc.claim(dst, movers)
        res = self._copy_slots(pg, level, [pages.slot[p] for p in movers], level, dst)
        for i in range(len(movers)):
            if res[i]:
                self._place(movers[i], level, dst[i])
            else:
                alloc.give_back(dst[i])
                self.mark_lost(movers[i])

    def _release_tail(self, level: i64, pg: i64, new_n: i64) -> None:
        """Gives the memory of slots past new_n back to the OS (addresses stay reserved)."""
        store = self.levels[level]
        for i, a in enumerate(store.host[pg]):
            rs = self.layout.pool_groups[pg].record_sizes[i]
            a.discard_from(new_n * rs)

    def release_memory(self) -> None:
        for store in self.levels:
            for allocs in store.host:
                for a in allocs:
                    a.release()
            for d in store.disk:
                d.close()
        self.pool_addresses = [[0 for _ in a] for a in self.pool_addresses]

