"""KVCache: one request's pages, counters and committed tokens.

Per layer group the cache keeps one unboxed vector of page ids (one entry per block, NIL where
it has no page: stale SWA blocks, released blocks). Every page it references carries one lock
(ACTIVE) or one hold (SUSPENDED) from this cache. All state changes go through the manager's
storage and tree; nothing happens in `__del__` — callers must `close()`.
"""

from __future__ import annotations

from array import array
from typing import Callable, Sequence

from librt.vecs import append, pop, vec
from mypy_extensions import i64

from .._block_radix_tree import BlockNode, ReuseMatch
from .._common import (
    BAD_PAGE_INDEX,
    TOKEN_ID_LIMIT,
    DEFAULT_PRIORITY,
    MAX_PRIORITY,
    HalfOpenRange,
    KVCacheStatus,
    PageIndexMode,
    ScratchDesc,
    TokenIdExt,
    div_up,
)
from .._config import ReuseScope
from .._exceptions import DataIntegrityError, LogicError, OutOfPagesError
from .._page import NIL
from .._stats import KVCacheStatsDelta
from .._storage_manager import LEVEL_LOST
from .._token_store import TokenStore
from .._tokens import as_token_list, check_token, pack_block
from ._context import CacheContext

ACTIVE: i64 = 0
SUSPENDED: i64 = 1
CLOSED: i64 = 2
_STATUS = (KVCacheStatus.ACTIVE, KVCacheStatus.SUSPENDED, KVCacheStatus.CLOSED)

PriorityCallback = Callable[[int, int], int]


def _check_count(value: object, name: str) -> int:
    # A bool is an int here (compiled code passes it as 0/1 anyway, so both modes agree).
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


