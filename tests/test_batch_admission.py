"""Batch admission, `KVCacheManager.create_kv_caches` (SPEC 3, 4.7).

Every member is matched against one tree state and its matched pages are claimed before any
member allocates or onboards, so a batch never evicts what one of its own members reuses. The
fake engine checks the reused bytes of every admitted member.
"""

from __future__ import annotations

from typing import Any, Sequence

import pytest

from kv_cache_manager_v2 import (
    KVCache,
    KVCacheManager,
    KVCacheManagerConfig,
    KVCacheRequest,
    KVCacheStatsDelta,
    KVCacheStatus,
    ReuseScope,
)

from fake_engine import FakeEngine, Step
from test_tiers import SLOT, TPB, tiered_config, toks


class Bench:
    def __init__(self, cfg: KVCacheManagerConfig) -> None:
        self.m = KVCacheManager(cfg)
        self.eng = FakeEngine(self.m, cfg)

    def prefill(self, tokens: Sequence[int]) -> None:
        """Admits `tokens` one by one (create, resume, resize), writes and commits them, closes."""
        tokens = list(tokens)
        kv = self.m.create_kv_cache(input_tokens=tokens)
        r = kv.num_committed_tokens
        assert self.eng.resume(kv)
        assert kv.resize(len(tokens))
        self.eng.forward([Step(kv, tokens[r:], tokens[:r])])
        kv.commit(tokens[r:])
        kv.close()
        self.eng.forget(kv)

    def sequential(self, tokens: Sequence[int]) -> KVCache | None:
        """The old way: create + resume + resize, one request after another."""
        kv = self.m.create_kv_cache(input_tokens=list(tokens))
        if not self.eng.resume(kv) or not kv.resize(len(tokens)):
            kv.close()
            return None
        return kv

    def finish(self, kv: KVCache, tokens: Sequence[int]) -> None:
        """Verifies the reused prefix byte for byte, writes the rest, commits, closes."""
        tokens = list(tokens)
        r = kv.num_committed_tokens
        assert kv.status == KVCacheStatus.ACTIVE
        self.eng.verify(kv, tokens[:r])
        self.eng.forward([Step(kv, tokens[r:], tokens[:r])])
        kv.commit(tokens[r:])
        self.eng.verify(kv, tokens)
        kv.close()
        self.eng.forget(kv)

    def placement(self) -> Any:
        """Everything that describes where pages are and who has them."""
        st = self.m._ctx.storage
        t = st.pages
        return (
            [list(v) for v in (t.level, t.slot, t.locks, t.holds, t.node, t.listed, t.pinned, t.prev, t.next)],
            list(t.heads),
            list(t.tails),
            [(s.total, s.free, s.evictable) for lv in range(st.num_levels) for s in self.m.get_storage_statistics(lv)],
            self.m.num_open_caches,
        )


def _l0_bench(slots: int, **kw: Any) -> Bench:
    return Bench(tiered_config(slots * SLOT, **kw))


# ---- the case sequential admission gets wrong ---------------------------------------------------
def _lru_setup(b: Bench) -> tuple[list[int], list[int], list[int]]:
    """10 slots: prefix A (4 blocks, least recently released), prefix B (4 blocks), 2 free."""
    a = toks(1, 4 * TPB)
    bb = toks(2, 4 * TPB)
    b.prefill(a)
    b.prefill(bb)
    fresh = toks(3, 6 * TPB)
    return a, bb, fresh


def test_batch_keeps_what_a_later_member_reuses() -> None:
    b = _l0_bench(10)
    a, _, fresh = _lru_setup(b)
    assert b.m.probe_reuse(input_tokens=a) == len(a)
    probes = [b.m.probe_reuse(input_tokens=fresh), b.m.probe_reuse(input_tokens=a)]
    out = b.m.create_kv_caches([KVCacheRequest(fresh), KVCacheRequest(a)])
    assert [kv is not None for kv in out] == [True, True]
    kv0, kv1 = out
    assert kv0 is not None and kv1 is not None
    assert [kv0.num_committed_tokens, kv1.num_committed_tokens] == probes == [0, len(a)]
    assert kv0.capacity == len(fresh) and kv0.history_length == 0
    assert kv1.capacity == kv1.history_length == len(a)
    b.m.check_invariants()
    b.finish(kv1, a)
    b.finish(kv0, fresh)
    b.m.check_invariants()


