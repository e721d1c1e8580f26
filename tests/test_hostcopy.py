"""hostcopy.copy_runs (the host backend's batched copy) and HostAllocation's memory commit/release.

Bytes are checked against numpy copies of random data; the streaming path (batches of at least
STREAM_MIN_BATCH bytes) is exercised with unaligned addresses and sizes that are not multiples
of the store width.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import pytest

import hostcopy
from kv_cache_manager_v2._backends._host import HostAllocation, HostBackend


class Buf:
    """A host buffer with a numpy view and its address."""

    def __init__(self, size: int, seed: int | None = None) -> None:
        self.arr = np.zeros(size, dtype=np.uint8)
        if seed is not None:
            self.arr[:] = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
        self.addr = int(self.arr.ctypes.data)


def test_single_copy_and_empty_batch() -> None:
    src = Buf(1000, seed=1)
    dst = Buf(1000)
    assert hostcopy.copy_runs([], [], []) == 0
    assert hostcopy.copy_runs([dst.addr + 10], [src.addr + 3], [500]) == 1
    assert np.array_equal(dst.arr[10:510], src.arr[3:503])
    assert not dst.arr[:10].any() and not dst.arr[510:].any()


def test_adjacent_runs_merge_and_others_do_not() -> None:
    rs = 256
    src = Buf(16 * rs, seed=2)
    dst = Buf(16 * rs)
    # slots 0..3 -> 4..7 continue each other: one copy; then 9 -> 1 and 10 -> 0 are separate.
    pairs = [(4, 0), (5, 1), (6, 2), (7, 3), (1, 9), (0, 10)]
    n = hostcopy.copy_runs(
        [dst.addr + d * rs for d, _ in pairs], [src.addr + s * rs for _, s in pairs], [rs] * len(pairs)
    )
    assert n == 3
    for d, s in pairs:
        assert np.array_equal(dst.arr[d * rs:(d + 1) * rs], src.arr[s * rs:(s + 1) * rs])
    assert not dst.arr[2 * rs:4 * rs].any() and not dst.arr[8 * rs:].any()


@pytest.mark.parametrize("src_off,dst_off,run", [(0, 0, 65536), (3, 17, 65536 + 5), (64, 8, 4099), (1, 0, 100)])
def test_streaming_batch_bytes(src_off: int, dst_off: int, run: int) -> None:
    """A batch above STREAM_MIN_BATCH (the streaming-store path) with unaligned addresses and
    run sizes; scattered destinations so nothing merges."""
    count = hostcopy.STREAM_MIN_BATCH // run + 2
    assert count * run >= hostcopy.STREAM_MIN_BATCH
    stride = run + 64
    src = Buf(src_off + count * stride, seed=run)
    dst = Buf(dst_off + count * stride + 1)
    order = list(range(count))[::-1]  # reversed: no two runs continue each other
    dsts = [dst.addr + dst_off + k * stride for k in order]
    srcs = [src.addr + src_off + k * stride for k in range(count)]
    assert hostcopy.copy_runs(dsts, srcs, [run] * count) == count
    for j, k in enumerate(order):
        got = dst.arr[dst_off + k * stride:dst_off + k * stride + run]
        want = src.arr[src_off + j * stride:src_off + j * stride + run]
        assert np.array_equal(got, want), f"run {j}"
        gap = dst.arr[dst_off + k * stride + run:dst_off + (k + 1) * stride]
        assert not gap.any(), "bytes written outside a run"
    assert not dst.arr[:dst_off].any()


def test_overlapping_ranges_copy_like_memmove() -> None:
    buf = Buf(8 << 20, seed=5)
    want = buf.arr.copy()
    n = (5 << 20) + 3
    # forward overlap, large enough for the streaming path
    hostcopy.copy_runs([buf.addr + 4096 + 1], [buf.addr], [n])
    want[4097:4097 + n] = want[:n].copy()
    assert np.array_equal(buf.arr, want)
    # backward overlap, small
    hostcopy.copy_runs([buf.addr], [buf.addr + 7], [1000])
    want[:1000] = want[7:1007].copy()
    assert np.array_equal(buf.arr, want)


def test_zero_sized_runs_are_skipped() -> None:
    src = Buf(64, seed=6)
    dst = Buf(64)
    # the empty run (null addresses are fine for it) is not counted; it separates the other two
    assert hostcopy.copy_runs([dst.addr, 0, dst.addr + 8], [src.addr, 0, src.addr + 8], [8, 0, 8]) == 2
    assert np.array_equal(dst.arr[:16], src.arr[:16])
    assert not dst.arr[16:].any()


def test_bad_arguments_name_the_field_and_copy_nothing() -> None:
    src = Buf(64, seed=7)
    dst = Buf(64)
    with pytest.raises(TypeError, match="dsts must be a list"):
        hostcopy.copy_runs((dst.addr,), [src.addr], [8])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one length"):
        hostcopy.copy_runs([dst.addr], [src.addr], [8, 8])
    with pytest.raises(TypeError, match=r"sizes\[0\] must be an int"):
        hostcopy.copy_runs([dst.addr], [src.addr], [8.0])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"srcs\[1\] must be in"):
        hostcopy.copy_runs([dst.addr, dst.addr + 8], [src.addr, -1], [8, 8])
    with pytest.raises(ValueError, match="copy 1 has a null address"):
        hostcopy.copy_runs([dst.addr, 0], [src.addr, src.addr], [8, 8])
    with pytest.raises(TypeError, match="takes 3 arguments"):
        hostcopy.copy_runs([dst.addr], [src.addr])  # type: ignore[call-arg]
    assert not dst.arr.any(), "a refused batch copied something"


def test_backend_copy_batch_and_copy() -> None:
    be = HostBackend()
    src = Buf(4096, seed=8)
    dst = Buf(4096)
    be.copy_batch([dst.addr + 1024, dst.addr], [src.addr, src.addr + 2048], [1024, 512])
    be.copy(dst.addr + 3000, src.addr + 10, 96)
    assert np.array_equal(dst.arr[1024:2048], src.arr[:1024])
    assert np.array_equal(dst.arr[:512], src.arr[2048:2560])
    assert np.array_equal(dst.arr[3000:3096], src.arr[10:106])


def _view(a: HostAllocation) -> np.ndarray:  # type: ignore[type-arg]
    raw = (ctypes.c_uint8 * a.size).from_address(a.address)
    return np.ctypeslib.as_array(raw)


def test_populate_keeps_bytes_and_discard_returns_zeros() -> None:
    size = 8 << 20
    a = HostAllocation(size)
    try:
        assert a.address % mmap.PAGESIZE == 0
        v = _view(a)
        head = np.random.default_rng(9).integers(1, 256, 5000, dtype=np.uint8)
        v[:5000] = head
        # populate from an unaligned offset inside the written page: earlier bytes stay
        a.populate(4999, size)
        assert np.array_equal(v[:5000], head)
        assert not v[5000:].any()
        v[:] = 0xAB
        a.discard_from(3 << 20)  # page-aligned: everything from there reads as zero again
        assert (v[: 3 << 20] == 0xAB).all()
        assert not v[3 << 20:].any()
        a.discard_from(1000)  # rounds up to the next page: the first page keeps its bytes
        assert (v[: mmap.PAGESIZE] == 0xAB).all()
        assert not v[mmap.PAGESIZE:].any()
        a.populate(0, size)
        assert (v[: mmap.PAGESIZE] == 0xAB).all()
        assert not v[mmap.PAGESIZE:].any()
        a.populate(size, size + 10)  # empty / past the end: nothing happens
    finally:
        a.release()
    assert a.address == 0
    a.populate(0, 10)  # released: a no-op
    a.discard_from(0)
