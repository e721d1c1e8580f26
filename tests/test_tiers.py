"""Tiered storage (SPEC 2, 3, 4.5, 4.6, 5, 9): level 0 plus a host tier.

Every test that moves data checks the real bytes with the fake engine: after every resume the
engine re-reads everything the cache's layers can see.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import pytest

from kv_cache_manager_v2 import (
    AttentionLayerConfig,
    BatchDesc,
    GpuCacheTierConfig,
    HostCacheTierConfig,
    KVCache,
    KVCacheDesc,
    KVCacheManager,
    KVCacheManagerConfig,
    KVCacheStatus,
    LogicError,
    OutOfPagesError,
)

from conftest import attention
from fake_engine import FakeEngine, Step

TPB = 16
# Default layers: two full-attention layers, K and V of 512 bytes per block -> one pool group,
# one pool, 2048-byte slots.
SLOT = 2048
# Two pool groups: full attention (2 layers, 512-byte K/V -> 2048-byte slot) and SWA (window 32,
# 256-byte K/V -> 512-byte slot): different pool sizes, so two pool groups.
FULL_SLOT = 2048
SWA_SLOT = 512


def two_group_layers(window: int = 32) -> list[AttentionLayerConfig]:
    return [attention(0), attention(1), attention(2, size=256, window=window)]


def tiered_config(
    l0: int,
    host: int | None = None,
    layers: list[AttentionLayerConfig] | None = None,
    **kwargs: Any,
) -> KVCacheManagerConfig:
    """Quotas in bytes; `host=None` means level 0 only."""
    tiers: list[Any] = [GpuCacheTierConfig(quota=l0)]
    if host is not None:
        tiers.append(HostCacheTierConfig(quota=host))
    return KVCacheManagerConfig(
        tokens_per_block=TPB,
        cache_tiers=tiers,
        layers=list(layers) if layers is not None else [attention(0), attention(1)],
        backend="host",
        **kwargs,
    )


def toks(seed: int, n: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(1, 1 << 31) for _ in range(n)]


def stats(m: KVCacheManager, level: int) -> list[tuple[int, int, int, int, int]]:
    return [(s.total, s.free, s.evictable, s.available, s.slot_size) for s in m.get_storage_statistics(level)]


def all_stats(m: KVCacheManager, levels: int) -> list[list[tuple[int, int, int, int, int]]]:
    return [stats(m, lv) for lv in range(levels)]


class Harness:
    """A manager, its fake engine and the tokens each cache holds."""

    def __init__(self, cfg: KVCacheManagerConfig) -> None:
        self.cfg = cfg
        self.m = KVCacheManager(cfg)
        self.eng = FakeEngine(self.m, cfg)
        self.tokens: dict[int, list[int]] = {}
        self.levels = len(cfg.cache_tiers)

    def start(
        self,
        tokens: Sequence[int],
        cb: Callable[[int, int], int] | None = None,
        capacity: int | None = None,
    ) -> KVCache:
        """Admits a prompt: create (reuse), resume, resize, forward the rest, commit it."""
        tokens = list(tokens)
        reused_probe = self.m.probe_reuse(input_tokens=tokens)
        kv = self.m.create_kv_cache(input_tokens=tokens, custom_priority_callback=cb)
        r = kv.num_committed_tokens
        assert r == reused_probe == kv.capacity == kv.history_length
        assert kv.status == KVCacheStatus.SUSPENDED
        assert self.eng.resume(kv)
        assert kv.resize(capacity if capacity is not None else len(tokens))
        self.eng.forward([Step(kv, tokens[r:], tokens[:r])])
        kv.commit(tokens[r:])
        self.tokens[id(kv)] = tokens
        return kv

    def decode(self, kv: KVCache, new: Sequence[int]) -> None:
        hist = self.tokens[id(kv)]
        assert kv.resize(len(hist) + len(new))
        self.eng.forward([Step(kv, list(new), list(hist))])
        kv.commit(list(new))
        self.tokens[id(kv)] = hist + list(new)

    def resume_verify(self, kv: KVCache) -> None:
        assert self.eng.resume(kv)
        assert kv.status == KVCacheStatus.ACTIVE
        self.eng.verify(kv, self.tokens[id(kv)])

    def close(self, kv: KVCache) -> None:
        kv.close()
        self.eng.forget(kv)
        self.tokens.pop(id(kv), None)

    def snapshot(self, caches: Sequence[KVCache]) -> Any:
        out: list[Any] = [all_stats(self.m, self.levels), [self.m.get_quota(lv) for lv in range(self.levels)]]
        for kv in caches:
            out.append(
                (
                    kv.status,
                    kv.capacity,
                    kv.history_length,
                    kv.num_committed_tokens,
                    [list(kv.get_base_page_indices(g)) for g in range(len(self.m.layer_grouping))],
                    [kv.get_aggregated_page_indices(g) for g in range(len(self.m.layer_grouping))],
                )
            )
        return out

    def assert_empty_after_clear(self) -> None:
        """Every cache closed and the tree cleared -> every level is empty."""
        self.m.clear_reusable_blocks()
        for lv in range(self.levels):
            for s in self.m.get_storage_statistics(lv):
                assert s.free == s.total, (lv, s)
                assert s.evictable == 0, (lv, s)
                assert s.available == s.total, (lv, s)
        self.m.check_invariants()

    def shutdown(self) -> None:
        for kv_id in list(self.tokens):
            del self.tokens[kv_id]
        self.m.shutdown()


def level_of_blocks(kv: KVCache, lg: int = 0) -> list[bool]:
    """Per block: is its page on level 0 (a suspended cache shows -1 where the page is colder)."""
    return [i >= 0 for i in kv.get_base_page_indices(lg)]


# --------------------------------------------------------------------------------------------
# Suspend makes level 0 evictable; statistics
# --------------------------------------------------------------------------------------------


def test_suspend_makes_held_pages_evictable_with_a_colder_level() -> None:
    h = Harness(tiered_config(8 * SLOT, 16 * SLOT))
    assert stats(h.m, 0) == [(8, 8, 0, 8, SLOT)]
    assert stats(h.m, 1) == [(16, 16, 0, 16, SLOT)]
    kv = h.start(toks(1, 5 * TPB))
    # ACTIVE: LOCKED pages are neither free nor evictable (committed or not).
    assert stats(h.m, 0) == [(8, 3, 0, 3, SLOT)]
    kv.suspend()
    # HELD pages count as evictable when a colder level exists.
    assert stats(h.m, 0) == [(8, 3, 5, 8, SLOT)]
    assert stats(h.m, 1) == [(16, 16, 0, 16, SLOT)]
    h.resume_verify(kv)
    assert stats(h.m, 0) == [(8, 3, 0, 3, SLOT)]
    h.close(kv)
    # Closed: committed pages stay in the tree as DROPPABLE (evictable, not free).
    assert stats(h.m, 0) == [(8, 3, 5, 8, SLOT)]
    h.assert_empty_after_clear()


def test_held_pages_not_evictable_without_a_colder_level() -> None:
    h = Harness(tiered_config(8 * SLOT))
    kv = h.start(toks(2, 5 * TPB))
    kv.suspend()
    assert stats(h.m, 0) == [(8, 3, 0, 3, SLOT)]
    # and they are really not reclaimable: a 4-block sequence does not fit
    kv2 = h.m.create_kv_cache()
    assert kv2.resume()
    assert not kv2.resize(4 * TPB)
    assert kv2.resize(3 * TPB)
    h.close(kv2)
    h.resume_verify(kv)
    h.close(kv)
    h.assert_empty_after_clear()


def test_statistics_per_pool_group_with_host_tier() -> None:
    q0 = 8 * FULL_SLOT + 8 * SWA_SLOT
    h = Harness(tiered_config(q0, 2 * q0, layers=two_group_layers()))
    s0 = h.m.get_storage_statistics(0)
    assert [s.pool_group_id for s in s0] == [0, 1]
    assert [(s.total, s.slot_size) for s in s0] == [(8, FULL_SLOT), (8, SWA_SLOT)]
    assert [(s.total, s.slot_size) for s in h.m.get_storage_statistics(1)] == [(16, FULL_SLOT), (16, SWA_SLOT)]
    # 80 tokens = 5 blocks: the full group needs 5 pages; SWA (window 32) keeps 3 at history 80.
    kv = h.start(toks(3, 80))
    # SWA: 5 pages allocated at history 0; committing 80 tokens made blocks 0-2 stale: released,
    # and as committed blocks they stay in the tree (DROPPABLE, evictable)
    assert stats(h.m, 0) == [(8, 3, 0, 3, FULL_SLOT), (8, 3, 3, 6, SWA_SLOT)]
    swa_locked = 2
    kv.suspend()
    st = h.m.get_storage_statistics(0)
    assert (st[0].free, st[0].evictable, st[0].available) == (3, 5, 8)
    assert st[1].available == 8 and st[1].free + st[1].evictable == 8
    assert swa_locked == sum(1 for i in kv.get_base_page_indices(1) if i >= 0)
    for s in st:
        assert s.available == s.free + s.evictable
    h.resume_verify(kv)
    h.close(kv)
    h.assert_empty_after_clear()


def test_two_sequences_larger_than_level0_alternate() -> None:
    h = Harness(tiered_config(8 * SLOT, 16 * SLOT))
    a = h.start(toks(10, 6 * TPB - 3))
    a.suspend()
    b = h.start(toks(11, 6 * TPB - 5))
    assert 2 * 6 > 8  # together they do not fit level 0
    b.suspend()
    rng = random.Random(5)
    onboarded = 0
    for step in range(8):
        for kv in (a, b):
            h.resume_verify(kv)
            st = h.m.get_and_reset_iteration_stats()[0]
            onboarded += st.onboarded_blocks
            assert st.onboarded_from_level[0] == 0
            assert st.onboarded_blocks == st.onboarded_from_level[1]
            # grow a little (a block boundary now and then)
            h.decode(kv, [rng.randrange(1, 1000) for _ in range(3)])
            kv.suspend()
    assert onboarded > 0
    assert a.capacity == 6 * TPB - 3 + 24 and b.capacity == 6 * TPB - 5 + 24
    for kv in (a, b):
        h.resume_verify(kv)
        kv.suspend()
    h.close(a)
    h.close(b)
    h.assert_empty_after_clear()


# --------------------------------------------------------------------------------------------
# Reuse after eviction to host
# --------------------------------------------------------------------------------------------


def test_reuse_after_eviction_to_host_non_aligned_prefix() -> None:
    h = Harness(tiered_config(8 * SLOT, 16 * SLOT))
    prompt = toks(20, 4 * TPB + 11)  # 75 tokens: the last block is partial
    kv = h.start(prompt)
    h.close(kv)  # stop_committing publishes the partial tail: reusable, DROPPABLE
    assert h.m.probe_reuse(input_tokens=prompt) == 75
    # Push the DROPPABLE pages to the host tier: a fresh 8-block sequence needs all of level 0.
    filler = h.start(toks(21, 8 * TPB))
    h.m.get_and_reset_iteration_stats()
    filler.suspend()
    # nothing was dropped: there was room on the host tier
    assert h.m.probe_reuse(input_tokens=prompt) == 75
    # A new request sharing 70 tokens (4 blocks + 6 tokens of the partial block), then diverging.
    query = prompt[:70] + toks(22, 30)
    assert h.m.probe_reuse(input_tokens=query) == 70
    kv2 = h.start(query)
    st = h.m.get_and_reset_iteration_stats()[0]
    assert st.onboarded_from_level[1] >= 5  # every reused page came from the host tier
    assert st.onboarded_from_level[0] == 0
    assert st.reused_full_blocks == 4 and st.reused_partial_blocks == 1
    h.eng.verify(kv2, query)
    kv2.suspend()
    # The donor's bytes never changed (copy-on-write): the original prompt still reuses 75.
    h.resume_verify(filler)
    filler.suspend()
    kv3 = h.start(prompt + toks(23, 9))
    assert h.tokens[id(kv3)][:75] == prompt
    h.eng.verify(kv3, h.tokens[id(kv3)])
    for kv_ in (kv3, kv2, filler):
        if kv_.is_active:
            kv_.suspend()
        h.resume_verify(kv_)
        h.close(kv_)
    h.assert_empty_after_clear()


def test_probe_reuse_equals_create_reuse_from_host() -> None:
    h = Harness(tiered_config(6 * SLOT, 32 * SLOT))
    prompts = [toks(30 + i, 3 * TPB + 5 * i + 1) for i in range(5)]
    for p in prompts:
        h.close(h.start(p))
    # level 0 holds 6 slots: most of those pages were pushed to the host tier
    assert stats(h.m, 1)[0][1] < 32
    for p in prompts:
        q = p[: len(p) - 2]
        n = h.m.probe_reuse(input_tokens=q)
        assert n == len(q)
        kv = h.m.create_kv_cache(input_tokens=q)
        assert kv.num_committed_tokens == n
        assert h.eng.resume(kv)
        h.eng.verify(kv, q)
        h.close(kv)
    h.assert_empty_after_clear()


# --------------------------------------------------------------------------------------------
# Larger than level 0
# --------------------------------------------------------------------------------------------


def test_sequence_larger_than_level0_fails_cleanly() -> None:
    h = Harness(tiered_config(8 * SLOT, 64 * SLOT))
    other = h.start(toks(40, 3 * TPB))
    other.suspend()
    kv = h.start(toks(41, 5 * TPB))
    before = h.snapshot([kv, other])
    assert not kv.resize(9 * TPB)  # more than level 0 holds, whatever the host tier has
    assert h.snapshot([kv, other]) == before
    with pytest.raises(OutOfPagesError):
        kv.capacity = 9 * TPB
    assert h.snapshot([kv, other]) == before
    # exactly level 0 works: the suspended cache moves to the host tier
    h.decode(kv, toks(42, 3 * TPB))
    assert kv.capacity == 8 * TPB
    assert not any(level_of_blocks(other))
    # the manager stays usable
    kv.suspend()
    h.resume_verify(other)
    h.decode(other, toks(43, 5))
    other.suspend()
    h.resume_verify(kv)
    h.close(kv)
    h.resume_verify(other)
    h.close(other)
    h.assert_empty_after_clear()


# --------------------------------------------------------------------------------------------
# Quota changes
# --------------------------------------------------------------------------------------------


def test_quota_shrink_and_regrow_with_suspended_caches() -> None:
    h = Harness(tiered_config(8 * SLOT, 16 * SLOT))
    a = h.start(toks(50, 3 * TPB + 7))
    a.suspend()
    b = h.start(toks(51, 3 * TPB + 2))
    b.suspend()
    assert h.m.get_quota(0) == 8 * SLOT
    # shrink level 0 to 3 slots: the held pages move to the host tier
    assert h.m.resize(0, 3 * SLOT)
    h.eng.mark_all_dirty()
    assert h.m.get_quota(0) == 3 * SLOT
    assert stats(h.m, 0)[0][0] == 3
    h.m.check_invariants()
    # neither cache fits level 0 now (4 blocks each)
    assert not a.resume()
    assert a.status == KVCacheStatus.SUSPENDED
    # regrow: data still right
    assert h.m.resize(0, 10 * SLOT)
    h.eng.mark_all_dirty()
    assert h.m.get_quota(0) == 10 * SLOT
    h.resume_verify(a)
    h.decode(a, toks(52, 20))
    a.suspend()
    # shrink to exactly one cache's size, alternate
    assert h.m.resize(0, 6 * SLOT)
    h.eng.mark_all_dirty()
    for kv in (a, b, a):
        h.resume_verify(kv)
        kv.suspend()
    # host tier shrink and regrow too. Note (library behaviour, SPEC 4.5 "one batched
    # migration"): a resume moves the victims colder BEFORE its own pages come up, so the host tier
    # needs room for both at once; a swap through a full host tier is refused.
    assert h.m.resize(1, 7 * SLOT)
    assert h.m.get_quota(1) == 7 * SLOT
    h.eng.mark_all_dirty()
    for kv in (b, a):
        h.resume_verify(kv)
        kv.suspend()
    assert h.m.resize(1, 16 * SLOT)
    h.close(a)
    h.close(b)
    h.assert_empty_after_clear()


def test_quota_resize_while_active_is_logic_error() -> None:
    h = Harness(tiered_config(8 * SLOT, 16 * SLOT))
    kv = h.start(toks(60, 40))
    before = h.snapshot([kv])
    for level, q in ((0, 4 * SLOT), (0, 12 * SLOT), (1, 4 * SLOT)):
        with pytest.raises(LogicError):
            h.m.resize(level, q)
    assert h.snapshot([kv]) == before
    kv.suspend()
    assert h.m.resize(0, 4 * SLOT)
    h.resume_verify(kv)
    h.close(kv)
    h.assert_empty_after_clear()


def test_quota_shrink_that_would_drop_held_pages_fails() -> None:
    h = Harness(tiered_config(8 * SLOT, 6 * SLOT))
    a = h.start(toks(70, 5 * TPB))
    a.suspend()
    b = h.start(toks(71, 6 * TPB))
    b.suspend()
    c = h.start(toks(72, 2 * TPB + 3))
    h.close(c)  # 3 DROPPABLE pages
    snap = h.snapshot([a, b])
    # 11 held pages; levels hold 8 + 6 = 14. Level 0 at 4 would need 11 - 4 = 7 > 6 host slots.
    assert not h.m.resize(0, 4 * SLOT)
    assert h.snapshot([a, b]) == snap
    assert h.m.get_quota(0) == 8 * SLOT
    # the host tier is the last level: it cannot drop HELD pages
    held_on_host = 11 - sum(1 for kv in (a, b) for x in level_of_blocks(kv) if x)
    assert held_on_host == 6  # c took 3 more slots on level 0 before it closed
    assert not h.m.resize(1, (held_on_host - 1) * SLOT)
    assert h.snapshot([a, b]) == snap
    assert not h.m.resize(1, 0)
    assert h.snapshot([a, b]) == snap
    # a shrink that fits succeeds (DROPPABLE pages may be dropped)
    assert h.m.resize(0, 5 * SLOT)
    assert h.m.get_quota(0) == 5 * SLOT
    h.eng.mark_all_dirty()
    # (levels 0 and 1 are now full of HELD pages: a resume needs a swap, see
    # test_resume_swaps_through_full_host_tier; give the host tier room first)
    assert h.m.resize(1, 16 * SLOT)
    h.resume_verify(a)
    a.suspend()
    assert not b.resume()  # 6 blocks > 5 slots
    assert b.status == KVCacheStatus.SUSPENDED
    assert h.m.resize(0, 8 * SLOT)
    h.resume_verify(b)
    h.close(a)
    h.close(b)
    h.assert_empty_after_clear()


def test_get_quota_follows_requests_in_whole_slots() -> None:
    h = Harness(tiered_config(8 * SLOT + 100, 16 * SLOT + 5))
    assert h.m.get_quota(0) == 8 * SLOT
    assert h.m.get_quota(1) == 16 * SLOT
    for lv, q in ((0, 5 * SLOT + 2047), (1, 3 * SLOT), (0, 11 * SLOT), (1, 20 * SLOT + 1)):
        assert h.m.resize(lv, q)
        got = h.m.get_quota(lv)
        assert got <= q and q - got < max(2 << 20, SLOT)
        assert got == stats(h.m, lv)[0][0] * SLOT
    with pytest.raises(ValueError):
        h.m.get_quota(2)
    with pytest.raises(ValueError):
        h.m.resize(2, SLOT)
    h.assert_empty_after_clear()


# --------------------------------------------------------------------------------------------
# Resume gate
# --------------------------------------------------------------------------------------------


def test_resume_gate_per_pool_group() -> None:
    # Full group: 10 slots; SWA group (window 32) has plenty. Gate at 0.5.
    q0 = 10 * FULL_SLOT + 10 * SWA_SLOT
    cfg = tiered_config(q0, 4 * q0, layers=two_group_layers(), max_util_for_resume=0.5)
    h = Harness(cfg)
    waiting = h.start(toks(80, 2 * TPB))
    waiting.suspend()
    runner = h.start(toks(81, 5 * TPB))  # full group 5/10 = 0.5 locked: not above the gate
    st = h.m.get_storage_statistics(0)
    assert st[0].total == 10 and (st[0].total - st[0].available) / st[0].total == 0.5
    swa_util = (st[1].total - st[1].available) / st[1].total
    assert swa_util < 0.5
    h.resume_verify(waiting)  # equal to the gate is allowed
    waiting.suspend()
    h.decode(runner, toks(82, TPB))  # 6/10 in the full group only
    st = h.m.get_storage_statistics(0)
    assert (st[0].total - st[0].available) / st[0].total > 0.5
    assert (st[1].total - st[1].available) / st[1].total <= 0.5
    before = h.snapshot([waiting, runner])
    assert not waiting.resume()
    assert not h.eng.resume(waiting)
    assert waiting.status == KVCacheStatus.SUSPENDED
    assert h.snapshot([waiting, runner]) == before
    runner.suspend()
    h.resume_verify(waiting)
    h.close(waiting)
    h.resume_verify(runner)
    h.close(runner)
    h.assert_empty_after_clear()


def test_resume_gate_one_disables() -> None:
    h = Harness(tiered_config(8 * SLOT, 8 * SLOT, max_util_for_resume=1.0))
    a = h.start(toks(85, 2 * TPB))
    a.suspend()
    b = h.start(toks(86, 6 * TPB))  # level 0 is full of LOCKED + HELD pages
    h.resume_verify(a)  # utilization 1.0 is not above 1.0
    h.close(a)
    h.close(b)
    h.assert_empty_after_clear()


# --------------------------------------------------------------------------------------------
# Eviction order and cascade
# --------------------------------------------------------------------------------------------


def _need_level0(h: Harness, blocks: int, seed: int) -> KVCache:
    """An active cache of `blocks` uncommitted blocks (takes room on level 0)."""
    kv = h.m.create_kv_cache()
    assert kv.resume()
    assert kv.resize(blocks * TPB)
    h.eng.forward([Step(kv, toks(seed, blocks * TPB), [])])
    h.tokens[id(kv)] = toks(seed, blocks * TPB)
    return kv


def test_eviction_lowest_priority_first_then_lru() -> None:
    h = Harness(tiered_config(12 * SLOT, 32 * SLOT))
    hi = h.start(toks(90, 3 * TPB), cb=lambda b, g: 80)
    hi.suspend()
    lo = h.start(toks(91, 3 * TPB), cb=lambda b, g: 10)
    lo.suspend()
    mid_old = h.start(toks(92, 3 * TPB))  # default priority 35
    mid_old.suspend()
    mid_new = h.start(toks(93, 3 * TPB))
    mid_new.suspend()
    # 12 slots full of HELD pages. Take 3: the priority-10 cache goes first.
    x = _need_level0(h, 3, 94)
    assert level_of_blocks(lo) == [False] * 3
    assert all(level_of_blocks(hi)) and all(level_of_blocks(mid_old)) and all(level_of_blocks(mid_new))
    # 3 more: priority 35, least recently released (suspended) first
    h.decode(x, toks(95, 3 * TPB))
    assert level_of_blocks(mid_old) == [False] * 3
    assert all(level_of_blocks(mid_new)) and all(level_of_blocks(hi))
    h.decode(x, toks(96, 3 * TPB))
    assert level_of_blocks(mid_new) == [False] * 3
    assert all(level_of_blocks(hi))
    x.suspend()
    for kv in (hi, lo, mid_old, mid_new, x):
        h.resume_verify(kv)
        kv.suspend()
    for kv in (hi, lo, mid_old, mid_new, x):
        h.close(kv)
    h.assert_empty_after_clear()


def test_eviction_priority_per_block_callback() -> None:
    h = Harness(tiered_config(6 * SLOT, 16 * SLOT))
    # blocks 0-1 high priority, 2-3 low
    kv = h.start(toks(100, 4 * TPB), cb=lambda b, g: 90 if b < 2 else 5)
    kv.suspend()
    x = _need_level0(h, 4, 101)  # 2 free + 2 evicted
    assert level_of_blocks(kv) == [True, True, False, False]
    h.close(x)
    h.resume_verify(kv)
    h.close(kv)
    h.assert_empty_after_clear()


def test_droppable_and_held_share_one_order() -> None:
    h = Harness(tiered_config(6 * SLOT, 16 * SLOT))
    d = h.start(toks(110, 3 * TPB))
    h.close(d)  # DROPPABLE, released first
    held = h.start(toks(111, 3 * TPB))
    held.suspend()  # HELD, released later
    x = _need_level0(h, 3, 112)
    assert all(level_of_blocks(held))  # the older DROPPABLE pages moved, not the HELD ones
    st = h.m.get_and_reset_iteration_stats()[0]
    assert st.offloaded_blocks == 3 and st.dropped_blocks == 0  # moved colder, not dropped
    h.close(x)
    # now a low-priority HELD page goes before a DROPPABLE page of higher priority
    d2 = h.start(toks(113, 2 * TPB), cb=lambda b, g: 60)
    h.close(d2)
    lowheld = h.start(toks(114, TPB), cb=lambda b, g: 1)
    lowheld.suspend()
    x2 = _need_level0(h, 4, 115)
    assert level_of_blocks(lowheld) == [False]
    h.close(x2)
    for kv in (held, lowheld):
        h.resume_verify(kv)
        h.close(kv)
    # every DROPPABLE prompt still reuses fully, with the right bytes
    for seed, n in ((110, 3 * TPB), (113, 2 * TPB)):
        p = toks(seed, n)
        assert h.m.probe_reuse(input_tokens=p) == n
        kv = h.m.create_kv_cache(input_tokens=p)
        assert h.eng.resume(kv)
        h.eng.verify(kv, p)
        h.close(kv)
    h.assert_empty_after_clear()


def test_cascade_last_level_drops_droppable_only() -> None:
    h = Harness(tiered_config(4 * SLOT, 4 * SLOT))
    old = toks(120, 4 * TPB)
    h.close(h.start(old))  # 4 DROPPABLE on level 0
    held = h.start(toks(121, 2 * TPB))
    held.suspend()  # 2 HELD pages; 2 of the DROPPABLE ones went to the host tier for them
    h.m.get_and_reset_iteration_stats()
    # 4 new blocks: level 0 must empty; its pages cascade to the host tier, which drops
    # DROPPABLE pages (it is the last level) to take the HELD ones.
    x = _need_level0(h, 4, 122)
    st = h.m.get_and_reset_iteration_stats()[0]
    # level 0 now holds x only; the host holds the 2 HELD pages and 2 DROPPABLE ones at most.
    assert not any(level_of_blocks(held))
    assert stats(h.m, 0)[0][:3] == (4, 0, 0)
    assert st.dropped_blocks >= 2  # the last level dropped DROPPABLE pages
    assert h.m.probe_reuse(input_tokens=old) < len(old)  # pruned: shorter, never wrong
    # HELD pages at the last level are never dropped: with the host full of HELD pages, no room
    x.suspend()
    y = h.m.create_kv_cache()
    assert y.resume()
    h.m.check_invariants()
    # level 0: 4 HELD (x) evictable to host, host has 2 HELD + 2 DROPPABLE -> 2 can go down
    assert y.resize(2 * TPB)
    assert not y.resize(3 * TPB)  # would need a HELD page dropped
    h.close(y)
    for kv in (held, x):
        h.resume_verify(kv)
        kv.suspend()
    n = h.m.probe_reuse(input_tokens=old)
    kv = h.m.create_kv_cache(input_tokens=old)
    assert kv.num_committed_tokens == n
    h.close(kv)
    h.close(held)
    h.close(x)
    h.assert_empty_after_clear()


def test_page_keeps_identity_when_it_moves() -> None:
    h = Harness(tiered_config(5 * SLOT, 16 * SLOT))
    p = toks(130, 3 * TPB + 9)
    h.close(h.start(p))
    assert h.m.probe_reuse(input_tokens=p) == len(p)
    for round_ in range(3):
        x = _need_level0(h, 5, 131 + round_)  # everything goes to the host tier
        assert h.m.probe_reuse(input_tokens=p) == len(p)
        h.close(x)
        kv = h.m.create_kv_cache(input_tokens=p)
        assert kv.num_committed_tokens == len(p)
        assert h.eng.resume(kv)
        st = h.m.get_and_reset_iteration_stats()[0]
        assert st.onboarded_from_level[1] == 4
        h.eng.verify(kv, p)
        h.close(kv)
    h.assert_empty_after_clear()


def _slots_on(h: Harness, level: int) -> dict[int, int]:
    """page id -> slot of every page living on `level` (internals: the page table)."""
    pages = h.m._ctx.storage.pages
    return {p: pages.slot[p] for p in range(len(pages.level)) if pages.level[p] == level}


def test_eviction_keeps_neighbours_together() -> None:
    """Victims leave in eviction order (tails first, here 3 2 1 0 7 6 5 4 by level-0 slot), but
    the slots they take one level colder follow their level-0 order, so the batch copies as
    one run (pairs that are neighbours on both levels merge into one copy)."""
    h = Harness(tiered_config(8 * SLOT, 16 * SLOT))
    a, b = toks(150, 4 * TPB), toks(151, 4 * TPB)
    h.close(h.start(a))
    h.close(h.start(b))
    before = _slots_on(h, 0)
    assert sorted(before.values()) == list(range(8))
    x = _need_level0(h, 8, 152)  # all eight go to the host tier in one batch
    after = _slots_on(h, 1)
    assert set(after) == set(before)
    by_old = sorted(before, key=before.__getitem__)
    assert [after[p] for p in by_old] == sorted(after.values())
    h.close(x)
    for t in (a, b):
        kv = h.m.create_kv_cache(input_tokens=t)
        assert kv.num_committed_tokens == len(t)
        assert h.eng.resume(kv)
        h.eng.verify(kv, t)
        h.close(kv)
    h.assert_empty_after_clear()


# --------------------------------------------------------------------------------------------
# prefetch
# --------------------------------------------------------------------------------------------


def test_prefetch_moves_pages_up_as_room_allows() -> None:
    h = Harness(tiered_config(6 * SLOT, 16 * SLOT))
    a = h.start(toks(140, 4 * TPB))
    a.suspend()
    x = _need_level0(h, 6, 141)  # a goes to the host tier
    assert not any(level_of_blocks(a))
    with pytest.raises(LogicError):
        x.prefetch(0)  # ACTIVE
    with pytest.raises(ValueError):
        a.prefetch(2)
    h.decode(x, [])
    # level 0 is full of LOCKED pages: nothing moves
    assert not a.prefetch(0)
    assert not any(level_of_blocks(a))
    assert a.prefetch(1)  # already there
    assert x.resize(4 * TPB)  # frees 2 slots
    assert not a.prefetch(0)
    assert sum(level_of_blocks(a)) == 2
    assert a.status == KVCacheStatus.SUSPENDED
    h.close(x)
    assert a.prefetch(0)
    assert all(level_of_blocks(a))
    h.m.get_and_reset_iteration_stats()
    h.resume_verify(a)
    assert h.m.get_and_reset_iteration_stats()[0].onboarded_blocks == 0
    h.close(a)
    h.assert_empty_after_clear()


# --------------------------------------------------------------------------------------------
# Quota split
# --------------------------------------------------------------------------------------------


def test_quota_split_initial_pool_ratio() -> None:
    q = 64 * 1024
    cfg = tiered_config(q, 2 * q, layers=two_group_layers(), initial_pool_ratio=[0.75, 0.25])
    h = Harness(cfg)
    for lv, quota in ((0, q), (1, 2 * q)):
        s = h.m.get_storage_statistics(lv)
        assert s[0].total == int(0.75 * quota) // FULL_SLOT
        assert s[1].total == int(0.25 * quota) // SWA_SLOT
    h.close(h.start(toks(150, 100)))
    h.assert_empty_after_clear()


def test_quota_split_default_same_slots_per_group() -> None:
    q = 40 * (FULL_SLOT + SWA_SLOT) + 100
    h = Harness(tiered_config(q, q, layers=two_group_layers()))
    for lv in (0, 1):
        s = h.m.get_storage_statistics(lv)
        assert s[0].total == s[1].total == 40
    h.assert_empty_after_clear()


def test_quota_split_typical_step() -> None:
    q = 256 * 1024
    # 4 caches of 256 tokens from scratch: 16 blocks each in both groups (nothing stale yet)
    step = BatchDesc([KVCacheDesc(256, 0)] * 4)
    h = Harness(tiered_config(q, q, layers=two_group_layers(), typical_step=step))
    s = h.m.get_storage_statistics(0)
    full_bytes = s[0].total * FULL_SLOT
    swa_bytes = s[1].total * SWA_SLOT
    # needs: 64 * 2048 vs 64 * 512 -> 80 % / 20 % of the bytes
    assert abs(full_bytes / q - 0.8) < 0.02
    assert abs(swa_bytes / q - 0.2) < 0.02
    # decode-like typical step: SWA needs only its window
    # (SWA window 32 at history 1023: 2 blocks per cache, 8 in all, vs 256 full-attention blocks)
    step2 = BatchDesc([KVCacheDesc(1024, 1023)] * 4)
    q2 = 1 << 20
    h2 = Harness(tiered_config(q2, q2, layers=two_group_layers(), typical_step=step2))
    s2 = h2.m.get_storage_statistics(0)
    assert s2[0].total * FULL_SLOT > 0.95 * q2
    assert s2[1].total >= 8  # every cache's window blocks
    assert s2[1].total * SWA_SLOT < 0.03 * q2
    h.assert_empty_after_clear()
    h2.assert_empty_after_clear()


def _run_constraint(h: Harness, batch: BatchDesc, seed: int) -> None:
    """Holds every cache of `batch` at once, each resized to exactly (capacity, history_length).

    With a system prompt, the first member prefills it like an engine (so its SWA window pages
    exist and are committed) and the others reuse it (bytes verified right after their resume).
    Members sized with history 0 write their whole capacity through the fake engine; members
    with a history commit it without data (an engine cannot write blocks that are already stale
    at that history), which is what makes the sizing exactly the constraint's.
    """
    sys_len = batch.system_prompt_length
    system = toks(seed, sys_len)
    caches: list[KVCache] = []
    for i, d in enumerate(batch.kv_caches):
        prompt = (system + toks(seed * 100 + i, max(0, d.capacity - sys_len)))[: d.capacity]
        hist = prompt[: d.history_length]
        kv = h.m.create_kv_cache(input_tokens=hist)
        r = kv.num_committed_tokens
        assert h.eng.resume(kv)
        if r:
            h.eng.verify(kv, hist[:r])
        if i == 0 and sys_len > 0:
            assert kv.resize(d.capacity), (i, d)
            h.eng.forward([Step(kv, hist, [])])
            kv.commit(hist)
        else:
            assert kv.resize(d.capacity, d.history_length), (i, d)
            if d.history_length == 0:
                h.eng.forward([Step(kv, prompt, [])])
                h.eng.verify(kv, prompt)
            else:
                kv.commit(hist[r:])
        if sys_len >= TPB and i > 0:
            assert r >= sys_len // TPB * TPB
        assert kv.history_length == d.history_length and kv.capacity == d.capacity
        caches.append(kv)
    for kv in caches:
        assert kv.is_active
        h.close(kv)


def test_quota_split_constraints_really_fit() -> None:
    layers = two_group_layers(window=48)
    constraints = [
        BatchDesc([KVCacheDesc(200, 0), KVCacheDesc(130, 64), KVCacheDesc(64, 64)]),
        BatchDesc([KVCacheDesc(160, 160)] * 3, system_prompt_length=96),
        BatchDesc([KVCacheDesc(400, 399)]),
    ]
    # find the smallest level-0 quota the library accepts, then use exactly that
    lo, hi = 0, 1 << 20
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            KVCacheManager(tiered_config(mid, 1 << 16, layers=layers, constraints=constraints)).shutdown()
            hi = mid
        except ValueError:
            lo = mid + 1
    q0 = lo
    with pytest.raises(ValueError, match="constraints"):
        KVCacheManager(tiered_config(q0 - 1, 1 << 16, layers=layers, constraints=constraints))
    h = Harness(tiered_config(q0, 1 << 16, layers=layers, constraints=constraints))
    for i, batch in enumerate(constraints):
        _run_constraint(h, batch, 160 + i)
        h.m.clear_reusable_blocks()
    # also with stale DROPPABLE pages in the way (they are evictable, so it still fits)
    h.close(h.start(toks(170, 100)))
    for i, batch in enumerate(constraints):
        _run_constraint(h, batch, 180 + i)
    h.assert_empty_after_clear()
    # the level-0 quota cannot be shrunk below the constraints either
    with pytest.raises(ValueError):
        h.m.resize(0, q0 - FULL_SLOT)


def test_constraint_larger_than_level0_is_value_error() -> None:
    big = BatchDesc([KVCacheDesc(100 * TPB, 0)])
    with pytest.raises(ValueError, match="constraints"):
        KVCacheManager(tiered_config(50 * SLOT, 500 * SLOT, constraints=[big]))
    # the host tier's size does not matter
    KVCacheManager(tiered_config(100 * SLOT, 0, constraints=[big])).shutdown()


# --------------------------------------------------------------------------------------------
# Empty after clear
# --------------------------------------------------------------------------------------------


def test_every_level_empty_after_close_and_clear() -> None:
    h = Harness(tiered_config(6 * SLOT, 10 * SLOT))
    caches = []
    for i in range(4):
        kv = h.start(toks(190 + i, 2 * TPB + 5 * i))
        kv.suspend()
        caches.append(kv)
    assert stats(h.m, 1)[0][1] < 10  # something lives on the host tier
    with pytest.raises(LogicError):
        h.m.clear_reusable_blocks()
    with pytest.raises(LogicError):
        h.m.shutdown()
    for kv in caches:
        h.close(kv)
    h.assert_empty_after_clear()
    h.m.shutdown()


def test_resume_swaps_through_full_host_tier() -> None:
    # level 0: 4 slots, host: 4 slots; two suspended 4-block caches fill both levels exactly.
    h = Harness(tiered_config(4 * SLOT, 4 * SLOT))
    a = h.start(toks(200, 4 * TPB))
    a.suspend()
    b = h.start(toks(201, 4 * TPB))
    b.suspend()
    assert not any(level_of_blocks(a)) and all(level_of_blocks(b))
    # a's 4 pages on the host tier, b's on level 0: resuming a is a swap; 8 pages fit 8 slots
    h.resume_verify(a)
    a.suspend()
    h.resume_verify(b)
    h.close(a)
    h.close(b)
    h.assert_empty_after_clear()
