"""The reuse tree (SPEC §4.3, §4.6): SHA-256 chain keys, matching rules (full, partial, backoff,
SWA-aware cut), identical commits, committed partial tails, copy-on-write of partial matches,
probe_reuse, pruning after eviction and the eviction order. Bytes are checked with the fake
engine wherever a test is about data."""

from __future__ import annotations

import hashlib
import random
from typing import Any, Callable, Sequence

import pytest

from kv_cache_manager_v2 import (
    KVCache,
    KVCacheManager,
    KVCacheManagerConfig,
    KVCacheStatus,
    ReuseScope,
)
from kv_cache_manager_v2._block_radix_tree import scope_digest

from conftest import attention, make_config
from fake_engine import FakeEngine, Step

TPB = 16
KiB = 1 << 10
MakeManager = Callable[..., KVCacheManager]
Tok = Any


# ----------------------------------------------------------------------------- helpers
def _manager(**kwargs: Any) -> tuple[KVCacheManager, KVCacheManagerConfig]:
    cfg = make_config(**kwargs)
    return KVCacheManager(cfg), cfg


def _prefill(
    m: KVCacheManager,
    tokens: Sequence[Tok],
    scope: ReuseScope | None = None,
    eng: FakeEngine | None = None,
    cb: Callable[[int, int], int] | None = None,
    close: bool = True,
) -> KVCache:
    """Admission the way an engine does it: create (reuse), resume, resize, write, commit."""
    tokens = list(tokens)
    kv = m.create_kv_cache(scope, tokens, custom_priority_callback=cb)
    r = kv.num_committed_tokens
    assert kv.resume()
    assert kv.resize(capacity=len(tokens))
    if eng is not None:
        eng.forward([Step(kv, tokens[r:], tokens[:r])])
    kv.commit(tokens[r:])
    if close:
        kv.close()
        if eng is not None:
            eng.forget(kv)
    return kv


def _pack(tokens: Sequence[Tok]) -> bytes:
    return b"".join(t.to_bytes(4, "little") if isinstance(t, int) else bytes(t) for t in tokens)


def _root_digest(scope: ReuseScope | None) -> bytes:
    lora = -1 if scope is None or scope.lora_id is None else scope.lora_id
    salt = -1 if scope is None or scope.salt is None else scope.salt
    return hashlib.sha256(
        b"kv_cache_manager_v2/ReuseScope/v1" + lora.to_bytes(8, "little", signed=True)
        + salt.to_bytes(8, "little", signed=True)
    ).digest()


def _chain(scope: ReuseScope | None, tokens: Sequence[Tok], tpb: int = TPB) -> dict[tuple[Any, ...], bytes]:
    """prefix tokens of each block (full blocks, then a trailing partial one) -> its chain key."""
    out: dict[tuple[Any, ...], bytes] = {}
    prev = _root_digest(scope)
    for beg in range(0, len(tokens), tpb):
        block = list(tokens[beg:beg + tpb])
        prev = hashlib.sha256(prev + _pack(block)).digest()
        out[tuple(tokens[:beg + len(block)])] = prev
    return out


def _scope_key(scope: ReuseScope | None) -> tuple[int, int]:
    if scope is None:
        return (-1, -1)
    return (-1 if scope.lora_id is None else scope.lora_id, -1 if scope.salt is None else scope.salt)


def _node_prefix(tree: Any, node: Any) -> tuple[tuple[int, int], tuple[Any, ...]]:
    parts: list[list[Any]] = []
    n = node
    while n.parent is not None:
        parts.append(list(tree.tokens_of(n)))
        n = n.parent
    root = n
    key = next(k for k, r in tree.roots.items() if r is root)
    toks: list[Any] = []
    for p in reversed(parts):
        toks.extend(p)
    return key, tuple(toks)


def _num_block_nodes(m: KVCacheManager) -> int:
    return sum(1 for n in m._ctx.tree.live_nodes() if n.parent is not None)


def _ints(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1 << 32) for _ in range(n)]


def _digest(i: int) -> bytes:
    return hashlib.sha256(b"mm-item-%d" % i).digest()


def _stats(m: KVCacheManager) -> list[tuple[int, int, int]]:
    return [(s.total, s.free, s.evictable) for s in m.get_storage_statistics(0)]


# ----------------------------------------------------------------------------- SHA-256 chain
def test_scope_digest_is_sha256_of_scope() -> None:
    for scope in (None, ReuseScope(), ReuseScope(lora_id=1), ReuseScope(salt=1), ReuseScope(lora_id=1, salt=2),
                  ReuseScope(lora_id=0), ReuseScope(salt=0), ReuseScope(lora_id=2**62, salt=2**63 - 1)):
        lora, salt = _scope_key(scope)
        assert scope_digest(lora, salt) == _root_digest(scope)
    digests = {scope_digest(*_scope_key(s)) for s in (None, ReuseScope(lora_id=1), ReuseScope(salt=1),
                                                       ReuseScope(lora_id=1, salt=1), ReuseScope(lora_id=0),
                                                       ReuseScope(salt=0), ReuseScope(lora_id=0, salt=0))}
    assert len(digests) == 7


