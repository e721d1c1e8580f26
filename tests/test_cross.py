"""Cross-attention caches (SPEC §4.9): full-attention layers only, sized once with resize(L, L),
reuse keyed by the encoder's key tokens."""

from __future__ import annotations

from typing import Callable

import pytest
from _serving import Seq
from conftest import attention, make_config
from fake_engine import FakeEngine, Step

from kv_cache_manager_v2 import KVCache, KVCacheManager, LogicError

MakeManager = Callable[..., KVCacheManager]
TPB = 32
L = 1500
NB = 47  # ceil(1500 / 32)
LAYERS = [attention(0), attention(1)]  # 512 bytes per buffer per block: 16 bytes per token


def _cross(make_manager: MakeManager, quota: int = 4 << 20) -> tuple[KVCacheManager, FakeEngine]:
    kw = dict(layers=LAYERS, tokens_per_block=TPB, quota=quota, cache_kind="cross")
    mgr = make_manager(**kw)
    return mgr, FakeEngine(mgr, make_config(**kw))  # type: ignore[arg-type]


def _keys(n: int = L, base: int = 5000) -> list[int]:
    return [base + 7 * i for i in range(n)]


def _indices(kv: KVCache) -> list[list[int]]:
    return [list(kv.get_base_page_indices(lg)) for lg in range(1)]


def _encode(eng: FakeEngine, kv: KVCache, keys: list[int], reused: int = 0) -> None:
    """Sizes the cache with resize(L, L), writes the cross K/V, commits the key tokens."""
    assert kv.resume()
    assert kv.resize(len(keys), len(keys))
    eng.forward([Step(kv, keys[reused:], keys[:reused])])
    kv.commit(keys[kv.num_committed_tokens :])


def test_cross_cache_holds_its_blocks_through_decode(make_manager: MakeManager) -> None:
    cmgr, ceng = _cross(make_manager)
    smgr = make_manager(layers=LAYERS, tokens_per_block=TPB, quota=4 << 20)
    seng = FakeEngine(smgr, make_config(layers=LAYERS, tokens_per_block=TPB, quota=4 << 20))
    keys = _keys()
    cross = cmgr.create_kv_cache(input_tokens=keys)
    _encode(ceng, cross, keys)
    assert cross.num_blocks == NB and cross.capacity == L and cross.history_length == L
    before = _indices(cross)
    assert all(i >= 0 for i in before[0]) and len(before[0]) == NB
    assert len(cross.get_aggregated_page_indices(0, valid_only=True)) == NB
    dec = Seq(seng, smgr.create_kv_cache())
    assert dec.kv.resume()
    assert dec.step(list(range(10, 60)))  # decoder prompt
    for i in range(150):
        assert dec.step([100 + i])
        if i % 50 == 0:
            assert cross.resize(L, L)  # always allowed at the current capacity
            ceng.verify(cross, keys)
        assert cross.num_blocks == NB and cross.capacity == L
        assert _indices(cross) == before
    dec.verify()
    ceng.verify(cross, keys)
    dec.close()
    cross.close()


def test_capacity_change_after_sizing_raises_and_changes_nothing(make_manager: MakeManager) -> None:
    cmgr, ceng = _cross(make_manager)
    keys = _keys()
    kv = cmgr.create_kv_cache(input_tokens=keys)
    _encode(ceng, kv, keys)
    before = (_indices(kv), kv.capacity, kv.history_length, kv.num_committed_tokens, kv.num_blocks)
    free = [s.free for s in cmgr.get_storage_statistics(0)]
    for cap, hist in ((L + 1, L + 1), (L + 100, None), (2000, 2000), (L - 1, None), (L - 32, None)):
        with pytest.raises(LogicError, match="capacity"):
            kv.resize(cap, hist)
    with pytest.raises(LogicError, match="capacity"):
        kv.capacity = L + 40
    assert (_indices(kv), kv.capacity, kv.history_length, kv.num_committed_tokens, kv.num_blocks) == before
    assert [s.free for s in cmgr.get_storage_statistics(0)] == free
    assert kv.resize(L, L)
    assert kv.resize(capacity=L)
    assert kv.resize()
    ceng.verify(kv, keys)
    with pytest.raises(ValueError, match="beam"):
        kv.get_base_page_indices(0, beam=1)
    kv.close()


def test_same_key_tokens_reuse_all(make_manager: MakeManager) -> None:
    cmgr, ceng = _cross(make_manager)
    keys = _keys()
    a = cmgr.create_kv_cache(input_tokens=keys)
    _encode(ceng, a, keys)
    a.close()
    ceng.forget(a)
    assert cmgr.probe_reuse(input_tokens=keys) == L
    b = cmgr.create_kv_cache(input_tokens=keys)
    assert b.capacity == L and b.num_committed_tokens == L and b.history_length == L
    assert b.resume()
    assert b.resize(L, L)  # sizing at the reused length: allowed
    ceng.verify(b, keys)
    st = b.commit_pending_stats()
    assert st.reused_blocks == NB and st.alloc_new_blocks == 0
    with pytest.raises(LogicError):
        b.resize(L + 1, L + 1)
    assert b.capacity == L
    # Different key tokens share nothing.
    assert cmgr.probe_reuse(input_tokens=_keys(base=90000)) == 0
    b.close()


