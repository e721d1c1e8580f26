"""Property-based (hypothesis stateful) tests: random create / resume / resize / commit /
suspend / close / stop_committing / clear sequences on small level-0 quotas, with the fake
engine reading back every visible byte at every forward step, a model of every cache's
counters, and the manager's invariant checker after every step (SPEC §9)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from conftest import attention, make_config
from fake_engine import FakeEngine, Step
from kv_cache_manager_v2 import (
    BAD_PAGE_INDEX,
    KVCache,
    KVCacheManager,
    KVCacheManagerConfig,
    KVCacheStatus,
    LogicError,
)

MAX_CACHES = 6
BASE_LEN = 80


def _digest(i: int) -> bytes:
    return bytes([(i * 13 + k) % 256 for k in range(32)])


class CacheModel:
    """What the test expects of one open cache."""

    def __init__(self, kv: KVCache, written: list[Any], pending: list[Any], bufs: list[Any] | None) -> None:
        self.kv = kv
        self.written = written  # tokens whose KV is in the cache (positions [0, len))
        self.pending = pending  # prompt tokens still to prefill
        self.committed = len(written)
        self.capacity = len(written)
        self.history = len(written)
        self.status = KVCacheStatus.SUSPENDED
        self.committing = True
        self.bufs = bufs


class KVCacheMachine(RuleBasedStateMachine):
    """Subclasses set CONFIG_KW (make_config arguments) and MAX_LEN (tokens per sequence)."""

    CONFIG_KW: dict[str, Any] = {}
    MAX_LEN = 192

    def __init__(self) -> None:
        super().__init__()
        self.cfg: KVCacheManagerConfig = make_config(**self.CONFIG_KW)
        self.mgr = KVCacheManager(self.cfg)
        self.eng = FakeEngine(self.mgr, self.cfg)
        self.tpb: int = self.mgr.tokens_per_block
        self.groups = len(self.mgr.layer_grouping)
        self.max_blocks = -(-self.MAX_LEN // self.tpb)
        self.caches: list[CacheModel] = []
        self.fresh = 1_000_000
        self.bases: list[list[Any]] = []
        for b in range(3):
            base: list[Any] = list(range(10_000 * (b + 1), 10_000 * (b + 1) + BASE_LEN))
            if b == 1:
                base[20] = _digest(1)
                base[50] = _digest(2)
            self.bases.append(base)

    # ------------------------------------------------------------------ helpers
    def new_tokens(self, n: int) -> list[Any]:
        out = list(range(self.fresh, self.fresh + n))
        self.fresh += n
        return out

    def pick(self, idx: int, status: KVCacheStatus | None = None, committing: bool | None = None) -> CacheModel | None:
        cands = [
            c
            for c in self.caches
            if (status is None or c.status == status) and (committing is None or c.committing == committing)
        ]
        if not cands:
            return None
        return cands[idx % len(cands)]

    def storage(self) -> list[tuple[int, int, int, int]]:
        return [(s.total, s.free, s.evictable, s.available) for s in self.mgr.get_storage_statistics(0)]

    def snapshot(self, kv: KVCache) -> tuple[Any, ...]:
        return (
            kv.status,
            kv.capacity,
            kv.history_length,
            kv.num_committed_tokens,
            kv.num_blocks,
            [list(kv.get_base_page_indices(g)) for g in range(self.groups)],
        )

    def ensure_active(self, c: CacheModel) -> bool:
        """Resumes a suspended cache (checking that a refused resume changes nothing)."""
        if c.status == KVCacheStatus.ACTIVE:
            return True
        snap, stor = self.snapshot(c.kv), self.storage()
        ok = self.eng.resume(c.kv)
        event(f"resume ok={ok}")
        if not ok:
            assert self.snapshot(c.kv) == snap and self.storage() == stor
            return False
        c.status = KVCacheStatus.ACTIVE
        assert c.kv.is_active
        # Pages stay where they were (only a copy-on-write block gains its private page).
        for g in range(self.groups):
            after = list(c.kv.get_base_page_indices(g))
            assert all(a == b for a, b in zip(after, snap[5][g]) if b != BAD_PAGE_INDEX)
        self.eng.verify(c.kv, list(c.written))
        return True

    def _close(self, c: CacheModel) -> None:
        c.kv.close()
        self.eng.forget(c.kv)
        self.caches.remove(c)

    @initialize()
    def warm_tree(self) -> None:
        """Two prefixes fully committed and released: reuse and eviction from the first rule on."""
        for b in (0, 2):
            kv = self.mgr.create_kv_cache(input_tokens=self.bases[b])
            assert kv.num_committed_tokens == 0 and kv.resume()
            assert kv.resize(capacity=BASE_LEN)
            self.eng.forward([Step(kv, self.bases[b], [])])
            kv.commit(self.bases[b])
            kv.close()
            self.eng.forget(kv)

    # ------------------------------------------------------------------ rules
    @rule(
        base=st.integers(0, 2),
        cut=st.integers(0, BASE_LEN),
        extra=st.integers(0, 40),
        prio=st.booleans(),
        with_buf=st.booleans(),
    )
    def create(self, base: int, cut: int, extra: int, prio: bool, with_buf: bool) -> None:
        self._create(base, cut, extra, prio, with_buf)

    @initialize(
        specs=st.lists(
            st.tuples(st.integers(0, 2), st.integers(0, BASE_LEN), st.integers(0, 40), st.booleans(), st.booleans()),
            min_size=1,
            max_size=4,
        )
    )
    def start_caches(self, specs: list[tuple[int, int, int, bool, bool]]) -> None:
        """A few caches from the start: hypothesis' swarm testing may disable `create`."""
        for spec in specs:
            self._create(*spec)

    def _create(self, base: int, cut: int, extra: int, prio: bool, with_buf: bool) -> CacheModel:
        if len(self.caches) >= MAX_CACHES:
            self._close(self.caches[0])
        prompt = self.bases[base][:cut] + self.new_tokens(extra)
        st_before = self.storage()
        probe = self.mgr.probe_reuse(input_tokens=prompt)
        assert self.storage() == st_before  # probing changes nothing
        cb = (lambda b, g: (b * 37 + g * 11) % 101) if prio else None
        kv = self.mgr.create_kv_cache(input_tokens=prompt, custom_priority_callback=cb)
        assert kv.status is KVCacheStatus.SUSPENDED
        assert kv.num_committed_tokens == kv.capacity == kv.history_length == probe
        assert kv.committed_tokens == prompt[:probe]
        d = kv.commit_pending_stats()
        nb_prompt = -(-len(prompt) // self.tpb)
        assert d.reused_blocks == -(-probe // self.tpb)
        assert d.missed_blocks == nb_prompt - d.reused_blocks
        assert d.alloc_new_blocks == 0
        event("create: reused" if probe else "create: no reuse")
        if probe % self.tpb:
            event("create: partial reuse")
        bufs = None
        if with_buf:
            bufs = [np.full(self.max_blocks + 2, 4242, dtype=np.int32) for _ in range(self.groups)]
            for g, buf in enumerate(bufs):
                kv.set_base_page_index_buf(0, g, buf)
        c = CacheModel(kv, prompt[:probe], prompt[probe:], bufs)
        self.caches.append(c)
        return c

    @rule(idx=st.integers(0, 99))
    def resume(self, idx: int) -> None:
        c = self.pick(idx)
        if c is None:
            return
        if c.status == KVCacheStatus.ACTIVE:
            with pytest.raises(LogicError):
                c.kv.resume()
            return
        self.ensure_active(c)

    def _resize_for_step(self, c: CacheModel, n: int, slack: int) -> bool:
        need = len(c.written) + n
        target = max(min(need + slack, self.MAX_LEN), c.history)
        snap, stor = self.snapshot(c.kv), self.storage()
        ok = c.kv.resize(capacity=target)
        event(f"resize ok={ok}")
        if ok:
            c.capacity = target
            return True
        assert self.snapshot(c.kv) == snap and self.storage() == stor
        return False

    def _next_input(self, c: CacheModel, n: int) -> list[Any]:
        n = min(n, self.MAX_LEN - len(c.written))
        take = c.pending[:n]
        return take + self.new_tokens(n - len(take))

    def _after_forward(self, c: CacheModel, new: list[Any], commit: bool) -> None:
        c.written.extend(new)
        del c.pending[: len(new)]
        if commit and c.committing:
            c.kv.commit(c.written[c.committed :])
            c.committed = len(c.written)
            c.history = max(c.history, c.committed)
        else:
            c.kv.resize(history_length=len(c.written))
            c.history = len(c.written)

    @rule(idx=st.integers(0, 99), n=st.integers(1, 64), slack=st.integers(0, 20), commit=st.booleans())
    def step_again(self, idx: int, n: int, slack: int, commit: bool) -> None:
        """Same as `step` (a second rule doubles how often steps are drawn)."""
        self.step(idx, n, slack, commit)

    @rule(idx=st.integers(0, 99), n=st.integers(1, 64), slack=st.integers(0, 20), commit=st.booleans())
    def step(self, idx: int, n: int, slack: int, commit: bool) -> None:
        c = self.pick(idx)
        if c is None:
            c = self._create(idx % 3, idx % (BASE_LEN + 1), n % 41, False, bool(idx % 2))
        if not self.ensure_active(c):
            return
        new = self._next_input(c, n)
        if not new:
            return
        if not self._resize_for_step(c, len(new), slack):
            return
        self.eng.forward([Step(c.kv, new, list(c.written))])
        self._after_forward(c, new, commit)

    @rule(n=st.integers(1, 20), commit=st.booleans())
    def step_batch(self, n: int, commit: bool) -> None:
        """One forward pass over every active cache that could be resized."""
        batch: list[tuple[CacheModel, list[Any]]] = []
        for c in self.caches:
            if not self.ensure_active(c):
                continue
            new = self._next_input(c, n)
            if new and self._resize_for_step(c, len(new), 0):
                batch.append((c, new))
        if not batch:
            return
        self.eng.forward([Step(c.kv, new, list(c.written)) for c, new in batch])
        for c, new in batch:
            self._after_forward(c, new, commit)

    @rule(idx=st.integers(0, 99), frac=st.floats(0.0, 1.0))
    def commit_pending(self, idx: int, frac: float) -> None:
        c = self.pick(idx)
        if c is None:
            return
        if not c.committing or c.status != KVCacheStatus.ACTIVE:
            with pytest.raises(LogicError):
                c.kv.commit([1])
            return
        if c.committed == len(c.written):
            c.kv.commit([])
            return
        k = max(1, int((len(c.written) - c.committed) * frac))
        c.kv.commit(c.written[c.committed : c.committed + k])
        c.committed += k
        c.history = max(c.history, c.committed)

    @rule(idx=st.integers(0, 99), frac=st.floats(0.0, 1.0))
    def shrink(self, idx: int, frac: float) -> None:
        c = self.pick(idx, KVCacheStatus.ACTIVE)
        if c is None:
            return
        target = c.history + int((c.capacity - c.history) * frac)
        free_before = [s[1] for s in self.storage()]
        assert c.kv.resize(capacity=target)
        c.capacity = target
        assert all(a >= b for a, b in zip([s[1] for s in self.storage()], free_before))
        with pytest.raises(ValueError):
            c.kv.resize(capacity=c.history - 1) if c.history > 0 else c.kv.resize(capacity=-1)

    @rule(idx=st.integers(0, 99))
    def suspend(self, idx: int) -> None:
        c = self.pick(idx)
        if c is None:
            return
        if c.status != KVCacheStatus.ACTIVE:
            with pytest.raises(LogicError):
                c.kv.suspend()
            return
        before = [list(c.kv.get_base_page_indices(g)) for g in range(self.groups)]
        stor = self.storage()
        c.kv.suspend()
        c.status = KVCacheStatus.SUSPENDED
        assert [list(c.kv.get_base_page_indices(g)) for g in range(self.groups)] == before
        assert [s[1] for s in self.storage()] == [s[1] for s in stor]  # held pages stay on level 0
        with pytest.raises(LogicError):
            c.kv.resize(capacity=c.capacity + 1)
        with pytest.raises(LogicError):
            c.kv.suspend()

    @rule(idx=st.integers(0, 99))
    def stop_committing(self, idx: int) -> None:
        c = self.pick(idx)
        if c is None:
            return
        c.kv.stop_committing()
        c.committing = False
        with pytest.raises(LogicError):
            c.kv.commit([1])

    @rule(idx=st.integers(0, 99))
    def close(self, idx: int) -> None:
        c = self.pick(idx)
        if c is None:
            return
        self._close(c)
        assert c.kv.status is KVCacheStatus.CLOSED
        c.kv.close()  # idempotent
        with pytest.raises(LogicError):
            c.kv.resume()
        if c.bufs is not None:
            assert all((b == BAD_PAGE_INDEX).all() for b in c.bufs)
        # What was committed stays reusable until evicted (at most what was committed).
        if c.committed:
            assert self.mgr.probe_reuse(input_tokens=c.written[: c.committed]) <= c.committed

    @rule()
    def clear(self) -> None:
        n = len(self.caches)
        if n:
            stor = self.storage()
            with pytest.raises(LogicError, match=rf"\b{n} KV cache\(s\) still open"):
                self.mgr.clear_reusable_blocks()
            assert self.storage() == stor
        else:
            self.mgr.clear_reusable_blocks()
            for total, free, evictable, available in self.storage():
                assert free == total and evictable == 0 and available == total

    @rule(base=st.integers(0, 2), cut=st.integers(1, BASE_LEN))
    def probe(self, base: int, cut: int) -> None:
        stor = self.storage()
        r = self.mgr.probe_reuse(input_tokens=self.bases[base][:cut])
        assert 0 <= r <= cut
        assert self.storage() == stor

    # ------------------------------------------------------------------ invariants
    @invariant()
    def manager_invariants(self) -> None:
        self.mgr.check_invariants()
        dropped = sum(s.dropped_blocks for s in self.mgr.get_and_reset_iteration_stats().values())
        if dropped:
            event("pages evicted or dropped")

    @invariant()
    def model_matches(self) -> None:
        for c in self.caches:
            kv = c.kv
            assert kv.status == c.status
            assert kv.is_active == (c.status == KVCacheStatus.ACTIVE)
            assert kv.capacity == c.capacity
            assert kv.history_length == c.history == len(c.written)
            assert kv.num_committed_tokens == c.committed
            assert kv.num_committed_tokens <= kv.history_length <= kv.capacity
            assert kv.num_blocks == -(-c.capacity // self.tpb)
            assert kv.committed_tokens == c.written[: c.committed]
            for g in range(self.groups):
                idx = list(kv.get_base_page_indices(g))
                assert len(idx) == kv.num_blocks
                if c.bufs is not None:
                    assert list(c.bufs[g][: len(idx)]) == idx
                    assert (c.bufs[g][len(idx) :] == BAD_PAGE_INDEX).all()
        for total, free, evictable, available in self.storage():
            assert 0 <= free <= total and 0 <= evictable and available == free + evictable <= total

    def teardown(self) -> None:
        for c in list(self.caches):
            c.kv.close()
            self.eng.forget(c.kv)
        self.caches.clear()
        self.mgr.check_invariants()
        self.mgr.clear_reusable_blocks()
        for total, free, evictable, available in self.storage():
            assert free == total and evictable == 0
        self.mgr.check_invariants()
        self.mgr.shutdown()


SETTINGS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class SwaSinkMachine(KVCacheMachine):
    """Full attention + SWA (window 48, 8 sink tokens) sharing one pool group; 22 slots."""

    CONFIG_KW = {
        "layers": [attention(0), attention(1, window=48, sinks=8)],
        "quota": 22 * 2048,
        "tokens_per_block": 16,
    }


class TwoPoolGroupMachine(KVCacheMachine):
    """Full attention (512-byte buffers) + SWA window 32 (1024-byte buffers): two pool groups."""

    CONFIG_KW = {
        "layers": [attention(0), attention(1, size=1024, window=32), attention(2)],
        "quota": 16 * 4096,
        "tokens_per_block": 16,
        "max_util_for_resume": 0.9,
    }


class FullNoPartialMachine(KVCacheMachine):
    """One full-attention group, tpb 8, partial reuse off, a low resume gate."""

    CONFIG_KW = {
        "layers": [attention(0, size=256), attention(1, size=256)],
        "quota": 22 * 1024,
        "tokens_per_block": 8,
        "enable_partial_reuse": False,
        "max_util_for_resume": 0.7,
    }
    MAX_LEN = 120


TestSwaSink = SwaSinkMachine.TestCase
TestSwaSink.settings = SETTINGS
TestTwoPoolGroups = TwoPoolGroupMachine.TestCase
TestTwoPoolGroups.settings = SETTINGS
TestFullNoPartial = FullNoPartialMachine.TestCase
TestFullNoPartial.settings = SETTINGS