def test_sha256_chain_keys_match_independent_chain() -> None:
    m, _ = _manager(quota=1 << 20)
    tree = m._ctx.tree
    common = _ints(32, 1)
    committed: list[tuple[ReuseScope | None, list[Tok]]] = [
        (None, common + _ints(20, 2)),  # tail of 4 tokens published at close
        (None, common + _ints(16, 3)),  # sibling of the previous one's block 2
        (None, [0, (1 << 32) - 1, 1 << 31, (1 << 31) - 1] * 4 + [2**32 - 2] * 3),
        (ReuseScope(lora_id=1), common + _ints(16, 2)),
        (ReuseScope(salt=7), common),
        (ReuseScope(lora_id=1, salt=7), common + [5]),
        (None, [_digest(1)] + _ints(15, 4) + _ints(5, 5) + [_digest(2)] + _ints(10, 6) + [_digest(3)]),
        (ReuseScope(salt=9), [_digest(4)] * 16 + [_digest(5), 3]),
        # reuses the mixed prompt (2 full blocks + its 1-token tail, copied) and extends it
        (None, [_digest(1)] + _ints(15, 4) + _ints(5, 5) + [_digest(2)] + _ints(10, 6) + [_digest(3)] + _ints(20, 60) + [_digest(6)] + _ints(3, 61)),
        # reuses a prefix of the first prompt, partial match inside block 1
        (None, common[:20] + _ints(30, 62)),
    ]
    expected: dict[tuple[tuple[int, int], tuple[Any, ...]], bytes] = {}
    for scope, toks in committed:
        kv = _prefill(m, toks, scope, close=False)
        assert kv.committed_tokens == toks
        kv.close()
        for prefix, key in _chain(scope, toks).items():
            expected[(_scope_key(scope), prefix)] = key
    nodes = [n for n in tree.live_nodes() if n.parent is not None]
    found: dict[tuple[tuple[int, int], tuple[Any, ...]], bytes] = {}
    for n in nodes:
        found[_node_prefix(tree, n)] = tree.block_sha256(n)
    assert found == expected
    # asking twice gives the same key; the roots carry the scope digests
    for n in nodes:
        assert tree.block_sha256(n) == found[_node_prefix(tree, n)]
    for key, root in tree.roots.items():
        assert tree.block_sha256(root) == scope_digest(*key)
    assert len(nodes) == len(expected)


def test_sha256_keys_of_a_new_manager_computed_bottom_up() -> None:
    # asking a deep node first (nothing computed yet) must give the same chain
    m, _ = _manager(quota=1 << 20)
    toks = _ints(16 * 6 + 3, 21)
    _prefill(m, toks)
    tree = m._ctx.tree
    deepest = max((n for n in tree.live_nodes() if n.parent is not None), key=lambda n: n.ordinal)
    exp = _chain(None, toks)
    assert tree.block_sha256(deepest) == exp[tuple(toks)]
    for n in tree.live_nodes():
        if n.parent is not None:
            assert tree.block_sha256(n) == exp[_node_prefix(tree, n)[1]]


# ----------------------------------------------------------------------------- scopes
def test_different_scopes_never_share(make_manager: MakeManager) -> None:
    m = make_manager()
    toks = _ints(40, 7)
    scopes = [None, ReuseScope(lora_id=1), ReuseScope(salt=1), ReuseScope(lora_id=1, salt=1), ReuseScope(lora_id=2)]
    _prefill(m, toks, ReuseScope(lora_id=1))
    for s in scopes:
        want = 40 if s == ReuseScope(lora_id=1) else 0
        assert m.probe_reuse(s, toks) == want, s
        kv = m.create_kv_cache(s, toks)
        assert kv.num_committed_tokens == want
        kv.close()
    # the same scope value in a new object matches
    assert m.probe_reuse(ReuseScope(lora_id=1, salt=None), toks) == 40
    # ReuseScope() and None are the same namespace
    _prefill(m, toks, None)
    assert m.probe_reuse(ReuseScope(), toks) == 40
    assert m.probe_reuse(ReuseScope(salt=1), toks) == 0


# ----------------------------------------------------------------------------- matching
def test_full_match_and_created_cache_counters(make_manager: MakeManager) -> None:
    m = make_manager()
    toks = _ints(64, 8)
    _prefill(m, toks)
    assert m.probe_reuse(None, toks) == 64
    assert m.probe_reuse(None, toks + _ints(10, 9)) == 64
    assert m.probe_reuse(None, toks[:48]) == 48
    assert m.probe_reuse(None, []) == 0
    assert m.probe_reuse(None, None) == 0
    kv = m.create_kv_cache(None, toks + [1, 2, 3])
    assert kv.status is KVCacheStatus.SUSPENDED
    assert kv.num_committed_tokens == kv.capacity == kv.history_length == 64
    assert kv.committed_tokens == toks
    assert kv.num_blocks == 4
    kv.close()


def test_partial_match_longest_common_prefix(make_manager: MakeManager) -> None:
    m = make_manager()
    p = _ints(16, 10)
    x = p + list(range(100, 116))
    y = p + [100, 101, 102, 103, 104, 105, 900, 901] + list(range(200, 208))
    _prefill(m, x)
    _prefill(m, y)
    assert _num_block_nodes(m) == 3
    # longest common prefix with x is 7, with y 6
    assert m.probe_reuse(None, p + [100, 101, 102, 103, 104, 105, 106, 5, 5]) == 16 + 7
    # y wins with 8
    assert m.probe_reuse(None, p + [100, 101, 102, 103, 104, 105, 900, 901, 1]) == 16 + 8
    # query shorter than a block, inside the block
    assert m.probe_reuse(None, p + [100, 101, 102]) == 16 + 3
    # a query that ends before any miss inside a full block: all its tokens
    assert m.probe_reuse(None, x[:29]) == 29
    # first token matches no child: no partial match
    assert m.probe_reuse(None, p + [7, 100, 101]) == 16
    # partial match in the first block
    assert m.probe_reuse(None, p[:5] + [0, 0]) == 5
    assert m.probe_reuse(None, [p[0] ^ 1] + p[1:]) == 0
    # the created cache holds the partially matched block
    kv = m.create_kv_cache(None, p + [100, 101, 102, 103, 104, 105, 106, 5, 5])
    assert kv.num_committed_tokens == kv.capacity == kv.history_length == 23
    assert kv.num_blocks == 2
    assert kv.committed_tokens == p + [100, 101, 102, 103, 104, 105, 106]
    kv.close()


