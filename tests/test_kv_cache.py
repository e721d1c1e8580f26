"""KVCache behaviour (SPEC §3 KVCache API, §4.1–§4.5), checked on counters, storage
statistics, page indices and — through the fake engine — on real bytes."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import pytest

from conftest import attention, make_config
from fake_engine import FakeEngine, Step
from _serving import Seq, setup, toks
from kv_cache_manager_v2 import (
    BAD_PAGE_INDEX,
    CacheCapacityError,
    KVCache,
    KVCacheManager,
    KVCacheStatsDelta,
    KVCacheStatus,
    LogicError,
    OutOfPagesError,
    ReuseScope,
    is_compiled,
)

TPB = 16
SLOT = 4 * 512  # default config: one group, layers 0 and 1, K + V of 512 bytes each

# Full attention (group 0, 512-byte buffers) + SWA window 32 (group 1, 1024-byte buffers):
# two layer groups in two pool groups, so each group's slots can be counted on its own.
SWA2 = [attention(0), attention(1, size=1024, window=32)]
SWA2_SINK = [attention(0), attention(1, size=1024, window=32, sinks=16)]
SWA2_QUOTA = 64 * 3072  # 64 slots in each pool group

MakeManager = Callable[..., KVCacheManager]


# ---------------------------------------------------------------------------- helpers
def new_seq(mgr: KVCacheManager, eng: FakeEngine, prompt: Sequence[Any] | None = None, **kw: Any) -> Seq:
    kv = mgr.create_kv_cache(input_tokens=prompt, **kw)
    reused = kv.num_committed_tokens
    written = list(prompt[:reused]) if prompt is not None else []
    assert kv.resume()
    return Seq(eng, kv, written)


def run(mgr: KVCacheManager, eng: FakeEngine, tokens: Sequence[Any], close: bool = True, **kw: Any) -> Seq:
    """A request that reuses what it can of `tokens`, computes and commits the rest."""
    s = new_seq(mgr, eng, tokens, **kw)
    rest = list(tokens[len(s.written) :])
    if rest:
        assert s.step(rest)
    if close:
        s.kv.close()
        eng.forget(s.kv)
    return s


def storage(mgr: KVCacheManager) -> list[tuple[int, int, int, int, int]]:
    return [(s.total, s.free, s.evictable, s.available, s.slot_size) for s in mgr.get_storage_statistics(0)]


def indices(kv: KVCache, groups: int) -> list[list[int]]:
    return [list(kv.get_base_page_indices(g)) for g in range(groups)]


def snapshot(kv: KVCache, groups: int) -> tuple[Any, ...]:
    return (
        kv.status,
        kv.capacity,
        kv.history_length,
        kv.num_committed_tokens,
        kv.num_blocks,
        kv.committed_tokens,
        indices(kv, groups),
        [kv.get_aggregated_page_indices(g) for g in range(groups)],
    )


def close_all(mgr: KVCacheManager, eng: FakeEngine | None, *caches: KVCache) -> None:
    for kv in caches:
        kv.close()
        if eng is not None:
            eng.forget(kv)


# ---------------------------------------------------------------------------- creation
def test_create_without_tokens_is_suspended_and_empty(make_manager: MakeManager) -> None:
    mgr = make_manager()
    before = storage(mgr)
    kv = mgr.create_kv_cache()
    assert kv.status is KVCacheStatus.SUSPENDED
    assert kv.is_active is False
    assert (kv.capacity, kv.history_length, kv.num_committed_tokens, kv.num_blocks) == (0, 0, 0, 0)
    assert kv.tokens_per_block == TPB
    assert kv.committed_tokens == []
    assert list(kv.get_base_page_indices(0)) == []
    assert storage(mgr) == before
    kv2 = mgr.create_kv_cache(input_tokens=toks(40, 1000))  # nothing to reuse yet
    assert kv2.status is KVCacheStatus.SUSPENDED
    assert (kv2.capacity, kv2.history_length, kv2.num_committed_tokens) == (0, 0, 0)
    assert storage(mgr) == before
    close_all(mgr, None, kv, kv2)


@pytest.mark.parametrize("partial", [True, False])
def test_create_with_reuse_counters_equal_reused_length(make_manager: MakeManager, partial: bool) -> None:
    mgr, eng = setup(make_manager, enable_partial_reuse=partial)
    prompt = toks(40, 1000)
    run(mgr, eng, prompt)  # commits 40 tokens; close publishes the 8-token tail
    longer = prompt + toks(10, 5000)
    expect = 40 if partial else 32
    assert mgr.probe_reuse(input_tokens=longer) == expect
    kv = mgr.create_kv_cache(input_tokens=longer)
    assert kv.status is KVCacheStatus.SUSPENDED
    assert kv.num_committed_tokens == kv.capacity == kv.history_length == expect
    assert kv.num_blocks == -(-expect // TPB)
    assert kv.committed_tokens == prompt[:expect]
    s = Seq(eng, kv, prompt[:expect])
    assert eng.resume(kv)
    s.step(longer[expect:])
    s.verify()
    close_all(mgr, eng, kv)


def test_reuse_scope_separates_namespaces(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    prompt = toks(48, 1000)
    run(mgr, eng, prompt, reuse_scope=ReuseScope(lora_id=1))
    assert mgr.probe_reuse(ReuseScope(lora_id=1), prompt) == 48
    assert mgr.probe_reuse(None, prompt) == 0
    assert mgr.probe_reuse(ReuseScope(lora_id=2), prompt) == 0
    assert mgr.probe_reuse(ReuseScope(lora_id=1, salt=3), prompt) == 0


# ---------------------------------------------------------------------------- suspend/resume
def test_suspend_resume_keeps_pages_on_level0_and_data(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    total = storage(mgr)[0][0]
    s = new_seq(mgr, eng)
    kv = s.kv
    assert kv.status is KVCacheStatus.ACTIVE and kv.is_active
    assert s.step(toks(40, 1000))
    assert s.step(toks(5, 2000), commit=False)
    before_idx = indices(kv, 1)
    assert all(i >= 0 for i in before_idx[0]) and len(before_idx[0]) == 3
    st_active = storage(mgr)
    assert st_active[0][1] == total - 3  # 3 locked pages, none free
    assert st_active[0][2] == 0
    kv.suspend()
    assert kv.status is KVCacheStatus.SUSPENDED and not kv.is_active
    # HELD pages stay on level 0, are not free and (single level) not evictable.
    assert storage(mgr) == st_active
    assert indices(kv, 1) == before_idx
    assert kv.get_aggregated_page_indices(0) == before_idx[0]
    assert (kv.capacity, kv.history_length, kv.num_committed_tokens) == (45, 45, 40)
    # Pressure from another cache cannot take held pages.
    other = new_seq(mgr, eng)
    assert not other.kv.resize(capacity=(total - 2) * TPB)
    assert eng.resume(kv)
    assert kv.status is KVCacheStatus.ACTIVE
    assert indices(kv, 1) == before_idx
    s.verify()
    assert s.step(toks(20, 3000))
    s.verify()
    close_all(mgr, eng, kv, other.kv)


def test_state_logic_errors(make_manager: MakeManager) -> None:
    mgr = make_manager()
    kv = mgr.create_kv_cache()
    # SUSPENDED: resize / commit / suspend need ACTIVE.
    with pytest.raises(LogicError):
        kv.resize(capacity=16)
    with pytest.raises(LogicError):
        kv.resize(history_length=0)
    with pytest.raises(LogicError):
        kv.capacity = 16
    with pytest.raises(LogicError):
        kv.history_length = 0
    with pytest.raises(LogicError):
        kv.commit([1])
    with pytest.raises(LogicError):
        kv.suspend()
    assert kv.status is KVCacheStatus.SUSPENDED
    assert kv.resume() is True
    with pytest.raises(LogicError):
        kv.resume()
    assert kv.status is KVCacheStatus.ACTIVE
    with pytest.raises(LogicError):
        kv.prefetch(0)  # suspended caches only
    kv.suspend()
    assert kv.prefetch(0) is True
    kv.close()
    assert kv.status is KVCacheStatus.CLOSED and not kv.is_active
    for call in (
        lambda: kv.resume(),
        lambda: kv.resize(capacity=16),
        lambda: kv.commit([1]),
        lambda: kv.suspend(),
        lambda: kv.prefetch(0),
    ):
        with pytest.raises(LogicError):
            call()
    with pytest.raises(LogicError):
        kv.capacity = 32
    kv.close()  # idempotent
    kv.stop_committing()  # no-op on a closed cache
    assert kv.status is KVCacheStatus.CLOSED


# ---------------------------------------------------------------------------- resize
def test_resize_out_of_pages_changes_nothing(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=8 * SLOT)
    a = new_seq(mgr, eng)
    assert a.step(toks(5 * TPB + 3, 1000))  # 6 blocks of 8
    b = new_seq(mgr, eng)
    assert b.step(toks(10, 2000))  # 1 block; 1 slot left
    snap_a, snap_b, st = snapshot(a.kv, 1), snapshot(b.kv, 1), storage(mgr)
    assert b.kv.resize(capacity=3 * TPB) is False
    assert b.kv.resize(capacity=3 * TPB, history_length=3 * TPB) is False
    assert snapshot(a.kv, 1) == snap_a and snapshot(b.kv, 1) == snap_b and storage(mgr) == st
    with pytest.raises(OutOfPagesError):
        b.kv.capacity = 3 * TPB
    with pytest.raises(CacheCapacityError):
        b.kv.capacity = 100 * TPB
    assert snapshot(b.kv, 1) == snap_b and storage(mgr) == st
    # Exactly what is left still fits; the manager is fully usable afterwards.
    assert b.kv.resize(capacity=2 * TPB)
    b.step(toks(TPB, 3000))
    a.verify()
    b.verify()
    close_all(mgr, eng, a.kv, b.kv)


def test_resize_all_or_nothing_across_pool_groups(make_manager: MakeManager) -> None:
    # Group 0 (full) gets many slots, group 1 (SWA, own pool group) only a few.
    mgr, eng = setup(make_manager, layers=SWA2, quota=64 * 1024, initial_pool_ratio=[0.75, 0.25])
    st = storage(mgr)
    assert st[0][0] == 48 and st[1][0] == 8
    s = new_seq(mgr, eng)
    snap = snapshot(s.kv, 2)
    # 12 blocks, history 0: nothing stale, group 1 needs 12 > 8 pages.
    assert s.kv.resize(capacity=12 * TPB) is False
    assert storage(mgr) == st and snapshot(s.kv, 2) == snap
    # With the history at 12 blocks most SWA blocks are stale: they need no page.
    assert s.kv.resize(capacity=12 * TPB, history_length=12 * TPB) is True
    b0 = list(s.kv.get_base_page_indices(0))
    b1 = list(s.kv.get_base_page_indices(1))
    assert all(x >= 0 for x in b0) and len(b0) == 12
    e = (12 * TPB + 1 - 32) // TPB  # 10
    assert b1[:e] == [BAD_PAGE_INDEX] * e and all(x >= 0 for x in b1[e:])
    st2 = storage(mgr)
    assert st2[0][1] == 48 - 12 and st2[1][1] == 8 - (12 - e)
    close_all(mgr, eng, s.kv)


def test_resize_failure_does_not_raise_history_or_release_stale(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, layers=SWA2, quota=8 * 3072)  # 8 slots per pool group
    s = new_seq(mgr, eng)
    assert s.step(toks(4 * TPB, 1000), commit=False)  # 4 blocks, SWA blocks 0..1 stale already
    hog = new_seq(mgr, eng)
    assert hog.kv.resize(capacity=4 * TPB)  # group 0 now full
    snap, st = snapshot(s.kv, 2), storage(mgr)
    assert s.kv.resize(capacity=6 * TPB, history_length=6 * TPB) is False
    assert snapshot(s.kv, 2) == snap and storage(mgr) == st
    close_all(mgr, eng, s.kv, hog.kv)


def test_resize_value_and_type_errors_change_nothing(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    s = new_seq(mgr, eng)
    assert s.step(toks(20, 1000))
    kv = s.kv
    assert kv.resize(capacity=40)
    snap, st = snapshot(kv, 1), storage(mgr)
    with pytest.raises(ValueError):
        kv.resize(history_length=19)  # history decreases
    with pytest.raises(ValueError):
        kv.resize(history_length=41)  # exceeds capacity
    with pytest.raises(ValueError):
        kv.resize(capacity=60, history_length=61)
    with pytest.raises(ValueError):
        kv.resize(capacity=19)  # below history
    with pytest.raises(ValueError):
        kv.capacity = 19
    with pytest.raises(ValueError):
        kv.history_length = 41
    with pytest.raises(ValueError):
        kv.history_length = 10
    with pytest.raises(ValueError):
        kv.resize(capacity=-1)
    with pytest.raises(TypeError):
        kv.resize(capacity=40.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        kv.resize(capacity="40")  # type: ignore[arg-type]
    assert snapshot(kv, 1) == snap and storage(mgr) == st
    s.verify()
    close_all(mgr, eng, kv)




@pytest.mark.parametrize(
    "call",
    [
        lambda kv: kv.resize(capacity=True),
        lambda kv: kv.resize(history_length=True),
        lambda kv: setattr(kv, "capacity", True),
        lambda kv: kv.get_base_page_indices(False),
        lambda kv: kv.get_base_page_indices(0, beam=False),
        lambda kv: kv.get_aggregated_page_indices(False),
    ],
    ids=["resize-capacity", "resize-history", "capacity-setter", "base-indices-group", "beam", "agg-group"],
)
def test_bool_is_an_int_argument(make_manager: MakeManager, call: Callable[[KVCache], Any]) -> None:
    # Documented choice (DESIGN.md): a bool passed for an int parameter is that int, in both
    # modes (compiled code coerces it at the call boundary, so dev mode does the same).
    mgr = make_manager()
    kv = mgr.create_kv_cache()
    assert kv.resume()
    try:
        try:
            call(kv)
        except ValueError:
            pass  # as the int 1 it may be out of range (history past capacity): a value error
        assert kv.capacity in (0, 1) and kv.history_length in (0, 1)
    finally:
        kv.close()


def test_capacity_shrink_releases_pages(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    total = storage(mgr)[0][0]
    s = new_seq(mgr, eng)
    kv = s.kv
    assert kv.resize(capacity=64)
    assert kv.num_blocks == 4 and storage(mgr)[0][1] == total - 4
    assert s.step(toks(20, 1000))
    idx = list(kv.get_base_page_indices(0))
    assert kv.resize(capacity=40)
    assert kv.num_blocks == 3 and storage(mgr)[0][1] == total - 3
    assert list(kv.get_base_page_indices(0)) == idx[:3]
    # Down to the history exactly is allowed and frees the last block.
    kv.capacity = 20
    assert kv.capacity == 20 and kv.num_blocks == 2 and storage(mgr)[0][1] == total - 2
    assert list(kv.get_base_page_indices(0)) == idx[:2]
    with pytest.raises(ValueError):
        kv.resize(capacity=19)
    s.verify()
    assert s.step(toks(30, 2000))
    s.verify()
    close_all(mgr, eng, kv)


def test_capacity_and_history_setters(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=4 * SLOT)
    s = new_seq(mgr, eng)
    kv = s.kv
    kv.capacity = 3 * TPB
    assert kv.capacity == 48 and kv.num_blocks == 3
    with pytest.raises(OutOfPagesError):
        kv.capacity = 5 * TPB
    assert kv.capacity == 48 and kv.num_blocks == 3
    assert s.step(toks(10, 1000), commit=False)
    kv.history_length = 30  # raise history only (no page needed)
    assert kv.history_length == 30 and kv.num_committed_tokens == 0
    kv.history_length = 30  # same value is fine
    with pytest.raises(ValueError):
        kv.history_length = 49
    close_all(mgr, eng, kv)


def test_resize_growth_within_last_block_needs_no_page(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=2 * SLOT)
    s = new_seq(mgr, eng)
    assert s.kv.resize(capacity=1)
    st = storage(mgr)
    for c in range(2, TPB + 1):
        assert s.kv.resize(capacity=c)
        assert storage(mgr) == st and s.kv.num_blocks == 1
    assert s.kv.resize(capacity=2 * TPB) and s.kv.num_blocks == 2
    assert s.kv.resize(capacity=2 * TPB + 1) is False
    assert s.kv.capacity == 2 * TPB
    close_all(mgr, eng, s.kv)


# ---------------------------------------------------------------------------- SWA
def test_swa_uncommitted_stale_pages_are_freed(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, layers=SWA2, quota=SWA2_QUOTA)
    s = new_seq(mgr, eng)
    assert s.kv.resize(capacity=5 * TPB)
    st0 = storage(mgr)
    assert st0[1][1] == 64 - 5
    assert s.step(toks(4 * TPB, 1000), commit=False)  # history 64 -> SWA stale [0, 2)
    b1 = list(s.kv.get_base_page_indices(1))
    assert b1[:2] == [BAD_PAGE_INDEX, BAD_PAGE_INDEX] and all(x >= 0 for x in b1[2:])
    assert s.kv.get_aggregated_page_indices(1)[:2] == [BAD_PAGE_INDEX] * 2
    assert s.kv.get_aggregated_page_indices(1, valid_only=True) == b1[2:]
    st = storage(mgr)
    assert st[1][1] == 64 - 3 and st[1][2] == 0  # freed, not evictable
    assert st[0][1] == 64 - 5  # full attention keeps every page
    assert all(x >= 0 for x in s.kv.get_base_page_indices(0))
    assert s.step(toks(TPB, 2000), commit=False)  # history 80 -> stale [0, 3)
    assert storage(mgr)[1][1] == 64 - 2
    s.verify()
    close_all(mgr, eng, s.kv)
    assert storage(mgr)[1][1] == 64 and storage(mgr)[0][1] == 64


def test_swa_committed_stale_pages_stay_droppable_in_tree(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, layers=SWA2, quota=SWA2_QUOTA)
    s = new_seq(mgr, eng)
    assert s.kv.resize(capacity=5 * TPB)
    assert s.step(toks(4 * TPB, 1000))  # commit 64: blocks 0..3 published, then SWA 0..1 stale
    st = storage(mgr)
    assert st[1][1] == 64 - 5 and st[1][2] == 2  # not free, evictable
    assert st[1][3] == st[1][1] + st[1][2]
    assert st[0][2] == 0  # locked pages are never evictable
    assert list(s.kv.get_base_page_indices(1))[:2] == [BAD_PAGE_INDEX] * 2
    s.verify()
    close_all(mgr, eng, s.kv)
    st = storage(mgr)
    # Every committed block is in the tree; block 4 (uncommitted) was freed.
    assert st[0][1] == 64 - 4 and st[0][2] == 4
    assert st[1][1] == 64 - 4 and st[1][2] == 4
    prompt = toks(4 * TPB, 1000)
    assert mgr.probe_reuse(input_tokens=prompt) == 64


def test_swa_resize_to_stale_history_maps_no_page(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, layers=SWA2, quota=SWA2_QUOTA)
    kv = mgr.create_kv_cache()
    assert kv.resume()
    L = 5 * TPB  # 80: stale [0, (81 - 32) // 16) = [0, 3)
    assert kv.resize(capacity=L, history_length=L)
    assert (kv.capacity, kv.history_length, kv.num_committed_tokens) == (L, L, 0)
    b1 = list(kv.get_base_page_indices(1))
    assert b1[:3] == [BAD_PAGE_INDEX] * 3 and all(x >= 0 for x in b1[3:]) and len(b1) == 5
    assert all(x >= 0 for x in kv.get_base_page_indices(0))
    st = storage(mgr)
    assert st[1][1] == 64 - 2 and st[0][1] == 64 - 5
    d = kv.commit_pending_stats()
    assert (d.alloc_total_blocks, d.alloc_new_blocks) == (5, 5)  # counted on the full group
    close_all(mgr, None, kv)


def test_swa_sinks_are_never_stale(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, layers=SWA2_SINK, quota=SWA2_QUOTA)
    s = new_seq(mgr, eng)
    for i in range(8):
        assert s.step(toks(TPB, 1000 + 100 * i))
        h = s.kv.history_length
        b1 = list(s.kv.get_base_page_indices(1))
        e = max(1, (h + 1 - 32) // TPB)
        assert b1[0] >= 0  # the sink block
        assert b1[1:e] == [BAD_PAGE_INDEX] * (e - 1)
        assert all(x >= 0 for x in b1[e:])
    s.verify()
    kv = mgr.create_kv_cache()
    assert kv.resume()
    assert kv.resize(capacity=6 * TPB, history_length=6 * TPB)
    b1 = list(kv.get_base_page_indices(1))
    assert b1[0] >= 0 and b1[1:4] == [BAD_PAGE_INDEX] * 3 and all(x >= 0 for x in b1[4:])
    close_all(mgr, eng, s.kv, kv)


def test_swa_reuse_then_continue(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, layers=SWA2_SINK, quota=SWA2_QUOTA)
    prompt = toks(7 * TPB, 1000)
    run(mgr, eng, prompt)
    s = new_seq(mgr, eng, prompt + toks(20, 9000))
    assert len(s.written) == 7 * TPB
    b1 = list(s.kv.get_base_page_indices(1))
    assert b1[0] >= 0 and b1[1:5] == [BAD_PAGE_INDEX] * 4
    assert s.step(toks(20, 9000))
    assert s.step(toks(1, 9500))
    s.verify()
    close_all(mgr, eng, s.kv)


# ---------------------------------------------------------------------------- commit
def test_commit_appends_publishes_and_raises_history(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    s = new_seq(mgr, eng)
    kv = s.kv
    prompt = toks(40, 1000)
    assert kv.resize(capacity=64)
    eng.forward([Step(kv, prompt, [])])
    kv.commit(prompt[:10])
    assert kv.num_committed_tokens == 10 and kv.history_length == 10
    assert mgr.probe_reuse(input_tokens=prompt) == 0
    kv.commit(prompt[10:20])
    assert kv.num_committed_tokens == 20 and kv.history_length == 20
    assert mgr.probe_reuse(input_tokens=prompt) == 16  # block 0 published
    kv.commit(prompt[20:40])
    assert kv.committed_tokens == prompt and kv.history_length == 40
    assert mgr.probe_reuse(input_tokens=prompt) == 32  # the tail is not published yet
    kv.commit([])  # no-op
    assert kv.num_committed_tokens == 40 and kv.history_length == 40 and kv.capacity == 64
    # History already above the committed count stays.
    kv.resize(history_length=50)
    kv.commit([7])
    assert kv.num_committed_tokens == 41 and kv.history_length == 50
    close_all(mgr, eng, kv)


def test_commit_past_capacity_raises_and_changes_nothing(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    s = new_seq(mgr, eng)
    assert s.step(toks(20, 1000))
    kv = s.kv
    snap, st = snapshot(kv, 1), storage(mgr)
    with pytest.raises(ValueError):
        kv.commit([1])
    assert kv.resize(capacity=24)
    snap, st = snapshot(kv, 1), storage(mgr)
    with pytest.raises(ValueError):
        kv.commit(toks(5, 0))
    with pytest.raises(ValueError):
        kv.commit([-1])
    with pytest.raises((TypeError, ValueError)):
        kv.commit(["x"])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        kv.commit([1, 2, 1 << 32])
    with pytest.raises(ValueError):
        kv.commit([b"short"])
    assert snapshot(kv, 1) == snap and storage(mgr) == st
    kv.commit(toks(4, 0))
    assert kv.num_committed_tokens == 24
    close_all(mgr, eng, kv)


def test_commit_after_stop_committing_is_logic_error_checked_first(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    s = new_seq(mgr, eng)
    assert s.step(toks(20, 1000))
    s.kv.stop_committing()
    s.kv.stop_committing()  # idempotent
    with pytest.raises(LogicError):
        s.kv.commit([1])
    with pytest.raises(LogicError):
        s.kv.commit([])
    with pytest.raises(LogicError):
        s.kv.commit(toks(100, 0))  # would also pass capacity: LogicError wins
    s.kv.suspend()
    with pytest.raises(LogicError, match="stop_committing"):
        s.kv.commit(toks(100, 0))
    assert eng.resume(s.kv)
    # The cache keeps working otherwise (history raised without commit).
    assert s.step(toks(5, 3000), commit=False)
    assert s.kv.num_committed_tokens == 20 and s.kv.history_length == 25
    s.verify()
    close_all(mgr, eng, s.kv)


def test_stop_committing_publishes_partial_tail(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    s = new_seq(mgr, eng)
    prompt = toks(40, 1000)
    assert s.step(prompt)
    assert mgr.probe_reuse(input_tokens=prompt) == 32
    s.kv.stop_committing()
    assert mgr.probe_reuse(input_tokens=prompt) == 40
    # Another cache reuses the partial tail (copy-on-write) while the first is still open.
    t = new_seq(mgr, eng, prompt + toks(8, 5000))
    assert len(t.written) == 40 and t.kv.num_committed_tokens == 40
    t.verify()
    assert t.step(toks(8, 5000))
    s.verify()
    t.verify()
    close_all(mgr, eng, s.kv, t.kv)


def test_identical_blocks_committed_twice_kept_once(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    total = storage(mgr)[0][0]
    prompt = toks(48, 1000)
    a = new_seq(mgr, eng)
    b = new_seq(mgr, eng)
    assert a.step(prompt)
    assert b.step(prompt)
    assert storage(mgr)[0][1] == total - 6
    a.verify()
    b.verify()
    close_all(mgr, eng, a.kv, b.kv)
    st = storage(mgr)[0]
    assert st[1] == total - 3 and st[2] == 3  # one copy in the tree
    c = run(mgr, eng, prompt, close=False)
    c.verify()
    close_all(mgr, eng, c.kv)


# ---------------------------------------------------------------------------- close
def test_close_releases_uncommitted_keeps_committed(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    total = storage(mgr)[0][0]
    s = new_seq(mgr, eng)
    assert s.step(toks(40, 1000))  # 2 full blocks + 8-token tail committed
    assert s.step(toks(30, 2000), commit=False)  # 70 tokens written, 40 committed
    assert s.kv.resize(capacity=100)  # 7 blocks
    assert storage(mgr)[0][1] == total - 7
    s.kv.close()
    eng.forget(s.kv)
    assert s.kv.status is KVCacheStatus.CLOSED
    st = storage(mgr)[0]
    # Blocks 0, 1 and the partial tail (block 2) stay in the tree; blocks 3..6 are freed.
    assert st[1] == total - 3 and st[2] == 3 and st[3] == total
    assert mgr.probe_reuse(input_tokens=toks(40, 1000) + toks(30, 2000)) == 40
    s.kv.close()
    assert storage(mgr)[0] == st
    mgr.clear_reusable_blocks()
    assert storage(mgr)[0][1] == total


def test_close_suspended_cache(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    total = storage(mgr)[0][0]
    s = new_seq(mgr, eng)
    assert s.step(toks(36, 1000))
    s.kv.suspend()
    s.kv.close()
    assert storage(mgr)[0][1] == total - 3 and storage(mgr)[0][2] == 3
    assert mgr.probe_reuse(input_tokens=toks(36, 1000)) == 36


def test_close_detaches_and_clears_index_buffer(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    s = new_seq(mgr, eng)
    buf = np.full(8, 12345, dtype=np.int32)
    s.kv.set_base_page_index_buf(0, 0, buf)
    assert s.step(toks(40, 1000))
    assert list(buf[:3]) == list(s.kv.get_base_page_indices(0))
    s.kv.close()
    assert list(buf) == [BAD_PAGE_INDEX] * 8


# ---------------------------------------------------------------------------- copy-on-write
def test_partial_reuse_copy_on_write_keeps_donor_bytes(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    total = storage(mgr)[0][0]
    donor_prompt = toks(40, 1000)
    run(mgr, eng, donor_prompt)  # tree: 2 full blocks + 8-token tail
    # B shares 36 tokens, then diverges inside block 2.
    b_prompt = donor_prompt[:36] + toks(20, 7000)
    assert mgr.probe_reuse(input_tokens=b_prompt) == 36
    kv = mgr.create_kv_cache(input_tokens=b_prompt)
    assert kv.num_committed_tokens == kv.capacity == kv.history_length == 36
    assert kv.committed_tokens == b_prompt[:36]
    st_before = storage(mgr)[0]
    assert eng.resume(kv)
    st_after = storage(mgr)[0]
    assert st_after[1] == st_before[1] - 1  # one private copy of the partial block
    b = Seq(eng, kv, b_prompt[:36])
    b.verify()  # the copy holds the donor's first 36 tokens
    b_idx = list(kv.get_base_page_indices(0))
    assert b.step(b_prompt[36:])
    b.verify()
    # The donor's bytes never changed: a cache reusing all 40 donor tokens reads them.
    c = new_seq(mgr, eng, donor_prompt + toks(3, 8000))
    assert len(c.written) == 40
    c_idx = list(c.kv.get_base_page_indices(0))
    assert c_idx[:2] == b_idx[:2]  # shared full blocks
    assert c_idx[2] != b_idx[2]  # private copies of the partial block
    c.verify()
    assert c.step(toks(3, 8000))
    c.verify()
    b.verify()
    close_all(mgr, eng, kv, c.kv)
    mgr.clear_reusable_blocks()
    assert storage(mgr)[0][1] == total


def test_partial_reuse_closed_before_resume_leaves_donor_intact(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    donor = toks(40, 1000)
    run(mgr, eng, donor)
    st = storage(mgr)
    kv = mgr.create_kv_cache(input_tokens=donor[:38] + [1, 2, 3])
    assert kv.num_committed_tokens == 38
    # The partial block still is the donor's page (not mapped for this cache until resume).
    assert list(kv.get_base_page_indices(0))[2] == BAD_PAGE_INDEX
    kv.close()
    assert storage(mgr) == st
    assert mgr.probe_reuse(input_tokens=donor) == 40
    c = run(mgr, eng, donor, close=False)
    c.verify()
    close_all(mgr, eng, c.kv)


# ---------------------------------------------------------------------------- page indices
def test_get_base_page_indices_int32_and_unmapped(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, layers=SWA2, quota=SWA2_QUOTA)
    s = new_seq(mgr, eng)
    assert s.step(toks(70, 1000))
    for g in (0, 1):
        idx = s.kv.get_base_page_indices(g)
        arr = np.asarray(idx)
        assert arr.dtype == np.int32 and arr.shape == (5,)
        assert memoryview(idx).itemsize == 4  # type: ignore[arg-type]
    b1 = list(s.kv.get_base_page_indices(1))
    assert b1[:2] == [BAD_PAGE_INDEX] * 2
    with pytest.raises(ValueError):
        s.kv.get_base_page_indices(2)
    with pytest.raises(ValueError):
        s.kv.get_base_page_indices(0, beam=1)
    with pytest.raises(TypeError):
        s.kv.get_base_page_indices("0")  # type: ignore[arg-type]
    # Slots of one cache never repeat within a group.
    b0 = list(s.kv.get_base_page_indices(0))
    assert len(set(b0)) == len(b0)
    close_all(mgr, eng, s.kv)


def test_index_buffer_kept_equal(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, layers=SWA2, quota=SWA2_QUOTA)
    s = new_seq(mgr, eng)
    kv = s.kv
    bufs = [np.full(12, 777, dtype=np.int32) for _ in range(2)]

    def check() -> None:
        for g in (0, 1):
            idx = list(kv.get_base_page_indices(g))
            assert list(bufs[g][: len(idx)]) == idx
            assert list(bufs[g][len(idx) :]) == [BAD_PAGE_INDEX] * (12 - len(idx))

    for g in (0, 1):
        kv.set_base_page_index_buf(0, g, bufs[g])
    check()
    assert s.step(toks(40, 1000))
    check()
    assert s.step(toks(40, 2000), commit=False)  # stale release without commit
    check()
    assert list(bufs[1][:3]) == [BAD_PAGE_INDEX] * 3
    kv.capacity = 100
    check()
    kv.capacity = 80
    check()
    assert s.step(toks(20, 3000))
    check()
    kv.suspend()
    check()
    assert eng.resume(kv)
    check()
    snap = snapshot(kv, 2)
    buf_copy = [b.copy() for b in bufs]
    # Growth past the buffer: ValueError, nothing changes.
    with pytest.raises(ValueError):
        kv.resize(capacity=13 * TPB)
    assert snapshot(kv, 2) == snap
    assert all((a == b).all() for a, b in zip(bufs, buf_copy))
    s.verify()
    kv.close()
    assert all((b == BAD_PAGE_INDEX).all() for b in bufs)


def test_set_base_page_index_buf_validation(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    s = new_seq(mgr, eng)
    assert s.step(toks(40, 1000))  # 3 blocks
    kv = s.kv
    with pytest.raises(ValueError):
        kv.set_base_page_index_buf(0, 0, np.zeros(2, dtype=np.int32))
    for bad in (np.zeros(8, dtype=np.int64), np.zeros(8, dtype=np.float32), np.zeros(8, dtype=np.uint32),
                np.zeros(8, dtype=np.int16)):
        with pytest.raises(TypeError):
            kv.set_base_page_index_buf(0, 0, bad)
    with pytest.raises(TypeError):
        kv.set_base_page_index_buf(0, 0, [0, 0, 0, 0])
    with pytest.raises(ValueError):
        kv.set_base_page_index_buf(0, 1, np.zeros(8, dtype=np.int32))
    with pytest.raises(ValueError):
        kv.set_base_page_index_buf(1, 0, np.zeros(8, dtype=np.int32))
    buf = np.zeros(3, dtype=np.int32)  # exactly num_blocks is enough
    kv.set_base_page_index_buf(0, 0, buf)
    assert list(buf) == list(kv.get_base_page_indices(0))
    kv.set_base_page_index_buf(0, 0, None)  # detach
    old = list(buf)
    kv.capacity = 64
    close_all(mgr, eng, kv)
    assert list(buf) == old  # no longer updated (close would have written -1)


def test_get_aggregated_page_indices(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, layers=SWA2, quota=SWA2_QUOTA)
    s = new_seq(mgr, eng)
    assert s.step(toks(70, 1000))
    kv = s.kv
    for g in (0, 1):
        agg = kv.get_aggregated_page_indices(g)
        assert agg == list(kv.get_base_page_indices(g))  # slot ids, level 0
        assert kv.get_aggregated_page_indices(g, valid_only=True) == [x for x in agg if x != BAD_PAGE_INDEX]
    assert kv.get_aggregated_page_indices(1)[:2] == [BAD_PAGE_INDEX] * 2
    assert len(kv.get_aggregated_page_indices(1, valid_only=True)) == 3
    kv.suspend()
    assert kv.get_aggregated_page_indices(0) == list(kv.get_base_page_indices(0))
    with pytest.raises(ValueError):
        kv.get_aggregated_page_indices(0, beam=1)
    close_all(mgr, eng, kv)


def test_aggregated_descriptors_address_engine_bytes(make_manager: MakeManager) -> None:
    import ctypes

    from kv_cache_manager_v2 import BufferId

    mgr, eng = setup(make_manager)
    s = new_seq(mgr, eng)
    prompt = toks(32, 1000)
    assert s.step(prompt)
    descs = mgr.get_aggregated_pages([BufferId(0, "k")])
    assert len(descs) == 1
    d = descs[0]
    agg = s.kv.get_aggregated_page_indices(0, valid_only=True)
    for b, slot in enumerate(agg):
        raw = ctypes.string_at(d.base + d.stride * slot, d.size)
        words = np.frombuffer(raw, dtype=np.uint32).reshape(TPB, -1)
        # Each token: records (token, layer 0, buffer 0, beam 0) over 32 bytes.
        assert list(words[:, 0]) == prompt[b * TPB : (b + 1) * TPB]
        assert (words[:, 1] == 0).all() and (words[:, 2] == 0).all()
    close_all(mgr, eng, s.kv)


# ---------------------------------------------------------------------------- stats
def test_commit_pending_stats(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    s = new_seq(mgr, eng)
    assert s.kv.commit_pending_stats() == KVCacheStatsDelta(0, 0, 0, 0)
    assert s.step(toks(40, 1000))
    d = s.kv.commit_pending_stats()
    assert (d.alloc_total_blocks, d.alloc_new_blocks, d.reused_blocks, d.missed_blocks) == (3, 3, 0, 0)
    assert s.kv.commit_pending_stats() == KVCacheStatsDelta(0, 0, 0, 0)  # reset
    assert s.step(toks(2, 2000))  # within block 2: nothing new
    assert s.kv.commit_pending_stats() == KVCacheStatsDelta(0, 0, 0, 0)
    close_all(mgr, eng, s.kv)
    # 42 tokens in the tree. 70-token prompt: 42 reused (3 blocks, last partial), 5 - 3 missed.
    prompt = toks(40, 1000) + toks(2, 2000) + toks(28, 3000)
    kv = mgr.create_kv_cache(input_tokens=prompt)
    assert kv.num_committed_tokens == 42
    d = kv.commit_pending_stats()
    assert (d.alloc_total_blocks, d.alloc_new_blocks, d.reused_blocks, d.missed_blocks) == (3, 0, 3, 2)
    assert kv.commit_pending_stats() == KVCacheStatsDelta(0, 0, 0, 0)
    assert eng.resume(kv)  # the copy of the partial block counts as reused (already counted)
    assert kv.commit_pending_stats() == KVCacheStatsDelta(0, 0, 0, 0)
    t = Seq(eng, kv, prompt[:42])
    assert t.step(prompt[42:])
    d = kv.commit_pending_stats()
    assert (d.alloc_total_blocks, d.alloc_new_blocks, d.reused_blocks, d.missed_blocks) == (2, 2, 0, 0)
    close_all(mgr, eng, kv)
    # A fully reused prompt misses nothing.
    kv = mgr.create_kv_cache(input_tokens=prompt)
    assert kv.commit_pending_stats() == KVCacheStatsDelta(5, 0, 5, 0)
    kv.close()


def test_commit_pending_stats_with_swa_counts_full_group(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, layers=SWA2, quota=SWA2_QUOTA)
    prompt = toks(6 * TPB, 1000)
    run(mgr, eng, prompt)
    kv = mgr.create_kv_cache(input_tokens=prompt + toks(40, 5000))
    assert kv.num_committed_tokens == 96
    d = kv.commit_pending_stats()
    assert (d.alloc_total_blocks, d.alloc_new_blocks, d.reused_blocks, d.missed_blocks) == (6, 0, 6, 3)
    # The SWA group holds only the window blocks.
    b1 = list(kv.get_base_page_indices(1))
    e = (96 + 1 - 32) // TPB
    assert b1[:e] == [BAD_PAGE_INDEX] * e and all(x >= 0 for x in b1[e:])
    kv.close()


def test_committed_tokens_property(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    s = new_seq(mgr, eng)
    assert s.kv.committed_tokens == []
    assert s.step(toks(20, 1000))
    assert s.kv.committed_tokens == toks(20, 1000)
    assert s.step(toks(5, 50), commit=False)
    assert s.kv.committed_tokens == toks(20, 1000)
    s.kv.commit(toks(5, 50))
    assert s.kv.committed_tokens == toks(20, 1000) + toks(5, 50)
    # numpy arrays and tuples are accepted as token sequences
    assert s.step([], commit=True)
    s.kv.resize(capacity=40)
    s.kv.commit(np.arange(60, 65, dtype=np.int64))
    s.kv.commit((70, 71))
    assert s.kv.committed_tokens[-7:] == [60, 61, 62, 63, 64, 70, 71]
    close_all(mgr, eng, s.kv)


# ---------------------------------------------------------------------------- bytes tokens
def _digest(i: int) -> bytes:
    return bytes([(i * 7 + k) % 256 for k in range(32)])


def test_bytes_tokens_end_to_end(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    prompt: list[Any] = toks(10, 1000) + [_digest(1)] + toks(20, 2000) + [_digest(2), _digest(3)] + toks(9, 3000)
    assert len(prompt) == 42
    s = run(mgr, eng, prompt, close=False)
    assert s.kv.committed_tokens == prompt
    assert all(type(a) is type(b) for a, b in zip(s.kv.committed_tokens, prompt))
    s.verify()
    close_all(mgr, eng, s.kv)
    assert mgr.probe_reuse(input_tokens=prompt) == 42
    # A different digest at the same place does not match beyond it.
    other = list(prompt)
    other[11 + 20] = _digest(99)
    assert mgr.probe_reuse(input_tokens=other) == 31
    # An int equal to the digest's first 4 bytes is a different token.
    other2 = list(prompt)
    other2[10] = int.from_bytes(_digest(1)[:4], "little")
    assert mgr.probe_reuse(input_tokens=other2) == 10
    t = new_seq(mgr, eng, prompt + [_digest(4)] + toks(5, 4000))
    assert len(t.written) == 42 and t.kv.committed_tokens == prompt
    t.verify()
    assert t.step([_digest(4)] + toks(5, 4000))
    t.verify()
    close_all(mgr, eng, t.kv)
    assert mgr.probe_reuse(input_tokens=prompt + [_digest(4)] + toks(5, 4000)) == 48


def test_bad_tokens_rejected(make_manager: MakeManager) -> None:
    mgr = make_manager()
    st = storage(mgr)
    for bad, exc in (([b"x" * 31], ValueError), ([-1], ValueError), ([1 << 32], ValueError),
                     ([1.0], TypeError), ([True], TypeError), (["abc"], TypeError)):
        with pytest.raises(exc):
            mgr.create_kv_cache(input_tokens=bad)  # type: ignore[arg-type]
        with pytest.raises(exc):
            mgr.probe_reuse(input_tokens=bad)  # type: ignore[arg-type]
    assert mgr.num_open_caches == 0 and storage(mgr) == st


# ---------------------------------------------------------------------------- priority callback
@pytest.mark.parametrize("bad", [101, -1, 1000])
def test_priority_callback_out_of_range(make_manager: MakeManager, bad: int) -> None:
    mgr = make_manager()
    st = storage(mgr)
    kv = mgr.create_kv_cache(custom_priority_callback=lambda b, g: bad)
    assert kv.resume()
    with pytest.raises(ValueError):
        kv.resize(capacity=40)
    assert kv.capacity == 0 and kv.num_blocks == 0 and storage(mgr) == st
    mgr.check_invariants()
    kv.close()


def test_priority_callback_in_range_is_accepted(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    seen: list[tuple[int, int]] = []

    def cb(block: int, group: int) -> int:
        seen.append((block, group))
        return 0 if block % 2 else 100

    s = new_seq(mgr, eng, custom_priority_callback=cb)
    assert s.step(toks(40, 1000))
    assert sorted(seen) == [(0, 0), (1, 0), (2, 0)]
    close_all(mgr, eng, s.kv)


def test_priority_callback_bad_on_later_block_changes_nothing(make_manager: MakeManager) -> None:
    mgr = make_manager()
    st = storage(mgr)
    kv = mgr.create_kv_cache(custom_priority_callback=lambda b, g: 50 if b < 2 else 101)
    assert kv.resume()
    with pytest.raises(ValueError):
        kv.resize(capacity=4 * TPB)
    assert kv.capacity == 0 and kv.num_blocks == 0
    assert storage(mgr) == st
    kv.close()
    mgr.check_invariants()


def test_priority_callback_error_on_resume_changes_nothing(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, layers=SWA2, quota=SWA2_QUOTA)
    donor = toks(40, 1000)
    run(mgr, eng, donor)
    st = storage(mgr)
    kv = mgr.create_kv_cache(input_tokens=donor[:36] + [1, 2], custom_priority_callback=lambda b, g: 101 if g == 1 else 50)
    assert kv.num_committed_tokens == 36
    st_held = storage(mgr)
    snap = snapshot(kv, 2)
    with pytest.raises(ValueError):
        kv.resume()
    assert kv.status is KVCacheStatus.SUSPENDED
    assert snapshot(kv, 2) == snap and storage(mgr) == st_held
    kv.close()
    assert storage(mgr) == st


def test_priority_callback_error_evicts_nothing(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=6 * SLOT)
    p = toks(4 * TPB, 1000)
    run(mgr, eng, p)  # 4 droppable pages, 2 free
    st = storage(mgr)
    kv = mgr.create_kv_cache(custom_priority_callback=lambda b, g: 101)
    assert kv.resume()
    with pytest.raises(ValueError):
        kv.resize(capacity=4 * TPB)  # needs 2 evictions
    assert kv.capacity == 0 and storage(mgr) == st
    assert mgr.probe_reuse(input_tokens=p) == 4 * TPB
    kv.close()


SWA_ONLY = [attention(0, window=32), attention(1, window=32)]


def test_commit_pending_stats_swa_only_excludes_stale_reused_blocks(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, layers=SWA_ONLY)
    prompt = toks(6 * TPB, 1000)
    s = new_seq(mgr, eng)
    assert s.step(prompt)
    d = s.kv.commit_pending_stats()
    # resize with history 0 allocates every block; none was stale then.
    assert (d.alloc_total_blocks, d.alloc_new_blocks) == (6, 6)
    s.kv.close()
    eng.forget(s.kv)
    kv = mgr.create_kv_cache(input_tokens=prompt + toks(TPB, 5000))
    assert kv.num_committed_tokens == 96
    idx = list(kv.get_base_page_indices(0))
    held = sum(1 for x in idx if x != BAD_PAGE_INDEX)
    assert held == 2  # blocks 0..3 are stale at 96 with window 32
    d = kv.commit_pending_stats()
    assert (d.alloc_total_blocks, d.alloc_new_blocks, d.reused_blocks, d.missed_blocks) == (held, 0, held, 1)
    kv.close()


def test_resize_history_only_on_swa_prefill_chunks(make_manager: MakeManager) -> None:
    """Chunked prefill of a long prompt on an SWA model: each chunk's out-of-window blocks
    get no page, and the pages held stay bounded by the window."""
    mgr, eng = setup(make_manager, layers=SWA2, quota=SWA2_QUOTA)
    s = new_seq(mgr, eng)
    for chunk in range(10):
        assert s.step(toks(32, 1000 + 100 * chunk))
        b1 = list(s.kv.get_base_page_indices(1))
        assert sum(1 for x in b1 if x != BAD_PAGE_INDEX) <= 3
    s.verify()
    close_all(mgr, eng, s.kv)


def test_extreme_token_ids_round_trip_and_reuse(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    big = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 - 2, 2**31 + 5]
    prompt = (big * 7)[:45]
    s = run(mgr, eng, prompt, close=False)
    assert s.kv.committed_tokens == prompt
    s.verify()
    close_all(mgr, eng, s.kv)
    assert mgr.probe_reuse(input_tokens=prompt) == 45
    # Partial match inside block 2 with large ids.
    other = prompt[:37] + [2**32 - 3] * 5
    assert mgr.probe_reuse(input_tokens=other) == 37
    t = new_seq(mgr, eng, other)
    assert len(t.written) == 37 and t.kv.committed_tokens == prompt[:37]
    t.verify()
    assert t.step(other[37:])
    t.verify()
    close_all(mgr, eng, t.kv)


def test_partial_match_inside_block_with_bytes_tokens(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    prompt: list[Any] = toks(16, 1000) + [_digest(5), 7, 8, _digest(6)] + toks(10, 2000)
    run(mgr, eng, prompt)
    other: list[Any] = prompt[:19] + [_digest(7)] + toks(4, 3000)
    assert mgr.probe_reuse(input_tokens=other) == 19
    t = new_seq(mgr, eng, other)
    assert t.kv.committed_tokens == prompt[:19]
    t.verify()
    assert t.step(other[19:])
    t.verify()
    close_all(mgr, eng, t.kv)
    # Same first 4 bytes, different digest: a different token, no partial match past it.
    d5b = _digest(5)[:4] + bytes(28)
    assert mgr.probe_reuse(input_tokens=toks(16, 1000) + [d5b, 7]) == 16
