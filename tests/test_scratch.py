"""SWA scratch reuse (SPEC 4.8): scratch ranges and slots, per-layer index conversion of scratch
blocks, the resize protocol, index-mode support, life cycle (commit, suspend, resume, close),
scratch-aware pool sizing, and the fake engine running scratch prefills layer by layer."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from kv_cache_manager_v2 import (
    BatchDesc,
    DataIntegrityError,
    HalfOpenRange,
    KVCache,
    KVCacheDesc,
    KVCacheManager,
    PageIndexMode,
    ScratchDesc,
    SwaScratchReuseConfig,
)
from kv_cache_manager_v2._life_cycle_registry import LifeCycleRegistry
from kv_cache_manager_v2._quota import layer_group_weights
from kv_cache_manager_v2._storage._layout import StorageLayout

from conftest import attention, make_config
from fake_engine import FakeEngine, Step

MakeManager = Callable[..., KVCacheManager]
KiB = 1 << 10
SHARED = PageIndexMode.SHARED
PER_LAYER = PageIndexMode.PER_LAYER


def _swa(n: int, window: int, size: int, sinks: int | None = None) -> list[Any]:
    return [attention(i, size=size, window=window, sinks=sinks) for i in range(n)]


def _used(m: KVCacheManager, pg: int = 0) -> int:
    st = m.get_storage_statistics(0)[pg]
    return st.total - st.free


def _locked(m: KVCacheManager, pg: int = 0) -> int:
    st = m.get_storage_statistics(0)[pg]
    return st.total - st.available


def _active(m: KVCacheManager) -> KVCache:
    kv = m.create_kv_cache()
    assert kv.resume()
    return kv


def _m32(make_manager: MakeManager, rewind: int | None = 0, quota_slots: int = 64) -> KVCacheManager:
    """32 SWA layers (K and V, 8 KiB each), window 128, tpb 32: one slot = 512 KiB, scale 64."""
    return make_manager(
        layers=_swa(32, 128, 8 * KiB),
        tokens_per_block=32,
        quota=quota_slots * 512 * KiB,
        swa_scratch_reuse=None if rewind is None else SwaScratchReuseConfig(rewind),
    )


# ----------------------------------------------------------------------------- the SPEC examples
def test_prompt_1024_uses_5_slots_instead_of_32(make_manager: MakeManager) -> None:
    m = _m32(make_manager)
    kv = _active(m)
    assert kv.resize(1024, 0)
    desc = kv.get_scratch_desc(0)
    assert desc is not None and desc
    assert desc.range == HalfOpenRange(0, 28)
    assert len(desc.slot_ids) == 1
    assert kv.has_scratch_slots
    base = list(kv.get_base_page_indices(0))
    assert base[:28] == [-1] * 28 and all(b >= 0 for b in base[28:]) and len(base) == 32
    assert desc.slot_ids[0] not in base
    assert _used(m) == 5
    assert kv.get_aggregated_page_indices(0, valid_only=True) == base[28:]
    tokens = list(range(1024))
    kv.commit(tokens)
    assert kv.get_scratch_desc(0) is None and not kv.has_scratch_slots
    assert _used(m) == 4
    kv.close()
    assert m.probe_reuse(None, tokens) == 1024
    assert m.probe_reuse(None, tokens[:896]) == 0
    again = m.create_kv_cache(input_tokens=tokens)
    assert again.num_committed_tokens == 1024
    again.close()


def test_without_scratch_the_same_prompt_takes_32_slots(make_manager: MakeManager) -> None:
    m = _m32(make_manager, rewind=None)
    kv = _active(m)
    assert kv.resize(1024, 0)
    assert _used(m) == 32 and kv.get_scratch_desc(0) is None and not kv.enable_swa_scratch_reuse
    kv.close()


def test_cache_with_scratch_turned_off_takes_32_slots(make_manager: MakeManager) -> None:
    m = _m32(make_manager)
    kv = _active(m)
    kv.enable_swa_scratch_reuse = False
    assert kv.resize(1024, 0)
    assert _used(m) == 32 and kv.get_scratch_desc(0) is None
    kv.capacity = 1100  # the protocol only applies with scratch on
    kv.close()


def test_eight_layers_per_layer_indices(make_manager: MakeManager) -> None:
    m = make_manager(
        layers=_swa(8, 32, 512), tokens_per_block=32, quota=64 * 16 * 512, swa_scratch_reuse=SwaScratchReuseConfig(0)
    )
    kv = _active(m)
    assert kv.resize(256, 0)
    desc = kv.get_scratch_desc(0)
    assert desc is not None and desc.range == HalfOpenRange(0, 7) and len(desc.slot_ids) == 1
    s = desc.slot_ids[0]
    base = list(kv.get_base_page_indices(0))
    assert base[:7] == [-1] * 7
    b = base[7]
    assert b >= 0 and b != s
    k0 = m.get_page_index_converter(0, "k")(base, PER_LAYER, desc)
    assert k0 == [16 * s + o for o in (0, 2, 4, 6, 8, 10, 12)] + [16 * b]
    v3 = m.get_page_index_converter(3, "v")(base, PER_LAYER, desc)
    assert v3 == [16 * s + o for o in (7, 9, 11, 13, 15, 1, 3)] + [16 * b + 7]
    with pytest.raises(ValueError):
        m.get_page_index_converter(0, "k")(base, SHARED, desc)
    # every (layer, role) of one scratch block lands on its own page of the scratch slot
    for o in range(7):
        pages = {
            m.get_page_index_converter(lid, r)(base, PER_LAYER, desc)[o] for lid in range(8) for r in ("k", "v")
        }
        assert len(pages) == 16 and all(16 * s <= p < 16 * s + 16 for p in pages)
    kv.close()


@pytest.mark.parametrize("rewind, expected", [(32, HalfOpenRange(0, 28)), (0, HalfOpenRange(0, 29))])
def test_max_rewind_len(make_manager: MakeManager, rewind: int, expected: HalfOpenRange) -> None:
    m = _m32(make_manager, rewind=rewind)
    kv = _active(m)
    assert kv.resize(1056, 0)
    desc = kv.get_scratch_desc(0)
    assert desc is not None and desc.range == expected
    base = list(kv.get_base_page_indices(0))
    assert base[: expected.end] == [-1] * expected.end
    assert all(x >= 0 for x in base[expected.end :])
    kv.close()


def test_sinks_are_never_scratch(make_manager: MakeManager) -> None:
    m = make_manager(
        layers=_swa(32, 128, 8 * KiB, sinks=40),
        tokens_per_block=32,
        quota=64 * 512 * KiB,
        swa_scratch_reuse=SwaScratchReuseConfig(0),
    )
    kv = _active(m)
    assert kv.resize(1024, 0)
    desc = kv.get_scratch_desc(0)
    assert desc is not None and desc.range == HalfOpenRange(2, 28)
    base = list(kv.get_base_page_indices(0))
    assert base[0] >= 0 and base[1] >= 0 and base[2:28] == [-1] * 26
    assert _used(m) == 2 + 1 + 4
    kv.commit(list(range(1024)))
    assert not kv.has_scratch_slots
    assert _used(m) == 6
    kv.close()


def test_full_attention_group_gets_no_scratch(make_manager: MakeManager) -> None:
    layers = [attention(0, size=512), attention(1, size=512, window=32)]
    m = make_manager(layers=layers, tokens_per_block=32, quota=1 << 20, swa_scratch_reuse=SwaScratchReuseConfig(0))
    kv = _active(m)
    assert kv.resize(256, 0)
    assert kv.get_scratch_desc(0) is None
    d1 = kv.get_scratch_desc(1)
    assert d1 is not None and d1.range == HalfOpenRange(0, 7)
    assert all(x >= 0 for x in kv.get_base_page_indices(0))
    kv.close()


# ----------------------------------------------------------------------------- index modes
def test_index_mode_support(make_manager: MakeManager) -> None:
    m = _m32(make_manager)
    assert m.supports_index_mode(SHARED) is None
    assert m.supports_index_mode(PER_LAYER) is True
    with pytest.raises(ValueError, match="index_mode"):
        m.get_mem_pool_base_address(0, "k")
    with pytest.raises(ValueError, match="index_mode"):
        m.get_mem_pool_base_address(0, "k", None)
    assert m.get_mem_pool_base_address(1, "k", SHARED) == m.get_mem_pool_base_address(1, "k", PER_LAYER) + 2 * 8 * KiB
    kv = _active(m)
    assert kv.supports_index_mode(SHARED) and kv.supports_index_mode(PER_LAYER)
    assert kv.resize(1024, 0)
    assert kv.supports_index_mode(SHARED) is False and kv.supports_index_mode(PER_LAYER) is True
    kv.commit(list(range(1024)))
    assert kv.supports_index_mode(SHARED) is True
    kv.close()


def test_index_modes_without_scratch_config(make_manager: MakeManager) -> None:
    m = _m32(make_manager, rewind=None)
    assert m.supports_index_mode(SHARED) is True and m.supports_index_mode(PER_LAYER) is True
    assert m.get_mem_pool_base_address(0, "k") == m.get_mem_pool_base_address(0, "k", SHARED)


# ----------------------------------------------------------------------------- per-cache switch
def test_enable_switch(make_manager: MakeManager) -> None:
    m = _m32(make_manager)
    kv = _active(m)
    assert kv.enable_swa_scratch_reuse is True
    assert kv.resize(1024, 0)
    with pytest.raises(ValueError, match="enable_swa_scratch_reuse"):
        kv.enable_swa_scratch_reuse = False
    assert kv.enable_swa_scratch_reuse is True and kv.has_scratch_slots
    kv.commit(list(range(1024)))
    kv.enable_swa_scratch_reuse = False
    assert kv.enable_swa_scratch_reuse is False
    kv.enable_swa_scratch_reuse = True
    with pytest.raises(TypeError):
        kv.enable_swa_scratch_reuse = 1  # type: ignore[assignment]
    kv.close()

    off = _m32(make_manager, rewind=None)
    kv2 = off.create_kv_cache()
    assert kv2.enable_swa_scratch_reuse is False
    with pytest.raises(ValueError, match="swa_scratch_reuse"):
        kv2.enable_swa_scratch_reuse = True
    kv2.enable_swa_scratch_reuse = False
    kv2.close()


# ----------------------------------------------------------------------------- resize protocol
def _snapshot(kv: KVCache) -> tuple[Any, ...]:
    d = kv.get_scratch_desc(0)
    return (kv.capacity, kv.history_length, list(kv.get_base_page_indices(0)), repr(d), kv.has_scratch_slots)


def test_resize_protocol(make_manager: MakeManager) -> None:
    m = _m32(make_manager, rewind=32)
    kv = _active(m)
    assert kv.resize(1024, 0)
    before = _snapshot(kv)
    used = _used(m)
    # new history must be in [old_capacity - max_rewind_len, old_capacity] on a capacity change
    for cap, hist in ((1100, 900), (1100, 991), (2048, 1025)):
        with pytest.raises(ValueError, match="history_length"):
            kv.resize(cap, hist)
        assert _snapshot(kv) == before and _used(m) == used
    # a shrink while scratch slots exist
    with pytest.raises(ValueError, match="capacity"):
        kv.resize(1000, 992)
    assert _snapshot(kv) == before and _used(m) == used
    # the capacity setter
    with pytest.raises(ValueError, match="capacity"):
        kv.capacity = 1100
    assert _snapshot(kv) == before and _used(m) == used
    # history alone may rise (no capacity change): the scratch range shrinks from its front
    assert kv.resize(history_length=512)
    d = kv.get_scratch_desc(0)
    assert d is not None and d.range == HalfOpenRange(16, 27)
    kv.commit(list(range(992)))
    assert kv.get_scratch_desc(0) is None and not kv.has_scratch_slots
    # a rewind of up to max_rewind_len tokens: decode-like next step
    assert kv.resize(1056, 992)
    assert kv.get_scratch_desc(0) is None
    assert kv.resize(1056, 1024)
    kv.close()


def test_chunked_prefill_rolls_scratch(make_manager: MakeManager) -> None:
    m = _m32(make_manager)
    kv = _active(m)
    tokens = list(range(2048))
    assert kv.resize(1024, 0)
    first = kv.get_scratch_desc(0)
    assert first is not None and first.range == HalfOpenRange(0, 28)
    kv.commit(tokens[:1024])
    assert kv.resize(2048, 1024)
    d = kv.get_scratch_desc(0)
    assert d is not None and d.range == HalfOpenRange(32, 60)
    assert _used(m) == 4 + 4 + 1  # previous window (still visible), new window, scratch
    kv.commit(tokens[1024:])
    assert _locked(m) == 4  # blocks 28-31 went stale: committed, so DROPPABLE in the tree
    kv.close()


def test_out_of_pages_changes_nothing(make_manager: MakeManager) -> None:
    m = _m32(make_manager, quota_slots=4)
    kv = _active(m)
    before = _snapshot(kv)
    assert not kv.resize(1024, 0)  # 4 window pages + 1 scratch slot > 4
    assert _snapshot(kv) == before and _used(m) == 0
    assert kv.resize(128, 0)  # 4 blocks, none stale at 128 - max_rewind_len: no scratch, 4 pages
    assert not kv.has_scratch_slots and _used(m) == 4
    kv.close()


# ----------------------------------------------------------------------------- life cycle
def test_suspend_resume_close(make_manager: MakeManager) -> None:
    m = _m32(make_manager)
    kv = _active(m)
    assert kv.resize(1024, 0)
    first = kv.get_scratch_desc(0)
    assert first is not None
    kv.suspend()
    assert not kv.has_scratch_slots and kv.get_scratch_desc(0) is None
    assert _used(m) == 4
    other = _active(m)
    assert other.resize(64, 0)  # takes the freed slot and more
    assert kv.resume()
    again = kv.get_scratch_desc(0)
    assert again is not None and again.range == first.range and len(again.slot_ids) == 1
    assert again.slot_ids[0] not in list(other.get_base_page_indices(0))
    assert _used(m) == 5 + 2
    kv.close()
    assert _used(m) == 2
    kv.close()  # idempotent
    other.close()


def test_scratch_slots_are_not_evictable(make_manager: MakeManager) -> None:
    m = _m32(make_manager)
    kv = _active(m)
    assert kv.resize(1024, 0)
    st = m.get_storage_statistics(0)[0]
    assert st.evictable == 0 and st.available == st.total - 5
    kv.close()


# ----------------------------------------------------------------------------- pool sizing
def test_scratch_aware_pool_sizing() -> None:
    def weights(scratch: SwaScratchReuseConfig | None) -> list[float]:
        cfg = make_config(
            layers=[attention(i, size=512) for i in range(32)]
            + [attention(32 + i, size=512, window=128) for i in range(32)],
            tokens_per_block=32,
            quota=64 << 20,
            typical_step=BatchDesc([KVCacheDesc(4096, 0)]),
            swa_scratch_reuse=scratch,
        )
        reg = LifeCycleRegistry(cfg.layers, cfg.tokens_per_block)
        w = layer_group_weights(cfg, reg, StorageLayout(cfg, reg), None)
        assert w is not None
        return w

    plain = weights(None)
    scratch = weights(SwaScratchReuseConfig(0))
    assert plain[1] == pytest.approx(0.5)
    # 4 window pages + ceil(124 / 32) = 4 scratch slots instead of 128 pages
    assert scratch[1] == pytest.approx(8 / 136)


# ----------------------------------------------------------------------------- fake engine
def _engine_manager(make_manager: MakeManager, full: bool) -> KVCacheManager:
    layers = _swa(8, 32, 32 * 16)
    if full:
        layers = [attention(8 + i, size=32 * 16) for i in range(2)] + [
            attention(i, size=32 * 16, window=32) for i in range(8)
        ]
    return make_manager(layers=layers, tokens_per_block=32, quota=8 << 20, swa_scratch_reuse=SwaScratchReuseConfig(0))


@pytest.mark.parametrize("full", [False, True])
def test_fake_engine_scratch_prefill_and_decode(make_manager: MakeManager, full: bool) -> None:
    m = _engine_manager(make_manager, full)
    eng = FakeEngine(m, m._config)
    swa = m.get_layer_group_id(0)
    kv = _active(m)
    prompt = list(range(1000, 1256))
    assert kv.resize(256, 0)
    d = kv.get_scratch_desc(swa)
    assert d is not None and d.range == HalfOpenRange(0, 7)
    eng.forward([Step(kv, prompt, [])])
    kv.commit(prompt)
    assert not kv.has_scratch_slots
    hist = list(prompt)
    for t in range(40):
        assert kv.resize(len(hist) + 1, len(hist))
        eng.forward([Step(kv, [5000 + t], hist)])
        kv.commit([5000 + t])
        hist.append(5000 + t)
    eng.verify(kv, hist)
    kv.close()


def test_fake_engine_chunked_scratch_prefill(make_manager: MakeManager) -> None:
    m = _engine_manager(make_manager, True)
    eng = FakeEngine(m, m._config)
    kv = _active(m)
    prompt = list(range(7, 7 + 640))
    hist: list[int] = []
    for lo in range(0, 640, 160):
        chunk = prompt[lo : lo + 160]
        assert kv.resize(lo + 160, lo)
        if lo + 160 > 64:
            assert kv.has_scratch_slots
        eng.forward([Step(kv, chunk, list(hist))])
        kv.commit(chunk)
        hist += chunk
    eng.verify(kv, hist)
    # a second request reuses the whole prompt and decodes on top of it
    kv.close()
    again = m.create_kv_cache(input_tokens=prompt)
    assert again.num_committed_tokens == 640
    assert eng.resume(again)
    assert again.resize(641, 640)
    eng.forward([Step(again, [1], prompt)])
    again.close()


class _HidingProxy:
    """A cache whose scratch desc wrongly claims one more block (a window block): that block's
    tokens go to the scratch slot, so its real page is never written."""

    def __init__(self, kv: KVCache) -> None:
        self._kv = kv

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)

    def get_scratch_desc(self, lg: int) -> Any:
        d = self._kv.get_scratch_desc(lg)
        if d is None:
            return None
        return ScratchDesc(HalfOpenRange(d.range.beg, d.range.end + 1), list(d.slot_ids))


def test_fake_engine_catches_a_hidden_window_block(make_manager: MakeManager) -> None:
    m = _engine_manager(make_manager, False)
    eng = FakeEngine(m, m._config)
    kv = _active(m)
    prompt = list(range(256))
    assert kv.resize(256, 0)
    eng.forward([Step(_HidingProxy(kv), prompt, [])])  # scratch writes read back fine
    kv.commit(prompt)
    assert kv.resize(257, 256)
    with pytest.raises(DataIntegrityError, match="block 7"):
        eng.forward([Step(kv, [1], prompt)])
    kv.close()


# ----------------------------------------------------------------------------- batch admission
def test_batch_admission_with_scratch(make_manager: MakeManager) -> None:
    from kv_cache_manager_v2 import KVCacheRequest

    m = _m32(make_manager, quota_slots=5)
    tokens = list(range(1024))
    # 4 window pages + 1 scratch slot: fits exactly (the up-front check counts scratch slots)
    out = m.create_kv_caches([KVCacheRequest(tokens)], all_or_nothing=True)
    kv = out[0]
    assert kv is not None and kv.is_active
    d = kv.get_scratch_desc(0)
    assert d is not None and d.range == HalfOpenRange(0, 28) and _used(m) == 5
    kv.commit(tokens)
    kv.close()
    with pytest.raises(ValueError, match=r"requests\[0\]\.history_length"):
        m.create_kv_caches([KVCacheRequest(list(range(5000, 7048)), history_length=64)])
    assert m.num_open_caches == 0