class KVCache:
    def __init__(
        self,
        ctx: CacheContext,
        cache_id: object,
        scope: ReuseScope | None,
        priority_callback: PriorityCallback | None,
    ) -> None:
        self._ctx = ctx
        self._serial: i64 = ctx.next_serial
        ctx.next_serial += 1
        self.id: object = cache_id if cache_id is not None else self._serial
        self._scope = scope
        self._priority_callback = priority_callback
        self._status: i64 = SUSPENDED
        self._tpb: i64 = ctx.tokens_per_block
        self._capacity: i64 = 0
        self._history: i64 = 0
        self._tokens = TokenStore(ctx.tokens_per_block)
        g = ctx.num_groups
        self._pages: list[vec[i64]] = [vec[i64]() for _ in range(g)]
        self._stale_end: vec[i64] = vec[i64]([0] * g)
        self._index_bufs: list[memoryview | None] = [None] * g
        self._last_node: BlockNode | None = None
        self._committing: bool = True
        # Block whose pages are still the donor's (a partial match, copied on first resume).
        self._cow_block: i64 = -1
        # A page of this cache failed its checksum: only close() is allowed from now on.
        self._lost_data: bool = False
        # Cross-attention cache: True once a resize has set its capacity (reuse does not count).
        self._cross: bool = ctx.cross
        self._sized: bool = False
        self._d_alloc_total: i64 = 0
        self._d_alloc_new: i64 = 0
        self._d_reused: i64 = 0
        self._d_missed: i64 = 0
        # SWA scratch reuse (SPEC 4.8). Per layer group: the scratch block range [beg, end) and
        # the scratch slots it shares, held as LOCKED pages outside the tree and outside
        # `_pages` (so they count as used level-0 slots and are never evictable). `_scr_hwm` is
        # the highest scratch end ever set (blocks below it may lack a page before they go
        # stale; the invariant checker needs it).
        self._scratch_on: bool = ctx.scratch_on
        self._scr_beg: vec[i64] = vec[i64]([0] * g)
        self._scr_end: vec[i64] = vec[i64]([0] * g)
        self._scr_pages: list[vec[i64]] = [vec[i64]() for _ in range(g)]
        self._scr_hwm: vec[i64] = vec[i64]([0] * g)
        self._scr_any: bool = False

    # ---- properties --------------------------------------------------------------------------
    @property
    def status(self) -> KVCacheStatus:
        return _STATUS[self._status]

    @property
    def is_active(self) -> bool:
        return self._status == ACTIVE

    @property
    def tokens_per_block(self) -> int:
        return self._ctx.tokens_per_block

    @property
    def num_blocks(self) -> int:
        return div_up(self._capacity, self._ctx.tokens_per_block)

    @property
    def num_committed_tokens(self) -> int:
        return self._tokens.count()

    @property
    def committed_tokens(self) -> list[TokenIdExt]:
        return self._tokens.to_list()

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        if self._scratch_on and len(self._ctx.swa_groups) > 0:
            # A capacity change with scratch on must name the new history (SPEC 4.8).
            raise ValueError(
                "capacity: with SWA scratch reuse on, change capacity with "
                "resize(capacity, history_length) so the new history_length is explicit"
            )
        if not self.resize(capacity=value):
            raise OutOfPagesError(f"not enough pages for capacity {value}")

    @property
    def history_length(self) -> int:
        return self._history

    @history_length.setter
    def history_length(self, value: int) -> None:
        if not self.resize(history_length=value):
            raise OutOfPagesError(f"not enough pages for history_length {value}")

    @property
    def has_scratch_slots(self) -> bool:
        for pl in self._scr_pages:
            if len(pl) > 0:
                return True
        return False

    @property
    def enable_swa_scratch_reuse(self) -> bool:
        return self._scratch_on

    @enable_swa_scratch_reuse.setter
    def enable_swa_scratch_reuse(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError("enable_swa_scratch_reuse must be a bool")
        if value and not self._ctx.scratch_on:
            raise ValueError("enable_swa_scratch_reuse: the manager has no swa_scratch_reuse configured")
        if not value and self._scr_any:
            raise ValueError(
                "enable_swa_scratch_reuse: this cache has scratch blocks in use; commit past them first"
            )
        self._scratch_on = value

    def get_scratch_desc(self, layer_group_id: int) -> ScratchDesc | None:
        self._check_group(layer_group_id)
        pl = self._scr_pages[layer_group_id]
        beg = self._scr_beg[layer_group_id]
        end = self._scr_end[layer_group_id]
        if len(pl) == 0 or end <= beg:
            return None
        slot = self._ctx.storage.pages.slot
        return ScratchDesc(HalfOpenRange(beg, end), [slot[p] for p in pl])

    def supports_index_mode(self, mode: PageIndexMode) -> bool:
        if not isinstance(mode, PageIndexMode):
            raise TypeError("mode must be a PageIndexMode")
        if mode is PageIndexMode.SHARED:
            return not self.has_scratch_slots
        return True

    def __repr__(self) -> str:
        return (
            f"KVCache(id={self.id!r}, status={self.status.name}, capacity={self._capacity}, "
            f"history_length={self._history}, num_committed_tokens={self._tokens.count()})"
        )

    # ---- checks ----------------------------------------------------------------------------------
    def _require_active(self, what: str) -> None:
        if self._status != ACTIVE:
            raise LogicError(f"{what} needs an ACTIVE cache; this cache is {_STATUS[self._status].name}")

    def _check_group(self, layer_group_id: int) -> None:
        if not isinstance(layer_group_id, int):
            raise TypeError("layer_group_id must be an int")
        if not 0 <= layer_group_id < self._ctx.num_groups:
            raise ValueError(f"layer_group_id {layer_group_id} is out of range [0, {self._ctx.num_groups})")

    def _check_beam(self, beam: int) -> None:
        if not isinstance(beam, int):
            raise TypeError("beam must be an int")
        if beam != 0:
            raise ValueError("beam: beam width > 1 is not supported yet (beam must be 0)")

    # ---- page bookkeeping ------------------------------------------------------------------------
    def _set_page(self, lg: i64, b: i64, p: i64) -> None:
        self._pages[lg][b] = p
        buf = self._index_bufs[lg]
        if buf is not None:
            buf[b] = self._ctx.storage.pages.slot[p] if p != NIL else BAD_PAGE_INDEX

    def _priority(self, block: i64, lg: i64) -> i64:
        cb = self._priority_callback
        if cb is None:
            return DEFAULT_PRIORITY
        prio = cb(block, lg)
        if isinstance(prio, bool) or not isinstance(prio, int) or not 0 <= prio <= MAX_PRIORITY:
            raise ValueError(f"custom_priority_callback must return an int in [0, 100], got {prio!r}")
        return prio

    def _adopt(self, match: ReuseMatch, tokens: list[TokenIdExt], all_int: bool) -> None:
        """Holds the pages of a reuse match (called once, right after construction)."""
        ctx = self._ctx
        storage = ctx.storage
        tree = ctx.tree
        tpb = ctx.tokens_per_block
        n = match.length
        nb = div_up(n, tpb)
        nodes = match.nodes
        num_groups = ctx.num_groups
        node_pages = tree.node_pages
        table = storage.pages
        holds = table.holds
        listed = table.listed
        tiered = storage.last_level > 0
        for lg in range(num_groups):
            lc = ctx.life_cycles[lg]
            s = lc.stale_beg(n)
            e = lc.stale_end(n)
            pages = vec[i64](capacity=nb + 1)
            got: i64 = 0
            for b in range(nb):
                if s <= b < e:
                    pages = append(pages, NIL)
                    continue
                p = node_pages[nodes[b].node_id * num_groups + lg]
                if tiered:
                    storage.add_hold(p)
                else:
                    if listed[p]:
                        table.unlink(p)
                    holds[p] += 1
                pages = append(pages, p)
                got += 1
            self._pages[lg] = pages
            self._stale_end[lg] = e
            if lg == ctx.stats_group:
                # Stale blocks count in none of the per-cache stats.
                self._d_reused += got
                self._d_alloc_total += got
            partial: i64 = 1 if match.partial and nb > 0 and not (s <= nb - 1 < e) else 0
            ctx.st_reused_full[lg] += got - partial
            ctx.st_reused_partial[lg] += partial
            ctx.st_allocated[lg] += got
        if match.partial:
            self._cow_block = nb - 1
        full = n // tpb
        self._tokens.set_prefix(nodes[:full])
        self._tokens.extend(tokens, full * tpb, n, all_int)
        self._capacity = n
        self._history = n
        self._last_node = nodes[full - 1] if full > 0 else match.root


    # ---- resize ----------------------------------------------------------------------------------
    def resize(self, capacity: int | None = None, history_length: int | None = None) -> bool:
        if self._status != ACTIVE:
            self._require_active("resize")
        if self._cross:
            return self._resize_cross(capacity, history_length)
        if (
            history_length is None
            and capacity is not None
            and type(capacity) is int
            and capacity >= self._history
            and not self._scratch_on
        ):
            # Fast path of a decode step: growth within the last block needs no page.
            tpb = self._tpb
            cap: i64 = capacity
            if (cap + tpb - 1) // tpb == (self._capacity + tpb - 1) // tpb:
                self._capacity = cap
                return True
            return self._resize(cap, self._history)
        new_cap: i64 = self._capacity if capacity is None else _check_count(capacity, "capacity")
        hist: i64 = self._history if history_length is None else _check_count(history_length, "history_length")
        if hist < self._history:
            raise ValueError(f"history_length cannot decrease ({self._history} -> {hist})")
        if hist > new_cap:
            raise ValueError(f"history_length {hist} exceeds capacity {new_cap}")
        return self._resize(new_cap, hist)

    def _resize_cross(self, capacity: int | None, history_length: int | None) -> bool:
        """A cross-attention cache is sized once (normally `resize(L, L)`); afterwards its capacity
        never changes. Resizing to the current capacity is always allowed."""
        new_cap: i64 = self._capacity if capacity is None else _check_count(capacity, "capacity")
        if self._sized and new_cap != self._capacity:
            raise LogicError(
                f"capacity: a cross-attention cache is sized once; its capacity {self._capacity} "
                f"cannot change to {new_cap}"
            )
        hist: i64 = self._history if history_length is None else _check_count(history_length, "history_length")
        if hist < self._history:
            raise ValueError(f"history_length cannot decrease ({self._history} -> {hist})")
        if hist > new_cap:
            raise ValueError(f"history_length {hist} exceeds capacity {new_cap}")
        if not self._resize(new_cap, hist):
            return False
        if capacity is not None:
            self._sized = True
        return True

    def _resize(self, cap: i64, hist: i64) -> bool:
        ctx = self._ctx
        if self._scratch_on and len(ctx.swa_groups) > 0:
            return self._resize_scratch(cap, hist)
        tpb = ctx.tokens_per_block
        old_nb: i64 = div_up(self._capacity, tpb)
        new_nb: i64 = div_up(cap, tpb)
        if new_nb > old_nb:
            if not self._grow(old_nb, new_nb, hist):
                return False
        elif new_nb < old_nb:
            self._shrink(new_nb)
        self._capacity = cap
        if hist > self._history:
            self._raise_history(hist)
        return True

    # ---- SWA scratch reuse (SPEC 4.8) ---------------------------------------------------------
    def _scratch_range(self, lg: i64, cap: i64, hist: i64) -> tuple[i64, i64]:
        """Scratch blocks of SWA group lg at (cap, hist): the stale range at history
        max(0, cap - max_rewind_len) intersected with [ceil(hist/tpb), ceil(cap/tpb))."""
        lc = self._ctx.life_cycles[lg]
        x: i64 = cap - self._ctx.max_rewind
        if x < 0:
            x = 0
        tpb = self._tpb
        beg: i64 = lc.stale_beg(x)
        lo: i64 = (hist + tpb - 1) // tpb
        if lo > beg:
            beg = lo
        end: i64 = lc.stale_end(x)
        hi: i64 = (cap + tpb - 1) // tpb
        if hi < end:
            end = hi
        if end < beg:
            end = beg
        return beg, end

    def _plan_scratch(self, cap: i64, hist: i64) -> tuple[list[int], list[int], list[int]]:
        """Scratch ranges per layer group at (cap, hist) and the extra level-0 slots per pool
        group they take beyond the scratch slots this cache already has."""
        ctx = self._ctx
        g = ctx.num_groups
        begs: list[int] = [0] * g
        ends: list[int] = [0] * g
        extra: list[int] = [0] * ctx.storage.num_pool_groups
        for lg in ctx.swa_groups:
            b, e = self._scratch_range(lg, cap, hist)
            begs[lg] = b
            ends[lg] = e
            want = ctx.layout.layer_groups[lg].scratch_slots(e - b)
            have = len(self._scr_pages[lg])
            if want > have:
                extra[ctx.lg_pool_group[lg]] += want - have
        return begs, ends, extra

    def _apply_scratch(self, begs: list[int], ends: list[int]) -> None:
        """Sets the scratch ranges: takes or gives back scratch slots (the caller made room),
        and gives up the pages of existing blocks that fall in a range."""
        ctx = self._ctx
        storage = ctx.storage
        any_range = False
        for lg in ctx.swa_groups:
            beg: i64 = begs[lg]
            end: i64 = ends[lg]
            want: i64 = ctx.layout.layer_groups[lg].scratch_slots(end - beg)
            pl = self._scr_pages[lg]
            while len(pl) > want:
                pl, p = pop(pl)
                storage.release_lock(p)
            if len(pl) < want:
                pl = storage.new_locked_pages(ctx.lg_pool_group[lg], lg, DEFAULT_PRIORITY, want - len(pl), pl)
            self._scr_pages[lg] = pl
            if end > beg:
                pages = self._pages[lg]
                buf = self._index_bufs[lg]
                for b in range(beg, min(end, len(pages))):
                    p = pages[b]
                    if p != NIL:
                        pages[b] = NIL
                        if buf is not None:
                            buf[b] = BAD_PAGE_INDEX
                        storage.release_lock(p)
                self._scr_beg[lg] = beg
                self._scr_end[lg] = end
                if end > self._scr_hwm[lg]:
                    self._scr_hwm[lg] = end
                any_range = True
            else:
                self._scr_beg[lg] = 0
                self._scr_end[lg] = 0
        self._scr_any = any_range

    def _release_scratch_slots(self) -> None:
        storage = self._ctx.storage
        for lg in range(self._ctx.num_groups):
            pl = self._scr_pages[lg]
            if len(pl) == 0:
                continue
            for p in pl:
                storage.release_lock(p)
            self._scr_pages[lg] = vec[i64]()

    def _resize_scratch(self, cap: i64, hist: i64) -> bool:
        """`_resize` with scratch reuse on: checks the resize protocol first (ValueError, no
        change), then allocates pages and scratch slots all-or-nothing."""
        ctx = self._ctx
        old_cap = self._capacity
        if cap != old_cap:
            r = ctx.max_rewind
            if not old_cap - r <= hist <= old_cap:
                raise ValueError(
                    f"history_length: with SWA scratch reuse a capacity change ({old_cap} -> {cap}) needs "
                    f"{max(0, old_cap - r)} <= history_length <= {old_cap} (max_rewind_len {r}), got {hist}"
                )
            if cap < old_cap and self.has_scratch_slots:
                raise ValueError(
                    f"capacity: cannot shrink ({old_cap} -> {cap}) while this cache has scratch slots"
                )
        tpb = self._tpb
        old_nb: i64 = (old_cap + tpb - 1) // tpb
        new_nb: i64 = (cap + tpb - 1) // tpb
        begs, ends, extra = self._plan_scratch(cap, hist)
        if new_nb > old_nb:
            if not self._grow(old_nb, new_nb, hist, begs, ends, extra):
                return False
        else:
            storage = ctx.storage
            for pg in range(storage.num_pool_groups):
                if extra[pg] > 0 and storage.capacity(0, pg) < extra[pg]:
                    return False
            for pg in range(storage.num_pool_groups):
                if extra[pg] > 0 and not storage.make_room(0, pg, extra[pg]):
                    return False
            if new_nb < old_nb:
                self._shrink(new_nb)
        self._apply_scratch(begs, ends)
        self._capacity = cap
        if hist > self._history:
            self._raise_history(hist)
        return True

    def _grow_need(
        self, old_nb: i64, new_nb: i64, hist: i64, sbeg: list[int] | None = None, send: list[int] | None = None
    ) -> list[int]:
        """Fresh level-0 pages per pool group that growing from old_nb to new_nb blocks takes
        (blocks stale at `hist` and scratch blocks take none)."""
        ctx = self._ctx
        need: list[int] = [0] * ctx.storage.num_pool_groups
        for lg in range(ctx.num_groups):
            lc = ctx.life_cycles[lg]
            if ctx.windowed[lg]:
                s = lc.stale_beg(hist)
                e = lc.stale_end(hist)
                sb: i64 = 0
                se: i64 = 0
                if sbeg is not None and send is not None:
                    sb = sbeg[lg]
                    se = send[lg]
                cnt: i64 = 0
                for b in range(old_nb, new_nb):
                    if not (s <= b < e or sb <= b < se):
                        cnt += 1
                need[ctx.lg_pool_group[lg]] += cnt
            else:
                need[ctx.lg_pool_group[lg]] += new_nb - old_nb
        return need

    def _grow(
        self,
        old_nb: i64,
        new_nb: i64,
        hist: i64,
        sbeg: list[int] | None = None,
        send: list[int] | None = None,
        extra: list[int] | None = None,
    ) -> bool:
        ctx = self._ctx
        storage = ctx.storage
        num_pg = storage.num_pool_groups
        need = self._grow_need(old_nb, new_nb, hist, sbeg, send)
        if extra is not None:
            for pg in range(num_pg):
                need[pg] += extra[pg]
        for pg in range(num_pg):
            if need[pg] > 0 and storage.capacity(0, pg) < need[pg]:
                return False
        for lg in range(ctx.num_groups):
            buf = self._index_bufs[lg]
            if buf is not None and len(buf) < new_nb:
                raise ValueError(
                    f"the index buffer of layer group {lg} holds {len(buf)} entries; capacity needs {new_nb}"
                )
        # Ask for every priority before anything is allocated: a bad answer changes nothing.
        prios: list[list[int]] = []
        if self._priority_callback is not None:
            prios = [[self._priority(b, lg) for b in range(old_nb, new_nb)] for lg in range(ctx.num_groups)]
        for pg in range(num_pg):
            if need[pg] > 0 and not storage.make_room(0, pg, need[pg]):
                return False  # a failed disk write left a HELD page in place: out of pages
        stats_group = ctx.stats_group
        for lg in range(ctx.num_groups):
            lc = ctx.life_cycles[lg]
            pgid = ctx.lg_pool_group[lg]
            windowed = ctx.windowed[lg]
            s = lc.stale_beg(hist)
            e = lc.stale_end(hist)
            pages = self._pages[lg]
            buf = self._index_bufs[lg]
            got: i64 = 0
            # Scratch blocks (SPEC 4.8) get no page either.
            sb: i64 = 0
            se: i64 = 0
            if windowed and sbeg is not None and send is not None:
                sb = sbeg[lg]
                se = send[lg]
            fast = buf is None and self._priority_callback is None
            if not windowed:
                s = new_nb
                e = new_nb
            lo = min(max(old_nb, s), new_nb)
            hi = min(max(old_nb, e), new_nb)
            if se > sb:
                slo = min(max(old_nb, sb), new_nb)
                shi = min(max(old_nb, se), new_nb)
                if shi > slo:
                    if hi <= lo:
                        lo = slo
                        hi = shi
                    elif slo <= hi and lo <= shi:
                        lo = min(lo, slo)
                        hi = max(hi, shi)
                    else:
                        fast = False
            if fast:
                # Common case: fresh pages in batches around the page-less range, nobody to notify.
                pages = storage.new_locked_pages(pgid, lg, DEFAULT_PRIORITY, lo - old_nb, pages)
                for _ in range(lo, hi):
                    pages = append(pages, NIL)
                pages = storage.new_locked_pages(pgid, lg, DEFAULT_PRIORITY, new_nb - hi, pages)
                got = (lo - old_nb) + (new_nb - hi)
            else:
                for b in range(old_nb, new_nb):
                    if windowed and (s <= b < e or sb <= b < se):
                        pages = append(pages, NIL)
                        if buf is not None:
                            buf[b] = BAD_PAGE_INDEX
                        continue
                    prio = prios[lg][b - old_nb] if prios else DEFAULT_PRIORITY
                    pages = storage.new_locked_pages(pgid, lg, prio, 1, pages)
                    if buf is not None:
                        buf[b] = storage.pages.slot[pages[b]]
                    got += 1
            self._pages[lg] = pages
            if windowed and e > self._stale_end[lg]:
                self._stale_end[lg] = e
            ctx.st_new[lg] += got
            ctx.st_allocated[lg] += got
            if lg == stats_group:
                self._d_alloc_new += got
                self._d_alloc_total += got
        return True

    def _shrink(self, new_nb: i64) -> None:
        storage = self._ctx.storage
        for lg in range(self._ctx.num_groups):
            pages = self._pages[lg]
            buf = self._index_bufs[lg]
            for b in range(len(pages) - 1, new_nb - 1, -1):
                p = pages[b]
                if p != NIL:
                    storage.release_lock(p)
                if buf is not None:
                    buf[b] = BAD_PAGE_INDEX
            self._pages[lg] = pages[:new_nb]

    def _raise_history(self, hist: i64) -> None:
        """Sets history and releases the SWA pages that just became stale; scratch ranges
        shrink with it (their slots are freed once a range empties)."""
        self._history = hist
        ctx = self._ctx
        if len(ctx.swa_groups) == 0:
            return
        if self._scr_any:
            self._shrink_scratch(hist)
        for lg in ctx.swa_groups:
            lc = ctx.life_cycles[lg]
            e = lc.stale_end(hist)
            old = self._stale_end[lg]
            if e <= old:
                continue
            s = lc.stale_beg(hist)
            storage = ctx.storage
            pages = self._pages[lg]
            buf = self._index_bufs[lg]
            for b in range(max(old, s), e):
                p = pages[b]
                if p != NIL:
                    pages[b] = NIL
                    if buf is not None:
                        buf[b] = BAD_PAGE_INDEX
                    if self._status == ACTIVE:
                        storage.release_lock(p)
                    else:
                        storage.release_hold(p)
            self._stale_end[lg] = e

    def _shrink_scratch(self, hist: i64) -> None:
        """History rose at the same capacity: the scratch ranges only shrink (no allocation)."""
        ctx = self._ctx
        begs: list[int] = [0] * ctx.num_groups
        ends: list[int] = [0] * ctx.num_groups
        for lg in ctx.swa_groups:
            b, e = self._scratch_range(lg, self._capacity, hist)
            # Never grow a range here; it may only lose blocks from its front.
            if b < self._scr_beg[lg]:
                b = self._scr_beg[lg]
            if e > self._scr_end[lg]:
                e = self._scr_end[lg]
            if e < b:
                e = b
            begs[lg] = b
            ends[lg] = e
        if self._status == ACTIVE:
            self._apply_scratch(begs, ends)
            return
        any_range = False
        for lg in ctx.swa_groups:
            if ends[lg] > begs[lg]:
                self._scr_beg[lg] = begs[lg]
                self._scr_end[lg] = ends[lg]
                any_range = True
            else:
                self._scr_beg[lg] = 0
                self._scr_end[lg] = 0
        self._scr_any = any_range

    # ---- commit ----------------------------------------------------------------------------------
    def commit(self, tokens: Sequence[TokenIdExt]) -> None:
        if not self._committing:
            raise LogicError("commit after stop_committing() is not allowed")
        if self._status != ACTIVE:
            self._require_active("commit")
        n: i64 = len(tokens)
        if n == 0:
            return
        store = self._tokens
        old: i64 = store.count()
        if old + n > self._capacity:
            raise ValueError(
                f"tokens: committing {n} tokens would pass capacity ({old} + {n} > {self._capacity})"
            )
        if n == 1:
            t = tokens[0]
            if type(t) is int and 0 <= t < TOKEN_ID_LIMIT:
                # Fast path of a decode step.
                store.ids = append(store.ids, t)
                new1: i64 = old + 1
                if new1 % self._tpb == 0:
                    self._publish(new1 // self._tpb - 1)
                if new1 > self._history:
                    self._raise_history(new1)
                return
            check_token(t, "tokens")
            store.append(t)
        else:
            store.extend_checked(as_token_list(tokens, "tokens"), "tokens")
        tpb = self._ctx.tokens_per_block
        new: i64 = old + n
        for b in range(old // tpb, new // tpb):
            self._publish(b)
        if new > self._history:
            self._raise_history(new)

    def _publish(self, b: i64) -> None:
        parent = self._last_node
        if parent is None or not parent.alive:
            # The chain was pruned under us (its pages were dropped): later blocks cannot be found.
            self._last_node = None
            return
        ctx = self._ctx
        tpb = ctx.tokens_per_block
        self._last_node = ctx.tree.insert(parent, self._block_key(parent, b * tpb, (b + 1) * tpb), tpb, self._pages, b)

    def _block_key(self, parent: BlockNode, beg: i64, end: i64) -> bytes:
        tree = self._ctx.tree
        if self._tokens.has_bytes(beg, end):
            return tree.child_key(parent, pack_block(self._tokens.slice(beg, end)))
        off = self._tokens.prefix_tokens
        return tree.ids_key(parent, self._tokens.ids, beg - off, end - off)

    def stop_committing(self) -> None:
        """Ends committing; a trailing partial block is published so it stays reusable."""
        if self._status == CLOSED or not self._committing:
            return
        self._committing = False
        ctx = self._ctx
        tpb = ctx.tokens_per_block
        n = self._tokens.count()
        rem = n % tpb
        parent = self._last_node
        if rem == 0 or parent is None or not parent.alive:
            return
        b = n // tpb
        if b == self._cow_block:
            return  # these tokens are already in the tree (the donor's block)
        ctx.tree.insert(parent, self._block_key(parent, b * tpb, n), rem, self._pages, b)

    # ---- suspend / resume / close --------------------------------------------------------------------
    def suspend(self) -> None:
        self._require_active("suspend")
        storage = self._ctx.storage
        # Scratch slots are freed (their bytes are never needed again); the ranges stay and
        # get fresh slots on resume.
        self._release_scratch_slots()
        if storage.last_level > 0:
            # With a colder level, HELD pages become evictable (they may move, never be dropped).
            for lg in range(self._ctx.num_groups):
                for p in self._pages[lg]:
                    if p != NIL:
                        storage.lock_to_hold(p)
        else:
            locks = storage.pages.locks
            holds = storage.pages.holds
            for lg in range(self._ctx.num_groups):
                for p in self._pages[lg]:
                    if p != NIL:
                        locks[p] -= 1
                        holds[p] += 1
        self._status = SUSPENDED

    def _all_pages(self) -> list[i64]:
        out: list[i64] = []
        for lg in range(self._ctx.num_groups):
            for p in self._pages[lg]:
                if p != NIL:
                    out.append(p)
        return out

    def _check_lost(self, lost: list[i64]) -> None:
        """Raises DataIntegrityError naming the blocks whose pages lost their bytes."""
        pages = self._ctx.storage.pages
        if not lost:
            for lg in range(self._ctx.num_groups):
                for p in self._pages[lg]:
                    if p != NIL and pages.level[p] == LEVEL_LOST:
                        lost.append(p)
        if not lost:
            return
        self._lost_data = True
        names: list[str] = []
        for lg in range(self._ctx.num_groups):
            pl = self._pages[lg]
            for b in range(len(pl)):
                if pl[b] in lost:
                    names.append(f"block {b} (layer group {lg})")
        raise DataIntegrityError(
            f"KV cache {self.id!r}: stored bytes of {', '.join(names)} failed their checksum; "
            "the pages were dropped and the cache can only be closed"
        )

    def resume(self, cuda_stream: object = None) -> bool:
        return self._resume(cuda_stream, True)

    def _batch_need(self, cap: i64, hist: i64) -> list[int]:
        """Level-0 slots per pool group that admitting this (suspended, just adopted) cache at
        (cap, hist) takes: its pages still below level 0, its copy-on-write copies, new blocks."""
        ctx = self._ctx
        table = ctx.storage.pages
        if self._scratch_on and len(ctx.swa_groups) > 0:
            begs, ends, extra = self._plan_scratch(cap, hist)
            need = self._grow_need(div_up(self._capacity, self._tpb), div_up(cap, self._tpb), hist, begs, ends)
            for pg in range(len(need)):
                need[pg] += extra[pg]
        else:
            need = self._grow_need(div_up(self._capacity, self._tpb), div_up(cap, self._tpb), hist)
        cow = self._cow_block
        for lg in range(ctx.num_groups):
            pl = self._pages[lg]
            for b in range(len(pl)):
                p = pl[b]
                if p == NIL:
                    continue
                if table.level[p] != 0:
                    need[table.pool_group[p]] += 1
                if b == cow:
                    need[table.pool_group[p]] += 1
        return need

    def _resume(self, cuda_stream: object, gate: bool) -> bool:
        if self._status == ACTIVE:
            raise LogicError("resume: the cache is already ACTIVE")
        if self._status == CLOSED:
            raise LogicError("resume: the cache is CLOSED")
        if self._lost_data:
            raise LogicError("resume: this cache lost data to a failed checksum; only close() is allowed")
        ctx = self._ctx
        storage = ctx.storage
        num_pg = storage.num_pool_groups
        if gate:
            for pg in range(num_pg):
                if storage.utilization(0, pg) > ctx.max_util_for_resume:
                    return False
        self._check_lost([])
        cow = self._cow_block
        # Ask for priorities before anything moves: a bad callback answer changes nothing.
        cow_prios = [self._priority(cow, lg) for lg in range(ctx.num_groups)] if cow >= 0 else []
        table = storage.pages
        need: list[int] = [0] * num_pg
        cow_need: list[int] = [0] * num_pg
        for lg in range(ctx.num_groups):
            for p in self._pages[lg]:
                if p != NIL and table.level[p] != 0:
                    need[table.pool_group[p]] += 1
        if cow >= 0:
            for lg in range(ctx.num_groups):
                if self._pages[lg][cow] != NIL:
                    cow_need[ctx.lg_pool_group[lg]] += 1
        if self._scr_any:
            # Scratch slots were freed on suspend; the ranges get fresh ones (made room for
            # together with the copy-on-write copies, after the promotion).
            for lg in ctx.swa_groups:
                n_scr: i64 = self._scr_end[lg] - self._scr_beg[lg]
                if n_scr > 0:
                    cow_need[ctx.lg_pool_group[lg]] += ctx.layout.layer_groups[lg].scratch_slots(n_scr)
        if sum(need) + sum(cow_need) > 0:
            # Something moves or is copied: the pages are pinned for the whole operation. (A
            # cache whose pages all sit on level 0 skips this: the usual case right after
            # admission.)
            mine = self._all_pages()
            for p in mine:
                storage.pin(p)
            try:
                for pg in range(num_pg):
                    total = need[pg] + cow_need[pg]
                    if total > 0 and storage.capacity_for(0, pg, mine) < total:
                        return False
                moved, lost = storage.promote(mine, 0, True)
                self._check_lost(lost)
                if not moved:
                    return False
                for pg in range(num_pg):
                    if cow_need[pg] > 0 and not storage.make_room(0, pg, cow_need[pg]):
                        return False
                if cow >= 0:
                    for lg in range(ctx.num_groups):
                        donor = self._pages[lg][cow]
                        if donor == NIL:
                            continue
                        p = storage.new_page(0, ctx.lg_pool_group[lg], lg, cow_prios[lg])
                        storage.copy_page(p, donor)
                        table.holds[p] = 1
                        table.pinned[p] = 1
                        self._pages[lg][cow] = p
                        mine.append(p)
                        mine.remove(donor)
                        table.pinned[donor] -= 1
                        storage.release_hold(donor)
                    self._cow_block = -1
            finally:
                for p in mine:
                    storage.unpin(p)
        for lg in range(ctx.num_groups):
            pages = self._pages[lg]
            storage.holds_to_locks(pages)
            buf = self._index_bufs[lg]
            if buf is not None:
                for b in range(len(pages)):
                    p = pages[b]
                    if p != NIL:
                        buf[b] = table.slot[p]
        if self._scr_any:
            self._apply_scratch([x for x in self._scr_beg], [x for x in self._scr_end])
        self._status = ACTIVE
        return True

    def prefetch(self, level: int) -> bool:
        """Moves a suspended cache's pages up to `level` as far as room allows; True when all of
        them are there."""
        if self._status != SUSPENDED:
            raise LogicError("prefetch needs a SUSPENDED cache")
        if self._lost_data:
            raise LogicError("prefetch: this cache lost data to a failed checksum; only close() is allowed")
        _check_count(level, "level")
        storage = self._ctx.storage
        if level >= storage.num_levels:
            raise ValueError(f"level {level} does not exist (levels: {storage.num_levels})")
        self._check_lost([])
        moved, lost = storage.promote(self._all_pages(), level, False)
        self._check_lost(lost)
        return moved

    def close(self) -> None:
        """Releases everything (idempotent). Committed blocks stay reusable in the tree."""
        if self._status == CLOSED:
            return
        self.stop_committing()
        storage = self._ctx.storage
        active = self._status == ACTIVE
        self._release_scratch_slots()
        self._scr_any = False
        for lg in range(self._ctx.num_groups):
            # Tail first: the least recently released pages are evicted first, and losing a
            # chain's tail keeps its prefix reusable while losing its head loses everything.
            storage.release_all_reversed(self._pages[lg], active)
            self._pages[lg] = vec[i64]()
            buf = self._index_bufs[lg]
            if buf is not None:
                for i in range(len(buf)):
                    buf[i] = BAD_PAGE_INDEX
                self._index_bufs[lg] = None
        self._status = CLOSED
        self._cow_block = -1
        self._last_node = None
        del self._ctx.open_caches[self._serial]

    # ---- page indices ----------------------------------------------------------------------------
    def _slot_or_bad(self, lg: i64, b: i64, level0_only: bool) -> i64:
        p = self._pages[lg][b]
        if p == NIL or b == self._cow_block:
            return BAD_PAGE_INDEX
        pages = self._ctx.storage.pages
        if level0_only and pages.level[p] != 0:
            return BAD_PAGE_INDEX
        return pages.slot[p]

    def get_base_page_indices(self, layer_group_id: int, beam: int = 0) -> array[int]:
        self._check_group(layer_group_id)
        self._check_beam(beam)
        out = array("i")
        for b in range(len(self._pages[layer_group_id])):
            out.append(self._slot_or_bad(layer_group_id, b, True))
        return out

    def set_base_page_index_buf(self, beam: int, layer_group_id: int, buf: object) -> None:
        """Keeps a caller-owned int32 buffer equal to `get_base_page_indices` (None detaches)."""
        self._check_beam(beam)
        self._check_group(layer_group_id)
        if buf is None:
            self._index_bufs[layer_group_id] = None
            return
        try:
            mv = memoryview(buf)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError("buf must support the buffer protocol (e.g. a numpy int32 array)") from None
        if mv.readonly:
            raise ValueError("buf must be writable")
        if mv.itemsize != 4 or mv.format.lstrip("@=<") not in ("i", "l"):
            raise TypeError(f"buf must hold int32 entries, got format {mv.format!r}")
        if not mv.c_contiguous:
            raise ValueError("buf must be contiguous")
        mv = mv.cast("B").cast("i")
        nb = len(self._pages[layer_group_id])
        if len(mv) < nb:
            raise ValueError(f"buf holds {len(mv)} entries; the cache has {nb} blocks")
        for b in range(len(mv)):
            mv[b] = self._slot_or_bad(layer_group_id, b, True) if b < nb else BAD_PAGE_INDEX
        self._index_bufs[layer_group_id] = mv

    def get_aggregated_page_indices(
        self, layer_group_id: int, beam: int = 0, valid_only: bool = False
    ) -> list[int]:
        self._check_group(layer_group_id)
        self._check_beam(beam)
        out: list[int] = []
        for b in range(len(self._pages[layer_group_id])):
            s = self._slot_or_bad(layer_group_id, b, False)
            if s != BAD_PAGE_INDEX or not valid_only:
                out.append(s)
        return out

    def commit_pending_stats(self) -> KVCacheStatsDelta:
        d = KVCacheStatsDelta(self._d_alloc_total, self._d_alloc_new, self._d_reused, self._d_missed)
        self._d_alloc_total = 0
        self._d_alloc_new = 0
        self._d_reused = 0
        self._d_missed = 0
        return d

    # ---- internal accessors (invariant checks) ------------------------------------------------
    def _page_lists(self) -> list[list[int]]:
        return [list(v) for v in self._pages]