def test_partial_match_tie_takes_oldest() -> None:
    m, cfg = _manager(quota=1 << 20)
    eng = FakeEngine(m, cfg)
    p = _ints(16, 11)
    older = p + [1, 2, 3, 4] + list(range(500, 512))
    newer = p + [1, 2, 3, 4] + list(range(700, 712))
    _prefill(m, older, eng=eng)
    _prefill(m, newer, eng=eng)
    query = p + [1, 2, 3, 4, 99, 98]
    match, _ = m._ctx.tree.match(None, query)
    assert match.length == 20
    older_node = match.nodes[-1]
    assert list(m._ctx.tree.tokens_of(older_node)) == older[16:]
    # the bytes copied into the new cache's private page come from the older donor
    kv = m.create_kv_cache(None, query)
    assert kv.num_committed_tokens == 20
    assert kv.resume()
    lg = 0
    slot = int(kv.get_base_page_indices(lg)[1])
    assert slot >= 0
    import ctypes

    base = m.get_mem_pool_base_address(0, "k", None)
    stride = m.get_page_stride(0, "k")
    conv = m.get_page_index_converter(0, "k")
    page = conv([slot])[0]
    tok_bytes = stride // TPB
    beyond = [ctypes.c_uint32.from_address(base + page * stride + j * tok_bytes).value for j in range(4, 16)]
    assert beyond == list(range(500, 512))
    # and the reversed creation order picks the other one
    kv.close()
    m2, cfg2 = _manager(quota=1 << 20)
    _prefill(m2, newer)
    _prefill(m2, older)
    match2, _ = m2._ctx.tree.match(None, query)
    assert list(m2._ctx.tree.tokens_of(match2.nodes[-1])) == newer[16:]


def test_partial_reuse_disabled_rounds_down(make_manager: MakeManager) -> None:
    m = make_manager(enable_partial_reuse=False)
    toks = _ints(40, 12)  # two full blocks and a tail of 8 (published at close)
    _prefill(m, toks)
    assert m.probe_reuse(None, toks) == 32
    assert m.probe_reuse(None, toks[:36]) == 32
    assert m.probe_reuse(None, toks[:20] + [1, 2]) == 16
    assert m.probe_reuse(None, toks[:31]) == 16
    assert m.probe_reuse(None, toks[:15]) == 0
    kv = m.create_kv_cache(None, toks[:36])
    assert kv.num_committed_tokens == 32
    kv.close()


@pytest.mark.parametrize("partial", [True, False])
def test_reuse_match_backoff(make_manager: MakeManager, partial: bool) -> None:
    m = make_manager(reuse_match_backoff=3, enable_partial_reuse=partial)
    toks = _ints(48, 13)
    _prefill(m, toks)

    def want(n: int) -> int:
        n = max(0, n - 3)
        return n if partial else n // TPB * TPB

    assert m.probe_reuse(None, toks) == want(48)
    assert m.probe_reuse(None, toks + [1]) == want(48)
    assert m.probe_reuse(None, toks[:40] + [1]) == (want(40) if partial else want(32))
    assert m.probe_reuse(None, toks[:2]) == 0
    assert m.probe_reuse(None, toks[:3]) == 0
    assert m.probe_reuse(None, toks[:4]) == (1 if partial else 0)
    kv = m.create_kv_cache(None, toks)
    assert kv.num_committed_tokens == want(48)
    kv.close()


def test_backoff_larger_than_match(make_manager: MakeManager) -> None:
    m = make_manager(reuse_match_backoff=100)
    toks = _ints(48, 14)
    _prefill(m, toks)
    assert m.probe_reuse(None, toks) == 0


@pytest.mark.parametrize("sinks", [None, 16])
def test_swa_cut_stale_blocks_without_pages(make_manager: MakeManager, sinks: int | None) -> None:
    """A windowed group only needs its sink and window blocks: a prompt imported with
    resize(L, L) has no SWA page on its stale blocks, and matches are cut to lengths the SWA
    group can serve."""
    m = make_manager(layers=[attention(0), attention(1, window=32, sinks=sinks)])
    toks = _ints(128, 15)
    kv = m.create_kv_cache()
    assert kv.resume()
    assert kv.resize(capacity=128, history_length=128)
    swa = list(kv.get_base_page_indices(1))
    stale_beg = 1 if sinks else 0
    assert swa[stale_beg:6] == [-1] * (6 - stale_beg) and min(swa[6:]) >= 0
    kv.commit(toks)
    kv.close()
    assert m.probe_reuse(None, toks) == 128
    assert m.probe_reuse(None, toks + _ints(12, 16)) == 128
    # at 64 tokens the window is blocks 2-3, whose SWA pages were never allocated
    assert m.probe_reuse(None, toks[:64]) == (16 if sinks else 0)
    assert m.probe_reuse(None, toks[:120]) == (16 if sinks else 0)
    assert m.probe_reuse(None, toks[:16]) == (16 if sinks else 0)
    kv2 = m.create_kv_cache(None, toks[:64])
    assert kv2.num_committed_tokens == (16 if sinks else 0)
    kv2.close()
    # at 127 and 128 tokens the window (and sink) blocks have pages
    assert m.probe_reuse(None, toks[:127]) == 127
    kv3 = m.create_kv_cache(None, toks)
    assert kv3.num_committed_tokens == 128
    assert list(kv3.get_base_page_indices(1))[stale_beg:6] == [-1] * (6 - stale_beg)
    kv3.close()


