"""Layout: layer groups, stale ranges, coalesced slots, pools, pool groups, page-index arithmetic
(SPEC §2 and its worked example), quotas and aggregated page descriptors, checked on real bytes."""

from __future__ import annotations

import ctypes
import os
import random
from typing import Any, Callable

import pytest

from kv_cache_manager_v2 import (
    AttentionLayerConfig,
    BufferConfig,
    BufferId,
    GpuCacheTierConfig,
    KVCache,
    KVCacheManager,
    KVCacheManagerConfig,
    PageIndexMode,
)
from kv_cache_manager_v2._life_cycle_registry import LifeCycle

from conftest import attention, make_config
from fake_engine import FakeEngine, Step

KiB = 1 << 10
MiB = 1 << 20
MakeManager = Callable[..., KVCacheManager]
SHARED = PageIndexMode.SHARED
PER_LAYER = PageIndexMode.PER_LAYER


def _div_up(a: int, b: int) -> int:
    return -(-a // b)


def _stale(h: int, tpb: int, window: int | None, sink_tokens: int) -> tuple[int, int]:
    """SPEC §2, written independently of the library."""
    if window is None:
        return (0, 0)
    s = min(_div_up(h, tpb), _div_up(sink_tokens, tpb))
    e = max(s, (h + 1 - window) // tpb)
    return (s, e)


def _active(m: KVCacheManager, capacity: int, history: int | None = None) -> KVCache:
    kv = m.create_kv_cache()
    assert kv.resume()
    if history is None:
        assert kv.resize(capacity=capacity)
    else:
        assert kv.resize(capacity=capacity, history_length=history)
    return kv


def _all_buffers(cfg: KVCacheManagerConfig) -> list[BufferId]:
    out: list[BufferId] = []
    for layer in cfg.layers:
        for b in layer.buffers:
            out.append(BufferId(layer.layer_id, b.role))
    return out


def _page_addresses(m: KVCacheManager, kv: KVCache, layer: int, role: str, mode: PageIndexMode) -> list[int]:
    """Byte address of every kernel page of (layer, role), -1 for unmapped pages."""
    lg = m.get_layer_group_id(layer)
    base = m.get_mem_pool_base_address(layer, role, mode)
    stride = m.get_page_stride(layer, role)
    idx = m.get_page_index_converter(layer, role)(list(kv.get_base_page_indices(lg)), mode)
    return [-1 if i < 0 else base + i * stride for i in idx]


# ----------------------------------------------------------------------------- layer groups
def test_layer_grouping_dense_ids_by_first_appearance(make_manager: MakeManager) -> None:
    layers = [
        attention(5, window=64),
        attention(2),
        attention(7, window=64),
        attention(1, window=32),
        attention(0),
        attention(9, window=64, sinks=16),  # sinks make another shape
        attention(4, window=64, sinks=10),  # same number of sink blocks (1) as layer 9
        attention(3, window=64, sinks=0),  # zero sinks: same shape as no sinks
    ]
    m = make_manager(layers=layers, quota=4 * MiB)
    assert m.layer_grouping == ((5, 7, 3), (2, 0), (1,), (9, 4))
    expected = {5: 0, 7: 0, 3: 0, 2: 1, 0: 1, 1: 2, 9: 3, 4: 3}
    for lid, g in expected.items():
        assert m.get_layer_group_id(lid) == g
    assert isinstance(m.layer_grouping, tuple)
    assert all(isinstance(g, tuple) for g in m.layer_grouping)
    for bad in (6, 10, -1, 100):
        with pytest.raises(ValueError, match="layer"):
            m.get_layer_group_id(bad)


def test_sink_blocks_decide_grouping(make_manager: MakeManager) -> None:
    # tpb 16: 17 sink tokens = 2 blocks, 16 sink tokens = 1 block
    m = make_manager(layers=[attention(0, window=64, sinks=16), attention(1, window=64, sinks=17)])
    assert m.layer_grouping == ((0,), (1,))


def test_layout_queries_reject_unknown_buffers(make_manager: MakeManager) -> None:
    m = make_manager()
    for fn in (m.get_page_stride, m.get_page_index_upper_bound, m.get_page_index_converter,
               m.get_mem_pool_base_address):
        with pytest.raises(ValueError):
            fn(7, "k")
        with pytest.raises(ValueError):
            fn(0, "q")
    with pytest.raises(ValueError):
        m.get_aggregated_pages([BufferId(0, "q")])


# ----------------------------------------------------------------------------- stale ranges
def test_stale_range_spec_example() -> None:
    lc = LifeCycle(1024, 0, 32)
    assert (lc.stale_beg(5000), lc.stale_end(5000)) == (0, 124)
    assert lc.is_stale(0, 5000) and lc.is_stale(123, 5000) and not lc.is_stale(124, 5000)
    with_sinks = LifeCycle(1024, 40, 32)  # 2 sink blocks
    assert with_sinks.sink_blocks == 2
    assert (with_sinks.stale_beg(5000), with_sinks.stale_end(5000)) == (2, 124)
    assert not with_sinks.is_stale(1, 5000) and with_sinks.is_stale(2, 5000)


@pytest.mark.parametrize("window,sinks,tpb", [(1024, 0, 32), (128, 40, 32), (64, 16, 16), (7, 3, 4), (1, 0, 8),
                                              (33, 100, 16)])
def test_stale_range_formula_brute_force(window: int, sinks: int, tpb: int) -> None:
    lc = LifeCycle(window, sinks, tpb)
    for h in range(0, 3000, 7):
        s, e = _stale(h, tpb, window, sinks)
        assert lc.stale_beg(h) == s, h
        assert lc.stale_end(h) == e, h
        if e > s:
            # every stale block's tokens are outside the window of the next token and not sinks
            for b in (s, e - 1):
                assert (b + 1) * tpb <= h + 1 - window
                assert b * tpb >= _div_up(sinks, tpb) * tpb


def test_stale_range_empty_without_window() -> None:
    lc = LifeCycle(0, 0, 16)
    assert not lc.is_windowed
    for h in (0, 15, 16, 10_000):
        assert lc.stale_end(h) == lc.stale_beg(h)


@pytest.mark.parametrize("sinks", [None, 16, 20])
def test_stale_blocks_show_bad_page_index(make_manager: MakeManager, sinks: int | None) -> None:
    tpb = 16
    m = make_manager(layers=[attention(0), attention(1, window=64, sinks=sinks)], quota=4 * MiB)
    kv = _active(m, 200, 200)
    s, e = _stale(200, tpb, 64, sinks or 0)
    assert e > s
    full = list(kv.get_base_page_indices(0))
    swa = list(kv.get_base_page_indices(1))
    assert len(full) == len(swa) == kv.num_blocks == 13
    assert all(x >= 0 for x in full)
    for b, x in enumerate(swa):
        assert (x == -1) == (s <= b < e), (b, swa)
    # history grows: newly stale pages are released in the same call
    kv.commit(list(range(200)))
    assert kv.resize(capacity=300)
    kv.commit(list(range(100)))
    s2, e2 = _stale(300, tpb, 64, sinks or 0)
    swa = list(kv.get_base_page_indices(1))
    for b, x in enumerate(swa):
        assert (x == -1) == (s2 <= b < e2), (b, swa)
    kv.close()


# ----------------------------------------------------------------------------- worked example
def _spec_example_config(quota: int = 8 * MiB) -> KVCacheManagerConfig:
    kv64 = [BufferConfig("K", 64 * KiB), BufferConfig("V", 64 * KiB)]
    layers = [
        AttentionLayerConfig(0, list(kv64)),
        AttentionLayerConfig(1, list(kv64)),
        AttentionLayerConfig(2, list(kv64), sliding_window_size=128),
        AttentionLayerConfig(3, list(kv64), sliding_window_size=128),
    ]
    return KVCacheManagerConfig(
        tokens_per_block=32, cache_tiers=[GpuCacheTierConfig(quota=quota)], layers=layers, backend="host"
    )


def test_spec_worked_example() -> None:
    m = KVCacheManager(_spec_example_config())
    assert m.layer_grouping == ((0, 1), (2, 3))
    assert m.get_layer_group_id(1) == 0 and m.get_layer_group_id(3) == 1
    B = m.get_mem_pool_base_address(1, "V", PER_LAYER)
    for lid in (0, 1):
        for role in ("K", "V"):
            assert m.get_mem_pool_base_address(lid, role, PER_LAYER) == B
            assert m.get_page_stride(lid, role) == 64 * KiB
    conv = m.get_page_index_converter(1, "V")
    assert (conv.scale, conv.layer_offset, conv.expansion) == (4, 3, 1)
    assert m.get_mem_pool_base_address(1, "V", SHARED) == B + 3 * 64 * KiB
    assert m.get_mem_pool_base_address(1, "V") == B + 3 * 64 * KiB  # None means SHARED
    assert conv([12], SHARED) == [48]
    assert conv([12]) == [48]
    assert conv([12], PER_LAYER) == [51]
    stride = m.get_page_stride(1, "V")
    shared_addr = m.get_mem_pool_base_address(1, "V", SHARED) + 48 * stride
    per_layer_addr = m.get_mem_pool_base_address(1, "V", PER_LAYER) + 51 * stride
    assert shared_addr == per_layer_addr == B + 51 * 64 * KiB
    # the other buffers of the record: [L0.K, L0.V, L1.K, L1.V]
    for (lid, role), off in {(0, "K"): 0, (0, "V"): 1, (1, "K"): 2, (1, "V"): 3}.items():
        c = m.get_page_index_converter(lid, role)
        assert c.layer_offset == off and c.scale == 4
        assert m.get_mem_pool_base_address(lid, role, SHARED) == B + off * 64 * KiB
        assert c([12], PER_LAYER) == [48 + off]
    # group 1 has the same record: same pool list, so one pool group (one storage statistic)
    for role, off in (("K", 0), ("V", 1)):
        assert m.get_page_index_converter(2, role).layer_offset == off
        assert m.get_page_index_converter(3, role).layer_offset == 2 + off
    stats = m.get_storage_statistics(0)
    assert len(stats) == 1
    assert stats[0].slot_size == 256 * KiB
    m.shutdown()


def test_spec_worked_example_real_cache_bytes() -> None:
    m = KVCacheManager(_spec_example_config())
    kv = _active(m, 32 * 5)
    stride = 64 * KiB
    for lid in range(4):
        lg = m.get_layer_group_id(lid)
        slots = list(kv.get_base_page_indices(lg))
        for role in ("K", "V"):
            a_sh = _page_addresses(m, kv, lid, role, SHARED)
            a_pl = _page_addresses(m, kv, lid, role, PER_LAYER)
            assert a_sh == a_pl
            off = m.get_page_index_converter(lid, role).layer_offset
            B = m.get_mem_pool_base_address(lid, role, PER_LAYER)
            assert a_pl == [B + (s * 4 + off) * stride for s in slots]
    kv.close()
    m.shutdown()


# ----------------------------------------------------------------------------- coalescing
def test_coalescing_different_buffer_sizes(make_manager: MakeManager) -> None:
    layers = [
        AttentionLayerConfig(3, [BufferConfig("k", 512), BufferConfig("v", 512), BufferConfig("x", 256)]),
        AttentionLayerConfig(1, [BufferConfig("x", 256), BufferConfig("k", 512)]),
        AttentionLayerConfig(2, [BufferConfig("v", 1024)]),
    ]
    m = make_manager(layers=layers, quota=2 * MiB)
    assert m.layer_grouping == ((3, 1, 2),)
    # pool 0 (512): [L3.k, L3.v, L1.k]; pool 1 (256): [L3.x, L1.x]; pool 2 (1024): [L2.v]
    expected = {
        (3, "k"): (0, 3, 0, 2),
        (3, "v"): (0, 3, 1, 2),
        (1, "k"): (0, 3, 2, 1),
        (3, "x"): (1, 2, 0, 1),
        (1, "x"): (1, 2, 1, 1),
        (2, "v"): (2, 1, 0, 1),
    }
    sizes = {0: 512, 1: 256, 2: 1024}
    pool_base = {p: m.get_mem_pool_base_address(*next(k for k, v in expected.items() if v[0] == p), PER_LAYER)
                 for p in sizes}
    assert len(set(pool_base.values())) == 3
    for (lid, role), (pool, scale, off, spb) in expected.items():
        c = m.get_page_index_converter(lid, role)
        assert (c.scale, c.layer_offset, c.scratch_pages_per_block, c.expansion) == (scale, off, spb, 1), (lid, role)
        assert m.get_mem_pool_base_address(lid, role, PER_LAYER) == pool_base[pool]
        assert m.get_mem_pool_base_address(lid, role, SHARED) == pool_base[pool] + off * sizes[pool]
        assert m.get_page_stride(lid, role) == sizes[pool]
    stats = m.get_storage_statistics(0)
    assert len(stats) == 1
    assert stats[0].slot_size == 3 * 512 + 2 * 256 + 1024
    # pool order = order of first appearance of each size: aggregated descs come in pool order
    descs = m.get_aggregated_pages([BufferId(2, "v"), BufferId(1, "x"), BufferId(3, "k")])
    assert [d.buffers for d in descs] == [[BufferId(3, "k")], [BufferId(1, "x")], [BufferId(2, "v")]]
    assert [d.stride for d in descs] == [3 * 512, 2 * 256, 1024]


def test_layer_offsets_follow_config_order_not_layer_ids(make_manager: MakeManager) -> None:
    m = make_manager(layers=[attention(9), attention(2), attention(5)])
    for pos, lid in enumerate((9, 2, 5)):
        assert m.get_page_index_converter(lid, "k").layer_offset == 2 * pos
        assert m.get_page_index_converter(lid, "v").layer_offset == 2 * pos + 1
        assert m.get_page_index_converter(lid, "k").scale == 6


def test_expansion_with_override(make_manager: MakeManager) -> None:
    tpb = 16
    layers = [
        AttentionLayerConfig(0, [BufferConfig("k", 512), BufferConfig("v", 256, tokens_per_block_override=8)]),
        AttentionLayerConfig(1, [BufferConfig("k", 128, tokens_per_block_override=4), BufferConfig("v", 256)]),
    ]
    m = make_manager(layers=layers, tokens_per_block=tpb, quota=1 * MiB)
    # expanded sizes: L0.k 512, L0.v 512, L1.k 512, L1.v 256
    conv = {(lid, r): m.get_page_index_converter(lid, r) for lid in (0, 1) for r in ("k", "v")}
    assert m.get_page_stride(0, "v") == 256 and m.get_page_stride(1, "k") == 128
    assert (conv[(0, "k")].expansion, conv[(0, "v")].expansion, conv[(1, "k")].expansion,
            conv[(1, "v")].expansion) == (1, 2, 4, 1)
    assert [conv[(0, "k")].layer_offset, conv[(0, "v")].layer_offset, conv[(1, "k")].layer_offset] == [0, 1, 2]
    assert conv[(0, "k")].scale == 3 and conv[(1, "v")].scale == 1
    B = m.get_mem_pool_base_address(0, "k", PER_LAYER)
    assert m.get_mem_pool_base_address(1, "k", SHARED) == B + 2 * 512
    assert m.get_mem_pool_base_address(0, "v", SHARED) == B + 512
    # indices expand i*e + k; -1 repeats e times
    assert conv[(1, "k")]([5, -1], PER_LAYER) == [(5 * 3 + 2) * 4 + k for k in range(4)] + [-1] * 4
    assert conv[(1, "k")]([5], SHARED) == [5 * 3 * 4 + k for k in range(4)]
    assert conv[(0, "v")]([0, 2], PER_LAYER) == [2, 3, 14, 15]
    # sub-page k of block slot s: base + index * stride lies inside the slot's record
    kv = _active(m, 5 * tpb)
    slots = list(kv.get_base_page_indices(0))
    for (lid, role), c in conv.items():
        for mode in (SHARED, PER_LAYER):
            addrs = _page_addresses(m, kv, lid, role, mode)
            assert len(addrs) == len(slots) * c.expansion
            stride = m.get_page_stride(lid, role)
            exp_size = stride * c.expansion
            rec = c.scale * exp_size
            pool = m.get_mem_pool_base_address(lid, role, PER_LAYER)
            for b, s in enumerate(slots):
                for k in range(c.expansion):
                    assert addrs[b * c.expansion + k] == pool + s * rec + c.layer_offset * exp_size + k * stride
    kv.close()


def test_override_equal_to_tpb_is_expansion_one(make_manager: MakeManager) -> None:
    layers = [AttentionLayerConfig(0, [BufferConfig("k", 512, tokens_per_block_override=16)])]
    m = make_manager(layers=layers)
    c = m.get_page_index_converter(0, "k")
    assert c.expansion == 1 and m.get_page_stride(0, "k") == 512


# ----------------------------------------------------------------------------- pool groups
def test_pool_group_shared_when_pool_lists_equal(make_manager: MakeManager) -> None:
    m = make_manager(layers=[attention(0), attention(1), attention(2, window=64), attention(3, window=64)],
                     quota=1 * MiB)
    stats = m.get_storage_statistics(0)
    assert len(stats) == 1
    assert stats[0].slot_size == 4 * 512
    # both layer groups draw from one allocator: the same pool base addresses
    assert m.get_mem_pool_base_address(0, "k", PER_LAYER) == m.get_mem_pool_base_address(2, "k", PER_LAYER)
    kv = _active(m, 64)
    s0 = set(kv.get_base_page_indices(0))
    s1 = set(kv.get_base_page_indices(1))
    assert not (s0 & s1)  # one allocator: no slot given twice
    assert m.get_storage_statistics(0)[0].free == stats[0].total - 8
    kv.close()


def test_pool_groups_separate_when_pool_lists_differ(make_manager: MakeManager) -> None:
    m = make_manager(layers=[attention(0), attention(1, window=64, size=256), attention(2, window=32)],
                     quota=1 * MiB)
    stats = m.get_storage_statistics(0)
    # group 0 {0}: 2x512; group 1 {1}: 2x256; group 2 {2}: 2x512 -> shares with group 0
    assert len(stats) == 2
    assert [s.slot_size for s in stats] == [1024, 512]
    assert m.get_mem_pool_base_address(0, "k", PER_LAYER) == m.get_mem_pool_base_address(2, "k", PER_LAYER)
    assert m.get_mem_pool_base_address(0, "k", PER_LAYER) != m.get_mem_pool_base_address(1, "k", PER_LAYER)
    kv = _active(m, 32)
    st = m.get_storage_statistics(0)
    assert st[0].total - st[0].free == 4  # groups 0 and 2, 2 blocks each
    assert st[1].total - st[1].free == 2
    kv.close()


def test_same_sizes_different_scale_do_not_share(make_manager: MakeManager) -> None:
    # group 0: two layers (scale 4); group 1: one layer (scale 2) -> different records
    m = make_manager(layers=[attention(0), attention(1), attention(2, window=64)])
    stats = m.get_storage_statistics(0)
    assert len(stats) == 2
    assert [s.slot_size for s in stats] == [2048, 1024]


# ----------------------------------------------------------------------------- bounds and quotas
def test_page_index_upper_bound(make_manager: MakeManager) -> None:
    layers = [
        AttentionLayerConfig(0, [BufferConfig("k", 512), BufferConfig("v", 256, tokens_per_block_override=8)]),
        attention(1, window=32, size=256),
    ]
    m = make_manager(layers=layers, quota=256 * KiB, max_util_for_resume=1.0)
    stats = m.get_storage_statistics(0)
    for lid, role in ((0, "k"), (0, "v"), (1, "k"), (1, "v")):
        c = m.get_page_index_converter(lid, role)
        pg = m.get_layer_group_id(lid)  # one pool group per layer group here
        ub = m.get_page_index_upper_bound(lid, role)
        assert ub == stats[pg].total * c.scale * c.expansion
        # the pool holds exactly ub pages of `stride` bytes
        assert ub * m.get_page_stride(lid, role) == stats[pg].total * c.scale * c.expansion * m.get_page_stride(
            lid, role)
    # fill every slot: every converted index stays below the bound
    kvs = []
    while True:
        kv = m.create_kv_cache()
        assert kv.resume()
        if not kv.resize(capacity=16):
            kv.close()
            break
        kvs.append(kv)
    assert m.get_storage_statistics(0)[0].free == 0
    for lid, role in ((0, "k"), (0, "v"), (1, "k"), (1, "v")):
        ub = m.get_page_index_upper_bound(lid, role)
        c = m.get_page_index_converter(lid, role)
        lg = m.get_layer_group_id(lid)
        seen: set[int] = set()
        for kv in kvs:
            for mode in (SHARED, PER_LAYER):
                idx = c(list(kv.get_base_page_indices(lg)), mode)
                assert all(0 <= i < ub for i in idx if i != -1)
            seen.update(c(list(kv.get_base_page_indices(lg)), PER_LAYER))
        seen.discard(-1)
        if lg == 0:
            assert max(seen) == ub - c.scale * c.expansion + c.layer_offset * c.expansion + c.expansion - 1
    for kv in kvs:
        kv.close()


def _slot_sum(m: KVCacheManager) -> int:
    return sum(s.slot_size for s in m.get_storage_statistics(0))


@pytest.mark.parametrize("quota", [0, 1, 1000, 2047, 2048, 100_000, 1 * MiB, 3 * MiB + 17, 10 * MiB + 12345])
def test_get_quota_close_to_request(make_manager: MakeManager, quota: int) -> None:
    m = make_manager(layers=[attention(0), attention(1, window=64, size=256)], quota=quota)
    q = m.get_quota(0)
    assert q <= quota
    assert quota - q < max(2 * MiB, _slot_sum(m))
    stats = m.get_storage_statistics(0)
    assert q == sum(s.total * s.slot_size for s in stats)


def test_get_quota_large_slots_shared_pool_group() -> None:
    # two layer groups share one pool group whose slot is 3 MiB; a 10 MiB request fits 3 slots
    # (9 MiB): the quota in force must be within one slot (3 MiB) of the request.
    big = [BufferConfig("k", 768 * KiB), BufferConfig("v", 768 * KiB)]
    layers = [
        AttentionLayerConfig(0, list(big)),
        AttentionLayerConfig(1, list(big)),
        AttentionLayerConfig(2, list(big), sliding_window_size=64),
        AttentionLayerConfig(3, list(big), sliding_window_size=64),
    ]
    quota = 10 * MiB
    m = KVCacheManager(make_config(layers=layers, quota=quota))
    stats = m.get_storage_statistics(0)
    assert len(stats) == 1 and stats[0].slot_size == 3 * MiB
    q = m.get_quota(0)
    assert q <= quota
    assert quota - q < max(2 * MiB, 3 * MiB), (quota, q)
    m.shutdown()


def test_get_quota_large_slots_single_group() -> None:
    big = [BufferConfig("k", 768 * KiB), BufferConfig("v", 768 * KiB)]
    m = KVCacheManager(make_config(layers=[AttentionLayerConfig(0, big)], quota=10 * MiB))
    assert m.get_storage_statistics(0)[0].slot_size == 1536 * KiB
    q = m.get_quota(0)
    assert 10 * MiB - 2 * MiB < q <= 10 * MiB
    m.shutdown()


def test_get_quota_with_pool_ratio() -> None:
    m = KVCacheManager(make_config(layers=[attention(0), attention(1, window=64, size=256)], quota=1 * MiB,
                                   initial_pool_ratio=[0.75, 0.25]))
    stats = m.get_storage_statistics(0)
    q = m.get_quota(0)
    assert q <= 1 * MiB and 1 * MiB - q < max(2 * MiB, _slot_sum(m))
    assert stats[0].total * stats[0].slot_size == pytest.approx(0.75 * MiB, abs=stats[0].slot_size)
    assert stats[1].total * stats[1].slot_size == pytest.approx(0.25 * MiB, abs=stats[1].slot_size)
    m.shutdown()


# ----------------------------------------------------------------------------- raw host memory
def test_base_addresses_are_real_host_pointers(make_manager: MakeManager) -> None:
    m = make_manager(layers=[attention(0), attention(1, window=64, size=256)], quota=256 * KiB)
    for lid, role in ((0, "k"), (0, "v"), (1, "k"), (1, "v")):
        base = m.get_mem_pool_base_address(lid, role, PER_LAYER)
        ub = m.get_page_index_upper_bound(lid, role)
        stride = m.get_page_stride(lid, role)
        end = base + ub * stride
        for addr in (base, m.get_mem_pool_base_address(lid, role, SHARED), end - stride):
            payload = os.urandom(stride)
            ctypes.memmove(addr, payload, stride)
            assert ctypes.string_at(addr, stride) == payload
    # stable addresses
    assert m.get_mem_pool_base_address(0, "k", PER_LAYER) == m.get_mem_pool_base_address(0, "k", PER_LAYER)


def test_pool_base_addresses_never_change(make_manager: MakeManager) -> None:
    m = make_manager(layers=[attention(0), attention(1, window=64)], quota=128 * KiB)
    bases = {(l, r, md): m.get_mem_pool_base_address(l, r, md) for l in (0, 1) for r in ("k", "v")
             for md in (SHARED, PER_LAYER)}
    kvs = []
    for i in range(6):
        kv = m.create_kv_cache(input_tokens=list(range(i, i + 40)))
        assert kv.resume()
        assert kv.resize(capacity=40)
        kv.commit(list(range(i, i + 40)))
        kvs.append(kv)
    for kv in kvs:
        kv.close()
    assert bases == {(l, r, md): m.get_mem_pool_base_address(l, r, md) for l in (0, 1) for r in ("k", "v")
                     for md in (SHARED, PER_LAYER)}


def test_shared_and_per_layer_same_bytes_fake_engine() -> None:
    tpb = 16
    layers = [
        AttentionLayerConfig(0, [BufferConfig("K", tpb * 32), BufferConfig("V", 8 * 32, tokens_per_block_override=8)]),
        AttentionLayerConfig(1, [BufferConfig("K", tpb * 32), BufferConfig("V", tpb * 64)]),
        AttentionLayerConfig(2, [BufferConfig("K", tpb * 32), BufferConfig("V", tpb * 32)], sliding_window_size=40,
                             num_sink_tokens=4),
    ]
    cfg = KVCacheManagerConfig(tokens_per_block=tpb, cache_tiers=[GpuCacheTierConfig(quota=4 * MiB)],
                               layers=layers, backend="host")
    m = KVCacheManager(cfg)
    writer = FakeEngine(m, cfg, index_mode=SHARED)
    reader = FakeEngine(m, cfg, index_mode=PER_LAYER)
    rng = random.Random(5)
    caches = []
    for i in range(3):
        toks = [rng.randrange(1 << 32) for _ in range(70 + 13 * i)]
        kv = m.create_kv_cache(input_tokens=toks)
        assert kv.resume() and kv.resize(capacity=len(toks))
        writer.forward([Step(kv, toks, [])])
        kv.commit(toks)
        caches.append((kv, toks))
    for kv, toks in caches:
        reader.verify(kv, toks)
        writer.verify(kv, toks)
    # the other way round, on a decode step written per layer and read shared
    kv, toks = caches[0]
    assert kv.resize(capacity=len(toks) + 5)
    reader.forward([Step(kv, [7, 8, 9, 10, 11], toks)])
    kv.commit([7, 8, 9, 10, 11])
    writer.verify(kv, toks + [7, 8, 9, 10, 11])
    # and every page address agrees between the modes
    for kv, _ in caches:
        for layer in layers:
            for b in layer.buffers:
                assert _page_addresses(m, kv, layer.layer_id, b.role, SHARED) == _page_addresses(
                    m, kv, layer.layer_id, b.role, PER_LAYER)
    for kv, _ in caches:
        kv.close()
    m.clear_reusable_blocks()
    m.shutdown()


def test_shared_and_per_layer_same_bytes_raw(make_manager: MakeManager) -> None:
    layers = [
        AttentionLayerConfig(0, [BufferConfig("k", 128), BufferConfig("v", 64, tokens_per_block_override=8)]),
        AttentionLayerConfig(1, [BufferConfig("k", 128), BufferConfig("v", 96)], sliding_window_size=32),
    ]
    m = make_manager(layers=layers, quota=64 * KiB)
    kv = _active(m, 100)
    written: dict[int, bytes] = {}
    for layer in layers:
        for b in layer.buffers:
            stride = m.get_page_stride(layer.layer_id, b.role)
            for addr in _page_addresses(m, kv, layer.layer_id, b.role, SHARED):
                if addr < 0:
                    continue
                data = os.urandom(stride)
                assert addr not in written
                ctypes.memmove(addr, data, stride)
                written[addr] = data
    for layer in layers:
        for b in layer.buffers:
            stride = m.get_page_stride(layer.layer_id, b.role)
            for addr in _page_addresses(m, kv, layer.layer_id, b.role, PER_LAYER):
                if addr < 0:
                    continue
                assert ctypes.string_at(addr, stride) == written[addr]
    kv.close()


# ----------------------------------------------------------------------------- aggregated pages
def test_aggregated_pages_merge_adjacent_buffers() -> None:
    m = KVCacheManager(_spec_example_config())
    B = m.get_mem_pool_base_address(0, "K", PER_LAYER)
    rec = 256 * KiB
    d = m.get_aggregated_pages([BufferId(0, "K"), BufferId(0, "V")])
    assert len(d) == 1
    assert (d[0].base, d[0].size, d[0].stride, d[0].layer_group_id) == (B, 128 * KiB, rec, 0)
    assert d[0].buffers == [BufferId(0, "K"), BufferId(0, "V")]
    # order of the request does not matter; plain tuples are accepted
    d = m.get_aggregated_pages([(1, "K"), (0, "V")])
    assert len(d) == 1
    assert (d[0].base, d[0].size, d[0].stride) == (B + 64 * KiB, 128 * KiB, rec)
    assert d[0].buffers == [BufferId(0, "V"), BufferId(1, "K")]
    # not adjacent: L0.K (offset 0) and L1.K (offset 2)
    d = m.get_aggregated_pages([BufferId(0, "K"), BufferId(1, "K")])
    assert [(x.base, x.size, x.stride) for x in d] == [(B, 64 * KiB, rec), (B + 128 * KiB, 64 * KiB, rec)]
    # the whole group: one desc covering the whole record
    d = m.get_aggregated_pages([BufferId(l, r) for l in (0, 1) for r in ("K", "V")])
    assert [(x.base, x.size, x.stride, x.layer_group_id) for x in d] == [(B, rec, rec, 0)]
    # two groups never merge
    d = m.get_aggregated_pages([BufferId(1, "V"), BufferId(2, "K")])
    assert [x.layer_group_id for x in d] == [0, 1]
    assert d[1].base == m.get_mem_pool_base_address(2, "K", SHARED)
    # a buffer listed twice is an error
    with pytest.raises(ValueError):
        m.get_aggregated_pages([BufferId(0, "K"), BufferId(0, "K")])
    assert m.get_aggregated_pages([]) == []
    m.shutdown()


def test_aggregated_pages_match_per_buffer_addresses_and_bytes(make_manager: MakeManager) -> None:
    layers = [
        AttentionLayerConfig(0, [BufferConfig("k", 128), BufferConfig("v", 64, tokens_per_block_override=8),
                                 BufferConfig("x", 32)]),
        AttentionLayerConfig(1, [BufferConfig("k", 128), BufferConfig("v", 128)]),
        AttentionLayerConfig(2, [BufferConfig("k", 128), BufferConfig("v", 128)], sliding_window_size=32),
    ]
    cfg_buffers = [BufferId(l.layer_id, b.role) for l in layers for b in l.buffers]
    m = make_manager(layers=layers, quota=64 * KiB)
    kv = _active(m, 16 * 9, 16 * 9)  # SWA group has stale blocks (-1)
    rng = random.Random(11)
    for trial in range(12):
        chosen = rng.sample(cfg_buffers, rng.randint(1, len(cfg_buffers)))
        descs = m.get_aggregated_pages(chosen)
        covered = [b for d in descs for b in d.buffers]
        assert sorted(covered) == sorted(chosen)
        for d in descs:
            agg = kv.get_aggregated_page_indices(d.layer_group_id)
            valid = kv.get_aggregated_page_indices(d.layer_group_id, valid_only=True)
            assert valid == [s for s in agg if s != -1]
            assert agg == list(kv.get_base_page_indices(d.layer_group_id))
            # buffers of a desc are contiguous: each starts where the previous ends
            for blk, slot in enumerate(agg):
                if slot == -1:
                    continue
                pos = d.base + d.stride * slot
                for bid in d.buffers:
                    addrs = _page_addresses(m, kv, bid.layer_id, bid.role, PER_LAYER)
                    c = m.get_page_index_converter(bid.layer_id, bid.role)
                    stride = m.get_page_stride(bid.layer_id, bid.role)
                    assert addrs[blk * c.expansion] == pos
                    pos += stride * c.expansion
                assert pos == d.base + d.stride * slot + d.size
    # bytes: write through the per-buffer pages, read through the aggregated ranges, and back
    descs = m.get_aggregated_pages(cfg_buffers)
    for d in descs:
        agg = kv.get_aggregated_page_indices(d.layer_group_id)
        for blk, slot in enumerate(agg):
            if slot == -1:
                continue
            expected = b""
            for bid in d.buffers:
                c = m.get_page_index_converter(bid.layer_id, bid.role)
                stride = m.get_page_stride(bid.layer_id, bid.role)
                for addr in _page_addresses(m, kv, bid.layer_id, bid.role, SHARED)[
                        blk * c.expansion:(blk + 1) * c.expansion]:
                    data = os.urandom(stride)
                    ctypes.memmove(addr, data, stride)
                    expected += data
            assert ctypes.string_at(d.base + d.stride * slot, d.size) == expected
            fresh = os.urandom(d.size)
            ctypes.memmove(d.base + d.stride * slot, fresh, d.size)
            got = b""
            for bid in d.buffers:
                c = m.get_page_index_converter(bid.layer_id, bid.role)
                stride = m.get_page_stride(bid.layer_id, bid.role)
                for addr in _page_addresses(m, kv, bid.layer_id, bid.role, PER_LAYER)[
                        blk * c.expansion:(blk + 1) * c.expansion]:
                    got += ctypes.string_at(addr, stride)
            assert got == fresh
    kv.close()


def test_aggregated_pages_transfer_between_managers() -> None:
    """Disaggregated-style copy: prefill side -> decode side through aggregated descriptors; the
    fake engine on the decode side verifies every byte."""
    tpb = 16
    layers = [
        AttentionLayerConfig(0, [BufferConfig("K", tpb * 32), BufferConfig("V", tpb * 32)]),
        AttentionLayerConfig(1, [BufferConfig("K", tpb * 32), BufferConfig("V", tpb * 32)]),
    ]
    cfg = KVCacheManagerConfig(tokens_per_block=tpb, cache_tiers=[GpuCacheTierConfig(quota=1 * MiB)],
                               layers=layers, backend="host")
    src_m = KVCacheManager(cfg)
    dst_m = KVCacheManager(cfg)
    toks = list(range(1000, 1090))
    src = src_m.create_kv_cache()
    assert src.resume() and src.resize(capacity=len(toks))
    FakeEngine(src_m, cfg).forward([Step(src, toks, [])])
    dst = dst_m.create_kv_cache()
    assert dst.resume() and dst.resize(capacity=len(toks), history_length=len(toks))
    bufs = _all_buffers(cfg)
    sd = src_m.get_aggregated_pages(bufs)
    dd = dst_m.get_aggregated_pages(bufs)
    assert len(sd) == len(dd) == 1
    for a, b in zip(sd, dd):
        si = src.get_aggregated_page_indices(a.layer_group_id, valid_only=True)
        di = dst.get_aggregated_page_indices(b.layer_group_id, valid_only=True)
        assert len(si) == len(di) == _div_up(len(toks), tpb)
        for s, d in zip(si, di):
            ctypes.memmove(b.base + b.stride * d, a.base + a.stride * s, a.size)
    FakeEngine(dst_m, cfg).verify(dst, toks)
    src.close()
    dst.close()
    src_m.shutdown()
    dst_m.shutdown()
