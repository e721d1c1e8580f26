"""DiskLevel: round trips, coalescing, faults (never wrong bytes reported good), resize, files."""

from __future__ import annotations

import ctypes
import errno
import os
import random
import secrets
import stat
from pathlib import Path
from typing import Iterator

import pytest

from kv_cache_manager_v2._backends._disk import DiskFaults, DiskLevel
from kv_cache_manager_v2._backends._host import HostAllocation
from kv_cache_manager_v2._exceptions import LogicError

SIZES = [4096, 1024]  # two pools with different record sizes


class Host:
    """A host buffer holding `n` records of every pool, pool-major: pool i at offset base_i."""

    def __init__(self, n: int, sizes: list[int]) -> None:
        self.n = n
        self.sizes = sizes
        self.bases: list[int] = []
        total = 0
        for rs in sizes:
            self.bases.append(total)
            total += n * rs
        self.alloc = HostAllocation(total)
        self.total = total

    def addr(self, j: int, pool: int) -> int:
        return self.alloc.address + self.bases[pool] + j * self.sizes[pool]

    def addrs(self, js: list[int]) -> list[list[int]]:
        return [[self.addr(j, i) for i in range(len(self.sizes))] for j in js]

    def fill_random(self, rng: random.Random) -> None:
        ctypes.memmove(self.alloc.address, rng.randbytes(self.total), self.total)

    def fill(self, byte: int) -> None:
        ctypes.memset(self.alloc.address, byte, self.total)

    def record(self, j: int, pool: int) -> bytes:
        return ctypes.string_at(self.addr(j, pool), self.sizes[pool])


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


@pytest.fixture
def level(tmp_path: Path) -> Iterator[DiskLevel]:
    lv = DiskLevel(str(tmp_path / "disk"), SIZES, 64, io_threads=3, faults=DiskFaults())
    yield lv
    lv.close()


def faults_of(lv: DiskLevel) -> DiskFaults:
    f = lv._faults
    assert f is not None
    return f


def check_same(src: Host, js: list[int], dst: Host, ds: list[int]) -> None:
    for j, d in zip(js, ds):
        for i in range(len(src.sizes)):
            assert dst.record(d, i) == src.record(j, i), (j, d, i)


def test_round_trip_contiguous_and_scattered(level: DiskLevel, rng: random.Random) -> None:
    n = 64
    src = Host(n, SIZES)
    src.fill_random(rng)
    slots = list(range(n))
    assert level.write(slots, src.addrs(list(range(n)))) == [True] * n
    assert all(level.is_valid(s) for s in slots)
    # Read back contiguous (fully coalesced) ...
    dst = Host(n, SIZES)
    dst.fill(0)
    assert level.read(slots, dst.addrs(list(range(n)))) == [True] * n
    check_same(src, list(range(n)), dst, list(range(n)))
    # ... and in a shuffled order into a permuted destination (no coalescing at all).
    perm = list(range(n))
    rng.shuffle(perm)
    dst2 = Host(n, SIZES)
    dst2.fill(0)
    assert level.read([perm[j] for j in range(n)], dst2.addrs(list(range(n)))) == [True] * n
    check_same(src, perm, dst2, list(range(n)))


def test_gathered_runs_past_the_iovec_limit(tmp_path: Path, rng: random.Random) -> None:
    """Consecutive slots from (and back into) scattered host records: one vectored call per
    run, split at 1024 buffers; every byte round-trips."""
    n = 1100
    lv = DiskLevel(str(tmp_path), SIZES, n, io_threads=2)
    try:
        lv.max_run_bytes = 1 << 30
        src = Host(n, SIZES)
        src.fill_random(rng)
        perm = list(range(n))
        rng.shuffle(perm)
        slots = list(range(n))
        runs = lv._plan(slots, src.addrs(perm), [0] * n, 0, -1, None)
        assert [(r.pool, len(r.slots), r.segments) for r in runs] == [
            (0, 1024, 1024), (0, n - 1024, n - 1024), (1, 1024, 1024), (1, n - 1024, n - 1024)]
        assert lv.write(slots, src.addrs(perm)) == [True] * n  # slot s <- host record perm[s]
        back = list(range(n))
        rng.shuffle(back)
        dst = Host(n, SIZES)
        dst.fill(0)
        assert lv.read(slots, dst.addrs(back)) == [True] * n  # slot s -> host record back[s]
        for s in range(n):
            for i in range(len(SIZES)):
                assert dst.record(back[s], i) == src.record(perm[s], i), (s, i)
    finally:
        lv.close()