def test_swa_cut_after_swa_pages_evicted() -> None:
    """Stale SWA pages released during commit are the first evicted; the full group keeps its
    pages, so long matches survive but short ones (whose window needs those blocks) are cut."""
    m, cfg = _manager(layers=[attention(0), attention(1, window=32)], quota=12 * KiB)
    stats = m.get_storage_statistics(0)
    assert len(stats) == 1 and stats[0].total == 12
    eng = FakeEngine(m, cfg)
    a = _ints(64, 17)
    _prefill(m, a, eng=eng)
    assert _stats(m) == [(12, 4, 8)]
    assert m.probe_reuse(None, a) == 64
    assert m.probe_reuse(None, a[:32]) == 32
    b = m.create_kv_cache(None, _ints(48, 18))
    assert b.resume() and b.resize(capacity=48)  # 6 slots: evicts the 2 stale SWA pages of `a`
    assert _stats(m) == [(12, 0, 6)]
    assert m.probe_reuse(None, a) == 64
    assert m.probe_reuse(None, a[:32]) == 0
    assert m.probe_reuse(None, a[:48]) == 0  # window at 48 tokens: blocks 1-2, block 1 is gone
    assert m.probe_reuse(None, a[:63]) == 63  # window at 63 tokens: blocks 2-3
    kv = m.create_kv_cache(None, a[:63])
    assert kv.num_committed_tokens == 63
    assert list(kv.get_base_page_indices(1))[:2] == [-1, -1]
    kv.close()
    b.close()


def test_identical_commits_stored_once(make_manager: MakeManager) -> None:
    m = make_manager(layers=[attention(0), attention(1, window=32)], quota=64 * 2 * KiB)
    total = m.get_storage_statistics(0)[0].total
    toks = _ints(64, 19)
    a = m.create_kv_cache()
    b = m.create_kv_cache()
    for kv in (a, b):
        assert kv.resume() and kv.resize(capacity=64)
    a.commit(toks[:40])
    b.commit(toks[:40])
    b.commit(toks[40:])
    a.commit(toks[40:])
    assert a.committed_tokens == b.committed_tokens == toks
    assert a.num_committed_tokens == b.num_committed_tokens == 64
    assert _num_block_nodes(m) == 4
    a.close()
    b.close()
    assert _num_block_nodes(m) == 4
    # one copy kept: 4 full-attention pages + 2 in-window SWA pages + 2 stale SWA pages
    st = m.get_storage_statistics(0)[0]
    assert st.evictable == 8 and st.free == total - 8
    assert m.probe_reuse(None, toks) == 64
    c = m.create_kv_cache(None, toks)
    assert c.num_committed_tokens == 64
    c.close()


def test_identical_commits_bytes_kept(make_manager: MakeManager) -> None:
    m, cfg = _manager(quota=1 << 20)
    eng = FakeEngine(m, cfg)
    toks = _ints(50, 20)
    a = m.create_kv_cache()
    b = m.create_kv_cache()
    for kv in (a, b):
        assert kv.resume() and kv.resize(capacity=50)
    eng.forward([Step(a, toks, []), Step(b, toks, [])])
    a.commit(toks)
    b.commit(toks)
    a.close()
    eng.forget(a)
    eng.verify(b, toks)
    b.close()
    eng.forget(b)
    assert _num_block_nodes(m) == 4  # 3 blocks + the tail
    c = _prefill(m, toks, close=False)
    assert c.num_committed_tokens == 50
    eng.verify(c, toks)
    c.close()


# ----------------------------------------------------------------------------- partial tails
def test_stop_committing_publishes_partial_tail(make_manager: MakeManager) -> None:
    m = make_manager()
    toks = _ints(40, 22)
    kv = _prefill(m, toks, close=False)
    assert m.probe_reuse(None, toks) == 32
    kv.stop_committing()
    assert m.probe_reuse(None, toks) == 40
    assert m.probe_reuse(None, toks[:37]) == 37
    assert m.probe_reuse(None, toks + [1, 2]) == 40
    kv.stop_committing()  # idempotent
    assert _num_block_nodes(m) == 3
    kv.close()
    assert _num_block_nodes(m) == 3
    assert m.probe_reuse(None, toks) == 40


def test_close_publishes_partial_tail_and_bytes_reused() -> None:
    m, cfg = _manager(quota=1 << 20)
    eng = FakeEngine(m, cfg)
    toks = _ints(45, 23)
    _prefill(m, toks, eng=eng)
    assert m.probe_reuse(None, toks) == 45
    ext = toks + _ints(20, 24)
    kv = m.create_kv_cache(None, ext)
    assert kv.num_committed_tokens == 45
    assert kv.resume() and kv.resize(capacity=len(ext))
    eng.forward([Step(kv, ext[45:], ext[:45])])  # verifies the reused 45 tokens first
    kv.commit(ext[45:])
    eng.verify(kv, ext)
    kv.close()
    eng.forget(kv)
    # the original tail is still there, intact
    kv2 = _prefill(m, toks, close=False)
    assert kv2.num_committed_tokens == 45
    eng.verify(kv2, toks)
    kv2.close()


