#!/usr/bin/env python3
"""Disk tier throughput probe: DiskLevel vs plain pwrite/pread of the same bytes.

Moves `--size` bytes (default 1 GiB) in `--record`-byte records (default 64 KiB) between one
host buffer and a DiskLevel (checksummed, batched on its thread pool), and the same bytes with
a plain sequential `os.pwrite`/`os.preadv` loop of one record per call to a file in the same
directory, no checksum. Each repetition uses fresh files and runs both back to back (order
alternating), so both see the same page-cache state (nothing is dropped: with enough RAM the
reads are served from the page cache). Two more DiskLevel cases: "gathered" (consecutive slots
from shuffled host records: one vectored call per run, like pages evicted together) and
"scattered" (every other slot, shuffled: no two records consecutive on disk, one call per
record). Also measures the checksum alone (the salted XXH3-64 the disk level uses, over
records). Prints a table; `--json FILE` writes the figures.

    PYTHONPATH=. python benchmarks/disk_io_probe.py [--dir DIR] [--size BYTES] [--record BYTES]
        [--threads N] [--reps N] [--json FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from kv_cache_manager_v2._backends._disk import DiskLevel
from kv_cache_manager_v2._backends._disk import _record_sum
from kv_cache_manager_v2._backends._host import HostAllocation

GB = 1e9


def checksum_gbps(buf: memoryview, record: int, threads: int) -> float:
    key = int.from_bytes(os.urandom(8), "little")
    n = len(buf) // record

    def part(lo: int, hi: int) -> None:
        for j in range(lo, hi):
            _record_sum(key, buf[j * record:(j + 1) * record])

    t0 = time.perf_counter()
    if threads == 1:
        part(0, n)
    else:
        step = (n + threads - 1) // threads
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda i: part(i * step, min(n, (i + 1) * step)), range(threads)))
    return n * record / (time.perf_counter() - t0) / GB


def raw_write(path: str, buf: memoryview, record: int) -> float:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, len(buf))
        t0 = time.perf_counter()
        for off in range(0, len(buf), record):
            if os.pwrite(fd, buf[off:off + record], off) != record:
                raise OSError("short write")
        return len(buf) / (time.perf_counter() - t0) / GB
    finally:
        os.close(fd)


def raw_read(path: str, buf: memoryview, record: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for off in range(0, len(buf), record):
            if os.preadv(fd, [buf[off:off + record]], off) != record:
                raise OSError("short read")
        return len(buf) / (time.perf_counter() - t0) / GB
    finally:
        os.close(fd)


def level_io(lv: DiskLevel, slots: list[int], addrs: list[list[int]], write: bool) -> float:
    t0 = time.perf_counter()
    ok = lv.write(slots, addrs) if write else lv.read(slots, addrs)
    dt = time.perf_counter() - t0
    if not all(ok):
        raise RuntimeError(f"{'write' if write else 'read'}: {ok.count(False)} slots failed")
    return len(slots) * lv.record_sizes[0] / dt / GB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="directory for the files (default: a temp dir)")
    ap.add_argument("--size", type=int, default=1 << 30)
    ap.add_argument("--record", type=int, default=64 << 10)
    ap.add_argument("--threads", type=int, default=4, help="DiskLevel io_threads")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    record = args.record
    n = args.size // record
    size = n * record
    host = HostAllocation(size)
    buf = memoryview((ctypes.c_char * size).from_address(host.address)).cast("B")
    rnd = random.Random(0)
    chunk = rnd.randbytes(64 << 20)
    for off in range(0, size, len(chunk)):
        m = min(len(chunk), size - off)
        buf[off:off + m] = chunk[:m]

    tmp = None
    d = args.dir
    if d is None:
        tmp = tempfile.TemporaryDirectory(prefix="kvcm-probe-")
        d = tmp.name
    os.makedirs(d, exist_ok=True)
    cores = os.cpu_count() or 1
    res: dict[str, list[float]] = {k: [] for k in (
        "raw_write", "level_write", "raw_read", "level_read", "level_write_gathered", "level_read_gathered",
        "level_write_scattered", "level_read_scattered")}
    contiguous = [[host.address + j * record] for j in range(n)]
    perm = list(range(n))
    rnd.shuffle(perm)
    # Gathered: slot perm[j] from host record j (consecutive slots, shuffled host records).
    # Scattered: slot 2 * perm[j] from host record j (no two records consecutive on disk).
    spread = [2 * s for s in perm]
    try:
        for rep in range(args.reps):
            raw_path = os.path.join(d, f"kvcm-probe-raw-{os.getpid()}-{rep}.bin")
            lv = DiskLevel(d, [record], 2 * n, io_threads=args.threads)
            try:
                first_raw = rep % 2 == 0
                for write in (True, False):
                    steps = ["raw", "level"] if first_raw else ["level", "raw"]
                    for who in steps:
                        if who == "raw":
                            f = raw_write(raw_path, buf, record) if write else raw_read(raw_path, buf, record)
                            res["raw_write" if write else "raw_read"].append(f)
                        else:
                            f = level_io(lv, list(range(n)), contiguous, write)
                            res["level_write" if write else "level_read"].append(f)
                res["level_write_gathered"].append(level_io(lv, perm, contiguous, True))
                res["level_read_gathered"].append(level_io(lv, perm, contiguous, False))
                res["level_write_scattered"].append(level_io(lv, spread, contiguous, True))
                res["level_read_scattered"].append(level_io(lv, spread, contiguous, False))
            finally:
                lv.close()
                os.unlink(raw_path)
        cs1 = checksum_gbps(buf[: min(size, 256 << 20)], record, 1)
        csn = checksum_gbps(buf[: min(size, 256 << 20)], record, min(args.threads, cores))
    finally:
        if tmp is not None:
            tmp.cleanup()
        host.release()

    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"disk I/O probe: {size / (1 << 30):.2f} GiB in {record >> 10} KiB records, dir {d}, "
          f"io_threads {args.threads}, {cores} CPUs, median of {args.reps}")
    print(f"{'what':<44}{'write GB/s':>12}{'read GB/s':>12}")
    print(f"{'raw pwrite/preadv, 1 record per call':<44}{med['raw_write']:>12.2f}{med['raw_read']:>12.2f}")
    print(f"{'DiskLevel, contiguous (coalesced)':<44}{med['level_write']:>12.2f}{med['level_read']:>12.2f}")
    print(f"{'DiskLevel, gathered (shuffled host records)':<44}"
          f"{med['level_write_gathered']:>12.2f}{med['level_read_gathered']:>12.2f}")
    print(f"{'DiskLevel, scattered (1 call per record)':<44}"
          f"{med['level_write_scattered']:>12.2f}{med['level_read_scattered']:>12.2f}")
    print(f"{'DiskLevel / raw (contiguous)':<44}{med['level_write'] / med['raw_write']:>11.0%} "
          f"{med['level_read'] / med['raw_read']:>11.0%}")
    print(f"checksum (salted XXH3-64, {record >> 10} KiB records): {cs1:.2f} GB/s on 1 thread, "
          f"{csn:.2f} GB/s on {min(args.threads, cores)} threads")
    if args.json:
        out = {"size": size, "record": record, "io_threads": args.threads, "cpus": cores,
               "median_gbps": med, "all_gbps": res, "checksum_gbps_1thread": cs1,
               "checksum_gbps_threads": csn}
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