def test_buffer_list_split_for_partial_transfers() -> None:
    """The retry after a short vectored transfer continues exactly where it stopped."""
    from kv_cache_manager_v2._backends._disk import _after_bytes, _first_bytes

    data = bytearray(range(30))
    views = [memoryview(data)[0:10], memoryview(data)[10:12], memoryview(data)[12:30]]
    for k in range(31):
        first = b"".join(bytes(v) for v in _first_bytes(views, k))
        rest = b"".join(bytes(v) for v in _after_bytes(views, k))
        assert first == bytes(data[:k]) and rest == bytes(data[k:]), k
        assert all(len(v) > 0 for v in _first_bytes(views, k) + _after_bytes(views, k))


def test_partly_coalesced_batches(tmp_path: Path, rng: random.Random) -> None:
    lv = DiskLevel(str(tmp_path), SIZES, 200, io_threads=4)
    try:
        lv.max_run_bytes = 3 * 4096  # force runs to be split on their own too
        src = Host(100, SIZES)
        src.fill_random(rng)
        # Runs of consecutive slots with contiguous sources, a gap in the slot ids, a break in
        # the source addresses, slots listed out of order.
        slots = list(range(10, 30)) + list(range(31, 41)) + [150, 151, 152] + [5, 4, 3]
        js = list(range(0, 20)) + list(range(20, 30)) + [40, 42, 41] + [60, 61, 62]
        assert lv.write(slots, src.addrs(js)) == [True] * len(slots)
        dst = Host(100, SIZES)
        dst.fill(0xAA)
        rd = list(reversed(slots))
        dj = list(range(len(rd)))
        assert lv.read(rd, dst.addrs(dj)) == [True] * len(rd)
        by_slot = dict(zip(slots, js))
        check_same(src, [by_slot[s] for s in rd], dst, dj)
    finally:
        lv.close()


def test_many_slots_single_thread(tmp_path: Path, rng: random.Random) -> None:
    sizes = [512, 2048, 512]
    lv = DiskLevel(str(tmp_path), sizes, 1000, io_threads=1)
    try:
        src = Host(1000, sizes)
        src.fill_random(rng)
        slots = rng.sample(range(1000), 700)
        assert lv.write(slots, src.addrs(list(range(700)))) == [True] * 700
        dst = Host(1000, sizes)
        assert lv.read(slots, dst.addrs(list(range(700)))) == [True] * 700
        check_same(src, list(range(700)), dst, list(range(700)))
        unwritten = sorted(set(range(1000)) - set(slots))[:50]
        assert lv.read(unwritten, dst.addrs(list(range(50)))) == [False] * 50
    finally:
        lv.close()


def test_rewrite_replaces_content(level: DiskLevel, rng: random.Random) -> None:
    a = Host(4, SIZES)
    a.fill_random(rng)
    b = Host(4, SIZES)
    b.fill_random(rng)
    assert level.write([7, 8], a.addrs([0, 1])) == [True, True]
    assert level.write([8], b.addrs([3])) == [True]
    dst = Host(2, SIZES)
    assert level.read([7, 8], dst.addrs([0, 1])) == [True, True]
    check_same(a, [0], dst, [0])
    check_same(b, [3], dst, [1])


def test_never_written_and_invalidated_slots_fail(level: DiskLevel, rng: random.Random) -> None:
    src = Host(4, SIZES)
    src.fill_random(rng)
    dst = Host(4, SIZES)
    assert level.read([0, 1], dst.addrs([0, 1])) == [False, False]
    assert level.write([0, 1, 2], src.addrs([0, 1, 2])) == [True] * 3
    level.invalidate([1])
    assert not level.is_valid(1)
    assert level.read([0, 1, 2], dst.addrs([0, 1, 2])) == [True, False, True]
    check_same(src, [0, 2], dst, [0, 2])


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_failed_writes_are_reported_per_slot(level: DiskLevel, rng: random.Random, err: int) -> None:
    old = Host(8, SIZES)
    old.fill_random(rng)
    assert level.write(list(range(8)), old.addrs(list(range(8)))) == [True] * 8
    new = Host(8, SIZES)
    new.fill_random(rng)
    faults_of(level).fail_next_writes(2, err)
    # Batch order: slots 5 and 2 are the first two listed, so they fail; the rest succeed even
    # though they are consecutive with the failing ones.
    slots = [5, 2, 0, 1, 3, 4, 6, 7]
    res = level.write(slots, new.addrs(slots))
    assert res == [False, False, True, True, True, True, True, True]
    assert level.write_failures == 2
    dst = Host(8, SIZES)
    got = level.read(list(range(8)), dst.addrs(list(range(8))))
    # The failed slots' previous content is invalid too: never the old bytes reported good.
    assert got == [True, True, False, True, True, False, True, True]
    check_same(new, [0, 1, 3, 4, 6, 7], dst, [0, 1, 3, 4, 6, 7])
    # Faults are used up: the next write of those slots works.
    assert level.write([2, 5], new.addrs([2, 5])) == [True, True]
    assert level.read([2, 5], dst.addrs([2, 5])) == [True, True]
    check_same(new, [2, 5], dst, [2, 5])