def test_sequential_admission_evicts_the_later_members_prefix() -> None:
    b = _l0_bench(10)
    a, _, fresh = _lru_setup(b)
    kv0 = b.sequential(fresh)
    assert kv0 is not None
    kv1 = b.sequential(a)
    assert kv1 is not None
    assert kv1.num_committed_tokens == 0  # the fresh allocation evicted A (least recently used)
    kv0.close()
    kv1.close()


def _host_setup(b: Bench) -> tuple[list[int], list[int], list[int]]:
    """L0 4 slots, host 4 slots: A (2 blocks) and C (2 blocks) on host, D (4 blocks) on L0."""
    a = toks(11, 2 * TPB)
    c = toks(12, 2 * TPB)
    d = toks(13, 4 * TPB)
    b.prefill(a)
    b.prefill(c)
    b.prefill(d)
    return a, c, d


def test_batch_onboarding_keeps_other_members_host_pages() -> None:
    b = Bench(tiered_config(4 * SLOT, host=4 * SLOT))
    a, c, _ = _host_setup(b)
    st = b.m.get_storage_statistics(1)[0]
    assert st.free == 0 and st.evictable == 4  # host is full: A and C live there
    probes = [b.m.probe_reuse(input_tokens=c), b.m.probe_reuse(input_tokens=a)]
    assert probes == [len(c), len(a)]
    out = b.m.create_kv_caches([KVCacheRequest(c), KVCacheRequest(a)])
    assert all(kv is not None for kv in out)
    assert [kv.num_committed_tokens for kv in out if kv is not None] == probes
    for kv in out:
        assert kv is not None and kv.is_active
        assert all(i >= 0 for i in kv.get_base_page_indices(0))
    b.m.check_invariants()
    assert out[0] is not None and out[1] is not None
    b.finish(out[0], c)
    b.finish(out[1], a)


def test_sequential_onboarding_pushes_the_other_prefix_off_host() -> None:
    b = Bench(tiered_config(4 * SLOT, host=4 * SLOT))
    a, c, _ = _host_setup(b)
    kv0 = b.sequential(c)
    assert kv0 is not None and kv0.num_committed_tokens == len(c)
    kv1 = b.sequential(a)
    assert kv1 is not None
    assert kv1.num_committed_tokens < len(a)
    kv0.close()
    kv1.close()


# ---- per-member stats ---------------------------------------------------------------------------
def test_per_member_stats() -> None:
    b = _l0_bench(40)
    a = toks(21, 4 * TPB)
    b.prefill(a)
    b.m.get_and_reset_iteration_stats()
    fresh = toks(22, 3 * TPB + 5)
    longer = a + toks(23, 20)
    partial = a[: 2 * TPB + 8]
    reqs = [KVCacheRequest(fresh), KVCacheRequest(longer), KVCacheRequest(partial), KVCacheRequest(a, capacity=len(a) + 3)]
    out = b.m.create_kv_caches(reqs)
    assert all(kv is not None for kv in out)
    got = [kv.commit_pending_stats() for kv in out if kv is not None]
    assert got[0] == KVCacheStatsDelta(4, 4, 0, 4)
    assert got[1] == KVCacheStatsDelta(6, 2, 4, 2)
    assert got[2] == KVCacheStatsDelta(3, 0, 3, 0)  # the copy of the partial block counts as reused
    assert got[3] == KVCacheStatsDelta(5, 1, 4, 0)
    assert [kv.commit_pending_stats() for kv in out if kv is not None] == [KVCacheStatsDelta(0, 0, 0, 0)] * 4
    it = b.m.get_and_reset_iteration_stats()[0]
    assert it.reused_full_blocks == 4 + 2 + 4
    assert it.reused_partial_blocks == 1
    assert it.new_blocks == 4 + 2 + 1
    assert it.missed_blocks == 4 + 2
    for kv, r in zip(out, reqs):
        assert kv is not None
        b.finish(kv, list(r.input_tokens))