# ----------------------------------------------------------------------------- copy-on-write
@pytest.mark.parametrize("donor_active", [True, False])
def test_copy_on_write_donor_bytes_never_change(donor_active: bool) -> None:
    m, cfg = _manager(layers=[attention(0), attention(1), attention(2, window=64)], quota=1 << 20)
    eng = FakeEngine(m, cfg)
    a_toks = _ints(48, 25)
    a = _prefill(m, a_toks, eng=eng, close=not donor_active)
    b_toks = a_toks[:40] + _ints(20, 26)
    b = m.create_kv_cache(None, b_toks)
    assert b.num_committed_tokens == 40
    assert b.resume()
    assert b.resize(capacity=len(b_toks))
    if donor_active:
        for lg in range(2):
            ai = list(a.get_base_page_indices(lg))
            bi = list(b.get_base_page_indices(lg))
            assert ai[:2] == bi[:2]  # full blocks shared
            assert ai[2] != bi[2]  # the partially reused block got a private copy
    eng.forward([Step(b, b_toks[40:], b_toks[:40])])  # checks the copied 40 tokens, writes the rest
    b.commit(b_toks[40:])
    eng.verify(b, b_toks)
    if donor_active:
        eng.verify(a, a_toks)  # donor untouched
        a.close()
        eng.forget(a)
    b.close()
    eng.forget(b)
    for toks in (a_toks, b_toks):
        kv = _prefill(m, toks, close=False)
        assert kv.num_committed_tokens == len(toks)
        eng.verify(kv, toks)
        kv.close()
        eng.forget(kv)


def test_copy_on_write_two_copiers_of_one_donor() -> None:
    m, cfg = _manager(quota=1 << 20)
    eng = FakeEngine(m, cfg)
    a_toks = _ints(40, 27)
    _prefill(m, a_toks, eng=eng)
    b_toks = a_toks[:20] + _ints(10, 28)
    c_toks = a_toks[:20] + _ints(12, 29)
    b = m.create_kv_cache(None, b_toks)
    c = m.create_kv_cache(None, c_toks)
    assert b.num_committed_tokens == c.num_committed_tokens == 20
    for kv, toks in ((b, b_toks), (c, c_toks)):
        assert kv.resume() and kv.resize(capacity=len(toks))
    eng.forward([Step(b, b_toks[20:], b_toks[:20]), Step(c, c_toks[20:], c_toks[:20])])
    eng.verify(b, b_toks)
    eng.verify(c, c_toks)
    b.close()
    c.close()
    kv = _prefill(m, a_toks, close=False)
    assert kv.num_committed_tokens == 40
    eng.verify(kv, a_toks)
    kv.close()


# ----------------------------------------------------------------------------- probe == create
@pytest.mark.parametrize("partial,backoff", [(True, 0), (False, 0), (True, 5), (False, 17)])
def test_probe_reuse_equals_create(partial: bool, backoff: int) -> None:
    m, _ = _manager(layers=[attention(0), attention(1, window=48, sinks=8)], quota=1 << 20,
                    enable_partial_reuse=partial, reuse_match_backoff=backoff)
    rng = random.Random(30)
    trunk = _ints(64, 31)
    prompts: list[list[Tok]] = []
    for i in range(8):
        cut = rng.randrange(0, 64)
        p = trunk[:cut] + _ints(rng.randrange(1, 60), 40 + i)
        if i % 3 == 0:
            p.insert(rng.randrange(len(p)), _digest(i))
        prompts.append(p)
        _prefill(m, p)
    for i in range(60):
        src = rng.choice(prompts)
        q = src[: rng.randrange(0, len(src) + 1)] + _ints(rng.randrange(0, 20), 1000 + i)
        probe = m.probe_reuse(None, q)
        kv = m.create_kv_cache(None, q)
        assert kv.num_committed_tokens == probe, (i, len(q))
        assert kv.committed_tokens == q[:probe]
        assert kv.capacity == kv.history_length == probe
        if not partial:
            assert probe % TPB == 0
        assert m.probe_reuse(None, q) == probe  # creating did not change the tree's answer
        kv.close()


def test_probe_reuse_changes_nothing(make_manager: MakeManager) -> None:
    m = make_manager()
    toks = _ints(50, 32)
    _prefill(m, toks)
    before = (_stats(m), _num_block_nodes(m))
    m.get_and_reset_iteration_stats()
    for n in range(0, 60, 3):
        m.probe_reuse(None, toks[:n] + [1, 2, 3])
    assert (_stats(m), _num_block_nodes(m)) == before
    st = m.get_and_reset_iteration_stats()[0]
    assert st.allocated_blocks == st.reused_blocks == st.missed_blocks == 0


# ----------------------------------------------------------------------------- eviction and pruning
def _tiny(slots: int, **kwargs: Any) -> tuple[KVCacheManager, KVCacheManagerConfig]:
    # one full-attention layer, K+V of 512 bytes: 1 KiB per slot
    kwargs.setdefault("max_util_for_resume", 1.0)
    m, cfg = _manager(layers=[attention(0)], quota=slots * KiB, **kwargs)
    assert m.get_storage_statistics(0)[0].total == slots
    return m, cfg


