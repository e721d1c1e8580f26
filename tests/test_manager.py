"""KVCacheManager behaviour (SPEC §3 manager API, §4.3 reuse, §4.6 eviction at level 0)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import pytest

from conftest import attention, make_config
from fake_engine import FakeEngine, Step
from _serving import Seq, setup, toks
from kv_cache_manager_v2 import (
    BufferId,
    KVCache,
    KVCacheManager,
    KVCacheStatus,
    LogicError,
    ReuseScope,
    is_compiled,
)

TPB = 16
SLOT = 4 * 512  # default config: one layer group (layers 0, 1), K + V of 512 bytes
MiB = 1 << 20
SWA2 = [attention(0), attention(1, size=1024, window=32)]  # two pool groups

MakeManager = Callable[..., KVCacheManager]


# ---------------------------------------------------------------------------- helpers
def new_seq(mgr: KVCacheManager, eng: FakeEngine, prompt: Sequence[Any] | None = None, **kw: Any) -> Seq:
    kv = mgr.create_kv_cache(input_tokens=prompt, **kw)
    written = list(prompt[: kv.num_committed_tokens]) if prompt is not None else []
    assert eng.resume(kv)
    return Seq(eng, kv, written)


def run(mgr: KVCacheManager, eng: FakeEngine, tokens: Sequence[Any], close: bool = True, **kw: Any) -> Seq:
    s = new_seq(mgr, eng, tokens, **kw)
    rest = list(tokens[len(s.written) :])
    if rest:
        assert s.step(rest)
    s.verify()
    if close:
        s.close()
    return s


def storage(mgr: KVCacheManager) -> list[tuple[int, int, int, int, int]]:
    return [(s.total, s.free, s.evictable, s.available, s.slot_size) for s in mgr.get_storage_statistics(0)]


def iter_stats(mgr: KVCacheManager) -> dict[int, dict[str, int]]:
    # The integer counters (onboarded_from_level is a per-level list; tier tests cover it).
    return {
        g: {k: v for k, v in st.as_dict().items() if isinstance(v, int)}
        for g, st in mgr.get_and_reset_iteration_stats().items()
    }


# ---------------------------------------------------------------------------- create / probe
def test_create_kv_cache_arguments(make_manager: MakeManager) -> None:
    mgr = make_manager()
    kv = mgr.create_kv_cache(id="req-1")
    assert kv.id == "req-1"
    assert kv.status is KVCacheStatus.SUSPENDED
    kv2 = mgr.create_kv_cache(reuse_scope=ReuseScope(lora_id=3, salt=5), input_tokens=(1, 2, 3))
    assert kv2.num_committed_tokens == 0
    assert mgr.num_open_caches == 2
    with pytest.raises(TypeError):
        mgr.create_kv_cache(reuse_scope=3)
    with pytest.raises(TypeError):
        mgr.create_kv_cache(custom_priority_callback=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        mgr.create_kv_cache(input_tokens="abc")  # type: ignore[arg-type]
    assert mgr.num_open_caches == 2
    kv.close()
    kv2.close()
    assert mgr.num_open_caches == 0


def test_probe_reuse_changes_nothing(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=8 * SLOT)
    a = toks(32, 1000)
    b = toks(32, 2000)
    run(mgr, eng, a)
    run(mgr, eng, b)
    iter_stats(mgr)
    st = storage(mgr)
    assert mgr.probe_reuse(input_tokens=None) == 0
    assert mgr.probe_reuse(input_tokens=[]) == 0
    for _ in range(5):
        assert mgr.probe_reuse(input_tokens=a + toks(20, 9000)) == 32
        assert mgr.probe_reuse(input_tokens=a[:20] + [5]) == 20
        assert mgr.probe_reuse(reuse_scope=ReuseScope(salt=1), input_tokens=a) == 0
    assert storage(mgr) == st
    assert all((not any(v)) if isinstance(v, list) else v == 0 for d in iter_stats(mgr).values() for v in d.values())
    assert mgr.num_open_caches == 0
    # Probing does not refresh LRU: `a` (released first) is still evicted first.
    s = new_seq(mgr, eng)
    assert s.kv.resize(capacity=6 * TPB)
    assert mgr.probe_reuse(input_tokens=a) == 0
    assert mgr.probe_reuse(input_tokens=b) == 32
    s.close()


def test_probe_equals_create_reuse(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    base = toks(50, 1000)
    run(mgr, eng, base)
    for prompt in (base, base[:49], base[:33] + [1], base + [7, 8], base[:16], base[:5], toks(3, 1)):
        want = mgr.probe_reuse(input_tokens=prompt)
        kv = mgr.create_kv_cache(input_tokens=prompt)
        assert kv.num_committed_tokens == want
        assert kv.committed_tokens == list(prompt[:want])
        kv.close()


# ---------------------------------------------------------------------------- clear / shutdown
def test_clear_and_shutdown_refused_while_caches_open(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    prompt = toks(40, 1000)
    run(mgr, eng, prompt)
    s1 = new_seq(mgr, eng)
    assert s1.step(toks(20, 2000))
    st = storage(mgr)
    with pytest.raises(LogicError, match=r"\b1 KV cache\(s\) still open"):
        mgr.clear_reusable_blocks()
    with pytest.raises(LogicError, match=r"\b1 KV cache\(s\) still open"):
        mgr.shutdown()
    kv2 = mgr.create_kv_cache()  # a suspended cache counts as open too
    with pytest.raises(LogicError, match=r"\b2 KV cache\(s\) still open"):
        mgr.clear_reusable_blocks()
    with pytest.raises(LogicError, match=r"\b2 KV cache\(s\) still open"):
        mgr.shutdown()
    assert storage(mgr) == st
    assert mgr.probe_reuse(input_tokens=prompt) == 40
    s1.verify()
    assert s1.step(toks(5, 3000))
    s1.close()
    kv2.close()
    total = storage(mgr)[0][0]
    assert storage(mgr)[0][1] < total
    mgr.clear_reusable_blocks()
    assert mgr.probe_reuse(input_tokens=prompt) == 0
    st = storage(mgr)[0]
    assert st[1] == total and st[2] == 0 and st[3] == total
    mgr.clear_reusable_blocks()  # again: nothing to do
    mgr.shutdown()


def test_calls_after_shutdown_raise(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    run(mgr, eng, toks(40, 1000))
    mgr.shutdown()
    with pytest.raises(LogicError):
        mgr.create_kv_cache()
    with pytest.raises(LogicError):
        mgr.probe_reuse(input_tokens=[1, 2])
    with pytest.raises(LogicError):
        mgr.clear_reusable_blocks()
    with pytest.raises(LogicError):
        mgr.get_mem_pool_base_address(0, "k")
    with pytest.raises(LogicError):
        mgr.get_aggregated_pages([BufferId(0, "k")])
    mgr.shutdown()  # idempotent


# ---------------------------------------------------------------------------- quotas / statistics
@pytest.mark.parametrize(
    "layers,quota",
    [
        (None, 1 * MiB),
        (None, 1 * MiB + 1000),
        (SWA2, 3 * MiB + 12345),
        ([attention(0, size=4096), attention(1, size=2048, window=64)], 5 * MiB + 7),
    ],
)
def test_get_quota_and_storage_statistics(make_manager: MakeManager, layers: Any, quota: int) -> None:
    kw: dict[str, Any] = {"quota": quota}
    if layers is not None:
        kw["layers"] = layers
    mgr = make_manager(**kw)
    q = mgr.get_quota(0)
    stats = mgr.get_storage_statistics(0)
    assert q == sum(s.total * s.slot_size for s in stats)
    assert abs(q - quota) < max(2 * MiB, max(s.slot_size for s in stats))
    for i, s in enumerate(stats):
        assert s.pool_group_id == i
        assert s.total > 0 and s.free == s.total and s.evictable == 0 and s.available == s.total
        assert s.utilization == 0.0
    with pytest.raises(ValueError):
        mgr.get_quota(1)
    with pytest.raises(ValueError):
        mgr.get_storage_statistics(1)
    with pytest.raises(TypeError):
        mgr.get_quota("0")  # type: ignore[arg-type]


def test_storage_statistics_by_page_state(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=32 * SLOT)

    def check(free: int, evictable: int) -> None:
        (s,) = mgr.get_storage_statistics(0)
        assert (s.total, s.free, s.evictable, s.available, s.slot_size) == (32, free, evictable, free + evictable, SLOT)
        assert s.utilization == pytest.approx((32 - free - evictable) / 32)

    check(32, 0)
    a = new_seq(mgr, eng)
    assert a.step(toks(48, 1000))  # 3 LOCKED pages (also in the tree)
    check(29, 0)
    a.kv.suspend()  # HELD: not evictable with a single level
    check(29, 0)
    assert eng.resume(a.kv)
    a.close()  # DROPPABLE: not free, evictable
    check(29, 3)
    b = new_seq(mgr, eng, toks(48, 1000))  # reused pages LOCKED again
    check(29, 0)
    b.kv.suspend()
    check(29, 0)
    b.kv.close()
    eng.forget(b.kv)
    check(29, 3)
    c = new_seq(mgr, eng)
    assert c.kv.resize(capacity=20)  # private uncommitted pages
    check(27, 3)
    c.close()
    check(29, 3)
    mgr.clear_reusable_blocks()
    check(32, 0)


def test_iteration_stats_counts_and_reset(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager)
    zero = iter_stats(mgr)
    assert list(zero) == [0] and all((not any(v)) if isinstance(v, list) else v == 0 for v in zero[0].values())
    prompt = toks(40, 1000)
    run(mgr, eng, prompt)
    st = iter_stats(mgr)[0]
    assert st["allocated_blocks"] == 3 and st["new_blocks"] == 3
    assert st["reused_full_blocks"] == 0 and st["reused_partial_blocks"] == 0
    assert st["missed_blocks"] == 3 and st["dropped_blocks"] == 0
    assert st["new_bytes"] == 3 * SLOT and st["allocated_bytes"] == 3 * SLOT
    assert all(v == 0 for v in iter_stats(mgr)[0].values())  # reset
    # 56-token prompt: 36 reused (2 full + 1 partial), 1 block missed, 1 block allocated new.
    p2 = prompt[:36] + toks(20, 5000)
    s = new_seq(mgr, eng, p2)
    assert len(s.written) == 36
    assert s.step(p2[36:])
    st = iter_stats(mgr)[0]
    assert st["reused_full_blocks"] == 2 and st["reused_partial_blocks"] == 1
    assert st["missed_blocks"] == 1
    assert st["new_blocks"] == 1 and st["allocated_blocks"] == 4
    assert st["reused_bytes"] == 3 * SLOT
    s.close()
    stats = mgr.get_and_reset_iteration_stats()
    assert stats[0].reused_blocks == 0 and stats[0].dropped_blocks == 0


def test_iteration_stats_per_group_with_swa(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, layers=SWA2)
    s = new_seq(mgr, eng)
    assert s.kv.resize(capacity=6 * TPB, history_length=6 * TPB)  # SWA blocks [0, 4) stale
    st = iter_stats(mgr)
    assert st[0]["new_blocks"] == 6 and st[0]["allocated_blocks"] == 6
    assert st[1]["new_blocks"] == 2 and st[1]["allocated_blocks"] == 2
    assert st[0]["new_bytes"] == 6 * 2 * 512 and st[1]["new_bytes"] == 2 * 2 * 1024
    s.close()


def test_iteration_stats_dropped_on_eviction(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=8 * SLOT)
    run(mgr, eng, toks(4 * TPB, 1000))
    iter_stats(mgr)
    s = new_seq(mgr, eng)
    assert s.kv.resize(capacity=6 * TPB)
    st = iter_stats(mgr)[0]
    assert st["dropped_blocks"] >= 2 and st["dropped_bytes"] == st["dropped_blocks"] * SLOT
    assert st["new_blocks"] == 6
    s.close()


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.get_quota(False),
        lambda m: m.get_storage_statistics(False),
        lambda m: m.clamp_max_seq_len_for_mem(True, 100),
        lambda m: m.get_layer_group_id(False),
    ],
    ids=["get_quota", "get_storage_statistics", "clamp", "get_layer_group_id"],
)
def test_bool_is_an_int_argument(make_manager: MakeManager, call: Callable[[KVCacheManager], Any]) -> None:
    # Documented choice (DESIGN.md): a bool passed for an int parameter is that int in both modes.
    mgr = make_manager()
    call(mgr)


def test_is_compiled_is_bool() -> None:
    assert isinstance(is_compiled(), bool)


# ---------------------------------------------------------------------------- clamp_max_seq_len_for_mem
@pytest.mark.parametrize("batch", [1, 3, 7])
def test_clamp_max_seq_len_for_mem_fits(make_manager: MakeManager, batch: int) -> None:
    mgr = make_manager(quota=100 * SLOT)
    L = mgr.clamp_max_seq_len_for_mem(batch, 10**6)
    assert L % TPB == 0 and 0 < L <= 10**6
    caches = [mgr.create_kv_cache() for _ in range(batch)]
    for kv in caches:
        assert kv.resume()
        assert kv.resize(capacity=L)
    # One more block for every sequence does not fit.
    grown = [kv.resize(capacity=L + TPB) for kv in caches]
    assert not all(grown)
    for kv in caches:
        kv.close()
    assert L == (100 // batch) * TPB


def test_clamp_max_seq_len_for_mem_bounds(make_manager: MakeManager) -> None:
    mgr = make_manager(quota=100 * SLOT)
    assert mgr.clamp_max_seq_len_for_mem(1, 100) == 96
    assert mgr.clamp_max_seq_len_for_mem(1, 96) == 96
    assert mgr.clamp_max_seq_len_for_mem(1, 10) == 0
    assert mgr.clamp_max_seq_len_for_mem(1, 10**9) == 100 * TPB
    assert mgr.clamp_max_seq_len_for_mem(200, 10**9) == 0
    with pytest.raises(ValueError):
        mgr.clamp_max_seq_len_for_mem(0, 100)
    with pytest.raises(ValueError):
        mgr.clamp_max_seq_len_for_mem(1, 0)
    with pytest.raises(TypeError):
        mgr.clamp_max_seq_len_for_mem(1.5, 100)  # type: ignore[arg-type]


def test_clamp_max_seq_len_for_mem_swa(make_manager: MakeManager) -> None:
    mgr = make_manager(layers=SWA2, quota=40 * 3072)
    batch = 2
    L = mgr.clamp_max_seq_len_for_mem(batch, 10**6)
    assert L % TPB == 0 and L > 0
    caches = [mgr.create_kv_cache() for _ in range(batch)]
    for kv in caches:
        assert kv.resume()
        assert kv.resize(capacity=L, history_length=L)
    assert not all(kv.resize(capacity=L + TPB) for kv in caches)
    for kv in caches:
        kv.close()


# ---------------------------------------------------------------------------- resume gate
def test_resume_gate_max_util_for_resume(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=8 * SLOT, max_util_for_resume=0.5)
    prompt = toks(32, 1000)
    run(mgr, eng, prompt)  # 2 droppable pages: available, utilization 0
    a = new_seq(mgr, eng)
    assert a.kv.resize(capacity=3 * TPB)  # 3 locked, util 3/8
    b = mgr.create_kv_cache(input_tokens=prompt + [1])  # holds 2 pages: util 5/8
    assert b.num_committed_tokens == 32
    c = mgr.create_kv_cache()
    st = storage(mgr)
    idx = list(b.get_base_page_indices(0))
    for kv in (b, c):
        assert kv.resume() is False
        assert kv.status is KVCacheStatus.SUSPENDED
    assert list(b.get_base_page_indices(0)) == idx and b.num_committed_tokens == 32
    assert storage(mgr) == st
    assert a.kv.resize(capacity=2 * TPB)  # util 4/8 == 0.5: not above the gate
    assert eng.resume(b)
    bs = Seq(eng, b, prompt)
    bs.verify()
    assert bs.step([1])  # 3 + 2 blocks locked: 5/8
    assert c.resume() is False
    bs.close()
    assert c.resume() is True
    c.close()
    a.close()


def test_resume_gate_disabled_at_one(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=8 * SLOT, max_util_for_resume=1.0)
    a = new_seq(mgr, eng)
    assert a.kv.resize(capacity=8 * TPB)  # util 1.0
    assert storage(mgr)[0][3] == 0
    b = mgr.create_kv_cache()
    assert b.resume() is True
    assert b.resize(capacity=1) is False
    b.close()
    a.close()


def test_resume_default_gate(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=8 * SLOT)  # default 0.97
    a = new_seq(mgr, eng)
    assert a.kv.resize(capacity=8 * TPB)
    b = mgr.create_kv_cache()
    assert b.resume() is False
    a.kv.capacity = 7 * TPB  # 7/8 = 0.875
    assert b.resume() is True
    b.close()
    a.close()


# ---------------------------------------------------------------------------- eviction
def test_droppable_page_evicted_under_pressure(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=8 * SLOT)
    p = toks(4 * TPB, 1000)
    run(mgr, eng, p)
    assert mgr.probe_reuse(input_tokens=p) == 64
    st = storage(mgr)[0]
    assert st[1] == 4 and st[2] == 4
    s = new_seq(mgr, eng)
    assert s.kv.resize(capacity=4 * TPB)  # fits in free slots: nothing evicted
    assert mgr.probe_reuse(input_tokens=p) == 64
    assert s.kv.resize(capacity=5 * TPB)  # needs one evicted page
    assert mgr.probe_reuse(input_tokens=p) < 64
    assert s.step(toks(5 * TPB, 2000))
    s.verify()
    s.close()
    mgr.check_invariants()


def test_sequence_larger_than_level0_fails_cleanly(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=8 * SLOT)
    p = toks(3 * TPB, 1000)
    run(mgr, eng, p)
    st = storage(mgr)
    s = new_seq(mgr, eng)
    assert s.kv.resize(capacity=9 * TPB) is False
    assert s.kv.resize(capacity=100 * TPB) is False
    assert s.kv.capacity == 0 and storage(mgr) == st
    assert mgr.probe_reuse(input_tokens=p) == 48  # nothing was evicted for a hopeless request
    assert s.step(toks(8 * TPB, 2000))  # the whole level still usable
    s.verify()
    assert mgr.probe_reuse(input_tokens=p) == 0
    s.close()
    t = run(mgr, eng, p, close=False)
    t.verify()
    t.close()


def test_held_pages_never_evicted(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=8 * SLOT)
    a = new_seq(mgr, eng)
    assert a.step(toks(4 * TPB, 1000))
    a.kv.suspend()
    b = new_seq(mgr, eng)
    assert b.kv.resize(capacity=5 * TPB) is False
    assert b.kv.resize(capacity=4 * TPB)
    assert eng.resume(a.kv) is False  # utilization 8/8 > 0.97 refuses the resume
    assert a.kv.status is KVCacheStatus.SUSPENDED
    b.close()
    assert eng.resume(a.kv)
    a.verify()
    a.close()


def test_eviction_lru_order(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=8 * SLOT)
    pa, pb, pc = toks(32, 1000), toks(32, 2000), toks(32, 3000)
    run(mgr, eng, pa)
    run(mgr, eng, pb)
    run(mgr, eng, pc)
    run(mgr, eng, pa)  # pa reused and released again: now the most recent
    assert [mgr.probe_reuse(input_tokens=p) for p in (pa, pb, pc)] == [32, 32, 32]
    s = new_seq(mgr, eng)
    assert s.kv.resize(capacity=4 * TPB)  # 2 free + 2 evicted: pb goes first
    assert [mgr.probe_reuse(input_tokens=p) for p in (pa, pb, pc)] == [32, 0, 32]
    assert s.kv.resize(capacity=6 * TPB)  # then pc
    assert [mgr.probe_reuse(input_tokens=p) for p in (pa, pb, pc)] == [32, 0, 0]
    s.close()


def test_eviction_priority_before_lru(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=8 * SLOT)
    pa, pb, pc = toks(32, 1000), toks(32, 2000), toks(32, 3000)
    run(mgr, eng, pa, custom_priority_callback=lambda b, g: 80)  # oldest, but high priority
    run(mgr, eng, pb)  # default 35
    run(mgr, eng, pc, custom_priority_callback=lambda b, g: 10)  # newest, lowest priority
    s = new_seq(mgr, eng)
    assert s.kv.resize(capacity=4 * TPB)
    assert [mgr.probe_reuse(input_tokens=p) for p in (pa, pb, pc)] == [32, 32, 0]
    assert s.kv.resize(capacity=6 * TPB)
    assert [mgr.probe_reuse(input_tokens=p) for p in (pa, pb, pc)] == [32, 0, 0]
    assert s.kv.resize(capacity=8 * TPB)
    assert [mgr.probe_reuse(input_tokens=p) for p in (pa, pb, pc)] == [0, 0, 0]
    s.close()


def test_eviction_priority_per_block(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=8 * SLOT)
    pa = toks(4 * TPB, 1000)
    # Tail blocks get the lowest priority: eviction trims the chain from its end.
    run(mgr, eng, pa, custom_priority_callback=lambda b, g: 90 - 20 * b)
    s = new_seq(mgr, eng)
    assert s.kv.resize(capacity=5 * TPB)
    assert mgr.probe_reuse(input_tokens=pa) == 3 * TPB
    assert s.kv.resize(capacity=6 * TPB)
    assert mgr.probe_reuse(input_tokens=pa) == 2 * TPB
    s.close()
    t = run(mgr, eng, pa, close=False)
    t.verify()
    t.close()


def test_reused_pages_of_new_cache_are_not_evicted_by_its_own_growth(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=8 * SLOT)
    p = toks(3 * TPB, 1000)
    run(mgr, eng, p)
    s = new_seq(mgr, eng, p + toks(5 * TPB, 2000))
    assert len(s.written) == 48
    assert s.step(toks(5 * TPB, 2000))  # uses every slot; reused pages are locked
    assert s.kv.resize(capacity=9 * TPB) is False
    s.verify()
    s.close()


# ---------------------------------------------------------------------------- quota resize
def test_manager_resize_quota(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=16 * SLOT)
    a = new_seq(mgr, eng)
    assert a.step(toks(40, 1000))
    with pytest.raises(LogicError):
        mgr.resize(0, 8 * SLOT)  # type: ignore[attr-defined]
    a.kv.suspend()
    assert mgr.resize(0, 8 * SLOT) is True  # type: ignore[attr-defined]
    assert mgr.get_quota(0) == 8 * SLOT
    assert eng.resume(a.kv)
    a.verify()
    a.close()


def test_resume_false_when_copy_on_write_page_cannot_be_placed(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=4 * SLOT, max_util_for_resume=1.0)
    donor = toks(40, 1000)
    run(mgr, eng, donor)  # 3 droppable pages (the last one a partial block)
    b = mgr.create_kv_cache(input_tokens=donor[:36] + [1])  # holds all 3
    assert b.num_committed_tokens == 36
    c = new_seq(mgr, eng)
    assert c.kv.resize(capacity=TPB)  # the last free slot
    st = storage(mgr)
    assert st[0][3] == 0
    idx = list(b.get_base_page_indices(0))
    assert b.resume() is False  # the private copy of block 2 has nowhere to go
    assert b.status is KVCacheStatus.SUSPENDED
    assert list(b.get_base_page_indices(0)) == idx and storage(mgr) == st
    c.close()
    assert eng.resume(b)
    bs = Seq(eng, b, donor[:36])
    bs.verify()
    assert bs.step([1])
    bs.close()
    t = run(mgr, eng, donor, close=False)  # the donor block is intact
    t.verify()
    t.close()


def test_evicting_a_middle_block_prunes_the_subtree(make_manager: MakeManager) -> None:
    mgr, eng = setup(make_manager, quota=8 * SLOT)
    p = toks(4 * TPB, 1000)
    # Block 1 has the lowest priority: it goes first and takes blocks 2, 3 with it.
    run(mgr, eng, p, custom_priority_callback=lambda b, g: 5 if b == 1 else 60)
    assert storage(mgr)[0][1:3] == (4, 4)
    s = new_seq(mgr, eng)
    assert s.kv.resize(capacity=5 * TPB)
    assert mgr.probe_reuse(input_tokens=p) == TPB
    st = storage(mgr)[0]
    assert st[1] == 2  # 8 slots - 5 locked - block 0 still droppable
    assert st[2] == 1
    s.close()
