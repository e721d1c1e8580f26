"""The embedded host backend: pools are page-aligned anonymous mappings in host RAM.

Addresses are real pointers, so a CPU engine (and the fake engine) can use the pages directly.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Final

from hostcopy import copy_runs

from .._exceptions import OutOfMemoryError

# madvise(2) advice that commits memory without writing it (Linux >= 5.14; the mmap module of
# some Python versions does not name it).
MADV_POPULATE_WRITE: Final = getattr(mmap, "MADV_POPULATE_WRITE", 23)


class HostAllocation:
    """One pool's memory. `address` stays fixed until `release()`."""

    __slots__ = ("size", "address", "_map", "_view")

    def __init__(self, size: int) -> None:
        self.size = size
        self._map: mmap.mmap | None = None
        self._view: ctypes.Array[ctypes.c_char] | None = None
        self.address = 0
        if size > 0:
            try:
                # MAP_NORESERVE: reserve address space; memory is committed only when touched.
                flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
                self._map = mmap.mmap(-1, size, flags=flags)
            except OSError as e:  # pragma: no cover - depends on the machine
                raise OutOfMemoryError(f"host allocation of {size} bytes failed: {e}") from e
            _advise_huge_pages(self._map)
            self._view = (ctypes.c_char * size).from_buffer(self._map)
            self.address = ctypes.addressof(self._view)

    def populate(self, start: int, end: int) -> None:
        """Commits the memory of [start, end) now (first-touch page faults would otherwise slow
        the first copies into it several times over)."""
        end = min(end, self.size)
        if self._map is None or start >= end:
            return
        page = mmap.PAGESIZE
        lo = start // page * page
        try:
            # One call that faults the range in without writing it (Linux >= 5.14): with huge
            # pages about 10x faster than touching it; older kernels refuse it (EINVAL).
            self._map.madvise(MADV_POPULATE_WRITE, lo, end - lo)
        except OSError:
            ctypes.memset(self.address + start, 0, end - start)

    def discard_from(self, offset: int) -> None:
        """Returns the memory past `offset` to the OS; the addresses stay reserved (zero-filled)."""
        m = self._map
        if m is None or offset >= self.size:
            return
        page = mmap.PAGESIZE
        start = (offset + page - 1) // page * page
        if start < self.size:
            m.madvise(mmap.MADV_DONTNEED, start, self.size - start)

    def release(self) -> None:
        self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None
        self.address = 0


def _advise_huge_pages(m: mmap.mmap) -> None:
    """Asks for transparent huge pages where the kernel offers them on request: committing and
    releasing memory (quota growth and shrink) then takes a fault / a free per 2 MiB instead of
    per 4 KiB, and copies miss the TLB less. Only advice: refused or unsupported is fine."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return
    try:
        m.madvise(advice)
    except OSError:
        pass


class HostBackend:
    name = "host"

    def allocate(self, size: int) -> HostAllocation:
        return HostAllocation(size)

    def copy(self, dst: int, src: int, size: int) -> None:
        copy_runs([dst], [src], [size])

    def copy_batch(self, dsts: list[int], srcs: list[int], sizes: list[int]) -> None:
        """Copies runs in order in one call without the GIL (hostcopy): runs that continue each
        other are merged, and large batches use streaming stores (see hostcopy/hostcopy.c)."""
        copy_runs(dsts, srcs, sizes)


def cuda_device_usable() -> bool:
    """True when cuda-python is importable and the driver reports at least one device."""
    try:
        from cuda.bindings import driver  # type: ignore[import-not-found]
    except Exception:
        return False
    try:
        (err,) = driver.cuInit(0)
        if int(err) != 0:
            return False
        err, count = driver.cuDeviceGetCount()
        return int(err) == 0 and int(count) > 0
    except Exception:
        return False


def select_backend(name: str) -> HostBackend:
    if name == "host":
        return HostBackend()
    if name == "auto":
        # The CUDA backend is not part of this release, so "auto" always lands on the host backend.
        return HostBackend()
    if name == "cuda":
        if not cuda_device_usable():
            raise RuntimeError(
                "backend='cuda' was requested but no usable CUDA driver/device was found "
                "(cuda-python could not be imported or reports no device); use backend='host' or 'auto'"
            )
        raise RuntimeError("backend='cuda' is not available in this release yet; use backend='host' or 'auto'")
    raise ValueError(f"backend must be one of ('auto', 'host', 'cuda'), got {name!r}")