@pytest.mark.parametrize("pool", [0, 1])
def test_one_failed_record_fails_the_slot(level: DiskLevel, rng: random.Random, pool: int) -> None:
    old = Host(4, SIZES)
    old.fill_random(rng)
    assert level.write(list(range(4)), old.addrs(list(range(4)))) == [True] * 4
    new = Host(4, SIZES)
    new.fill_random(rng)
    # ENOSPC on one pool file only: the other pool's record of that slot was written, but the
    # slot as a whole failed and must not read back as good (neither old nor mixed bytes).
    faults_of(level).fail_next_writes(1, errno.ENOSPC, pool=pool)
    assert level.write([2, 1, 3], new.addrs([2, 1, 3])) == [False, True, True]
    assert not level.is_valid(2)
    dst = Host(4, SIZES)
    assert level.read(list(range(4)), dst.addrs(list(range(4)))) == [True, True, False, True]
    check_same(new, [1, 3], dst, [1, 3])
    faults_of(level).short_next_writes(1, pool=pool)
    assert level.write([0, 2], new.addrs([0, 2])) == [False, True]
    assert level.read([0, 2], dst.addrs([0, 2])) == [False, True]


def test_short_writes(level: DiskLevel, rng: random.Random) -> None:
    src = Host(6, SIZES)
    src.fill_random(rng)
    f = faults_of(level)
    f.short_next_writes(1)  # still short after the retry: the slot fails
    assert level.write([0, 1, 2], src.addrs([0, 1, 2])) == [False, True, True]
    f.short_next_writes(2, recover=True)  # the retry writes the rest: success
    assert level.write([3, 4, 5], src.addrs([3, 4, 5])) == [True, True, True]
    dst = Host(6, SIZES)
    assert level.read(list(range(6)), dst.addrs(list(range(6)))) == [False] + [True] * 5
    check_same(src, [1, 2, 3, 4, 5], dst, [1, 2, 3, 4, 5])


def test_short_reads_and_read_errors(level: DiskLevel, rng: random.Random) -> None:
    src = Host(6, SIZES)
    src.fill_random(rng)
    assert level.write(list(range(6)), src.addrs(list(range(6)))) == [True] * 6
    f = faults_of(level)
    dst = Host(6, SIZES)
    f.short_next_reads(1)
    assert level.read(list(range(6)), dst.addrs(list(range(6)))) == [False] + [True] * 5
    check_same(src, [1, 2, 3, 4, 5], dst, [1, 2, 3, 4, 5])
    assert level.checksum_mismatches == 0  # the unread record was not even hashed
    f.short_next_reads(1, recover=True)
    dst.fill(0)
    assert level.read([4], dst.addrs([4])) == [True]
    check_same(src, [4], dst, [4])
    f.short_next_reads(1, pool=1)  # only the second pool's record is short: the slot fails
    assert level.read([5, 0], dst.addrs([5, 0])) == [False, True]
    f.fail_next_reads(1, errno.EIO)
    assert level.read([3, 2], dst.addrs([3, 2])) == [False, True]
    # A failed read does not forget the slot: the bytes on disk are still good.
    dst.fill(0)
    assert level.read([0, 3], dst.addrs([0, 3])) == [True, True]
    check_same(src, [0, 3], dst, [0, 3])
    # Faults only count slots that are actually read (a never-written slot is skipped).
    level.invalidate([1])
    f.short_next_reads(1)
    assert level.read([1, 2, 5], dst.addrs([1, 2, 5])) == [False, False, True]


