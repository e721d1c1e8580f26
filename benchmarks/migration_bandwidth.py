#!/usr/bin/env python3
"""Batched page migration bandwidth between storage levels (SPEC §8).

One manager, one layer whose K buffer is `--page-kb` KiB per block (tokens_per_block 16), so one
block = one page = one slot; level 0, host and disk quotas of `--size-mb` MiB (+ a small margin).
One cache of `size / page` blocks is created, resumed, sized, filled with a per-block pattern
(numpy over the level-0 pool: base address + stride x converted page index), committed and
suspended. Then every page is forced through the levels with public calls, each timed:

* level 0 -> host:  ``manager.resize(0, 0)``            (HELD pages move one level colder)
* host -> disk:     ``manager.resize(1, 0)``
* disk -> host:     ``manager.resize(1, quota)`` + ``kv.prefetch(1)``
* host -> level 0:  ``manager.resize(0, quota)`` + ``kv.resume()``

after which every byte of every block is checked against its pattern (at its new page index),
and the level statistics confirm that each step moved every page. Then level 0 -> host once more,
the way serving does it: the cache is suspended and another cache's ``resize`` takes every level-0
slot, evicting all its pages to host (timed; no quota change, so no memory is released); the
cache is resumed and checked again.

Baselines, same run, same sizes: a plain ``memcpy`` (``ctypes.memmove``) of the same bytes between
two buffers, and a plain loop of ``os.pwrite`` / ``os.preadv`` of the same bytes in page-sized
chunks to a fresh file in the same directory (no checksum; fresh sparse file like the disk
level's, reads served from the page cache like the disk level's: same page-cache state).
Targets: host moves >= 80 % of memcpy, disk moves >= 50 % of raw file I/O.

The migration runs in two variants, each on a fresh manager:

* ``as-is``: public API only. A quota shrink hands the memory of the released slots back to the
  OS and a quota growth commits it again (timed apart and printed: on a VM, memory the guest
  never touched before can take seconds per GiB the first time). The memcpy / pread baselines
  into fresh memory are printed too.
* ``prefaulted``: before each timed move the destination level's memory is touched (untimed)
  through the manager's internals (``manager._ctx.storage``: pool addresses and slot counts),
  which isolates the copy machinery from the page faults; compare with the plain baselines.

    PYTHONPATH=. python benchmarks/migration_bandwidth.py [--size-mb 1024] [--page-kb 64]
        [--dir DIR] [--reps N] [--warmup N] [--variant {as-is,prefaulted,both}] [--json FILE]
        [--compiled-dir build/compiled]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import numpy.typing as npt

    from kv_cache_manager_v2 import KVCache, KVCacheManager

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
GB = 1e9
TOKENS_PER_BLOCK = 16
QUOTA_MARGIN = 4 * MiB
HOST_TARGET = 0.80  # host moves vs memcpy
DISK_TARGET = 0.50  # disk moves vs raw pwrite / pread
VARIANTS = ("as-is", "prefaulted")
DIRECTIONS = ("level0_to_host", "host_to_disk", "disk_to_host", "host_to_level0", "level0_to_host_evict")
DIRECTION_LABELS = {
    "level0_to_host": "level 0 -> host",
    "host_to_disk": "host -> disk",
    "disk_to_host": "disk -> host",
    "host_to_level0": "host -> level 0",
    "level0_to_host_evict": "l0 -> host (evict)",
}
# direction -> (baseline key, baseline label, target)
BASELINE_OF = {
    "level0_to_host": ("memcpy_gbps", "memcpy", HOST_TARGET),
    "host_to_disk": ("raw_pwrite_gbps", "raw pwrite", DISK_TARGET),
    "disk_to_host": ("raw_pread_gbps", "raw pread", DISK_TARGET),
    "host_to_level0": ("memcpy_gbps", "memcpy", HOST_TARGET),
    "level0_to_host_evict": ("memcpy_gbps", "memcpy", HOST_TARGET),
}


# ---------------------------------------------------------------------------- helpers
class _Mem:
    """An anonymous private mapping (fresh: untouched until written); `huge` asks for
    transparent huge pages, as the library's pools do."""

    def __init__(self, size: int, huge: bool = False) -> None:
        self.size = size
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if huge and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self.map.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        self._arr = (ctypes.c_char * size).from_buffer(self.map)
        self.address = ctypes.addressof(self._arr)

    def view(self) -> memoryview:
        return memoryview(self.map)

    def close(self) -> None:
        del self._arr
        self.map.close()


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / GB if seconds > 0 else float("inf")


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def fs_type(path: str) -> str:
    """File system type of the mount holding `path` (from /proc/mounts; '?' if unknown)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def default_dir() -> str:
    """build/ next to the repository (on the repository's disk; /tmp may be tmpfs)."""
    return os.path.join(REPO_ROOT, "build", "migration_bandwidth")


# -------------------------------------------------------------------------- baselines
def memcpy_gbps(size: int, reps: int) -> tuple[float, float, float, float]:
    """(warm, fresh, release seconds, release seconds with huge pages): one memmove of `size`
    bytes into touched memory / into fresh memory, and the time to hand `size` touched bytes back
    to the OS (madvise DONTNEED, what a quota shrink does with the memory it releases) in 4 KiB
    pages and in huge pages (what the library's pools ask for)."""
    src = _Mem(size)
    ctypes.memset(src.address, 0x5A, size)
    warm: list[float] = []
    fresh: list[float] = []
    release: list[float] = []
    release_huge: list[float] = []
    try:
        for _ in range(reps):
            dst = _Mem(size)
            try:
                t0 = time.perf_counter()
                ctypes.memmove(dst.address, src.address, size)
                fresh.append(_gbps(size, time.perf_counter() - t0))
                t0 = time.perf_counter()
                ctypes.memmove(dst.address, src.address, size)
                warm.append(_gbps(size, time.perf_counter() - t0))
                t0 = time.perf_counter()
                dst.map.madvise(mmap.MADV_DONTNEED, 0, size)
                release.append(time.perf_counter() - t0)
            finally:
                dst.close()
            dst = _Mem(size, huge=True)
            try:
                ctypes.memmove(dst.address, src.address, size)
                t0 = time.perf_counter()
                dst.map.madvise(mmap.MADV_DONTNEED, 0, size)
                release_huge.append(time.perf_counter() - t0)
            finally:
                dst.close()
    finally:
        src.close()
    return _median(warm), _median(fresh), _median(release), _median(release_huge)


def raw_file_gbps(directory: str, size: int, page: int, reps: int) -> tuple[float, float, float]:
    """(pwrite, pread, pread into fresh memory): a plain loop of one call per page to a fresh
    sparse file in `directory`, no checksum; the reads come right after the writes (from the
    page cache, as the disk level's do)."""
    src = _Mem(size)
    ctypes.memset(src.address, 0xA5, size)
    sv = src.view()
    writes: list[float] = []
    reads: list[float] = []
    reads_fresh: list[float] = []
    try:
        for _ in range(reps):
            fd, path = tempfile.mkstemp(prefix="raw-", suffix=".bin", dir=directory)
            dst = _Mem(size)
            dv = dst.view()
            try:
                os.ftruncate(fd, size)
                t0 = time.perf_counter()
                for off in range(0, size, page):
                    if os.pwrite(fd, sv[off : off + page], off) != page:
                        raise OSError("short write")
                writes.append(_gbps(size, time.perf_counter() - t0))
                t0 = time.perf_counter()  # into fresh memory (first touch)
                for off in range(0, size, page):
                    if os.preadv(fd, [dv[off : off + page]], off) != page:
                        raise OSError("short read")
                reads_fresh.append(_gbps(size, time.perf_counter() - t0))
                t0 = time.perf_counter()  # again, into the now touched memory
                for off in range(0, size, page):
                    if os.preadv(fd, [dv[off : off + page]], off) != page:
                        raise OSError("short read")
                reads.append(_gbps(size, time.perf_counter() - t0))
                if dv[:64] != sv[:64] or dv[size - 64 :] != sv[size - 64 :]:
                    raise AssertionError("raw file round trip returned other bytes")
            finally:
                dv.release()
                dst.close()
                os.close(fd)
                os.unlink(path)  # drops its page cache: the next writer starts clean
    finally:
        sv.release()
        src.close()
    return _median(writes), _median(reads), _median(reads_fresh)


# -------------------------------------------------------------------------- migration
def _make_manager(size: int, page: int, directory: str) -> "KVCacheManager":
    from kv_cache_manager_v2 import (
        AttentionLayerConfig,
        BufferConfig,
        DiskCacheTierConfig,
        GpuCacheTierConfig,
        HostCacheTierConfig,
        KVCacheManager,
        KVCacheManagerConfig,
    )

    quota = size + QUOTA_MARGIN
    cfg = KVCacheManagerConfig(
        tokens_per_block=TOKENS_PER_BLOCK,
        cache_tiers=[
            GpuCacheTierConfig(quota=quota),
            HostCacheTierConfig(quota=quota),
            DiskCacheTierConfig(quota=quota, path=directory),
        ],
        layers=[AttentionLayerConfig(0, [BufferConfig("K", page)])],
        backend="host",
    )
    return KVCacheManager(cfg)


def _touch_level(manager: "KVCacheManager", level: int) -> None:
    """Writes zeros over the memory of every slot of a memory level (INTERNALS: the public API
    gives no address for levels other than 0). Only free slots are touched here: the callers
    prefault a destination level right before pages move into it."""
    storage = manager._ctx.storage
    layout = manager._ctx.layout
    npg = storage.num_pool_groups
    for pg in range(npg):
        n = int(storage.num_slots(level, pg))
        if n != int(storage.num_free(level, pg)):
            raise AssertionError(f"level {level} pool group {pg} is not empty; refusing to overwrite it")
        for i, rs in enumerate(layout.pool_groups[pg].record_sizes):
            addr = storage.pool_addresses[level * npg + pg][i]
            if addr:
                ctypes.memset(addr, 0, n * int(rs))


def _used_slots(manager: "KVCacheManager", level: int) -> int:
    return sum(int(s.total) - int(s.free) for s in manager.get_storage_statistics(level))


class _Pattern:
    """The expected bytes of block b: uint64 words ((b << 32) | w) ^ salt."""

    def __init__(self, page: int) -> None:
        import numpy as np

        self.np = np
        self.words = page // 8
        self.salt = np.uint64(int.from_bytes(os.urandom(8), "little"))
        self.word_ids = np.arange(self.words, dtype=np.uint64)

    def blocks(self, b0: int, b1: int) -> "npt.NDArray[Any]":
        np = self.np
        blocks = np.arange(b0, b1, dtype=np.uint64)
        out: npt.NDArray[Any] = ((blocks[:, None] << np.uint64(32)) | self.word_ids[None, :]) ^ self.salt
        return out


def _pool_rows(manager: "KVCacheManager", kv: "KVCache", page: int) -> tuple["npt.NDArray[Any]", "npt.NDArray[Any]"]:
    """(uint64 view [pages, words] of the level-0 pool, page index of each block), from the
    public API: base address + stride x converted page index."""
    import numpy as np

    from kv_cache_manager_v2 import PageIndexMode

    mode = PageIndexMode.PER_LAYER
    base = int(manager.get_mem_pool_base_address(0, "K", mode))
    stride = int(manager.get_page_stride(0, "K"))
    if stride != page:
        raise AssertionError(f"page stride {stride} != {page}")
    conv = manager.get_page_index_converter(0, "K")
    idx = np.asarray(conv(list(kv.get_base_page_indices(0)), mode), dtype=np.int64)
    if idx.size == 0 or int(idx.min()) < 0:
        raise AssertionError("a block has no page on level 0")
    rows = int(idx.max()) + 1
    raw = (ctypes.c_uint8 * (rows * stride)).from_address(base)
    view = np.ctypeslib.as_array(raw).view(np.uint64).reshape(rows, stride // 8)
    return view, idx


def migrate_once(size: int, page: int, directory: str, prefault: bool, chunk_blocks: int = 256) -> dict[str, Any]:
    """One full level-0 -> host -> disk -> host -> level-0 cycle on a fresh manager."""
    import numpy as np

    n = size // page
    manager = _make_manager(size, page, directory)
    kv: Any = None
    out: dict[str, Any] = {"variant": "prefaulted" if prefault else "as-is"}
    try:
        quota = size + QUOTA_MARGIN
        kv = manager.create_kv_cache()
        if not kv.resume() or not kv.resize(capacity=n * TOKENS_PER_BLOCK):
            raise AssertionError("could not place the cache on level 0")
        pat = _Pattern(page)
        view, idx = _pool_rows(manager, kv, page)
        for b0 in range(0, n, chunk_blocks):
            b1 = min(n, b0 + chunk_blocks)
            view[idx[b0:b1]] = pat.blocks(b0, b1)
        kv.commit(list(range(n * TOKENS_PER_BLOCK)))
        kv.suspend()
        manager.get_and_reset_iteration_stats()
        seconds: dict[str, float] = {}
        moved: dict[str, int] = {}

        def step(name: str, dst_level: int, move: Callable[[], bool]) -> None:
            if prefault:
                _touch_level(manager, dst_level)
            before = _used_slots(manager, dst_level)
            t0 = time.perf_counter()
            ok = move()
            dt = time.perf_counter() - t0
            if not ok:
                raise AssertionError(f"{name}: the move returned False")
            seconds[name] = dt
            moved[name] = _used_slots(manager, dst_level) - before

        # level 0 -> host: shrink level 0; its HELD pages move one level colder
        step("level0_to_host", 1, lambda: bool(manager.resize(0, 0)))
        step("host_to_disk", 2, lambda: bool(manager.resize(1, 0)))
        # disk -> host. Growing a memory level's quota commits (touches) its new memory so later
        # copies into it run at memcpy speed; that one-time cost is reported on its own.
        t_grow = time.perf_counter()
        if not manager.resize(1, quota):
            raise AssertionError("host quota growth refused")
        grow_s = time.perf_counter() - t_grow
        step("disk_to_host", 1, lambda: bool(kv.prefetch(1)))
        grow_seconds = {"host": grow_s}
        t_grow = time.perf_counter()
        if not manager.resize(0, quota):
            raise AssertionError("level-0 quota growth refused")
        grow_s = time.perf_counter() - t_grow
        step("host_to_level0", 0, lambda: bool(kv.resume()))
        grow_seconds["level0"] = grow_s
        stats = manager.get_and_reset_iteration_stats()

        def verify() -> tuple[int, int]:
            """(bad blocks, first bad block): every byte of every block at its page index."""
            view, idx = _pool_rows(manager, kv, page)
            bad = 0
            first_bad = -1
            for b0 in range(0, n, chunk_blocks):
                b1 = min(n, b0 + chunk_blocks)
                ok_rows = (view[idx[b0:b1]] == pat.blocks(b0, b1)).all(axis=1)
                if not bool(ok_rows.all()):
                    bad += int((~ok_rows).sum())
                    if first_bad < 0:
                        first_bad = b0 + int(np.argmin(ok_rows))
            return bad, first_bad

        bad, first_bad = verify()
        # level 0 -> host once more, the way serving does it: another cache's allocation evicts
        # the suspended cache's pages (no quota change, so no memory is released; the host slots
        # were written once already, so in both variants the destination memory is touched)
        kv.suspend()
        if prefault:
            _touch_level(manager, 1)
        total_slots = sum(int(x.total) for x in manager.get_storage_statistics(0))
        other = manager.create_kv_cache()
        try:
            if not other.resume():
                raise AssertionError("the evicting cache could not resume")
            before = _used_slots(manager, 1)
            t0 = time.perf_counter()
            ok = other.resize(capacity=total_slots * TOKENS_PER_BLOCK)
            seconds["level0_to_host_evict"] = time.perf_counter() - t0
            if not ok:
                raise AssertionError("level0_to_host_evict: the allocation returned False")
            moved["level0_to_host_evict"] = _used_slots(manager, 1) - before
        finally:
            other.close()
        if not kv.resume():  # back to level 0 (untimed) for a second full check
            raise AssertionError("resume after the eviction step returned False")
        bad2, first_bad2 = verify()
        if first_bad < 0:
            first_bad = first_bad2
        bad += bad2
        out["seconds"] = seconds
        out["quota_growth_seconds"] = grow_seconds
        out["moved_pages"] = moved
        out["complete"] = all(moved[d] == n for d in DIRECTIONS)
        for d in DIRECTIONS:
            out[f"{d}_gbps"] = _gbps(size, seconds[d])
        st = stats.get(0)
        out["offloaded_blocks"] = int(getattr(st, "offloaded_blocks", 0))
        out["onboarded_blocks"] = int(getattr(st, "onboarded_blocks", 0))
        out["onboarded_from_level"] = [int(x) for x in getattr(st, "onboarded_from_level", [])]
        out["verified_bytes"] = 2 * n * page
        out["bad_blocks"] = bad
        out["first_bad_block"] = first_bad
        out["bytes_ok"] = bad == 0
        kv.close()
        kv = None
        manager.clear_reusable_blocks()
        manager.check_invariants()
    finally:
        if kv is not None:
            kv.close()
            manager.clear_reusable_blocks()
        manager.shutdown()
    return out


# ------------------------------------------------------------------------------ driver
def run_benchmark(
    size_mb: int = 1024,
    page_kb: int = 64,
    directory: str | None = None,
    reps: int = 3,
    variants: Sequence[str] = VARIANTS,
    log: Callable[[str], None] | None = None,
    warmup: int = 1,
) -> dict[str, Any]:
    """Runs the baselines and the migration variants, `warmup` discarded rounds then `reps`
    measured ones (each round: baselines, then every variant on a fresh manager); figures are
    medians over the measured rounds. Returns the figures (see main())."""
    size = size_mb * MiB
    page = page_kb * 1024
    if size <= 0 or page <= 0 or page % 8 or size % page:
        raise ValueError("--size-mb must be a positive multiple of --page-kb (a multiple of 8 bytes)")
    if reps < 1 or warmup < 0:
        raise ValueError("reps must be >= 1 and warmup >= 0")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r} (one of {VARIANTS})")
    say = log or (lambda _msg: None)
    own_dir = directory is None
    parent = default_dir() if directory is None else directory
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix="run-", dir=parent) if own_dir else parent
    import kv_cache_manager_v2 as kvm

    res: dict[str, Any] = {
        "size_bytes": size,
        "page_bytes": page,
        "pages": size // page,
        "dir": work,
        "fs_type": fs_type(work),
        "reps": reps,
        "warmup": warmup,
        "mode": "compiled" if kvm.is_compiled() else "dev",
        "module_file": kvm.__file__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    base_keys = (
        "memcpy_gbps",
        "memcpy_fresh_gbps",
        "release_seconds",
        "release_huge_seconds",
        "raw_pwrite_gbps",
        "raw_pread_gbps",
        "raw_pread_fresh_gbps",
    )
    base_runs: dict[str, list[float]] = {k: [] for k in base_keys}
    var_runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    try:
        for r in range(warmup + reps):
            tag = f"warm-up {r + 1}/{warmup}" if r < warmup else f"rep {r - warmup + 1}/{reps}"
            say(f"[{tag}] memcpy and raw file I/O baselines ...")
            figs: dict[str, float] = {}
            (
                figs["memcpy_gbps"],
                figs["memcpy_fresh_gbps"],
                figs["release_seconds"],
                figs["release_huge_seconds"],
            ) = memcpy_gbps(size, 1)
            figs["raw_pwrite_gbps"], figs["raw_pread_gbps"], figs["raw_pread_fresh_gbps"] = raw_file_gbps(
                work, size, page, 1
            )
            runs: dict[str, dict[str, Any]] = {}
            for v in variants:
                say(f"[{tag}] migration, {v} ...")
                runs[v] = migrate_once(size, page, work, prefault=(v == "prefaulted"))
            if r >= warmup:
                for k in base_keys:
                    base_runs[k].append(figs[k])
                for v in variants:
                    var_runs[v].append(runs[v])
        for k in base_keys:
            res[k] = _median(base_runs[k])
            res[k + "_runs"] = base_runs[k]
        res["variants"] = {}
        for v in variants:
            vr = var_runs[v]
            merged = dict(vr[-1])
            for d in DIRECTIONS:
                merged[f"{d}_gbps"] = _median([x[f"{d}_gbps"] for x in vr])
                merged[f"{d}_gbps_runs"] = [x[f"{d}_gbps"] for x in vr]
            merged["bytes_ok"] = all(x["bytes_ok"] for x in vr)
            merged["complete"] = all(x["complete"] for x in vr)
            merged["bad_blocks"] = sum(x["bad_blocks"] for x in vr)
            res["variants"][v] = merged
        targets: list[dict[str, Any]] = []
        for v, fig in res["variants"].items():
            for d in DIRECTIONS:
                key, label, target = BASELINE_OF[d]
                base = res[key]
                ratio = fig[f"{d}_gbps"] / base if base > 0 else 0.0
                targets.append(
                    {
                        "variant": v,
                        "direction": d,
                        "gbps": fig[f"{d}_gbps"],
                        "baseline": label,
                        "baseline_gbps": base,
                        "ratio": ratio,
                        "target": target,
                        "pass": ratio >= target,
                    }
                )
        res["targets"] = targets
        first = res["variants"][variants[0]] if variants else {}
        for d in DIRECTIONS:  # the first variant's figures at top level, for quick reading
            if f"{d}_gbps" in first:
                res[f"{d}_gbps"] = first[f"{d}_gbps"]
        res["bytes_ok"] = all(f["bytes_ok"] for f in res["variants"].values())
        res["complete"] = all(f["complete"] for f in res["variants"].values())
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    return res


def format_table(res: dict[str, Any]) -> str:
    size = res["size_bytes"]
    lines = [
        f"migration bandwidth: {size / (1 << 30):.2f} GiB in {res['page_bytes'] // 1024} KiB pages "
        f"({res['pages']} pages), library {res['mode']}, python {res['python']}, {res['cpus']} CPUs, "
        f"median of {res['reps']} (+{res['warmup']} warm-up)",
        f"directory: {res['dir']} ({res['fs_type']})",
        "",
        f"{'direction':<22}{'GB/s':>8}   {'baseline':<12}{'GB/s':>8}{'ratio':>9}   target",
    ]
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for t in res["targets"]:
        by_variant.setdefault(t["variant"], []).append(t)
    titles = {
        "as-is": "as-is (public API only)",
        "prefaulted": "prefaulted (destination memory touched first, via internals)",
    }
    for v, rows in by_variant.items():
        lines.append(titles.get(v, v))
        for t in rows:
            verdict = "PASS" if t["pass"] else "MISS"
            lines.append(
                f"  {DIRECTION_LABELS[t['direction']]:<20}{t['gbps']:>8.2f}   {t['baseline']:<12}"
                f"{t['baseline_gbps']:>8.2f}{100 * t['ratio']:>8.1f}%   >= {100 * t['target']:.0f}% {verdict}"
            )
        fig = res["variants"][v]
        lines.append(
            f"  bytes verified: {fig['verified_bytes']:,} ({'OK' if fig['bytes_ok'] else 'MISMATCH'}), "
            f"every move complete: {'yes' if fig['complete'] else 'NO ' + str(fig['moved_pages'])}"
        )
        grow = fig.get("quota_growth_seconds", {})
        if grow:
            lines.append(
                "  quota growth, not in the rows above (commits the new memory once): "
                + ", ".join(f"{k} {1e3 * float(t):.0f} ms" for k, t in grow.items())
            )
    lines.append("")
    lines.append(
        f"baselines: memcpy {res['memcpy_gbps']:.2f} GB/s (into fresh memory {res['memcpy_fresh_gbps']:.2f}); "
        f"raw pwrite {res['raw_pwrite_gbps']:.2f} GB/s; raw pread {res['raw_pread_gbps']:.2f} GB/s "
        f"(into fresh memory {res['raw_pread_fresh_gbps']:.2f})"
    )
    lines.append(
        f"note: resize(level, 0) also hands the level's memory back to the OS, inside the level 0 -> host "
        f"time: madvise(DONTNEED) of the same bytes alone takes {1e3 * res['release_huge_seconds']:.1f} ms "
        f"in huge pages (the pools ask for them), {1e3 * res['release_seconds']:.1f} ms in 4 KiB pages; "
        "host -> disk releases the host's memory the same way"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=1024, help="bytes moved, in MiB (default 1024)")
    p.add_argument("--page-kb", type=int, default=64, help="page (block) size in KiB (default 64)")
    p.add_argument(
        "--dir",
        default=None,
        help="directory for the disk tier and the raw-I/O file (default: a temporary directory under "
        "build/migration_bandwidth/ of the repository, removed afterwards)",
    )
    p.add_argument("--reps", type=int, default=3, help="measured rounds; figures are medians (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="discarded rounds first (default 1)")
    p.add_argument("--variant", choices=(*VARIANTS, "both"), default="both", help="default both")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument(
        "--compiled-dir",
        metavar="DIR",
        help="import kv_cache_manager_v2 from DIR first (e.g. build/compiled after `make compiled`)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    if args.compiled_dir:
        d = os.path.abspath(args.compiled_dir)
        if not os.path.isdir(os.path.join(d, "kv_cache_manager_v2")):
            print(f"error: no kv_cache_manager_v2 under {d} (run `make compiled`)", file=sys.stderr)
            return 2
        sys.path.insert(0, d)
    elif REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    variants = VARIANTS if args.variant == "both" else (args.variant,)
    if args.dir and fs_type(args.dir) == "tmpfs":
        print(f"warning: {args.dir} is on tmpfs: the 'disk' tier is RAM there", file=sys.stderr)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        res = run_benchmark(args.size_mb, args.page_kb, args.dir, args.reps, variants, log, args.warmup)
    except ValueError as exc:
        p.error(str(exc))
    print(format_table(res))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2, sort_keys=True)
            f.write("\n")
    return 0 if res["bytes_ok"] and res["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