def test_eviction_of_full_attention_page_prunes_subtree() -> None:
    m, cfg = _tiny(8)
    eng = FakeEngine(m, cfg)
    prio = {0: 50, 1: 10, 2: 50, 3: 50}
    a = _ints(64, 33)
    _prefill(m, a, eng=eng, cb=lambda b, lg: prio[b])
    assert _stats(m) == [(8, 4, 4)]
    assert m.probe_reuse(None, a) == 64
    assert _num_block_nodes(m) == 4
    m.get_and_reset_iteration_stats()
    b = m.create_kv_cache(None, _ints(80, 34))
    assert b.resume() and b.resize(capacity=80)  # needs 5: evicts block 1 (lowest priority)
    # block 1's page is gone: blocks 2-3 can never match again and are pruned (pages dropped)
    assert m.probe_reuse(None, a) == 16
    assert _num_block_nodes(m) == 1
    assert _stats(m) == [(8, 2, 1)]
    assert m.get_and_reset_iteration_stats()[0].dropped_blocks == 3
    m.check_invariants()
    # what is left still holds the right bytes
    b.close()
    eng.forget(b)
    kv = m.create_kv_cache(None, a)
    assert kv.num_committed_tokens == 16
    assert kv.resume() and kv.resize(capacity=64)
    eng.forward([Step(kv, a[16:], a[:16])])
    kv.commit(a[16:])
    eng.verify(kv, a)
    kv.close()
    assert m.probe_reuse(None, a) == 64


def test_eviction_leaf_first_keeps_prefix() -> None:
    m, _ = _tiny(8)
    a = _ints(64, 35)
    _prefill(m, a, cb=lambda b, lg: 50 - b)  # the deepest block has the lowest priority
    b = m.create_kv_cache(None, _ints(80, 36))
    assert b.resume() and b.resize(capacity=80)
    assert m.probe_reuse(None, a) == 48
    assert _num_block_nodes(m) == 3
    assert b.resize(capacity=96)  # evicts block 2
    assert m.probe_reuse(None, a) == 32
    assert b.resize(capacity=128)  # evicts blocks 1 and 0
    assert m.probe_reuse(None, a) == 0
    assert _num_block_nodes(m) == 0
    assert not b.resize(capacity=144)  # nothing left to evict: no change
    assert b.capacity == 128
    b.close()


def test_locked_pages_never_evicted() -> None:
    m, _ = _tiny(8)
    a = _ints(64, 37)
    holder = _prefill(m, a, close=False)  # ACTIVE: its 4 pages are LOCKED
    assert _stats(m) == [(8, 4, 0)]
    b = m.create_kv_cache()
    assert b.resume()
    assert not b.resize(capacity=80)  # 5 needed, only 4 available
    assert b.resize(capacity=64)
    assert m.probe_reuse(None, a) == 64
    holder.suspend()  # HELD pages are not evictable with a single level either
    c = m.create_kv_cache()
    assert c.resume()
    assert not c.resize(capacity=16)
    assert m.probe_reuse(None, a) == 64
    for kv in (holder, b, c):
        kv.close()


@pytest.mark.parametrize("order", ["ab", "ba"])
def test_eviction_least_recently_released_first(order: str) -> None:
    m, _ = _tiny(8)
    toks = {"a": _ints(64, 38), "b": _ints(64, 39)}
    kvs = {k: _prefill(m, v, close=False) for k, v in toks.items()}
    for k in order:
        kvs[k].close()
    assert _stats(m) == [(8, 0, 8)]
    c = m.create_kv_cache()
    assert c.resume() and c.resize(capacity=16)
    first, second = order[0], order[1]
    # close() releases tail first, so the first-closed chain loses its last block only
    assert m.probe_reuse(None, toks[first]) == 48
    assert m.probe_reuse(None, toks[second]) == 64
    c.close()


def test_eviction_reuse_refreshes_recency() -> None:
    m, _ = _tiny(8)
    a, b = _ints(64, 40), _ints(64, 41)
    _prefill(m, a)
    _prefill(m, b)
    kv = m.create_kv_cache(None, a)  # holds a's pages; released again afterwards
    assert kv.num_committed_tokens == 64
    kv.close()
    c = m.create_kv_cache()
    assert c.resume() and c.resize(capacity=16)
    assert m.probe_reuse(None, a) == 64
    assert m.probe_reuse(None, b) == 48  # b's tail block (least recently released) went
    c.close()


def test_eviction_lowest_priority_first() -> None:
    m, _ = _tiny(8)
    a, b = _ints(64, 42), _ints(64, 43)
    _prefill(m, a, cb=lambda blk, lg: 80)  # released first, but high priority
    _prefill(m, b, cb=lambda blk, lg: 20)
    c = m.create_kv_cache()
    assert c.resume() and c.resize(capacity=16)
    assert m.probe_reuse(None, a) == 64
    assert m.probe_reuse(None, b) == 48  # the low-priority chain loses its tail block
    c.close()


def test_priority_callback_arguments_and_range() -> None:
    m, _ = _manager(layers=[attention(0), attention(1, window=32)], quota=1 << 20)
    calls: list[tuple[int, int]] = []

    def cb(block: int, lg: int) -> int:
        calls.append((block, lg))
        return 35

    _prefill(m, _ints(40, 44), cb=cb)
    assert sorted(set(calls)) == [(b, lg) for b in range(3) for lg in range(2)]
    bad = m.create_kv_cache(custom_priority_callback=lambda b, lg: 101)
    assert bad.resume()
    before = _stats(m)
    with pytest.raises(ValueError):
        bad.resize(capacity=16)
    assert _stats(m) == before
    assert bad.capacity == 0
    bad.close()