def test_shared_partial_source_is_released_after_its_copiers() -> None:
    b = _l0_bench(20)
    a = toks(31, 3 * TPB)
    b.prefill(a)
    p1 = a[: 2 * TPB + 5]
    p2 = a[: 2 * TPB + 9]
    out = b.m.create_kv_caches([KVCacheRequest(p1), KVCacheRequest(p2)])
    assert all(kv is not None for kv in out)
    assert [kv.num_committed_tokens for kv in out if kv is not None] == [len(p1), len(p2)]
    # Both copied block 2; its source is DROPPABLE again (evictable), not held by anyone.
    s = b.m.get_storage_statistics(0)[0]
    assert s.evictable == 1
    b.m.check_invariants()
    for kv, t in zip(out, (p1, p2)):
        assert kv is not None
        b.finish(kv, t)
    # A full matcher in the same batch keeps the source: it is locked by that member.
    out = b.m.create_kv_caches([KVCacheRequest(p1), KVCacheRequest(a)])
    assert all(kv is not None for kv in out)
    assert out[1] is not None and out[1].num_committed_tokens == len(a)
    b.finish(out[1], a)
    assert out[0] is not None
    b.finish(out[0], p1)


# ---- all or nothing, misfits ----------------------------------------------------------------------
def test_member_too_big_gets_none_others_succeed() -> None:
    b = _l0_bench(10)
    a, _, _ = _lru_setup(b)
    small = toks(41, 2 * TPB)
    huge = toks(42, 20 * TPB)
    out = b.m.create_kv_caches([KVCacheRequest(small), KVCacheRequest(huge), KVCacheRequest(a)])
    assert out[1] is None
    assert out[0] is not None and out[2] is not None
    assert out[2].num_committed_tokens == len(a)
    assert b.m.num_open_caches == 2
    b.m.check_invariants()
    b.finish(out[0], small)
    b.finish(out[2], a)
    assert b.m.num_open_caches == 0


def test_all_or_nothing_fails_and_changes_nothing() -> None:
    b = Bench(tiered_config(6 * SLOT, host=4 * SLOT))
    a, c, _ = _host_setup(b)
    b.m.get_and_reset_iteration_stats()
    before = b.placement()
    probes = [b.m.probe_reuse(input_tokens=t) for t in (a, c)]
    out = b.m.create_kv_caches(
        [KVCacheRequest(c), KVCacheRequest(toks(51, 8 * TPB)), KVCacheRequest(a)], all_or_nothing=True
    )
    assert out == [None, None, None]
    assert b.placement() == before
    assert [b.m.probe_reuse(input_tokens=t) for t in (a, c)] == probes
    it = b.m.get_and_reset_iteration_stats()[0]
    assert (it.allocated_blocks, it.reused_full_blocks, it.missed_blocks, it.onboarded_blocks) == (0, 0, 0, 0)


def test_all_or_nothing_succeeds_when_everything_fits() -> None:
    b = Bench(tiered_config(6 * SLOT, host=4 * SLOT))
    a, c, _ = _host_setup(b)
    fresh = toks(52, 2 * TPB)
    out = b.m.create_kv_caches([KVCacheRequest(c), KVCacheRequest(fresh), KVCacheRequest(a)], all_or_nothing=True)
    assert all(kv is not None for kv in out)
    assert [kv.num_committed_tokens for kv in out if kv is not None] == [len(c), 0, len(a)]
    for kv, t in zip(out, (c, fresh, a)):
        assert kv is not None
        b.finish(kv, t)


def test_all_or_nothing_without_tiers() -> None:
    b = _l0_bench(10)
    a, _, fresh = _lru_setup(b)
    before = b.placement()
    out = b.m.create_kv_caches([KVCacheRequest(fresh), KVCacheRequest(toks(53, TPB)), KVCacheRequest(a)], all_or_nothing=True)
    assert out == [None, None, None]
    assert b.placement() == before
    out = b.m.create_kv_caches([KVCacheRequest(fresh), KVCacheRequest(a)], all_or_nothing=True)
    assert out[0] is not None and out[1] is not None
    b.finish(out[1], a)
    b.finish(out[0], fresh)


# ---- options ---------------------------------------------------------------------------------------
def test_resume_gate_does_not_apply() -> None:
    b = Bench(tiered_config(10 * SLOT, max_util_for_resume=0.1))
    a = toks(61, 4 * TPB)
    b.prefill(a)
    hog = b.m.create_kv_caches([KVCacheRequest(toks(62, 4 * TPB))])[0]
    assert hog is not None
    kv = b.m.create_kv_cache(input_tokens=a)
    assert not kv.resume()  # the gate refuses a plain resume
    kv.close()
    out = b.m.create_kv_caches([KVCacheRequest(a, capacity=len(a) + TPB)])
    assert out[0] is not None and out[0].num_committed_tokens == len(a)
    b.finish(out[0], a + toks(63, TPB))
    hog.close()