@pytest.mark.parametrize("pool,offset", [(0, 0), (0, 4095), (1, 513)])
def test_corrupted_slot_fails_its_checksum(level: DiskLevel, rng: random.Random, pool: int, offset: int) -> None:
    src = Host(10, SIZES)
    src.fill_random(rng)
    assert level.write(list(range(10)), src.addrs(list(range(10)))) == [True] * 10
    faults_of(level).corrupt(4, pool, offset)
    dst = Host(10, SIZES)
    got = level.read(list(range(10)), dst.addrs(list(range(10))))
    assert got == [True] * 4 + [False] + [True] * 5
    assert level.checksum_mismatches == 1
    others = [j for j in range(10) if j != 4]
    check_same(src, others, dst, others)
    # The bytes really are wrong on disk (the corruption is not a simulation).
    rs = SIZES[pool]
    with open(level.paths[pool], "rb") as fh:
        fh.seek(4 * rs)
        assert fh.read(rs) != src.record(4, pool)
    # Rewriting the slot heals it.
    assert level.write([4], src.addrs([4])) == [True]
    assert level.read([4], dst.addrs([4])) == [True]
    check_same(src, [4], dst, [4])


def test_resize_grow_and_shrink(tmp_path: Path, rng: random.Random) -> None:
    lv = DiskLevel(str(tmp_path), SIZES, 8)
    try:
        for p, rs in zip(lv.paths, SIZES):
            assert os.path.getsize(p) == 8 * rs
        src = Host(16, SIZES)
        src.fill_random(rng)
        assert lv.write(list(range(8)), src.addrs(list(range(8)))) == [True] * 8
        lv.resize(16)
        assert lv.num_slots == 16
        for p, rs in zip(lv.paths, SIZES):
            assert os.path.getsize(p) == 16 * rs
        dst = Host(16, SIZES)
        # Old slots survive growth; new slots are not valid until written.
        assert lv.read(list(range(16)), dst.addrs(list(range(16)))) == [True] * 8 + [False] * 8
        check_same(src, list(range(8)), dst, list(range(8)))
        assert lv.write([12, 15], src.addrs([12, 15])) == [True, True]
        lv.resize(5)
        for p, rs in zip(lv.paths, SIZES):
            assert os.path.getsize(p) == 5 * rs
        with pytest.raises(ValueError):
            lv.read([12], dst.addrs([0]))
        lv.resize(16)
        assert not lv.is_valid(12) and not lv.is_valid(15)
        # Slots past the shrink point are forgotten, even though they were written before.
        assert lv.read(list(range(16)), dst.addrs(list(range(16)))) == [True] * 5 + [False] * 11
        check_same(src, list(range(5)), dst, list(range(5)))
        lv.resize(0)
        assert lv.read([], []) == []
    finally:
        lv.close()


def test_files_mode_names_and_close(tmp_path: Path) -> None:
    d = tmp_path / "new" / "dir"
    old_umask = os.umask(0o002)  # a permissive umask must not widen the mode
    try:
        lv = DiskLevel(str(d), [256, 512, 1024], 4)
    finally:
        os.umask(old_umask)
    paths = lv.paths
    assert len(paths) == 3 and len(set(paths)) == 3
    for i, p in enumerate(paths):
        assert os.path.dirname(p) == str(d)
        name = os.path.basename(p)
        assert name.startswith(f"kvcm-{os.getpid()}-") and name.endswith(f"-pool{i}.bin")
        st = os.stat(p)
        assert stat.S_ISREG(st.st_mode)
        assert st.st_mode & 0o777 == 0o600
    lv.close()
    for p in paths:
        assert not os.path.exists(p)
    lv.close()  # idempotent
    assert lv.closed
    with pytest.raises(LogicError):
        lv.read([], [])
    with pytest.raises(LogicError):
        lv.write([], [])


def test_close_when_files_vanished(tmp_path: Path) -> None:
    lv = DiskLevel(str(tmp_path), SIZES, 4)
    for p in lv.paths:
        os.unlink(p)
    lv.close()
    assert list(tmp_path.iterdir()) == []


def test_path_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"x")
    with pytest.raises(OSError):
        DiskLevel(str(f), SIZES, 4)