# ----------------------------------------------------------------------------- mixed tokens
def test_mixed_tokens_match_and_bytes() -> None:
    m, cfg = _manager(quota=1 << 20)
    eng = FakeEngine(m, cfg)
    d1, d2 = _digest(10), _digest(11)
    toks: list[Tok] = [d1] + _ints(15, 45) + _ints(5, 46) + [d2] + _ints(10, 47) + [_digest(12), 7]
    _prefill(m, toks, eng=eng)
    assert m.probe_reuse(None, toks) == len(toks)
    # a different digest in block 0: nothing
    assert m.probe_reuse(None, [_digest(99)] + toks[1:]) == 0
    # a different digest in block 1: block 0 + the 5 ints before it (partial)
    assert m.probe_reuse(None, toks[:21] + [_digest(98)] + toks[22:]) == 21
    # ints carrying the digest's exact bytes are different tokens
    as_ints = [int.from_bytes(d1[i:i + 4], "little") for i in range(0, 32, 4)]
    assert m.probe_reuse(None, as_ints + toks[1:]) == 0
    assert m.probe_reuse(None, as_ints[:1] + toks[1:]) == 0
    # the same digest as a different object matches
    assert m.probe_reuse(None, [bytes(bytearray(d1))] + toks[1:20]) == 20
    # reuse, then the bytes read back are right
    kv = m.create_kv_cache(None, toks + [1, 2, 3])
    r = kv.num_committed_tokens
    assert r == len(toks)
    assert kv.committed_tokens == toks
    assert kv.resume() and kv.resize(capacity=len(toks) + 3)
    eng.forward([Step(kv, [1, 2, 3], toks)])
    kv.commit([1, 2, 3])
    eng.verify(kv, toks + [1, 2, 3])
    kv.close()
    assert m.probe_reuse(None, toks + [1, 2, 3]) == len(toks) + 3


def test_int_block_and_mixed_block_with_same_bytes_do_not_collide(make_manager: MakeManager) -> None:
    m = make_manager()
    d = bytes(range(32))
    as_ints = [int.from_bytes(d[i:i + 4], "little") for i in range(0, 32, 4)]
    x: list[Tok] = as_ints + list(range(8))  # 16 ints
    y: list[Tok] = [d] + list(range(8)) + [0] * 7  # 1 digest + 15 ints
    _prefill(m, x)
    assert m.probe_reuse(None, y) == 0
    _prefill(m, y)
    assert m.probe_reuse(None, x) == 16 and m.probe_reuse(None, y) == 16
    assert _num_block_nodes(m) == 2


def test_backoff_inside_a_full_block_copies_on_write() -> None:
    m, cfg = _manager(quota=1 << 20, reuse_match_backoff=3)
    eng = FakeEngine(m, cfg)
    a = _ints(48, 48)
    donor = _prefill(m, a, eng=eng, close=False)  # stays ACTIVE: its bytes can be verified
    kv = m.create_kv_cache(None, a)
    assert kv.num_committed_tokens == 45
    assert kv.committed_tokens == a[:45]
    assert kv.resume() and kv.resize(capacity=48)
    assert list(kv.get_base_page_indices(0))[:2] == list(donor.get_base_page_indices(0))[:2]
    assert kv.get_base_page_indices(0)[2] != donor.get_base_page_indices(0)[2]
    # the engine recomputes the last 3 tokens with different values into the private copy
    eng.forward([Step(kv, [1, 2, 3], a[:45])])
    kv.commit([1, 2, 3])
    eng.verify(kv, a[:45] + [1, 2, 3])
    eng.verify(donor, a)
    kv.close()
    eng.forget(kv)
    donor.close()
    eng.forget(donor)
    # the new block is a sibling of the donor's
    assert _num_block_nodes(m) == 4
    m2 = m.create_kv_cache(None, a + [9, 9, 9, 9])
    assert m2.num_committed_tokens == 45
    m2.close()


def test_pruned_node_with_a_locked_page_becomes_private() -> None:
    m, _ = _tiny(8)
    a = _ints(32, 49)
    _prefill(m, a)  # 2 DROPPABLE tree pages
    d = m.create_kv_cache()  # no reuse: commits identical blocks into private pages
    assert d.resume() and d.resize(capacity=64)
    d_toks = a + _ints(16, 50)
    d.commit(d_toks)  # blocks 0-1 identical (tree keeps a's), block 2 adopts d's page
    assert _num_block_nodes(m) == 3
    assert m.probe_reuse(None, d_toks) == 48
    assert _stats(m) == [(8, 2, 2)]
    e = m.create_kv_cache()
    # evicts a's block 1 (released before block 0: tail first), which prunes the node of
    # block 2 below it, whose page d still locks: that page becomes d's private page
    assert e.resume() and e.resize(capacity=48)
    assert m.probe_reuse(None, d_toks) == 16
    assert _num_block_nodes(m) == 1
    assert _stats(m) == [(8, 0, 1)]
    m.check_invariants()
    d.commit(_ints(16, 51))  # still works; nothing more can be published under a pruned chain
    assert d.num_committed_tokens == 64
    d.close()
    assert _stats(m) == [(8, 4, 1)]
    e.close()
    assert _stats(m) == [(8, 7, 1)]


def test_token_sequences_other_than_lists(make_manager: MakeManager) -> None:
    import numpy as np

    m = make_manager()
    toks = _ints(40, 63)
    _prefill(m, tuple(toks))
    assert m.probe_reuse(None, toks) == 40
    assert m.probe_reuse(None, tuple(toks)) == 40
    assert m.probe_reuse(None, np.array(toks, dtype=np.uint32)) == 40
    assert m.probe_reuse(None, np.array(toks[:20] + [5, 5], dtype=np.int64)) == 20
    kv = m.create_kv_cache(None, np.array(toks, dtype=np.uint32))
    assert kv.num_committed_tokens == 40 and kv.committed_tokens == toks
    kv.close()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window,sinks", [(None, None), (40, None), (40, 20)])
