"""The disk tier (SPEC 3, 4.5, 4.6, 5, 9): files, reuse from disk, checksums and fault injection.

Data is always checked with the fake engine; corrupted or unreadable pages must become misses
or a DataIntegrityError, never wrong bytes.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("kv_cache_manager_v2._backends._disk")

from kv_cache_manager_v2 import (  # noqa: E402
    AttentionLayerConfig,
    BufferConfig,
    DataIntegrityError,
    DiskCacheTierConfig,
    GpuCacheTierConfig,
    HostCacheTierConfig,
    KVCache,
    KVCacheManagerConfig,
    KVCacheStatus,
    LogicError,
    OutOfPagesError,
)
from kv_cache_manager_v2._backends._disk import DiskFaults, DiskLevel  # noqa: E402

from conftest import attention  # noqa: E402
from fake_engine import Step  # noqa: E402
from test_tiers import (  # noqa: E402
    SLOT,
    TPB,
    Harness,
    level_of_blocks,
    stats,
    toks,
    two_group_layers,
)

REPO = Path(__file__).resolve().parent.parent


def disk_config(
    path: Path | str,
    l0: int,
    host: int | None,
    disk: int,
    layers: list[AttentionLayerConfig] | None = None,
    **kwargs: Any,
) -> KVCacheManagerConfig:
    tiers: list[Any] = [GpuCacheTierConfig(quota=l0)]
    if host is not None:
        tiers.append(HostCacheTierConfig(quota=host))
    tiers.append(DiskCacheTierConfig(quota=disk, path=str(path)))
    return KVCacheManagerConfig(
        tokens_per_block=TPB,
        cache_tiers=tiers,
        layers=list(layers) if layers is not None else [attention(0), attention(1)],
        backend="host",
        **kwargs,
    )


def disk_levels(h: Harness) -> list[DiskLevel]:
    """The disk level's stores, one per pool group (test access to fault injection)."""
    storage = h.m._ctx.storage
    out = storage.levels[storage.last_level].disk
    assert out, "the last level is not a disk level"
    return list(out)


def attach_faults(h: Harness, pg: int = 0) -> DiskFaults:
    f = DiskFaults()
    disk_levels(h)[pg].set_faults(f)
    return f


def disk_level_index(h: Harness) -> int:
    return h.levels - 1


def held_disk_slots(kv: KVCache, lg: int = 0) -> list[int]:
    """Slots (on their current level) of a suspended cache's pages."""
    return [s for s in kv.get_aggregated_page_indices(lg) if s >= 0]


def tree_only_disk_slots(h: Harness, pg: int = 0) -> list[int]:
    """Disk slots of DROPPABLE pages (test access to the page table)."""
    pages = h.m._ctx.storage.pages
    lv = h.levels - 1
    return sorted(
        pages.slot[p]
        for p in range(len(pages.level))
        if pages.level[p] == lv and pages.pool_group[p] == pg and pages.holds[p] == 0
        and pages.locks[p] == 0 and pages.node[p] >= 0
    )


def corrupt_all_valid(h: Harness, pg: int = 0) -> int:
    """Flips one byte in every written slot of every pool of the disk level; returns the count."""
    d = disk_levels(h)[pg]
    f = attach_faults(h, pg)
    n = 0
    for s in range(d.num_slots):
        if d.is_valid(s):
            for pool in range(len(d.record_sizes)):
                f.corrupt(s, pool, offset=7)
            n += 1
    disk_levels(h)[pg].set_faults(None)
    return n


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers,num_pools",
    [
        (None, 1),
        (two_group_layers(), 2),  # two pool groups, one pool each
        # one pool group, two pools (512-byte K, 256-byte V)
        ([AttentionLayerConfig(0, [BufferConfig("k", 512), BufferConfig("v", 256)])], 2),
    ],
)
def test_disk_files_per_pool_mode_0600_removed_at_shutdown(tmp_path: Path, layers: Any, num_pools: int) -> None:
    d = tmp_path / "kv"
    d.mkdir()
    (d / "unrelated.txt").write_text("keep me")
    h = Harness(disk_config(d, 1 << 16, 1 << 16, 1 << 17, layers=layers))
    files = sorted(p for p in d.iterdir() if p.name != "unrelated.txt")
    assert len(files) == num_pools
    for p in files:
        st = os.lstat(p)
        assert stat.S_ISREG(st.st_mode), p
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert p.parent == d  # directly under path
    # used for real
    kv = h.start(toks(1, 50))
    h.close(kv)
    h.assert_empty_after_clear()
    assert sorted(p for p in d.iterdir() if p.name != "unrelated.txt") == files
    h.m.shutdown()
    assert [p.name for p in d.iterdir()] == ["unrelated.txt"]
    assert (d / "unrelated.txt").read_text() == "keep me"


