"""KVCacheManager: the entry point. Builds the layout, the storage levels and the reuse tree,
creates caches, answers layout questions and checks its own invariants."""

from __future__ import annotations

from typing import Iterable, Sequence

from librt.vecs import vec
from mypy_extensions import i64

from .._backends._host import select_backend
from .._block_radix_tree import BlockRadixTree
from .._common import BufferId, PageIndexMode, TokenIdExt, div_up
from .._config import (
    DiskCacheTierConfig,
    KVCacheManagerConfig,
    KVCacheRequest,
    ReuseScope,
    check_reuse_scope,
    validate_config,
    validate_pool_ratio,
)
from .._block_radix_tree import ReuseMatch
from .._exceptions import DataIntegrityError, LogicError
from .._life_cycle_registry import LifeCycleRegistry
from .._page import NIL
from .._stats import AggregatedPageDesc, IterationStats, StorageStatistics
from .._storage._layout import BufferLayout, StorageLayout
from .._quota import layer_group_weights, level0_floors
from .._storage_manager import KIND_DISK, KIND_MEMORY, DiskStore, StorageManager
from .._tokens import as_token_list
from ._context import CacheContext
from ._index import PageIndexConverter
from ._kv_cache import ACTIVE, KVCache, PriorityCallback, _check_count