def test_capacity_history_scope_and_id() -> None:
    b = _l0_bench(20)
    a = toks(71, 2 * TPB)
    b.prefill(a)
    scope = ReuseScope(lora_id=3)
    out = b.m.create_kv_caches(
        [
            KVCacheRequest(a, id="x", capacity=3 * TPB, history_length=2 * TPB + 4),
            KVCacheRequest(a, reuse_scope=scope),
            KVCacheRequest([]),
        ]
    )
    kv0, kv1, kv2 = out
    assert kv0 is not None and kv1 is not None and kv2 is not None
    assert kv0.id == "x" and kv0.capacity == 3 * TPB and kv0.history_length == 2 * TPB + 4
    assert kv0.num_committed_tokens == len(a)
    assert kv1.num_committed_tokens == 0 and kv1.capacity == len(a)
    assert kv2.capacity == 0 and kv2.is_active
    for kv in out:
        assert kv is not None
        kv.close()
    assert b.m.create_kv_caches([]) == []


@pytest.mark.parametrize(
    "reqs, exc, field",
    [
        ([object()], TypeError, "requests[0]"),
        ([KVCacheRequest([1, 2]), KVCacheRequest([1], capacity=-1)], ValueError, "requests[1].capacity"),
        ([KVCacheRequest([1], capacity="3")], TypeError, "requests[0].capacity"),  # type: ignore[arg-type]
        ([KVCacheRequest([1, 2], history_length=-2)], ValueError, "requests[0].history_length"),
        ([KVCacheRequest([1, 2], capacity=1, history_length=2)], ValueError, "requests[0].history_length"),
        ([KVCacheRequest(list(range(TPB)) + [1, 2], capacity=3)], ValueError, "requests[0].capacity"),
        ([KVCacheRequest([1, -5])], ValueError, "input_tokens"),
        ([KVCacheRequest(None)], TypeError, "requests[0].input_tokens"),  # type: ignore[arg-type]
        ([KVCacheRequest([1], reuse_scope=5)], TypeError, "reuse_scope"),
    ],
)
def test_bad_input_changes_nothing(reqs: list[Any], exc: type[Exception], field: str) -> None:
    b = _l0_bench(10)
    b.prefill(list(range(TPB)))
    before = b.placement()
    with pytest.raises(exc, match=field.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        b.m.create_kv_caches(reqs)
    assert b.placement() == before


def test_bad_call_arguments() -> None:
    b = _l0_bench(4)
    with pytest.raises(TypeError, match="all_or_nothing"):
        b.m.create_kv_caches([], all_or_nothing=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="requests"):
        b.m.create_kv_caches(KVCacheRequest([1]))  # type: ignore[arg-type]


def test_two_pool_groups_with_sliding_window() -> None:
    from test_tiers import FULL_SLOT, SWA_SLOT, two_group_layers

    b = Bench(tiered_config(16 * (FULL_SLOT + SWA_SLOT), host=6 * (FULL_SLOT + SWA_SLOT), layers=two_group_layers()))
    a = toks(81, 6 * TPB)
    other = toks(82, 5 * TPB)
    b.prefill(a)
    b.prefill(other)
    fresh = toks(83, 6 * TPB)
    want = a + toks(84, 2 * TPB)
    probes = [b.m.probe_reuse(input_tokens=t) for t in (fresh, want, a[: 3 * TPB + 3])]
    out = b.m.create_kv_caches([KVCacheRequest(fresh), KVCacheRequest(want), KVCacheRequest(a[: 3 * TPB + 3])])
    assert all(kv is not None for kv in out)
    assert [kv.num_committed_tokens for kv in out if kv is not None] == probes
    assert probes[1] == len(a)
    b.m.check_invariants()
    # A member that would need A's claimed pages to fit gets None; A stays whole.
    extra = b.m.create_kv_caches([KVCacheRequest(toks(85, 16 * TPB)), KVCacheRequest(a)])
    assert extra[0] is None and extra[1] is not None and extra[1].num_committed_tokens == len(a)
    b.finish(extra[1], a)
    for kv, t in zip(out, (fresh, want, a[: 3 * TPB + 3])):
        assert kv is not None
        b.finish(kv, t)
