"""The disk backend: one level of fixed-size records ("slots") kept in regular files.

One named file per pool lives directly under the level's directory while the level is open
(`kvcm-<pid>-<random hex>-pool<i>.bin`, mode 0600, created with O_CREAT|O_EXCL so an existing
file or symlink of that name is never opened) and is removed by `close()`. Slot `s` of pool `i`
is the byte range `[s * record_sizes[i], (s + 1) * record_sizes[i])` of file `i`.

Every record written successfully gets a checksum (64-bit XXH3 seeded with a per-process random
salt), kept in memory only. A read reports success for a slot only when every record of it was
read in full and hashes to the checksum of its last successful write, so bytes from a failed or
partial write, a corrupted file, or a file a previous process left behind are never reported as
good.

I/O is batched: a run of consecutive slot ids becomes one `pwritev`/`preadv` per pool file,
gathering from (scattering to) wherever its records live in host memory, one buffer per
contiguous stretch (capped at `max_run_bytes` so a large batch spreads over the threads, and at
`IOV_MAX` buffers), and the runs are spread over a thread pool created once. Pages evicted
together land in consecutive free slots, so an eviction of scattered host pages is still a few
large writes. `os.pwritev` and `os.preadv` release the GIL, so one run's I/O overlaps another's
hashing (which runs at ~20 GB/s). Host memory is addressed through ctypes arrays over the
caller's addresses: no copy through Python bytes.

Nothing is fsync'ed: the files are a cache for this process's lifetime, not durable storage.
The files are sparse (ftruncate), so running out of disk space shows up as failed writes
(ENOSPC), reported per slot.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final

import xxhash

from .._exceptions import LogicError

# Fault codes attached to one slot of a batch (deterministic fault injection).
_FAULT_NONE: Final = 0
_FAULT_ERRNO: Final = 1  # the call raises OSError(errno)
_FAULT_SHORT: Final = 2  # the call transfers half the bytes, and the retry nothing
_FAULT_SHORT_ONCE: Final = 3  # the call transfers half the bytes, the retry completes it

def _record_sum(salt: int, data: memoryview) -> int:
    """64-bit XXH3 of the record, seeded with the per-process salt (~20 GB/s per core, five
    times zlib's CRC-32, so checking a read costs a fraction of reading it). It catches torn,
    short and corrupted records and bytes left by another process; it is not meant to resist an
    attacker (the files are private, mode 0600)."""
    return xxhash.xxh3_64_intdigest(data, salt)


DEFAULT_MAX_RUN_BYTES: Final = 4 << 20
# Most buffers one vectored call takes (the kernel's IOV_MAX; 1024 on Linux).
_MAX_IOV: Final = 1024
# The checksum of a slot whose content is not valid (never written, failed, invalidated).
_NO_SUM: Final = -1
_OPEN_FLAGS: Final = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_NAME_ATTEMPTS: Final = 16


def _host_view(addr: int, size: int) -> memoryview:
    """A writable byte view over `size` bytes of host memory at `addr` (no copy)."""
    return memoryview((ctypes.c_char * size).from_address(addr)).cast("B")


def _run_views(run: _Run) -> tuple[list[memoryview], list[memoryview]]:
    """(one view per contiguous stretch of the run's host memory, as planned; one per record)."""
    rs = run.record_size
    addrs = run.addrs
    starts = run.seg_starts
    views: list[memoryview] = []
    records: list[memoryview] = []
    for s in range(len(starts)):
        i = starts[s]
        j = starts[s + 1] if s + 1 < len(starts) else len(addrs)
        v = _host_view(addrs[i], (j - i) * rs)
        views.append(v)
        for r in range(j - i):
            records.append(v[r * rs:(r + 1) * rs])
    return views, records


def _first_bytes(views: list[memoryview], k: int) -> list[memoryview]:
    """The buffers covering the first k bytes of `views`."""
    out: list[memoryview] = []
    for v in views:
        if k <= 0:
            break
        out.append(v[:k])
        k -= len(v)
    return out


def _after_bytes(views: list[memoryview], k: int) -> list[memoryview]:
    """The buffers covering everything after the first k bytes of `views`."""
    out: list[memoryview] = []
    for v in views:
        if k >= len(v):
            k -= len(v)
            continue
        out.append(v[k:] if k > 0 else v)
        k = 0
    return out


class DiskFaults:
    """Deterministic fault injection for a `DiskLevel` (tests only).

    Faults are assigned when a batch is planned, to slots in the order the caller listed them,
    and apply to every pool record of that slot (or, with `pool`, to that pool's record only);
    a faulty record is never coalesced with its neighbours, so the other slots of the batch are
    unaffected. `corrupt()` flips a byte of a
    slot's record in the file directly (the level must have been built with this object).
    """

    __slots__ = (
        "write_pool",
        "read_pool",
        "write_errors",
        "write_errno",
        "short_writes",
        "short_writes_recover",
        "read_errors",
        "read_errno",
        "short_reads",
        "short_reads_recover",
        "_paths",
        "_record_sizes",
    )

    def __init__(self) -> None:
        self.write_pool = -1
        self.read_pool = -1
        self.write_errors = 0
        self.write_errno = errno.ENOSPC
        self.short_writes = 0
        self.short_writes_recover = False
        self.read_errors = 0
        self.read_errno = errno.EIO
        self.short_reads = 0
        self.short_reads_recover = False
        self._paths: list[str] = []
        self._record_sizes: list[int] = []

    def fail_next_writes(self, n: int, err: int = errno.ENOSPC, pool: int = -1) -> None:
        """The next `n` slot writes fail with OSError(err) (ENOSPC, EIO, ...); `pool` >= 0
        limits the fault to that pool's record (the slot still fails as a whole)."""
        self.write_errors = n
        self.write_errno = err
        self.write_pool = pool

    def short_next_writes(self, n: int, recover: bool = False, pool: int = -1) -> None:
        """The next `n` slot writes are short: half the bytes, then the retry writes nothing
        (the write fails) or, with `recover`, the rest (the retry path succeeds)."""
        self.short_writes = n
        self.short_writes_recover = recover
        self.write_pool = pool

    def fail_next_reads(self, n: int, err: int = errno.EIO, pool: int = -1) -> None:
        """The next `n` slot reads (of slots that have a checksum) fail with OSError(err)."""
        self.read_errors = n
        self.read_errno = err
        self.read_pool = pool

    def short_next_reads(self, n: int, recover: bool = False, pool: int = -1) -> None:
        """The next `n` slot reads are short (see `short_next_writes`)."""
        self.short_reads = n
        self.short_reads_recover = recover
        self.read_pool = pool

    def attach(self, paths: list[str], record_sizes: list[int]) -> None:
        self._paths = list(paths)
        self._record_sizes = list(record_sizes)

    def corrupt(self, slot: int, pool: int = 0, offset: int = 0) -> None:
        """Flips (xor 0xFF) byte `offset` of `slot`'s record of `pool` in the file on disk."""
        if not self._paths:
            raise LogicError("DiskFaults.corrupt: not attached to an open DiskLevel")
        rs = self._record_sizes[pool]
        if not 0 <= offset < rs:
            raise ValueError(f"offset {offset} outside a record of {rs} bytes")
        fd = os.open(self._paths[pool], os.O_RDWR)
        try:
            pos = slot * rs + offset
            old = os.pread(fd, 1, pos)
            if len(old) != 1:
                raise ValueError(f"slot {slot} is past the end of pool file {pool}")
            os.pwrite(fd, bytes([old[0] ^ 0xFF]), pos)
        finally:
            os.close(fd)

    def take_write_fault(self) -> int:
        if self.write_errors > 0:
            self.write_errors -= 1
            return _FAULT_ERRNO
        if self.short_writes > 0:
            self.short_writes -= 1
            return _FAULT_SHORT_ONCE if self.short_writes_recover else _FAULT_SHORT
        return _FAULT_NONE

    def take_read_fault(self) -> int:
        if self.read_errors > 0:
            self.read_errors -= 1
            return _FAULT_ERRNO
        if self.short_reads > 0:
            self.short_reads -= 1
            return _FAULT_SHORT_ONCE if self.short_reads_recover else _FAULT_SHORT
        return _FAULT_NONE


class _Run:
    """Consecutive records of one pool file (contiguous on disk; anywhere in host memory)."""

    __slots__ = ("pool", "offset", "addrs", "seg_starts", "record_size", "ks", "slots", "fault", "err",
                 "done", "digests", "expected", "ok", "mismatches")

    def __init__(self, pool: int, offset: int, record_size: int, fault: int, err: int) -> None:
        self.pool = pool
        self.offset = offset
        self.record_size = record_size
        self.addrs: list[int] = []  # host address of each record
        # Where each contiguous stretch of host memory (one buffer of the vectored call) begins,
        # as an index into `addrs`.
        self.seg_starts: list[int] = []
        self.ks: list[int] = []  # batch positions, one per record, in file order
        self.slots: list[int] = []
        self.fault = fault
        self.err = err
        self.done = 0  # bytes transferred from the start of the run
        self.digests: list[int] = []  # write: checksum of each record's source bytes
        self.expected: list[int] = []  # read: checksum each record must have
        self.ok: list[bool] = []  # read: record read in full and checksum matched
        self.mismatches = 0  # read: records read in full whose checksum did not match

    @property
    def segments(self) -> int:
        return len(self.seg_starts)

    @property
    def length(self) -> int:
        return len(self.ks) * self.record_size


class DiskLevel:
    """Fixed-size records of several pools in one file per pool under `path`."""

    __slots__ = ("_dir", "_record_sizes", "_num_slots", "_fds", "_paths", "_sums", "_salt",
                 "_executor", "_io_threads", "_faults", "_closed", "max_run_bytes",
                 "write_failures", "read_failures", "checksum_mismatches")

    def __init__(
        self,
        path: str,
        record_sizes: list[int],
        num_slots: int,
        io_threads: int = 4,
        faults: DiskFaults | None = None,
    ) -> None:
        if not record_sizes:
            raise ValueError("record_sizes must list at least one pool")
        for rs in record_sizes:
            if rs <= 0:
                raise ValueError(f"record_sizes must be positive, got {record_sizes}")
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        if io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {io_threads}")
        self._dir = os.path.abspath(path)
        self._record_sizes = list(record_sizes)
        self._num_slots = num_slots
        self._fds: list[int] = []
        self._paths: list[str] = []
        self._salt = int.from_bytes(os.urandom(8), "little")
        self._faults = faults
        self._closed = False
        self._io_threads = io_threads
        self.max_run_bytes = DEFAULT_MAX_RUN_BYTES
        self.write_failures = 0  # slot writes that failed
        self.read_failures = 0  # slot reads that failed (I/O error, short read or checksum)
        self.checksum_mismatches = 0  # records read in full whose checksum did not match
        self._sums: list[list[int]] = [[_NO_SUM] * num_slots for _ in record_sizes]
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        if not os.path.isdir(self._dir):
            raise NotADirectoryError(f"disk tier path {self._dir!r} is not a directory")
        try:
            self._create_files()
        except BaseException:
            self._remove_files()
            raise
        self._executor = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="kvcm-disk")
        if faults is not None:
            faults.attach(self._paths, self._record_sizes)

    def _create_files(self) -> None:
        pid = os.getpid()
        for i, rs in enumerate(self._record_sizes):
            for attempt in range(_NAME_ATTEMPTS):
                name = f"kvcm-{pid}-{secrets.token_hex(8)}-pool{i}.bin"
                p = os.path.join(self._dir, name)
                try:
                    fd = os.open(p, _OPEN_FLAGS, 0o600)
                except FileExistsError:
                    if attempt == _NAME_ATTEMPTS - 1:
                        raise
                    continue
                self._fds.append(fd)
                self._paths.append(p)
                break
            fd = self._fds[i]
            os.fchmod(fd, 0o600)  # the umask may only have removed bits; make it exact
            os.ftruncate(fd, self._num_slots * rs)

    def _remove_files(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        for p in self._paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    # ---- properties ------------------------------------------------------------------------
    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    @property
    def record_sizes(self) -> list[int]:
        return list(self._record_sizes)

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def closed(self) -> bool:
        return self._closed

    def is_valid(self, slot: int) -> bool:
        """True when every record of `slot` has a checksum (its last write succeeded)."""
        for sums in self._sums:
            if sums[slot] == _NO_SUM:
                return False
        return True

    # ---- lifetime --------------------------------------------------------------------------
    def resize(self, num_slots: int) -> None:
        """Grows or shrinks every pool file to `num_slots` records; shrinking forgets the slots
        past the end. On failure the files are restored to the old size and OSError is raised."""
        self._check_open()
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        old = self._num_slots
        done = 0
        try:
            for fd, rs in zip(self._fds, self._record_sizes):
                os.ftruncate(fd, num_slots * rs)
                done += 1
        except OSError:
            for j in range(done):
                try:
                    os.ftruncate(self._fds[j], old * self._record_sizes[j])
                except OSError:
                    pass
            raise
        for sums in self._sums:
            if num_slots < old:
                del sums[num_slots:]
            else:
                sums.extend([_NO_SUM] * (num_slots - old))
        self._num_slots = num_slots

    def set_faults(self, faults: DiskFaults | None) -> None:
        """Attaches (or, with None, detaches) deterministic fault injection after construction
        (tests reach a manager's disk levels through its storage manager)."""
        self._faults = faults
        if faults is not None:
            faults.attach(self._paths, self._record_sizes)

    def close(self) -> None:
        """Stops the I/O threads, closes and removes the files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        self._remove_files()
        if self._faults is not None:
            self._faults.attach([], [])
        self._sums = [[] for _ in self._record_sizes]

    def _check_open(self) -> None:
        if self._closed:
            raise LogicError("DiskLevel is closed")

    def invalidate(self, slots: list[int]) -> None:
        """Forgets the content of `slots`: later reads of them fail until they are written."""
        self._check_open()
        n = self._num_slots
        for s in slots:
            if 0 <= s < n:
                for sums in self._sums:
                    sums[s] = _NO_SUM

    # ---- batched I/O -----------------------------------------------------------------------
    def write(self, slots: list[int], src_addrs: list[list[int]]) -> list[bool]:
        """Writes slot `slots[k]` of every pool `i` from `record_sizes[i]` bytes at host address
        `src_addrs[k][i]`. Returns per-slot success; a failed slot's previous content is lost."""
        self._check_open()
        self._check_batch(slots, src_addrs)
        faults = self._faults
        fault_of = [_FAULT_NONE] * len(slots)
        if faults is not None:
            for k in range(len(slots)):
                fault_of[k] = faults.take_write_fault()
            err = faults.write_errno
        else:
            err = 0
        # The previous content of every slot of the batch is invalid from here on.
        for sums in self._sums:
            for s in slots:
                sums[s] = _NO_SUM
        runs = self._plan(slots, src_addrs, fault_of, err, -1 if faults is None else faults.write_pool, None)
        self._execute(runs, True)
        ok = [True] * len(slots)
        for run in runs:
            sums = self._sums[run.pool]
            rs = run.record_size
            for j in range(len(run.ks)):
                if (j + 1) * rs <= run.done:
                    sums[run.slots[j]] = run.digests[j]
                else:
                    ok[run.ks[j]] = False
        for k in range(len(slots)):
            if not ok[k]:
                self.write_failures += 1
                s = slots[k]
                for sums in self._sums:
                    sums[s] = _NO_SUM
        return ok

    def read(self, slots: list[int], dst_addrs: list[list[int]]) -> list[bool]:
        """Reads slot `slots[k]` of every pool `i` into host address `dst_addrs[k][i]`. Returns
        per-slot success: True only when every record read back in full with the checksum of its
        last successful write. A slot never written (or whose write failed, or invalidated) is
        not read and returns False; the destination bytes of a failed slot are unspecified."""
        self._check_open()
        self._check_batch(slots, dst_addrs)
        n = len(slots)
        ok = [True] * n
        for sums in self._sums:
            for k in range(n):
                if sums[slots[k]] == _NO_SUM:
                    ok[k] = False
        faults = self._faults
        fault_of = [_FAULT_NONE] * n
        err = 0
        if faults is not None:
            for k in range(n):
                if ok[k]:
                    fault_of[k] = faults.take_read_fault()
            err = faults.read_errno
        runs = self._plan(slots, dst_addrs, fault_of, err, -1 if faults is None else faults.read_pool, ok)
        for run in runs:
            sums = self._sums[run.pool]
            run.expected = [sums[s] for s in run.slots]
        self._execute(runs, False)
        for run in runs:
            self.checksum_mismatches += run.mismatches
            for j in range(len(run.ks)):
                if not run.ok[j]:
                    ok[run.ks[j]] = False
        for k in range(n):
            if not ok[k]:
                self.read_failures += 1
        return ok

    def _check_batch(self, slots: list[int], addrs: list[list[int]]) -> None:
        if len(slots) != len(addrs):
            raise ValueError(f"{len(slots)} slots but {len(addrs)} address lists")
        npools = len(self._record_sizes)
        n = self._num_slots
        seen: set[int] = set()
        for k in range(len(slots)):
            s = slots[k]
            if not 0 <= s < n:
                raise ValueError(f"slot {s} out of range [0, {n})")
            if len(addrs[k]) != npools:
                raise ValueError(f"slot {s}: {len(addrs[k])} addresses for {npools} pools")
            seen.add(s)
        if len(seen) != len(slots):
            raise ValueError("a slot appears more than once in one batch")

    def _plan(
        self,
        slots: list[int],
        addrs: list[list[int]],
        fault_of: list[int],
        err: int,
        fault_pool: int,
        include: list[bool] | None,
    ) -> list[_Run]:
        """Groups the batch into runs per pool: consecutive slot ids, capped at `max_run_bytes`
        and at _MAX_IOV host stretches; a faulty record gets a run of its own. Faults apply to
        every pool, or to pool `fault_pool` only when it is >= 0."""
        order = sorted(range(len(slots)), key=slots.__getitem__)
        if include is not None:
            order = [k for k in order if include[k]]
        runs: list[_Run] = []
        cap = self.max_run_bytes
        for pool in range(len(self._record_sizes)):
            rs = self._record_sizes[pool]
            cur: _Run | None = None
            next_slot = -1
            next_addr = -1
            pool_faulty = fault_pool < 0 or fault_pool == pool
            for k in order:
                s = slots[k]
                a = addrs[k][pool]
                f = fault_of[k] if pool_faulty else _FAULT_NONE
                new_segment = a != next_addr
                if (
                    cur is None
                    or f != _FAULT_NONE
                    or cur.fault != _FAULT_NONE
                    or s != next_slot
                    or cur.length + rs > cap
                    or (new_segment and cur.segments >= _MAX_IOV)
                ):
                    cur = _Run(pool, s * rs, rs, f, err if f == _FAULT_ERRNO else 0)
                    runs.append(cur)
                    new_segment = True
                if new_segment:
                    cur.seg_starts.append(len(cur.addrs))
                cur.addrs.append(a)
                cur.ks.append(k)
                cur.slots.append(s)
                next_slot = s + 1
                next_addr = a + rs
        return runs

    def _execute(self, runs: list[_Run], is_write: bool) -> None:
        """Runs the I/O of `runs`, spread over the thread pool in groups of similar byte size."""
        if not runs:
            return
        total = 0
        for run in runs:
            total += run.length
        ntasks = min(len(runs), self._io_threads * 2)
        if ntasks <= 1 or self._io_threads == 1:
            self._do_runs(runs, is_write)
            return
        target = (total + ntasks - 1) // ntasks
        futures: list[Future[None]] = []
        group: list[_Run] = []
        acc = 0
        for run in runs:
            group.append(run)
            acc += run.length
            if acc >= target:
                futures.append(self._executor.submit(self._do_runs, group, is_write))
                group = []
                acc = 0
        if group:
            futures.append(self._executor.submit(self._do_runs, group, is_write))
        for fut in futures:
            fut.result()

    def _do_runs(self, runs: list[_Run], is_write: bool) -> None:
        for run in runs:
            if is_write:
                self._write_run(run)
            else:
                self._read_run(run)

    def _write_run(self, run: _Run) -> None:
        fd = self._fds[run.pool]
        n = run.length
        views, records = _run_views(run)
        salt = self._salt
        # Hash the source first: if it changes during the write, the read check fails (safe).
        run.digests = [_record_sum(salt, r) for r in records]
        fault = run.fault
        try:
            if fault == _FAULT_ERRNO:
                raise OSError(run.err, os.strerror(run.err))
            first = _first_bytes(views, n // 2) if fault != _FAULT_NONE else views
            done = os.pwritev(fd, first, run.offset)
            if done < n and fault != _FAULT_SHORT:
                done += os.pwritev(fd, _after_bytes(views, done), run.offset + done)  # retry the rest once
            run.done = done
        except OSError as e:
            run.done = 0
            run.err = e.errno if e.errno is not None else errno.EIO

    def _read_run(self, run: _Run) -> None:
        fd = self._fds[run.pool]
        rs = run.record_size
        n = run.length
        views, records = _run_views(run)
        fault = run.fault
        done = 0
        try:
            if fault == _FAULT_ERRNO:
                raise OSError(run.err, os.strerror(run.err))
            first = _first_bytes(views, n // 2) if fault != _FAULT_NONE else views
            done = os.preadv(fd, first, run.offset)
            if done < n and fault != _FAULT_SHORT:
                done += os.preadv(fd, _after_bytes(views, done), run.offset + done)  # retry the rest once
        except OSError as e:
            done = 0
            run.err = e.errno if e.errno is not None else errno.EIO
        run.done = done
        salt = self._salt
        ok: list[bool] = []
        mismatches = 0
        for j in range(len(run.ks)):
            if (j + 1) * rs > done:
                ok.append(False)
                continue
            d = _record_sum(salt, records[j])
            good = d == run.expected[j]
            if not good:
                mismatches += 1
            ok.append(good)
        run.ok = ok
        run.mismatches = mismatches