def test_disk_path_created_if_missing(tmp_path: Path) -> None:
    d = tmp_path / "a" / "b"
    h = Harness(disk_config(d, 1 << 16, None, 1 << 16))
    assert len(list(d.iterdir())) == 1
    h.m.shutdown()
    assert list(d.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Reuse from disk
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_host", [True, False])
def test_reuse_after_eviction_to_disk_non_aligned(tmp_path: Path, with_host: bool) -> None:
    h = Harness(disk_config(tmp_path, 6 * SLOT, 6 * SLOT if with_host else None, 32 * SLOT))
    disk_lv = disk_level_index(h)
    prompt = toks(10, 4 * TPB + 11)  # 75 tokens, 5 blocks, partial tail
    h.close(h.start(prompt))
    # push it all the way to disk: fill level 0 (and the host tier) with held caches
    fillers = []
    for i in range(2 if with_host else 1):
        f = h.start(toks(11 + i, 6 * TPB))
        f.suspend()
        fillers.append(f)
    assert h.m.probe_reuse(input_tokens=prompt) == 75
    h.m.get_and_reset_iteration_stats()
    query = prompt[:70] + toks(13, 21)  # 4 blocks + 6 tokens of the partial block
    n = h.m.probe_reuse(input_tokens=query)
    assert n == 70
    kv = h.start(query)
    st = h.m.get_and_reset_iteration_stats()[0]
    assert st.onboarded_from_level[disk_lv] == 5
    assert sum(st.onboarded_from_level) == st.onboarded_blocks == 5
    assert st.reused_partial_blocks == 1 and st.reused_full_blocks == 4
    h.eng.verify(kv, query)
    kv.suspend()
    # the donor kept its bytes: full reuse of the original prompt, from wherever it lives now
    kv2 = h.start(prompt + toks(14, 3))
    h.eng.verify(kv2, h.tokens[id(kv2)])
    kv2.suspend()
    for c in [kv, kv2, *fillers]:
        h.resume_verify(c)
        h.close(c)
    h.assert_empty_after_clear()
    h.m.shutdown()


def test_three_sequences_alternate_through_disk(tmp_path: Path) -> None:
    """Three 6-block caches over level 0 (6) + host (6) + disk: each resume finds the cache
    on the disk tier (least recently suspended), and its bytes must come back right."""
    h = Harness(disk_config(tmp_path, 6 * SLOT, 6 * SLOT, 32 * SLOT))
    caches = []
    for i in range(3):
        kv = h.start(toks(20 + i, 5 * TPB + 3 * i + 1))
        kv.suspend()
        caches.append(kv)
    from_disk = 0
    for i in range(4):
        for kv in caches:
            h.resume_verify(kv)
            st = h.m.get_and_reset_iteration_stats()[0]
            from_disk += st.onboarded_from_level[2]
            h.decode(kv, toks(30 + i, 2))
            kv.suspend()
    assert from_disk >= 6 * 4
    for kv in caches:
        h.close(kv)
    h.assert_empty_after_clear()
    h.m.shutdown()


def test_prefetch_from_disk(tmp_path: Path) -> None:
    h = Harness(disk_config(tmp_path, 4 * SLOT, 8 * SLOT, 32 * SLOT))
    a = h.start(toks(30, 4 * TPB))
    a.suspend()
    b = h.start(toks(31, 4 * TPB))
    b.suspend()
    c = h.start(toks(32, 4 * TPB))  # b -> host
    c.suspend()
    d = h.start(toks(33, 4 * TPB))  # c -> host, a -> disk (LRU)
    d.suspend()
    assert h.m.get_and_reset_iteration_stats()[0].offloaded_blocks >= 12  # one per level moved
    storage = h.m._ctx.storage
    assert not any(level_of_blocks(a))
    # prefetch to the host tier: b (least recently suspended there) moves to disk for it
    assert a.prefetch(1)
    assert a.status == KVCacheStatus.SUSPENDED
    assert not any(level_of_blocks(a))
    h.m.get_and_reset_iteration_stats()
    h.resume_verify(a)
    st = h.m.get_and_reset_iteration_stats()[0]
    assert st.onboarded_from_level[1] == 4 and st.onboarded_from_level[2] == 0
    a.suspend()
    for kv in (b, c, a, d):
        h.resume_verify(kv)
        kv.suspend()
    del storage
    for kv in (a, b, c, d):
        h.close(kv)
    h.assert_empty_after_clear()
    h.m.shutdown()


# --------------------------------------------------------------------------------------------
# Corrupt pages
# --------------------------------------------------------------------------------------------


def _push_to_disk(h: Harness, blocks: int, seed: int) -> list[KVCache]:
    """Fills level 0 and the host tier with suspended caches of `blocks` blocks each."""
    out = []
    s = h.m.get_storage_statistics(0)[0].total + (
        h.m.get_storage_statistics(1)[0].total if h.levels == 3 else 0
    )
    for i in range((s + blocks - 1) // blocks):
        kv = h.start(toks(seed + i, blocks * TPB))
        kv.suspend()
        out.append(kv)
    return out


def test_corrupt_tree_only_page_gives_shorter_match_never_wrong_data(tmp_path: Path) -> None:
    # (level 0 holds 6: reusing the 4-block prompt needs 5, its partial tail is copied on resume)
    # (host tier >= level 0: see test_eviction_through_small_host_tier)
    h = Harness(disk_config(tmp_path, 6 * SLOT, 6 * SLOT, 32 * SLOT))
    prompt = toks(40, 3 * TPB + 4)
    h.close(h.start(prompt))
    fillers = _push_to_disk(h, 4, 41)
    assert h.m.probe_reuse(input_tokens=prompt) == len(prompt)
    slots = tree_only_disk_slots(h)
    assert len(slots) == 4  # the whole prompt lives on disk, known only to the tree
    f = attach_faults(h)
    for s in slots:
        f.corrupt(s, 0, offset=3)
    # The tree cannot know yet; reading the pages finds the corruption. The cache that adopted
    # them cannot be resumed; the corrupt pages are dropped and the tree pruned.
    kv = h.m.create_kv_cache(input_tokens=prompt)
    with pytest.raises(DataIntegrityError, match="block 0"):
        kv.resume()
    assert kv.status == KVCacheStatus.SUSPENDED
    h.close(kv)
    st = h.m.get_and_reset_iteration_stats()[0]
    assert st.dropped_blocks >= 1
    n = h.m.probe_reuse(input_tokens=prompt)
    assert n < len(prompt)
    # later requests work with the shorter match and correct bytes
    kv = h.start(prompt)
    assert kv.commit_pending_stats().reused_blocks == (n + TPB - 1) // TPB
    h.eng.verify(kv, prompt)
    h.close(kv)
    for f in fillers:
        h.close(f)
    h.assert_empty_after_clear()
    h.m.shutdown()


@pytest.mark.parametrize("via", ["resume", "prefetch"])
@pytest.mark.parametrize("fault", ["corrupt", "eio", "short_read"])
def test_corrupt_held_page_resume_raises_and_only_close_works(tmp_path: Path, via: str, fault: str) -> None:
    h = Harness(disk_config(tmp_path, 4 * SLOT, None, 32 * SLOT))
    a = h.start(toks(50, 3 * TPB + 5))  # 4 blocks
    a.suspend()
    other = h.start(toks(51, 4 * TPB))  # a's pages go to disk
    other.suspend()
    assert not any(level_of_blocks(a))
    slots = held_disk_slots(a)
    assert len(slots) == 4
    f = attach_faults(h)
    if fault == "corrupt":
        f.corrupt(slots[2], 0, offset=100)  # block 2
    elif fault == "eio":
        f.fail_next_reads(1, errno.EIO)
    else:
        f.short_next_reads(1)
    with pytest.raises(DataIntegrityError, match=r"block \d") as ei:
        if via == "resume":
            a.resume()
        else:
            a.prefetch(0)
    if fault == "corrupt":
        assert "block 2" in str(ei.value)
    assert a.status == KVCacheStatus.SUSPENDED
    h.m.check_invariants()
    # afterwards only close() works
    with pytest.raises(LogicError):
        a.resume()
    with pytest.raises(LogicError):
        a.prefetch(0)
    with pytest.raises(LogicError):
        a.resize(100)
    with pytest.raises(LogicError):
        a.commit([1])
    assert a.status == KVCacheStatus.SUSPENDED
    h.m.check_invariants()
    h.close(a)
    h.close(a)  # idempotent
    assert a.status == KVCacheStatus.CLOSED
    h.m.check_invariants()
    # the prompt's damaged block is gone from the tree: shorter, never wrong
    p = h.tokens.get(id(a)) or toks(50, 3 * TPB + 5)
    n = h.m.probe_reuse(input_tokens=p)
    kv = h.start(p)
    assert kv.num_committed_tokens == len(p)
    h.eng.verify(kv, p)
    h.close(kv)
    assert n < len(p) or fault != "corrupt"
    h.resume_verify(other)
    h.close(other)
    h.assert_empty_after_clear()
    h.m.shutdown()
    assert list(tmp_path.iterdir()) == []


def test_corrupt_page_of_other_cache_does_not_affect_this_one(tmp_path: Path) -> None:
    h = Harness(disk_config(tmp_path, 4 * SLOT, None, 32 * SLOT))
    a = h.start(toks(60, 2 * TPB))
    a.suspend()
    b = h.start(toks(61, 2 * TPB))
    b.suspend()
    c = h.start(toks(62, 4 * TPB))
    c.suspend()
    assert not any(level_of_blocks(a)) and not any(level_of_blocks(b))
    f = attach_faults(h)
    f.corrupt(held_disk_slots(a)[0], 0)
    h.resume_verify(b)
    b.suspend()
    with pytest.raises(DataIntegrityError, match="block 0"):
        a.resume()
    h.close(a)
    for kv in (c, b):
        h.resume_verify(kv)
        h.close(kv)
    h.assert_empty_after_clear()
    h.m.shutdown()


# --------------------------------------------------------------------------------------------
# Failed writes
# --------------------------------------------------------------------------------------------


def _inject_write_fault(f: DiskFaults, kind: str, n: int) -> None:
    if kind == "enospc":
        f.fail_next_writes(n, errno.ENOSPC)
    elif kind == "eio":
        f.fail_next_writes(n, errno.EIO)
    else:
        f.short_next_writes(n)


@pytest.mark.parametrize("kind", ["enospc", "eio", "short"])
def test_failed_write_never_drops_held_page(tmp_path: Path, kind: str) -> None:
    h = Harness(disk_config(tmp_path, 4 * SLOT, None, 32 * SLOT))
    a = h.start(toks(70, 4 * TPB))
    a.suspend()
    b = h.start(toks(71, TPB))
    snap = h.snapshot([a, b])
    f = attach_faults(h)
    _inject_write_fault(f, kind, 100)
    # b needs 2 more slots: a's HELD pages would have to go to disk, whose writes fail
    assert not b.resize(3 * TPB)
    assert h.snapshot([a, b]) == snap
    with pytest.raises(OutOfPagesError):
        b.capacity = 3 * TPB
    assert h.snapshot([a, b]) == snap
    h.m.check_invariants()
    _inject_write_fault(f, kind, 0)
    f.write_errors = 0
    f.short_writes = 0
    assert b.resize(3 * TPB)
    h.eng.forward([Step(b, toks(72, 2 * TPB), h.tokens[id(b)])])
    b.suspend()
    h.resume_verify(a)
    h.close(a)
    h.resume_verify(b)
    h.close(b)
    h.assert_empty_after_clear()
    h.m.shutdown()


def test_failed_write_one_of_several_held_pages(tmp_path: Path) -> None:
    """Only one write of the batch fails: the call fails, the HELD page stays, data intact.

    (The pages whose writes succeeded may stay on disk: a placement change, not a data change.)
    """
    h = Harness(disk_config(tmp_path, 4 * SLOT, None, 32 * SLOT))
    a = h.start(toks(80, 4 * TPB))
    a.suspend()
    b = h.m.create_kv_cache()
    assert b.resume()
    f = attach_faults(h)
    f.fail_next_writes(1, errno.EIO)
    before = (b.capacity, b.history_length, list(b.get_base_page_indices(0)))
    assert not b.resize(4 * TPB)
    assert (b.capacity, b.history_length, list(b.get_base_page_indices(0))) == before
    h.m.check_invariants()
    b.suspend()
    h.resume_verify(a)
    a.suspend()
    h.resume_verify(a)
    h.close(a)
    h.close(b)
    h.assert_empty_after_clear()
    h.m.shutdown()


@pytest.mark.parametrize("kind", ["enospc", "eio", "short"])
def test_failed_write_of_droppable_page_may_drop_it(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(disk_config(tmp_path, 4 * SLOT, None, 32 * SLOT))
    prompt = toks(90, 4 * TPB)
    h.close(h.start(prompt))  # 4 DROPPABLE pages on level 0
    h.m.get_and_reset_iteration_stats()
    f = attach_faults(h)
    _inject_write_fault(f, kind, 100)
    caplog.set_level(logging.WARNING, logger="kv_cache_manager_v2")
    x = h.start(toks(91, 2 * TPB))  # needs 2 slots: 2 DROPPABLE pages fail to move -> dropped
    st = h.m.get_and_reset_iteration_stats()[0]
    # 2 victims were written and failed, so dropped; dropping a full-attention block also
    # prunes the chain below it (SPEC 4.6), so more may go
    assert st.dropped_blocks >= 2
    assert st.offloaded_blocks == 0
    assert h.m._ctx.storage.failed_writes == 2
    h.close(x)
    y = h.start(toks(92, 2 * TPB))
    h.close(y)
    warnings = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(warnings) == 1  # logged once
    # the prompt is now a shorter (here: empty) match, never wrong bytes
    assert h.m.probe_reuse(input_tokens=prompt) == 0
    _inject_write_fault(f, kind, 0)
    f.write_errors = 0
    f.short_writes = 0
    kv = h.start(prompt)
    h.eng.verify(kv, prompt)
    h.close(kv)
    h.assert_empty_after_clear()
    h.m.shutdown()


def test_short_write_that_recovers_is_fine(tmp_path: Path) -> None:
    h = Harness(disk_config(tmp_path, 4 * SLOT, None, 32 * SLOT))
    a = h.start(toks(95, 4 * TPB))
    a.suspend()
    f = attach_faults(h)
    f.short_next_writes(4, recover=True)
    b = h.start(toks(96, 4 * TPB))
    assert not any(level_of_blocks(a))
    b.suspend()
    h.resume_verify(a)
    h.close(a)
    h.resume_verify(b)
    h.close(b)
    h.assert_empty_after_clear()
    h.m.shutdown()


# --------------------------------------------------------------------------------------------
# Disk quota changes
# --------------------------------------------------------------------------------------------


def test_disk_quota_shrink_refused_when_held_pages_do_not_fit(tmp_path: Path) -> None:
    h = Harness(disk_config(tmp_path, 4 * SLOT, None, 8 * SLOT))
    caches = _push_to_disk(h, 4, 100)  # 4 on level 0... 1 cache; then more
    more = h.start(toks(110, 4 * TPB))
    more.suspend()
    caches.append(more)
    snap = h.snapshot(caches)
    # 8 HELD pages on 4 + 8 slots: disk at 3 slots cannot hold the 4 that must stay colder
    assert not h.m.resize(2 - 1, 3 * SLOT)
    assert h.snapshot(caches) == snap
    for kv in caches:
        h.resume_verify(kv)
        kv.suspend()
    for kv in caches:
        h.close(kv)
    h.assert_empty_after_clear()
    h.m.shutdown()


_COMPACT_SCRIPT = textwrap.dedent(
    """
    import sys, tempfile
    from kv_cache_manager_v2 import *
    from conftest import attention
    from fake_engine import FakeEngine, Step
    from test_tiers import toks
    d = tempfile.mkdtemp()
    S = 2048
    cfg = KVCacheManagerConfig(tokens_per_block=16, cache_tiers=[GpuCacheTierConfig(4 * S),
        DiskCacheTierConfig(16 * S, d)], layers=[attention(0), attention(1)], backend="host")
    m = KVCacheManager(cfg)
    eng = FakeEngine(m, cfg)
    caches = []
    for i in range(4):
        t = toks(i, 64)
        kv = m.create_kv_cache(input_tokens=t)
        assert kv.resume() and kv.resize(64)
        eng.forward([Step(kv, t, [])])
        kv.commit(t)
        kv.suspend()
        caches.append((kv, t))
    for kv, t in caches[:2]:
        kv.close()
    # cache 2 lives in disk slots 8..11: shrinking the disk to 8 slots compacts it
    assert caches[2][0].get_aggregated_page_indices(0) == [8, 9, 10, 11], caches[2][0].get_aggregated_page_indices(0)
    assert m.resize(1, 8 * S)
    m.check_invariants()
    for kv, t in caches[2:]:
        assert eng.resume(kv)
        eng.verify(kv, t)
        kv.suspend()
    for kv, t in caches[2:]:
        kv.close()
    m.clear_reusable_blocks()
    m.check_invariants()
    m.shutdown()
    print("OK")
    """
)


def test_disk_quota_shrink_compacts_pages(tmp_path: Path) -> None:
    # Run in a child process: the bug crashes the interpreter.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", _COMPACT_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "OK" in r.stdout, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])


def test_disk_quota_grow_and_shrink_without_compaction(tmp_path: Path) -> None:
    h = Harness(disk_config(tmp_path, 4 * SLOT, None, 8 * SLOT))
    a = h.start(toks(120, 4 * TPB))
    a.suspend()
    b = h.start(toks(121, 4 * TPB))
    b.suspend()  # a on disk (slots 0..3), b on level 0
    assert h.m.resize(1, 32 * SLOT)
    assert h.m.get_quota(1) == 32 * SLOT
    assert stats(h.m, 1)[0][0] == 32
    c = h.start(toks(122, 4 * TPB))
    c.suspend()
    h.eng.mark_all_dirty()
    for kv in (a, b, c):
        h.resume_verify(kv)
        kv.suspend()
    h.close(c)
    for kv in (a, b):
        h.resume_verify(kv)
        kv.suspend()
    h.close(a)
    h.close(b)
    h.assert_empty_after_clear()
    # empty disk: any shrink works
    assert h.m.resize(1, 2 * SLOT)
    assert h.m.get_quota(1) == 2 * SLOT
    h.m.shutdown()


def test_every_level_empty_after_close_and_clear_with_disk(tmp_path: Path) -> None:
    h = Harness(disk_config(tmp_path, 4 * SLOT, 4 * SLOT, 16 * SLOT))
    caches = _push_to_disk(h, 3, 130)
    extra = h.start(toks(140, 3 * TPB + 1))
    h.close(extra)
    assert stats(h.m, 2)[0][1] < 16
    for kv in caches:
        h.close(kv)
    h.assert_empty_after_clear()
    h.m.shutdown()
    assert list(tmp_path.iterdir()) == []


def test_eviction_through_small_host_tier(tmp_path: Path) -> None:
    h = Harness(disk_config(tmp_path, 6 * SLOT, 2 * SLOT, 32 * SLOT))
    a = h.start(toks(150, 6 * TPB))
    a.suspend()
    # 6 HELD pages must leave level 0; the host tier (2 slots) can pass them on to the disk
    b = h.start(toks(151, 6 * TPB))
    b.suspend()
    h.resume_verify(a)
    h.close(a)
    h.resume_verify(b)
    h.close(b)
    h.assert_empty_after_clear()
    h.m.shutdown()
