"""PageIndexConverter (SPEC §2 page-index arithmetic, §3 index conversion, §4.8 scratch formula),
its vectorised numpy form, and the small value classes HalfOpenRange / ScratchDesc / BufferId."""

from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np
import pytest

from kv_cache_manager_v2 import (
    BAD_PAGE_INDEX,
    BufferId,
    HalfOpenRange,
    KVCacheManager,
    PageIndexConverter,
    PageIndexMode,
    ScratchDesc,
)

from conftest import attention

SHARED = PageIndexMode.SHARED
PER_LAYER = PageIndexMode.PER_LAYER
MakeManager = Callable[..., KVCacheManager]


def _reference(
    base: Sequence[int],
    scale: int,
    e: int,
    off: int,
    spb: int,
    mode: PageIndexMode | None,
    scratch: ScratchDesc | None = None,
) -> list[int]:
    """SPEC §2 / §4.8, written independently of the library."""
    out: list[int] = []
    for o, b in enumerate(base):
        if scratch is not None and scratch.range.beg <= o < scratch.range.end:
            p = o - scratch.range.beg
            t = p * spb
            slot = scratch.slot_ids[t // scale]
            i = slot * scale + ((t % scale) + off) % scale
        elif b == -1:
            out.extend([-1] * e)
            continue
        elif mode is PER_LAYER:
            i = b * scale + off
        else:
            i = b * scale
        out.extend(i * e + k for k in range(e))
    return out


# ----------------------------------------------------------------------------- list form
def test_shared_and_per_layer_basic() -> None:
    c = PageIndexConverter(4, 1, 3, 2)
    assert c([12]) == [48]
    assert c([12], None) == [48]
    assert c([12], SHARED) == [48]
    assert c([12], PER_LAYER) == [51]
    assert c([0, 1, 2, -1, 5], PER_LAYER) == [3, 7, 11, -1, 23]
    assert c([0, 1, 2, -1, 5], SHARED) == [0, 4, 8, -1, 20]
    assert c([]) == [] and c([], PER_LAYER) == []


def test_expansion() -> None:
    c = PageIndexConverter(3, 4, 2, 1)
    assert c([5], PER_LAYER) == [68, 69, 70, 71]  # (5*3+2)*4 + k
    assert c([5], SHARED) == [60, 61, 62, 63]
    assert c([-1], PER_LAYER) == [-1, -1, -1, -1]
    assert c([-1, 0, -1], SHARED) == [-1] * 4 + [0, 1, 2, 3] + [-1] * 4
    assert c([1, -1, 2], PER_LAYER) == [20, 21, 22, 23, -1, -1, -1, -1, 32, 33, 34, 35]


def test_bad_page_index_constant() -> None:
    assert BAD_PAGE_INDEX == -1


@pytest.mark.parametrize("seed", range(8))
def test_list_form_matches_reference(seed: int) -> None:
    rng = random.Random(seed)
    scale = rng.randint(1, 9)
    e = rng.choice([1, 2, 3, 4, 8])
    off = rng.randrange(scale)
    spb = rng.randint(1, scale)
    c = PageIndexConverter(scale, e, off, spb)
    base = [rng.choice([-1, rng.randrange(10_000)]) for _ in range(rng.randint(0, 50))]
    for mode in (None, SHARED, PER_LAYER):
        assert c(base, mode) == _reference(base, scale, e, off, spb, mode)
    # any sequence type works (e.g. the int32 array a cache returns)
    import array

    assert c(array.array("i", base), PER_LAYER) == _reference(base, scale, e, off, spb, PER_LAYER)
    assert c(tuple(base), SHARED) == _reference(base, scale, e, off, spb, SHARED)


def test_converter_rejects_bad_parameters() -> None:
    for args in ((0, 1, 0, 1), (4, 0, 0, 1), (4, 1, 4, 1), (4, 1, -1, 1), (4, 1, 0, 0), (-2, 1, 0, 1)):
        with pytest.raises(ValueError):
            PageIndexConverter(*args)


def test_index_mode_type_checked() -> None:
    c = PageIndexConverter(2, 1, 1, 1)
    with pytest.raises(TypeError):
        c([1], 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        c([1], "PER_LAYER")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- scratch
def test_shared_with_scratch_raises() -> None:
    c = PageIndexConverter(16, 1, 0, 2)
    sd = ScratchDesc(HalfOpenRange(0, 3), [5])
    with pytest.raises(ValueError):
        c([-1, -1, -1, 4], SHARED, sd)
    with pytest.raises(ValueError):
        c([-1, -1, -1, 4], None, sd)
    with pytest.raises(ValueError):
        c([-1, -1, -1, 4], scratch=sd)


def test_shared_with_empty_scratch_is_fine() -> None:
    c = PageIndexConverter(16, 1, 3, 2)
    empty = ScratchDesc(HalfOpenRange(2, 2), [])
    assert c([1, 2], SHARED, empty) == [16, 32]
    assert c([1, 2], PER_LAYER, empty) == [19, 35]
    assert c([1, 2], SHARED, None) == [16, 32]
    backwards = ScratchDesc(HalfOpenRange(5, 1), [9])
    assert c([1, 2], SHARED, backwards) == [16, 32]


def test_scratch_eight_swa_layers_example() -> None:
    # 8 SWA layers with K and V in one pool: scale 16, 2 scratch pages per block.
    s = 9
    sd = ScratchDesc(HalfOpenRange(0, 7), [s])
    base = [-1] * 7 + [3, 4]
    key0 = PageIndexConverter(16, 1, 0, 2)
    assert key0(base, PER_LAYER, sd) == [16 * s + x for x in (0, 2, 4, 6, 8, 10, 12)] + [48, 64]
    val3 = PageIndexConverter(16, 1, 7, 2)
    assert val3(base, PER_LAYER, sd) == [16 * s + x for x in (7, 9, 11, 13, 15, 1, 3)] + [55, 71]
    # the 16 buffers of the 7 scratch blocks land on distinct pages of the scratch slot only
    # when they fit (7 blocks x 2 pages <= 16): every (layer, role) pair gets its own page per block
    pages = set()
    for off in range(16):
        c = PageIndexConverter(16, 1, off, 2)
        out = c(base, PER_LAYER, sd)[:7]
        assert all(16 * s <= x < 16 * (s + 1) for x in out)
        pages.update(out)
    assert pages == set(range(16 * s, 16 * (s + 1)))


def test_scratch_range_not_at_zero_and_several_slots() -> None:
    scale, spb = 4, 2
    sd = ScratchDesc(HalfOpenRange(2, 7), [10, 20, 30])
    base = [1, 2, -1, -1, -1, -1, -1, 8, -1]
    for off in range(scale):
        c = PageIndexConverter(scale, 1, off, spb)
        got = c(base, PER_LAYER, sd)
        assert got == _reference(base, scale, 1, off, spb, PER_LAYER, sd)
        # p = 0..4, t = 0,2,4,6,8 -> slots 10,10,20,20,30
        assert got[2:7] == [10 * 4 + (0 + off) % 4, 10 * 4 + (2 + off) % 4, 20 * 4 + (0 + off) % 4,
                            20 * 4 + (2 + off) % 4, 30 * 4 + (0 + off) % 4]
        assert got[:2] == [1 * 4 + off, 2 * 4 + off] and got[7] == 8 * 4 + off and got[8] == -1


def test_scratch_with_expansion() -> None:
    c = PageIndexConverter(4, 2, 3, 2)
    sd = ScratchDesc(HalfOpenRange(0, 2), [7])
    # o=0: t=0 -> 7*4 + 3 = 31 -> [62, 63]; o=1: t=2 -> 7*4 + (2+3)%4 = 29 -> [58, 59]
    assert c([-1, -1, 1], PER_LAYER, sd) == [62, 63, 58, 59, 14, 15]


@pytest.mark.parametrize("seed", range(6))
def test_scratch_matches_reference_random(seed: int) -> None:
    rng = random.Random(100 + seed)
    scale = rng.randint(1, 16)
    spb = rng.randint(1, scale)
    e = rng.choice([1, 2, 4])
    n = rng.randint(1, 40)
    beg = rng.randint(0, n - 1)
    end = rng.randint(beg + 1, n)
    need = -(-((end - beg) * spb) // scale)
    slots = [rng.randrange(1000) for _ in range(need)]
    sd = ScratchDesc(HalfOpenRange(beg, end), slots)
    base = [(-1 if beg <= o < end else rng.choice([-1, rng.randrange(1000)])) for o in range(n)]
    for off in range(scale):
        c = PageIndexConverter(scale, e, off, spb)
        assert c(base, PER_LAYER, sd) == _reference(base, scale, e, off, spb, PER_LAYER, sd)


# ----------------------------------------------------------------------------- numpy form
@pytest.mark.parametrize("seed", range(10))
def test_convert_array_matches_list_form(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scale = int(rng.integers(1, 10))
    e = int(rng.choice([1, 2, 3, 4]))
    off = int(rng.integers(0, scale))
    c = PageIndexConverter(scale, e, off, 1)
    rows, cols = int(rng.integers(1, 9)), int(rng.integers(1, 30))
    a = rng.integers(0, 5000, size=(rows, cols))
    a[rng.random((rows, cols)) < 0.3] = -1
    for mode in (None, SHARED, PER_LAYER):
        for arr in (a, a.astype(np.int32)):
            out = c.convert_array(arr, mode)
            assert isinstance(out, np.ndarray)
            assert out.shape == (rows, cols * e)
            for r in range(rows):
                assert out[r].tolist() == c(a[r].tolist(), mode)
    # 1-D input too
    assert c.convert_array(a[0], PER_LAYER).tolist() == c(a[0].tolist(), PER_LAYER)
    # list input
    assert c.convert_array(a.tolist(), SHARED).tolist() == [c(r, SHARED) for r in a.tolist()]


def test_convert_array_three_dims_and_large_slots() -> None:
    c = PageIndexConverter(64, 2, 63, 1)
    a = np.array([[[0, -1], [2**24, 1]], [[-1, -1], [5, 6]]], dtype=np.int64)
    out = c.convert_array(a, PER_LAYER)
    assert out.shape == (2, 2, 4)
    for i in range(2):
        for j in range(2):
            assert out[i, j].tolist() == c(a[i, j].tolist(), PER_LAYER)
    assert out.dtype.kind == "i"
    assert int(out[0, 1, 0]) == (2**24 * 64 + 63) * 2


def test_convert_array_on_real_caches(make_manager: MakeManager) -> None:
    m = make_manager(layers=[attention(0), attention(1), attention(2, window=32)], quota=256 << 10)
    kvs = []
    for n in (17, 40, 70):
        kv = m.create_kv_cache()
        assert kv.resume()
        assert kv.resize(capacity=n, history_length=n)
        kvs.append(kv)
    width = max(kv.num_blocks for kv in kvs)
    for lid in (0, 1, 2):
        for role in ("k", "v"):
            lg = m.get_layer_group_id(lid)
            c = m.get_page_index_converter(lid, role)
            table = np.full((len(kvs), width), -1, dtype=np.int32)
            for r, kv in enumerate(kvs):
                kv.set_base_page_index_buf(0, lg, table[r])
            assert any(-1 in list(kv.get_base_page_indices(lg)) for kv in kvs) == (lg == 1)
            for mode in (SHARED, PER_LAYER):
                out = c.convert_array(table, mode)
                for r, kv in enumerate(kvs):
                    want = c(list(kv.get_base_page_indices(lg)), mode)
                    assert out[r].tolist()[: len(want)] == want
                    assert set(out[r].tolist()[len(want):]) <= {-1}
            for kv in kvs:
                kv.set_base_page_index_buf(0, lg, None)
    for kv in kvs:
        kv.close()


def test_manager_converters_match_spec_parameters(make_manager: MakeManager) -> None:
    m = make_manager(layers=[attention(0), attention(1)])
    c = m.get_page_index_converter(1, "v")
    assert (c.scale, c.expansion, c.layer_offset, c.scratch_pages_per_block) == (4, 1, 3, 2)
    assert isinstance(c, PageIndexConverter)


# ----------------------------------------------------------------------------- value classes
def test_half_open_range() -> None:
    r = HalfOpenRange(3, 7)
    assert (r.beg, r.end) == (3, 7)
    assert len(r) == 4 and bool(r)
    assert len(HalfOpenRange(5, 5)) == 0 and not HalfOpenRange(5, 5)
    assert len(HalfOpenRange(7, 2)) == 0 and not HalfOpenRange(7, 2)
    assert HalfOpenRange(0, 1) and len(HalfOpenRange(0, 1)) == 1
    assert r == HalfOpenRange(3, 7)
    assert r != HalfOpenRange(3, 8) and r != HalfOpenRange(2, 7)
    assert r != (3, 7)
    assert hash(r) == hash(HalfOpenRange(3, 7))
    assert len({r, HalfOpenRange(3, 7), HalfOpenRange(0, 0)}) == 2
    assert not isinstance(r, tuple)
    assert not hasattr(r, "__dict__")  # slotted
    assert "3" in repr(r) and "7" in repr(r)


def test_scratch_desc_truthiness() -> None:
    sd = ScratchDesc(HalfOpenRange(2, 5), [4, 5])
    assert sd and sd.range == HalfOpenRange(2, 5) and list(sd.slot_ids) == [4, 5]
    assert not ScratchDesc(HalfOpenRange(2, 2), [])
    assert not ScratchDesc(HalfOpenRange(4, 2), [1])
    assert ScratchDesc(HalfOpenRange(0, 1), (9,))
    assert not isinstance(sd, tuple)
    assert not hasattr(sd, "__dict__")


def test_buffer_id_named_tuple() -> None:
    b = BufferId(3, "k")
    assert isinstance(b, tuple)
    assert b == (3, "k")
    assert b.layer_id == 3 and b.role == "k"
    assert b[0] == 3 and b[1] == "k"
    assert BufferId._fields == ("layer_id", "role")
    lid, role = b
    assert (lid, role) == (3, "k")
    assert BufferId(layer_id=1, role="v") == BufferId(1, "v")
    assert len({BufferId(1, "v"), (1, "v")}) == 1
    assert sorted([BufferId(2, "a"), BufferId(1, "z"), BufferId(1, "b")]) == [(1, "b"), (1, "z"), (2, "a")]


def test_page_index_mode_members() -> None:
    assert {m.name for m in PageIndexMode} == {"SHARED", "PER_LAYER"}
    assert PageIndexMode.SHARED is not PageIndexMode.PER_LAYER


def test_manager_and_cache_support_both_modes(make_manager: MakeManager) -> None:
    m = make_manager(layers=[attention(0), attention(1, window=32)])
    assert m.supports_index_mode(SHARED) is True
    assert m.supports_index_mode(PER_LAYER) is True
    kv = m.create_kv_cache()
    assert kv.supports_index_mode(SHARED) is True and kv.supports_index_mode(PER_LAYER) is True
    assert not kv.has_scratch_slots
    assert kv.get_scratch_desc(0) is None and kv.get_scratch_desc(1) is None
    kv.close()