def test_old_files_are_never_trusted(tmp_path: Path, rng: random.Random) -> None:
    src = Host(8, SIZES)
    src.fill_random(rng)
    first = DiskLevel(str(tmp_path), SIZES, 8)
    assert first.write(list(range(8)), src.addrs(list(range(8)))) == [True] * 8
    # Simulate a crashed process: its files stay behind with valid-looking data.
    leftovers = {}
    for p in first.paths:
        leftovers[p + ".old"] = Path(p).read_bytes()
    first.close()
    for p, data in leftovers.items():
        Path(p).write_bytes(data)
        os.rename(p, p[: -len(".old")])
    left = sorted(os.listdir(tmp_path))
    second = DiskLevel(str(tmp_path), SIZES, 8)
    try:
        assert not set(second.paths) & {str(tmp_path / n) for n in left}
        dst = Host(8, SIZES)
        assert second.read(list(range(8)), dst.addrs(list(range(8)))) == [False] * 8
    finally:
        second.close()
    # The old files are not ours: close leaves them alone.
    assert sorted(os.listdir(tmp_path)) == left


def test_name_collision_never_opens_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = iter(["0" * 16, "0" * 16, "1" * 16, "2" * 16])
    monkeypatch.setattr(secrets, "token_hex", lambda n=None: next(tokens))
    pid = os.getpid()
    existing = tmp_path / f"kvcm-{pid}-{'0' * 16}-pool0.bin"
    existing.write_bytes(b"other user's data")
    os.chmod(existing, 0o644)
    target = tmp_path / "target"
    target.write_bytes(b"victim")
    os.symlink(target, tmp_path / f"kvcm-{pid}-{'1' * 16}-pool0.bin")
    lv = DiskLevel(str(tmp_path), [64], 4)
    try:
        assert lv.paths == [str(tmp_path / f"kvcm-{pid}-{'2' * 16}-pool0.bin")]
        assert existing.read_bytes() == b"other user's data"
        assert os.stat(existing).st_mode & 0o777 == 0o644
        assert target.read_bytes() == b"victim"
    finally:
        lv.close()
    assert existing.exists() and target.exists()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        DiskLevel(str(tmp_path), [], 4)
    with pytest.raises(ValueError):
        DiskLevel(str(tmp_path), [0], 4)
    with pytest.raises(ValueError):
        DiskLevel(str(tmp_path), [64], -1)
    assert list(tmp_path.iterdir()) == []
    lv = DiskLevel(str(tmp_path), SIZES, 4)
    try:
        h = Host(4, SIZES)
        with pytest.raises(ValueError):
            lv.write([4], h.addrs([0]))
        with pytest.raises(ValueError):
            lv.write([1, 1], h.addrs([0, 1]))
        with pytest.raises(ValueError):
            lv.write([1], [[h.addr(0, 0)]])
        with pytest.raises(ValueError):
            lv.read([1, 2], h.addrs([0]))
        with pytest.raises(ValueError):
            lv.resize(-1)
    finally:
        lv.close()


def test_faults_corrupt_requires_attached_level() -> None:
    with pytest.raises(LogicError):
        DiskFaults().corrupt(0)


def test_random_batches_against_a_model(tmp_path: Path, rng: random.Random) -> None:
    """Random writes/reads/invalidations with random faults: a read reports True only for slots
    whose bytes equal the last successful write."""
    sizes = [256, 768]
    n = 48
    faults = DiskFaults()
    lv = DiskLevel(str(tmp_path), sizes, n, io_threads=2, faults=faults)
    model: dict[int, bytes] = {}
    src = Host(n, sizes)
    dst = Host(n, sizes)
    try:
        for _ in range(150):
            op = rng.random()
            k = rng.randint(1, 16)
            slots = rng.sample(range(n), k)
            js = list(range(k)) if rng.random() < 0.5 else rng.sample(range(n), k)
            if op < 0.45:
                src.fill_random(rng)
                if rng.random() < 0.3:
                    faults.fail_next_writes(rng.randint(1, 3), rng.choice([errno.ENOSPC, errno.EIO]))
                if rng.random() < 0.2:
                    faults.short_next_writes(rng.randint(1, 3), recover=rng.random() < 0.5)
                res = lv.write(slots, src.addrs(js))
                for s, j, ok in zip(slots, js, res):
                    if ok:
                        model[s] = src.record(j, 0) + src.record(j, 1)
                    else:
                        model.pop(s, None)
                faults.fail_next_writes(0)
                faults.short_next_writes(0)
            elif op < 0.9:
                if rng.random() < 0.2:
                    faults.short_next_reads(rng.randint(1, 2))
                if rng.random() < 0.2 and model:
                    faults.corrupt(rng.choice(sorted(model)), rng.randrange(2), 0)
                dst.fill(0)
                res = lv.read(slots, dst.addrs(js))
                for s, j, ok in zip(slots, js, res):
                    if ok:
                        assert dst.record(j, 0) + dst.record(j, 1) == model[s]
                faults.short_next_reads(0)
            else:
                lv.invalidate(slots)
                for s in slots:
                    model.pop(s, None)
    finally:
        lv.close()