class KVCacheManager:
    def __init__(self, config: KVCacheManagerConfig) -> None:
        config = validate_config(config)
        self._config = config
        registry = LifeCycleRegistry(config.layers, config.tokens_per_block)
        ratio = validate_pool_ratio(config.initial_pool_ratio, registry.num_groups)
        self._registry = registry
        layout = StorageLayout(config, registry)
        self._layout = layout
        backend = select_backend(config.backend)
        self._backend_name = backend.name
        quotas = [t.quota for t in config.cache_tiers]
        kinds = [KIND_DISK if isinstance(t, DiskCacheTierConfig) else KIND_MEMORY for t in config.cache_tiers]
        weights = layer_group_weights(config, registry, layout, ratio)
        floors = level0_floors(config, registry, layout)
        if floors is not None:
            need = sum(floors[i] * layout.pool_groups[i].slot_size for i in range(len(floors)))
            if need > quotas[0]:
                raise ValueError(
                    f"constraints: the largest batch needs {need} bytes on level 0, more than its quota {quotas[0]}"
                )
        disk_path = ""
        for t in config.cache_tiers:
            if isinstance(t, DiskCacheTierConfig):
                disk_path = t.path

        def make_disk(record_sizes: list[int], num_slots: int) -> DiskStore:
            from .._backends._disk import DiskLevel

            return DiskLevel(disk_path, record_sizes, num_slots)

        storage = StorageManager(layout, quotas, kinds, backend, weights, floors, make_disk)
        tree = BlockRadixTree(
            config.tokens_per_block,
            registry.life_cycles,
            storage,
            config.enable_partial_reuse,
            config.reuse_match_backoff,
        )
        self._ctx = CacheContext(config, registry, layout, storage, tree)
        self._converters: dict[tuple[int, str], PageIndexConverter] = {}

    # ---- properties ----------------------------------------------------------------------------
    @property
    def tokens_per_block(self) -> int:
        return self._config.tokens_per_block

    @property
    def layer_grouping(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(ids) for ids in self._registry.group_layers)

    @property
    def backend(self) -> str:
        return self._backend_name

    @property
    def num_open_caches(self) -> int:
        return len(self._ctx.open_caches)

    def _check_alive(self) -> None:
        if self._ctx.shut_down:
            raise LogicError("the manager was shut down")

    # ---- caches --------------------------------------------------------------------------------
    def create_kv_cache(
        self,
        reuse_scope: object = None,
        input_tokens: Sequence[TokenIdExt] | None = None,
        id: object = None,
        custom_priority_callback: PriorityCallback | None = None,
    ) -> KVCache:
        """A SUSPENDED cache holding the longest reusable prefix of `input_tokens`."""
        self._check_alive()
        scope = check_reuse_scope(reuse_scope)
        if custom_priority_callback is not None and not callable(custom_priority_callback):
            raise TypeError("custom_priority_callback must be callable or None")
        ctx = self._ctx
        tree = ctx.tree
        match = None
        seq: list[TokenIdExt] = []
        all_int = True
        if input_tokens is not None:
            # Matching validates every token: a bad one raises before anything changes.
            seq = as_token_list(input_tokens, "input_tokens")
            match, all_int = tree.match(scope, seq)
        root = tree.root_for(scope, True)
        kv = KVCache(ctx, id, scope, custom_priority_callback)
        if match is not None:
            match.root = root
            kv._adopt(match, seq, all_int)
            missed = div_up(len(seq), ctx.tokens_per_block) - div_up(match.length, ctx.tokens_per_block)
            kv._d_missed += missed
            for lg in range(ctx.num_groups):
                ctx.st_missed[lg] += missed
        else:
            kv._last_node = root
        if ctx.cross and not seq:
            # A cross cache created without key tokens never shares: no chain to publish on.
            kv._last_node = None
        ctx.open_caches[kv._serial] = kv
        return kv

    def create_kv_caches(
        self,
        requests: Sequence[KVCacheRequest],
        cuda_stream: object = None,
        all_or_nothing: object = False,
    ) -> list[KVCache | None]:
        """Batch admission (SPEC 4.7): every member is matched against one tree state and every
        matched page is claimed (held and pinned) before any member onboards, copies or
        allocates, so no member can evict what another reuses. Then, member by member: onboard,
        copy-on-write, allocate, set capacity/history; each result is ACTIVE, or None (holding
        nothing) when the member does not fit. With `all_or_nothing`, one misfit makes every
        result None and changes nothing."""
        self._check_alive()
        if not isinstance(all_or_nothing, bool):
            raise TypeError(f"all_or_nothing must be a bool, got {type(all_or_nothing).__name__}")
        aon: bool = all_or_nothing
        reqs_obj: object = requests
        if isinstance(reqs_obj, (str, bytes, bytearray)) or not isinstance(reqs_obj, Sequence):
            raise TypeError(f"requests must be a sequence of KVCacheRequest, got {type(reqs_obj).__name__}")
        ctx = self._ctx
        tree = ctx.tree
        storage = ctx.storage
        tpb = ctx.tokens_per_block
        reqs = list(requests)
        # ---- validation and phase 1a: match everything against the same tree state -------------
        scopes: list[ReuseScope | None] = []
        seqs: list[list[TokenIdExt]] = []
        matches: list[ReuseMatch] = []
        all_ints: list[bool] = []
        caps: list[int] = []
        hists: list[int] = []
        for i in range(len(reqs)):
            req = reqs[i]
            where = f"requests[{i}]"
            if not isinstance(req, KVCacheRequest):
                raise TypeError(f"{where} must be a KVCacheRequest, got {type(req).__name__}")
            # Read as plain objects: compiled code would otherwise check the declared field
            # types on access, with a message that does not name the field.
            f_tokens: object = getattr(req, "input_tokens")
            f_scope: object = getattr(req, "reuse_scope")
            f_cap: object = getattr(req, "capacity")
            f_hist: object = getattr(req, "history_length")
            try:
                scope = check_reuse_scope(f_scope)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{where}.{exc}") from None
            seq = as_token_list(f_tokens, f"{where}.input_tokens")
            try:
                match, all_int = tree.match(scope, seq)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{where}: {exc}") from None
            n: int = match.length
            cap = len(seq) if f_cap is None else _check_count(f_cap, f"{where}.capacity")
            hist = n if f_hist is None else _check_count(f_hist, f"{where}.history_length")
            if hist < n:
                raise ValueError(f"{where}.history_length {hist} is below the reused length {n}")
            if hist > cap:
                if f_hist is None:
                    raise ValueError(f"{where}.capacity {cap} is below the reused length {n}")
                raise ValueError(f"{where}.history_length {hist} exceeds capacity {cap}")
            if ctx.scratch_on and ctx.swa_groups and cap != n and hist > n:
                # The scratch resize protocol (SPEC 4.8) seen from the member's reused state.
                raise ValueError(
                    f"{where}.history_length {hist}: with SWA scratch reuse a member that changes its "
                    f"capacity needs history_length <= its reused length {n}"
                )
            scopes.append(scope)
            seqs.append(seq)
            matches.append(match)
            all_ints.append(all_int)
            caps.append(cap)
            hists.append(hist)
        count = len(reqs)
        if aon and not self._batch_fits(matches, caps, hists):
            return [None] * count
        # ---- phase 1b: claim (hold and pin) every matched page of every member -------------------
        start_stats = self._stat_snapshot()
        caches: list[KVCache] = []
        claims: list[list[int]] = []
        stat_deltas: list[list[int]] = []
        g = ctx.num_groups
        for i in range(count):
            before = self._stat_snapshot()
            match = matches[i]
            match.root = tree.root_for(scopes[i], True)
            kv = KVCache(ctx, getattr(reqs[i], "id"), scopes[i], None)
            kv._adopt(match, seqs[i], all_ints[i])
            missed = div_up(len(seqs[i]), tpb) - div_up(match.length, tpb)
            kv._d_missed += missed
            for lg in range(g):
                ctx.st_missed[lg] += missed
            after = self._stat_snapshot()
            stat_deltas.append([after[k] - before[k] for k in range(len(after))])
            ctx.open_caches[kv._serial] = kv
            mine = [int(p) for p in kv._all_pages()]
            for p in mine:
                storage.pin(p)
            caches.append(kv)
            claims.append(mine)
        # ---- phase 2: member by member ------------------------------------------------------------
        out: list[KVCache | None] = [None] * count
        done = 0
        try:
            while done < count:
                i = done
                kv = caches[i]
                ok = not (aon and any(r is None for r in out[:i]))
                if ok:
                    need = kv._batch_need(caps[i], hists[i])
                    mine_pages = kv._all_pages()
                    for pg in range(storage.num_pool_groups):
                        if need[pg] > 0 and storage.capacity_for(0, pg, mine_pages) < need[pg]:
                            ok = False
                if ok:
                    try:
                        ok = kv._resume(cuda_stream, False)
                    except DataIntegrityError:
                        ok = False
                if ok:
                    ok = kv._resize(caps[i], hists[i])
                # The member's claims end with it: a partial source shared with no later member
                # is released right after its last copier.
                for p in claims[i]:
                    storage.unpin(p)
                claims[i] = []
                done += 1
                if ok:
                    out[i] = kv
                else:
                    self._discard_member(kv, stat_deltas[i])
        except BaseException:
            # An unexpected error: release whatever is still claimed (nothing leaks a pin) and
            # close every member, admitted or not; the caller gets none of them.
            for j in range(done, count):
                for p in claims[j]:
                    storage.unpin(p)
                caches[j].close()
            for j in range(done):
                caches[j].close()
            raise
        if aon and any(r is None for r in out):
            # Only reached when the up-front check was too optimistic: undo the admitted members.
            for j in range(count):
                kvj = out[j]
                if kvj is not None:
                    kvj._committing = False
                    kvj.close()
            self._restore_stats(start_stats)
            return [None] * count
        return out

    def _stat_vecs(self) -> tuple[vec[i64], vec[i64], vec[i64], vec[i64], vec[i64]]:
        """The per-layer-group iteration counters a batch admission snapshots and takes back."""
        ctx = self._ctx
        return (ctx.st_allocated, ctx.st_new, ctx.st_reused_full, ctx.st_reused_partial, ctx.st_missed)

    def _restore_stats(self, snap: list[int]) -> None:
        g = self._ctx.num_groups
        vecs = self._stat_vecs()
        for k in range(len(vecs)):
            v = vecs[k]
            for lg in range(g):
                v[lg] = snap[k * g + lg]

    def _stat_snapshot(self) -> list[int]:
        out: list[int] = []
        for v in self._stat_vecs():
            for x in v:
                out.append(int(x))
        return out

    def _discard_member(self, kv: KVCache, stat_delta: list[int]) -> None:
        """Closes a batch member that did not make it and takes back the reuse it counted. It
        publishes nothing (its copy of a partial block stays private and is freed)."""
        kv._committing = False
        kv.close()
        if not stat_delta:
            return
        g = self._ctx.num_groups
        vecs = self._stat_vecs()
        for k in range(len(vecs)):
            v = vecs[k]
            for lg in range(g):
                v[lg] -= stat_delta[k * g + lg]

    def _batch_fits(self, matches: list[ReuseMatch], caps: list[int], hists: list[int]) -> bool:
        """Whether the whole batch fits on level 0 at once, judged before anything changes: the
        claimed pages cannot be evicted, those below level 0 must come up, and every member's
        copy-on-write copies and new blocks need slots."""
        ctx = self._ctx
        storage = ctx.storage
        table = storage.pages
        tree = ctx.tree
        tpb = ctx.tokens_per_block
        g = ctx.num_groups
        npg = storage.num_pool_groups
        nlv = storage.num_levels
        need = [0] * npg
        claimed: set[int] = set()
        for i in range(len(matches)):
            match = matches[i]
            n = match.length
            nb = div_up(n, tpb)
            new_nb = div_up(caps[i], tpb)
            for lg in range(g):
                lc = ctx.life_cycles[lg]
                pg = ctx.lg_pool_group[lg]
                s = lc.stale_beg(n)
                e = lc.stale_end(n)
                for b in range(nb):
                    if s <= b < e:
                        continue
                    p = tree.page_of(match.nodes[b], lg)
                    claimed.add(p)
                    if match.partial and b == nb - 1:
                        need[pg] += 1
                hs = lc.stale_beg(hists[i])
                he = lc.stale_end(hists[i])
                # SWA scratch blocks (SPEC 4.8) take their shared scratch slots instead of pages.
                ss = 0
                se = 0
                if ctx.scratch_on and ctx.windowed[lg]:
                    x = max(0, caps[i] - ctx.max_rewind)
                    ss = max(lc.stale_beg(x), div_up(hists[i], tpb))
                    se = min(lc.stale_end(x), new_nb)
                    if se > ss:
                        need[pg] += self._layout.layer_groups[lg].scratch_slots(se - ss)
                for b in range(nb, new_nb):
                    if not (ctx.windowed[lg] and (hs <= b < he or ss <= b < se)):
                        need[pg] += 1
        # Claimed pages per (level, pool group): how many are evictable now, how many of those HELD.
        cl_listed = [0] * (nlv * npg)
        cl_held = [0] * (nlv * npg)
        cl_at = [0] * (nlv * npg)
        for p in claimed:
            lv = table.level[p]
            pg = table.pool_group[p]
            if lv < 0:
                continue
            if lv != 0:
                need[pg] += 1
            k = lv * npg + pg
            cl_at[k] += 1
            if table.listed[p]:
                cl_listed[k] += 1
                if table.holds[p] > 0:
                    cl_held[k] += 1
        for pg in range(npg):
            if need[pg] == 0:
                continue
            listed = storage.num_evictable(0, pg) - cl_listed[pg]
            held = table.held_evictable_count(0, pg) - cl_held[pg]
            cap = storage.num_free(0, pg) + listed - held
            if held > 0:
                room = 0
                if nlv > 1 and storage.levels[0].kind == KIND_MEMORY and storage.levels[1].kind == KIND_MEMORY:
                    room += cl_at[npg + pg]
                for lv in range(1, nlv):
                    k = lv * npg + pg
                    room += (
                        storage.num_free(lv, pg)
                        + storage.num_evictable(lv, pg)
                        - cl_listed[k]
                        - (table.held_evictable_count(lv, pg) - cl_held[k])
                    )
                cap += min(held, room)
            if cap < need[pg]:
                return False
        return True

    def probe_reuse(self, reuse_scope: object = None, input_tokens: Sequence[TokenIdExt] | None = None) -> int:
        """How many tokens `create_kv_cache` would reuse now (changes nothing)."""
        self._check_alive()
        scope = check_reuse_scope(reuse_scope)
        if input_tokens is None:
            return 0
        seq = as_token_list(input_tokens, "input_tokens")
        return self._ctx.tree.match(scope, seq)[0].length

    def _require_no_open_caches(self, what: str) -> None:
        n = len(self._ctx.open_caches)
        if n:
            raise LogicError(f"{what}: {n} KV cache(s) still open")

    def clear_reusable_blocks(self) -> None:
        self._check_alive()
        self._require_no_open_caches("clear_reusable_blocks")
        self._ctx.tree.clear()

    def shutdown(self) -> None:
        if self._ctx.shut_down:
            return
        self._require_no_open_caches("shutdown")
        self._ctx.tree.clear()
        self._ctx.storage.release_memory()
        self._ctx.shut_down = True

    # ---- layout ------------------------------------------------------------------------------------
    def _buffer(self, layer_id: int, role: str) -> BufferLayout:
        if not isinstance(layer_id, int):
            raise TypeError("layer_id must be an int")
        if not isinstance(role, str):
            raise TypeError("role must be a str")
        return self._layout.buffer(layer_id, role)

    def get_layer_group_id(self, layer_id: int) -> int:
        if not isinstance(layer_id, int):
            raise TypeError("layer_id must be an int")
        g = self._registry.layer_to_group.get(layer_id)
        if g is None:
            raise ValueError(f"layer_id {layer_id} is not a configured layer")
        return g

    def supports_index_mode(self, mode: PageIndexMode) -> bool | None:
        """True for both modes, except SHARED with swa_scratch_reuse configured: None then
        (scratch blocks need PER_LAYER; ask each cache's `supports_index_mode`)."""
        if not isinstance(mode, PageIndexMode):
            raise TypeError("mode must be a PageIndexMode")
        if mode is PageIndexMode.SHARED and self._ctx.scratch_on:
            return None
        return True

    def get_mem_pool_base_address(
        self, layer_id: int, role: str, index_mode: PageIndexMode | None = None
    ) -> int:
        self._check_alive()
        bl = self._buffer(layer_id, role)
        if index_mode is not None and not isinstance(index_mode, PageIndexMode):
            raise TypeError("index_mode must be a PageIndexMode or None")
        if index_mode is None and self._ctx.scratch_on:
            raise ValueError(
                "index_mode: with swa_scratch_reuse configured the default (SHARED) is ambiguous; pass "
                "PageIndexMode.PER_LAYER (or an explicit SHARED for caches without scratch slots)"
            )
        pg = self._layout.layer_groups[bl.layer_group].pool_group
        base = self._ctx.storage.pool_addresses[pg][bl.pool_index]
        if index_mode is PageIndexMode.PER_LAYER:
            return base
        return base + bl.layer_offset * bl.expanded_size

    def get_page_stride(self, layer_id: int, role: str) -> int:
        return self._buffer(layer_id, role).size

    def get_page_index_upper_bound(self, layer_id: int, role: str) -> int:
        bl = self._buffer(layer_id, role)
        pg = self._layout.layer_groups[bl.layer_group].pool_group
        scale = self._layout.layer_groups[bl.layer_group].pools[bl.pool_index].scale
        return self._ctx.storage.num_slots(0, pg) * scale * bl.expansion

    def get_page_index_converter(self, layer_id: int, role: str) -> PageIndexConverter:
        bl = self._buffer(layer_id, role)
        conv = self._converters.get((layer_id, role))
        if conv is None:
            scale = self._layout.layer_groups[bl.layer_group].pools[bl.pool_index].scale
            conv = PageIndexConverter(scale, bl.expansion, bl.layer_offset, bl.scratch_pages_per_block)
            self._converters[(layer_id, role)] = conv
        return conv

    def get_aggregated_pages(self, buffers: Iterable[BufferId | tuple[int, str]]) -> list[AggregatedPageDesc]:
        """Byte ranges per block for a set of buffers; adjacent buffers of one slot merge."""
        self._check_alive()
        chosen: dict[tuple[int, int], list[BufferLayout]] = {}
        seen: set[tuple[int, str]] = set()
        for item in buffers:
            layer_id, role = item[0], item[1]
            bl = self._buffer(layer_id, role)
            if (layer_id, role) in seen:
                raise ValueError(f"buffers: ({layer_id}, {role!r}) is listed twice")
            seen.add((layer_id, role))
            chosen.setdefault((bl.layer_group, bl.pool_index), []).append(bl)
        out: list[AggregatedPageDesc] = []
        storage = self._ctx.storage
        for (lg, pool_index), bls in sorted(chosen.items()):
            pg = self._layout.layer_groups[lg].pool_group
            pool = self._layout.layer_groups[lg].pools[pool_index]
            base = storage.pool_addresses[pg][pool_index]
            stride = pool.record_size
            bls.sort(key=lambda b: b.layer_offset)
            run: list[BufferLayout] = []
            for bl in bls:
                if run and run[-1].layer_offset + 1 != bl.layer_offset:
                    out.append(self._agg_desc(base, stride, lg, run))
                    run = []
                run.append(bl)
            if run:
                out.append(self._agg_desc(base, stride, lg, run))
        return out

    @staticmethod
    def _agg_desc(base: int, stride: int, lg: int, run: list[BufferLayout]) -> AggregatedPageDesc:
        first = run[0]
        return AggregatedPageDesc(
            base + first.layer_offset * first.expanded_size,
            sum(b.expanded_size for b in run),
            stride,
            lg,
            [BufferId(b.layer_id, b.role) for b in run],
        )

    # ---- quotas and statistics --------------------------------------------------------------------
    def _check_level(self, level: int) -> int:
        if not isinstance(level, int):
            raise TypeError("level must be an int")
        if not 0 <= level < self._ctx.storage.num_levels:
            raise ValueError(f"level {level} does not exist (levels: {self._ctx.storage.num_levels})")
        return level

    def get_quota(self, level: int) -> int:
        """Bytes in force at `level` (whole slots of every pool group)."""
        return self._ctx.storage.quota_in_force(self._check_level(level))

    def resize(self, level: int, quota: int) -> bool:
        """Changes a level's byte quota; every cache must be suspended. Shrinking moves or drops
        what no longer fits (HELD pages are never dropped): False, and no change, if they cannot."""
        self._check_alive()
        level = self._check_level(level)
        if isinstance(quota, bool) or not isinstance(quota, int):
            raise TypeError("quota must be an int")
        if quota < 0:
            raise ValueError(f"quota must be >= 0, got {quota}")
        active = sum(1 for kv in self._ctx.open_caches.values() if kv.is_active)
        if active:
            raise LogicError(f"resize(level, quota): {active} KV cache(s) are ACTIVE; suspend them first")
        storage = self._ctx.storage
        if level == 0 and storage.floors is not None:
            need = sum(storage.floors[i] * self._layout.pool_groups[i].slot_size for i in range(storage.num_pool_groups))
            if quota < need:
                raise ValueError(f"quota: level 0 must hold the configured constraints ({need} bytes)")
        return storage.resize_level(level, quota)

    def get_storage_statistics(self, level: int = 0) -> list[StorageStatistics]:
        level = self._check_level(level)
        storage = self._ctx.storage
        out: list[StorageStatistics] = []
        for pg in range(storage.num_pool_groups):
            out.append(
                StorageStatistics(
                    pg,
                    storage.num_slots(level, pg),
                    storage.num_free(level, pg),
                    storage.num_evictable(level, pg),
                    self._layout.pool_groups[pg].slot_size,
                )
            )
        return out

    def clamp_max_seq_len_for_mem(self, batch_size: int, token_num_upper_bound: int) -> int:
        """Longest sequence (a multiple of tokens_per_block, at most the bound) of which
        `batch_size` could be held on level 0 at once."""
        for name, v in (("batch_size", batch_size), ("token_num_upper_bound", token_num_upper_bound)):
            if not isinstance(v, int):
                raise TypeError(f"{name} must be an int")
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        tpb = self.tokens_per_block
        storage = self._ctx.storage

        def fits(n_blocks: int) -> bool:
            need = [0] * storage.num_pool_groups
            length = n_blocks * tpb
            for lg, lc in enumerate(self._registry.life_cycles):
                blocks = n_blocks - (lc.stale_end(length) - lc.stale_beg(length))
                # A step may still touch the block before the window edge: keep one spare.
                if lc.is_windowed and blocks < n_blocks:
                    blocks += 1
                need[self._layout.layer_groups[lg].pool_group] += blocks * batch_size
            return all(need[pg] <= storage.num_slots(0, pg) for pg in range(storage.num_pool_groups))

        lo, hi = 0, token_num_upper_bound // tpb
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo * tpb

    def get_and_reset_iteration_stats(self) -> dict[int, IterationStats]:
        ctx = self._ctx
        out: dict[int, IterationStats] = {}
        for lg in range(ctx.num_groups):
            st = IterationStats(self._layout.layer_groups[lg].slot_size)
            st.allocated_blocks = ctx.st_allocated[lg]
            st.new_blocks = ctx.st_new[lg]
            st.reused_full_blocks = ctx.st_reused_full[lg]
            st.reused_partial_blocks = ctx.st_reused_partial[lg]
            st.missed_blocks = ctx.st_missed[lg]
            st.dropped_blocks = ctx.storage.dropped_by_group[lg]
            st.onboarded_blocks = ctx.storage.onboarded_by_group[lg]
            st.offloaded_blocks = ctx.storage.offloaded_by_group[lg]
            ctx.storage.onboarded_by_group[lg] = 0
            g = ctx.num_groups
            st.onboarded_from_level = [ctx.storage.onboarded_from_level[lv * g + lg] for lv in range(ctx.storage.num_levels)]
            for lv in range(ctx.storage.num_levels):
                ctx.storage.onboarded_from_level[lv * g + lg] = 0
            ctx.storage.offloaded_by_group[lg] = 0
            ctx.st_allocated[lg] = 0
            ctx.st_new[lg] = 0
            ctx.st_reused_full[lg] = 0
            ctx.st_reused_partial[lg] = 0
            ctx.st_missed[lg] = 0
            ctx.storage.dropped_by_group[lg] = 0
            out[lg] = st
        return out

    # ---- invariants ------------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Debug check of every bookkeeping invariant; raises AssertionError naming the first broken one."""
        from ._invariants import check_manager

        check_manager(self._ctx)