def test_random_workload_under_eviction(seed: int, window: int | None, sinks: int | None) -> None:
    """Random admissions with shared prefixes, decode steps and closes on a quota small enough to
    evict all the time: every reuse equals probe_reuse, and every byte read back is right."""
    layers = [attention(0)] + ([attention(1, window=window, sinks=sinks)] if window else [])
    m, cfg = _manager(layers=layers, quota=40 * KiB, max_util_for_resume=1.0)
    eng = FakeEngine(m, cfg)
    rng = random.Random(seed)
    trunks = [_ints(80, 200 + i) for i in range(3)]
    live: list[tuple[KVCache, list[Tok]]] = []
    for _ in range(200):
        op = rng.random()
        if op < 0.5 or not live:
            q: list[Tok] = rng.choice(trunks)[: rng.randrange(80)] + [rng.randrange(1 << 32)
                                                                     for _ in range(rng.randrange(1, 40))]
            scope = rng.choice([None, ReuseScope(salt=1)])
            probe = m.probe_reuse(scope, q)
            kv = m.create_kv_cache(scope, q)
            assert kv.num_committed_tokens == probe
            assert kv.committed_tokens == q[:probe]
            if not kv.resume() or not kv.resize(capacity=len(q)):
                kv.close()
                continue
            eng.forward([Step(kv, q[probe:], q[:probe])])
            kv.commit(q[probe:])
            live.append((kv, q))
        elif op < 0.8:
            kv, q = live.pop(rng.randrange(len(live)))
            eng.verify(kv, q)
            kv.close()
            eng.forget(kv)
        else:
            kv, q = rng.choice(live)
            n = rng.randrange(1, 20)
            if kv.resize(capacity=len(q) + n):
                new = [rng.randrange(1 << 32) for _ in range(n)]
                eng.forward([Step(kv, new, q)])
                kv.commit(new)
                q.extend(new)
        m.check_invariants()
    for kv, q in live:
        eng.verify(kv, q)
        kv.close()
    m.clear_reusable_blocks()
    assert all(s.free == s.total for s in m.get_storage_statistics(0))


def test_mixed_block_next_to_an_int_block_with_the_same_prefix() -> None:
    """Siblings that differ only in the last token, an int in one and a digest in the other:
    each matches itself, a third digest matches neither in full."""
    m, _ = _manager(layers=[attention(0)])
    ints = _ints(TPB, 43)
    mixed: list[Tok] = ints[:-1] + [_digest(1)]
    _prefill(m, ints)
    _prefill(m, mixed)
    assert m.probe_reuse(None, ints) == TPB and m.probe_reuse(None, mixed) == TPB
    assert m.probe_reuse(None, ints[:-1] + [_digest(2)]) == TPB - 1  # partial, via a sibling
    m.check_invariants()


def test_siblings_with_the_same_first_token_share_a_bucket() -> None:
    """Blocks under one parent that start with the same token sit in one bucket chain (with a
    partial tail starting the same way): each matches only itself (bytes checked), and dropping
    either full block, the chain's head or not, keeps the other reachable."""
    m, cfg = _tiny(3, enable_partial_reuse=False)
    eng = FakeEngine(m, cfg)
    first = 12345
    a = [first] + _ints(TPB - 1, 44)
    b = [first] + _ints(TPB - 1, 45)
    tail = [first] + _ints(5, 46)
    tree = m._ctx.tree
    prio = {"a": 10, "b": 50}  # a is always the eviction victim
    _prefill(m, a, eng=eng, cb=lambda blk, lg: prio["a"])
    _prefill(m, b, eng=eng, cb=lambda blk, lg: prio["b"])
    kv = m.create_kv_cache(None, tail)
    assert kv.resume() and kv.resize(capacity=len(tail))
    kv.commit(tail)
    kv.close()  # publishes the partial tail block under the same parent
    assert len(tree.children) == 1, "all three children should share one bucket"
    chain = []
    c = next(iter(tree.children.values()))
    while c is not None:
        chain.append(c.num_tokens)
        c = c.next_in_bucket
    assert sorted(chain) == [6, TPB, TPB]
    assert m.probe_reuse(None, a) == TPB and m.probe_reuse(None, b) == TPB
    assert m.probe_reuse(None, [first] + _ints(TPB - 1, 47)) == 0
    m.check_invariants()
    for toks in (a, b):
        kv = m.create_kv_cache(None, toks + [7])
        assert kv.num_committed_tokens == TPB and kv.resume()
        eng.verify(kv, toks)  # the page reused is the one these tokens were written to
        kv.close()
        eng.forget(kv)

    def evict_a() -> None:
        other = m.create_kv_cache(None, _ints(TPB, 48))
        assert other.resume() and other.resize(capacity=TPB)  # takes a's slot (lowest priority)
        other.close()

    evict_a()  # a is the oldest node: not the chain's head
    assert m.probe_reuse(None, a) == 0 and m.probe_reuse(None, b) == TPB
    m.check_invariants()
    _prefill(m, a, eng=eng, cb=lambda blk, lg: prio["a"])  # a comes back as the head
    assert next(iter(tree.children.values())).next_in_bucket is not None
    assert m.probe_reuse(None, a) == TPB and m.probe_reuse(None, b) == TPB
    evict_a()  # now the head, with the others behind it
    assert m.probe_reuse(None, a) == 0 and m.probe_reuse(None, b) == TPB
    m.check_invariants()
    kv = m.create_kv_cache(None, b + [7])
    assert kv.num_committed_tokens == TPB and kv.resume()
    eng.verify(kv, b)
    kv.close()
    m.clear_reusable_blocks()
    assert not tree.children
    m.check_invariants()