def test_plan_coalesces_contiguous_runs(tmp_path: Path) -> None:
    lv = DiskLevel(str(tmp_path), SIZES, 64)
    try:
        h = Host(64, SIZES)
        n = 20
        none = [0] * n
        # Contiguous slots and addresses: one run per pool.
        runs = lv._plan(list(range(n)), h.addrs(list(range(n))), none, 0, -1, None)
        assert [(r.pool, len(r.slots)) for r in runs] == [(0, n), (1, n)]
        assert runs[0].offset == 0 and runs[0].addrs == [h.addr(j, 0) for j in range(n)]
        assert runs[0].segments == 1
        # Listed in reverse order: sorted first, still one run per pool.
        rev = list(reversed(range(n)))
        runs = lv._plan(rev, h.addrs(rev), none, 0, -1, None)
        assert [(r.pool, r.slots) for r in runs] == [(0, list(range(n))), (1, list(range(n)))]
        # A break in the host addresses adds a buffer to the run (gathered by one vectored
        # call); a gap in the slot ids splits it.
        js = list(range(10)) + list(range(11, 21))
        runs = lv._plan(list(range(n)), h.addrs(js), none, 0, -1, None)
        assert [(len(r.slots), r.segments) for r in runs] == [(n, 2), (n, 2)]
        perm = list(range(n))
        random.Random(5).shuffle(perm)
        runs = lv._plan(list(range(n)), h.addrs(perm), none, 0, -1, None)
        assert [len(r.slots) for r in runs] == [n, n]
        assert runs[0].addrs == [h.addr(j, 0) for j in perm]
        slots = list(range(10)) + list(range(30, 40))
        runs = lv._plan(slots, h.addrs(list(range(n))), none, 0, -1, None)
        assert [len(r.slots) for r in runs] == [10, 10, 10, 10]
        # The byte cap splits long runs at record boundaries.
        lv.max_run_bytes = 4 * 4096
        runs = lv._plan(list(range(n)), h.addrs(list(range(n))), none, 0, -1, None)
        assert [len(r.slots) for r in runs if r.pool == 0] == [4] * 5
        assert [len(r.slots) for r in runs if r.pool == 1] == [16, 4]
        # A faulty slot gets a run of its own.
        lv.max_run_bytes = 1 << 30
        f = [0] * n
        f[7] = 1
        runs = lv._plan(list(range(n)), h.addrs(list(range(n))), f, errno.EIO, -1, None)
        assert [len(r.slots) for r in runs if r.pool == 0] == [7, 1, 12]
        runs = lv._plan(list(range(n)), h.addrs(list(range(n))), f, errno.EIO, 1, None)
        assert [len(r.slots) for r in runs if r.pool == 0] == [n]
        assert [len(r.slots) for r in runs if r.pool == 1] == [7, 1, 12]
    finally:
        lv.close()


def test_disk_io_probe_smoke(tmp_path: Path) -> None:
    """benchmarks/disk_io_probe.py runs end to end on a tiny scale (no timing checks)."""
    import json
    import subprocess
    import sys

    d = Path(__file__).resolve().parent
    while not (d / "benchmarks" / "disk_io_probe.py").is_file():
        if d.parent == d:
            pytest.skip("benchmarks/disk_io_probe.py not found")
        d = d.parent
    out = tmp_path / "probe.json"
    env = dict(os.environ)
    import kv_cache_manager_v2

    # The package the suite runs against (dev sources or a compiled copy) comes first.
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(kv_cache_manager_v2.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [x for x in sys.path if x])
    proc = subprocess.run(
        [sys.executable, str(d / "benchmarks" / "disk_io_probe.py"), "--dir", str(tmp_path / "io"),
         "--size", str(2 << 20), "--record", "4096", "--reps", "1", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    fig = json.loads(out.read_text())
    assert set(fig["median_gbps"]) >= {"raw_write", "raw_read", "level_write", "level_read"}
    assert all(v > 0 for v in fig["median_gbps"].values())
    assert os.listdir(tmp_path / "io") == []