def test_reuse_at_creation_is_not_the_sizing(make_manager: MakeManager) -> None:
    cmgr, ceng = _cross(make_manager)
    keys = _keys()
    a = cmgr.create_kv_cache(input_tokens=keys[:1000])
    _encode(ceng, a, keys[:1000])
    a.close()
    ceng.forget(a)
    b = cmgr.create_kv_cache(input_tokens=keys)
    assert b.capacity == 1000  # reused, not yet sized
    assert b.resume()
    assert b.resize(L, L)  # the sizing
    ceng.forward([Step(b, keys[1000:], keys[:1000])])
    b.commit(keys[b.num_committed_tokens :])
    ceng.verify(b, keys)
    assert b.num_blocks == NB
    with pytest.raises(LogicError):
        b.resize(1600, 1600)
    b.close()
    assert cmgr.probe_reuse(input_tokens=keys) == L


def test_history_only_resize_and_failed_sizing_do_not_size(make_manager: MakeManager) -> None:
    # Room for 20 blocks only: sizing to 1500 fails and changes nothing.
    cmgr, ceng = _cross(make_manager, quota=20 * 4 * 512)
    kv = cmgr.create_kv_cache()
    assert kv.resume()
    assert kv.resize(history_length=0)
    assert kv.resize(L, L) is False
    assert kv.capacity == 0 and kv.history_length == 0 and kv.num_blocks == 0
    keys = _keys(600)
    assert kv.resize(600, 600)
    ceng.forward([Step(kv, keys, [])])
    ceng.verify(kv, keys)
    with pytest.raises(LogicError):
        kv.resize(640, 640)
    kv.close()


def test_no_key_tokens_never_shares(make_manager: MakeManager) -> None:
    cmgr, ceng = _cross(make_manager)
    keys = _keys()
    a = cmgr.create_kv_cache()  # no key tokens
    _encode(ceng, a, keys)
    assert a.num_committed_tokens == L
    a.close()
    assert cmgr.probe_reuse(input_tokens=keys) == 0
    # Also when the same encoder output was published by a keyed cache: no key tokens, no reuse.
    b = cmgr.create_kv_cache(input_tokens=keys)
    _encode(ceng, b, keys)
    b.close()
    c = cmgr.create_kv_cache()
    assert c.capacity == 0 and c.num_committed_tokens == 0
    assert c.resume()
    assert c.resize(L, L)
    assert c.commit_pending_stats().reused_blocks == 0
    c.close()
    assert cmgr.probe_reuse(input_tokens=keys) == L
    b2 = cmgr.create_kv_cache(input_tokens=keys)
    assert b2.num_committed_tokens == L
    b2.close()


def test_cross_caches_through_batch_admission(make_manager: MakeManager) -> None:
    """create_kv_caches works for cross caches too: a member sized to L (capacity = L) reuses
    the encoder output of an earlier request with the same key tokens, a new one is sized fresh;
    after the sizing a capacity change is a LogicError."""
    from kv_cache_manager_v2 import KVCacheRequest

    cmgr, ceng = _cross(make_manager, quota=8 << 20)
    keys = _keys()
    a = cmgr.create_kv_cache(input_tokens=keys)
    _encode(ceng, a, keys)
    a.close()
    ceng.forget(a)
    other = _keys(base=70000)
    got = cmgr.create_kv_caches(
        [KVCacheRequest(input_tokens=keys), KVCacheRequest(input_tokens=other, history_length=0)]
    )
    assert all(kv is not None for kv in got)
    same, fresh = got
    assert same is not None and fresh is not None
    assert same.is_active and same.capacity == L and same.num_committed_tokens == L
    assert same.num_blocks == NB and all(i >= 0 for i in same.get_base_page_indices(0))
    ceng.verify(same, keys)
    assert same.resize(L, L)  # the sizing at the current capacity is always allowed
    with pytest.raises(LogicError):
        same.resize(L + 32, L + 32)
    assert same.capacity == L
    assert fresh.is_active and fresh.capacity == L and fresh.num_committed_tokens == 0
    assert fresh.resize(L, L)  # its sizing
    ceng.forward([Step(fresh, other, [])])
    fresh.commit(other)
    ceng.verify(fresh, other)
    with pytest.raises(LogicError):
        fresh.resize(L - 32, L - 32)
    for kv in (same, fresh):
        kv.close()
        ceng.forget(kv)
