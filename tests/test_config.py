"""Configuration validation (SPEC §3) and argument validation of token inputs.

Every bad value raises ValueError (bad value) or TypeError (wrong type) whose message names the
offending field; features that are not in this release are refused with a clear ValueError.
Bad token inputs leave the manager and the cache exactly as they were.
"""

from __future__ import annotations

import ctypes
import gc
from typing import Any, Callable, Iterator

import pytest

from kv_cache_manager_v2 import (
    AttentionLayerConfig,
    BufferConfig,
    DiskCacheTierConfig,
    GpuCacheTierConfig,
    HostCacheTierConfig,
    KVCacheManager,
    KVCacheManagerConfig,
    KVCacheStatus,
    LogicError,
    PageIndexMode,
    ReuseScope,
    SsmLayerConfig,
    SwaScratchReuseConfig,
    is_compiled,
)

from conftest import attention, make_config

TPB = 16
MakeManager = Callable[..., KVCacheManager]


@pytest.fixture(autouse=True)
def _collect_half_built_managers() -> Iterator[None]:
    """A constructor that raised leaves a half-built manager in a garbage cycle (traceback ->
    frame -> self); collect it before conftest's invariant check looks for live managers."""
    yield
    gc.collect()


def _cfg(**kwargs: Any) -> KVCacheManagerConfig:
    return make_config(**kwargs)


def _raises(exc: type[BaseException] | tuple[type[BaseException], ...], match: str, **kwargs: Any) -> None:
    with pytest.raises(exc, match=match):
        KVCacheManager(_cfg(**kwargs))


def _raises_type(match: str, build: Callable[[], KVCacheManagerConfig]) -> None:
    """A wrong type raises TypeError naming the field at manager construction. Compiled by
    mypyc, the config dataclasses are native classes whose typed attributes already refuse a
    wrong type when the config is built (TypeError too, before any manager exists)."""
    try:
        cfg = build()
    except TypeError:
        assert is_compiled(), "only compiled dataclasses check attribute types"
        return
    with pytest.raises(TypeError, match=match):
        KVCacheManager(cfg)


# ----------------------------------------------------------------------------- valid configs
def test_minimal_valid_config_builds() -> None:
    m = KVCacheManager(_cfg())
    assert m.tokens_per_block == TPB
    assert m.layer_grouping == ((0, 1),)
    kv = m.create_kv_cache()
    assert kv.status is KVCacheStatus.SUSPENDED
    kv.close()
    m.shutdown()


def test_backend_auto_works_on_host() -> None:
    cfg = KVCacheManagerConfig(
        tokens_per_block=TPB,
        cache_tiers=[GpuCacheTierConfig(quota=1 << 20)],
        layers=[attention(0)],
        backend="auto",
    )
    m = KVCacheManager(cfg)
    # "auto" lands on the host backend here: base addresses are real, writable host pointers.
    addr = m.get_mem_pool_base_address(0, "k", PageIndexMode.PER_LAYER)
    assert addr != 0
    ctypes.memmove(addr, b"auto-backend", 12)
    assert ctypes.string_at(addr, 12) == b"auto-backend"
    kv = m.create_kv_cache(input_tokens=list(range(20)))
    assert kv.resume()
    assert kv.resize(capacity=20)
    kv.commit(list(range(20)))
    kv.close()
    assert m.probe_reuse(input_tokens=list(range(20))) == 20
    m.clear_reusable_blocks()
    m.shutdown()


def test_default_backend_is_auto() -> None:
    cfg = KVCacheManagerConfig(
        tokens_per_block=TPB, cache_tiers=[GpuCacheTierConfig(quota=1 << 20)], layers=[attention(0)]
    )
    assert cfg.backend == "auto"
    m = KVCacheManager(cfg)
    assert m.get_mem_pool_base_address(0, "k") != 0
    m.shutdown()


def test_backend_cuda_without_device_names_cuda() -> None:
    cfg = _cfg()
    cfg.backend = "cuda"
    with pytest.raises(Exception, match=r"(?i)cuda") as info:
        KVCacheManager(cfg)
    assert not isinstance(info.value, AssertionError)


def test_max_util_for_resume_one_is_allowed() -> None:
    m = KVCacheManager(_cfg(max_util_for_resume=1.0))
    kv = m.create_kv_cache()
    assert kv.resume()
    kv.close()
    m.shutdown()


def test_zero_sinks_without_window_is_allowed() -> None:
    m = KVCacheManager(_cfg(layers=[attention(0, sinks=0)]))
    assert m.layer_grouping == ((0,),)
    m.shutdown()


def test_valid_initial_pool_ratio() -> None:
    m = KVCacheManager(_cfg(layers=[attention(0), attention(1, window=64)], initial_pool_ratio=[0.25, 0.75]))
    assert len(m.layer_grouping) == 2
    m.shutdown()


def test_zero_quota_is_valid() -> None:
    m = KVCacheManager(_cfg(quota=0))
    assert m.get_quota(0) == 0
    assert all(s.total == 0 for s in m.get_storage_statistics(0))
    m.shutdown()


# ----------------------------------------------------------------------------- tokens_per_block
@pytest.mark.parametrize("tpb", [0, -1, -16])
def test_tokens_per_block_not_positive(tpb: int) -> None:
    _raises(ValueError, "tokens_per_block", tokens_per_block=tpb)


@pytest.mark.parametrize("tpb", [16.0, "16", None])
def test_tokens_per_block_not_int(tpb: object) -> None:
    _raises_type("tokens_per_block", lambda: _cfg(tokens_per_block=tpb))


def test_tokens_per_block_bool_rejected() -> None:
    with pytest.raises(TypeError, match="tokens_per_block"):
        KVCacheManager(_cfg(tokens_per_block=True))


# ----------------------------------------------------------------------------- quotas and tiers
def test_negative_quota() -> None:
    _raises(ValueError, "quota", quota=-1)


def test_quota_not_int() -> None:
    _raises_type("quota", lambda: _cfg(quota=1.5))


def test_tiers_must_go_warm_to_cold(tmp_path: Any) -> None:
    bad_orders = [
        [GpuCacheTierConfig(quota=1 << 20), DiskCacheTierConfig(quota=1 << 20, path=str(tmp_path)), HostCacheTierConfig(quota=1 << 20)],
        [GpuCacheTierConfig(quota=1 << 20), HostCacheTierConfig(quota=1 << 20), HostCacheTierConfig(quota=1 << 20)],
        [GpuCacheTierConfig(quota=1 << 20), GpuCacheTierConfig(quota=1 << 20)],
        [HostCacheTierConfig(quota=1 << 20)],
    ]
    for tiers in bad_orders:
        cfg = _cfg()
        cfg.cache_tiers = tiers  # type: ignore[assignment]
        with pytest.raises(ValueError, match="cache_tiers"):
            KVCacheManager(cfg)
    # nothing is created under the disk path for a refused config
    assert list(tmp_path.iterdir()) == []


def test_host_tier_accepted() -> None:
    cfg = _cfg()
    cfg.cache_tiers = [GpuCacheTierConfig(quota=1 << 20), HostCacheTierConfig(quota=1 << 20)]
    m = KVCacheManager(cfg)
    assert m.get_quota(1) > 0
    m.shutdown()


def test_negative_host_quota_names_quota() -> None:
    cfg = _cfg()
    cfg.cache_tiers = [GpuCacheTierConfig(quota=1 << 20), HostCacheTierConfig(quota=-5)]
    with pytest.raises(ValueError, match="quota"):
        KVCacheManager(cfg)


def test_empty_cache_tiers() -> None:
    cfg = _cfg()
    cfg.cache_tiers = []
    with pytest.raises(ValueError, match="cache_tiers"):
        KVCacheManager(cfg)


def test_first_tier_must_be_gpu() -> None:
    cfg = _cfg()
    cfg.cache_tiers = [HostCacheTierConfig(quota=1 << 20)]
    with pytest.raises(ValueError, match="cache_tiers"):
        KVCacheManager(cfg)


# ----------------------------------------------------------------------------- layers
def test_duplicate_layer_ids() -> None:
    _raises(ValueError, "layer_id", layers=[attention(3), attention(3)])


def test_duplicate_layer_ids_across_shapes() -> None:
    _raises(ValueError, "layer_id", layers=[attention(0), attention(1, window=64), attention(0, window=64)])


def test_negative_layer_id() -> None:
    _raises(ValueError, "layer_id", layers=[attention(-1)])


def test_duplicate_roles_in_a_layer() -> None:
    _raises(ValueError, "role", layers=[attention(0, roles=("k", "v", "k"))])


def test_same_role_in_two_layers_is_fine() -> None:
    m = KVCacheManager(_cfg(layers=[attention(0, roles=("k",)), attention(1, roles=("k",))]))
    assert m.get_page_stride(0, "k") == m.get_page_stride(1, "k") == 512
    m.shutdown()


def test_override_not_dividing_tpb() -> None:
    layer = AttentionLayerConfig(0, [BufferConfig("k", 512), BufferConfig("v", 96, tokens_per_block_override=3)])
    _raises(ValueError, "tokens_per_block_override", layers=[layer])


def test_override_larger_than_tpb() -> None:
    layer = AttentionLayerConfig(0, [BufferConfig("k", 512, tokens_per_block_override=32)])
    _raises(ValueError, "tokens_per_block_override", layers=[layer])


@pytest.mark.parametrize("t", [0, -4])
def test_override_not_positive(t: int) -> None:
    layer = AttentionLayerConfig(0, [BufferConfig("k", 512, tokens_per_block_override=t)])
    _raises(ValueError, "tokens_per_block_override", layers=[layer])


def test_valid_override() -> None:
    layer = AttentionLayerConfig(0, [BufferConfig("k", 512), BufferConfig("v", 256, tokens_per_block_override=8)])
    m = KVCacheManager(_cfg(layers=[layer]))
    assert m.get_page_stride(0, "v") == 256
    m.shutdown()


@pytest.mark.parametrize("window", [0, -1, -128])
def test_window_not_positive(window: int) -> None:
    _raises(ValueError, "sliding_window_size", layers=[attention(0, window=window)])


def test_window_not_int() -> None:
    _raises_type("sliding_window_size", lambda: _cfg(layers=[attention(0, window=64.0)]))  # type: ignore[arg-type]


def test_sinks_without_window() -> None:
    _raises(ValueError, "num_sink_tokens", layers=[attention(0, sinks=4)])


def test_negative_sinks() -> None:
    _raises(ValueError, "num_sink_tokens", layers=[attention(0, window=64, sinks=-1)])


@pytest.mark.parametrize("size", [0, -512])
def test_buffer_size_not_positive(size: int) -> None:
    _raises(ValueError, "size", layers=[attention(0, size=size)])


def test_buffer_size_not_int() -> None:
    _raises_type("size", lambda: _cfg(layers=[attention(0, size=512.0)]))  # type: ignore[arg-type]


def test_empty_buffers() -> None:
    _raises(ValueError, "buffers", layers=[AttentionLayerConfig(0, [])])


def test_empty_layers() -> None:
    _raises(ValueError, "layers", layers=[])


def test_ssm_layer_rejected() -> None:
    layers = [attention(0), SsmLayerConfig(1, [BufferConfig("state", 4096)])]
    with pytest.raises(ValueError, match="^SSM layers are not supported yet$"):
        KVCacheManager(_cfg(layers=layers))


def test_ssm_layer_alone_rejected() -> None:
    with pytest.raises(ValueError, match="^SSM layers are not supported yet$"):
        KVCacheManager(_cfg(layers=[SsmLayerConfig(0, [BufferConfig("state", 4096)])]))


# ----------------------------------------------------------------------------- other fields
@pytest.mark.parametrize("backend", ["gpu", "", "HOST", "tpu"])
def test_unknown_backend(backend: str) -> None:
    cfg = _cfg()
    cfg.backend = backend
    with pytest.raises(ValueError, match="backend"):
        KVCacheManager(cfg)


@pytest.mark.parametrize("kind", ["encoder", "", "SELF"])
def test_unknown_cache_kind(kind: str) -> None:
    _raises(ValueError, "cache_kind", cache_kind=kind)


def test_cross_cache_accepts_full_attention_layers() -> None:
    m = KVCacheManager(_cfg(cache_kind="cross"))
    m.shutdown()


@pytest.mark.parametrize("sinks", [None, 4])
def test_cross_cache_rejects_a_window(sinks: int | None) -> None:
    layers = [attention(0), attention(1, window=64, sinks=sinks)]
    with pytest.raises(ValueError, match=r"layers\[1\]\.sliding_window_size") as info:
        KVCacheManager(_cfg(cache_kind="cross", layers=layers))
    assert "cross" in str(info.value)


@pytest.mark.parametrize("mu", [0.0, -0.5, 1.0001, 2.0, float("nan")])
def test_max_util_for_resume_out_of_range(mu: float) -> None:
    _raises(ValueError, "max_util_for_resume", max_util_for_resume=mu)


def test_max_util_for_resume_wrong_type() -> None:
    _raises_type("max_util_for_resume", lambda: _cfg(max_util_for_resume="0.9"))


def test_initial_pool_ratio_wrong_length() -> None:
    layers = [attention(0), attention(1, window=64)]
    _raises(ValueError, "initial_pool_ratio", layers=layers, initial_pool_ratio=[1.0])
    _raises(ValueError, "initial_pool_ratio", layers=layers, initial_pool_ratio=[0.2, 0.3, 0.5])


@pytest.mark.parametrize("ratio", [[0.0, 1.0], [-0.5, 1.5], [1.0, 0.0]])
def test_initial_pool_ratio_not_positive(ratio: list[float]) -> None:
    layers = [attention(0), attention(1, window=64)]
    _raises(ValueError, "initial_pool_ratio", layers=layers, initial_pool_ratio=ratio)


@pytest.mark.parametrize("ratio", [[0.5, 0.6], [0.2, 0.2], [1.0, 1.0]])
def test_initial_pool_ratio_not_summing_to_one(ratio: list[float]) -> None:
    layers = [attention(0), attention(1, window=64)]
    _raises(ValueError, "initial_pool_ratio", layers=layers, initial_pool_ratio=ratio)


def test_initial_pool_ratio_wrong_element_type() -> None:
    _raises(TypeError, "initial_pool_ratio", layers=[attention(0)], initial_pool_ratio=["1"])


@pytest.mark.parametrize("backoff", [-1, -100])
def test_reuse_match_backoff_negative(backoff: int) -> None:
    _raises(ValueError, "reuse_match_backoff", reuse_match_backoff=backoff)


def test_reuse_match_backoff_wrong_type() -> None:
    _raises_type("reuse_match_backoff", lambda: _cfg(reuse_match_backoff=1.5))


def test_commit_min_snapshot_rejected() -> None:
    _raises(ValueError, "commit_min_snapshot", commit_min_snapshot=True)


def test_swa_scratch_reuse_accepted() -> None:
    # SPEC 4.8: SwaScratchReuseConfig(max_rewind_len) is accepted (scratch reuse is implemented).
    for rewind in (0, 32):
        m = KVCacheManager(_cfg(layers=[attention(0, window=64)], swa_scratch_reuse=SwaScratchReuseConfig(rewind)))
        kv = m.create_kv_cache()
        assert kv.enable_swa_scratch_reuse is True
        kv.close()
        m.shutdown()


def test_swa_scratch_reuse_wrong_type() -> None:
    with pytest.raises(TypeError, match="swa_scratch_reuse"):
        KVCacheManager(_cfg(layers=[attention(0, window=64)], swa_scratch_reuse=0))


def test_swa_scratch_reuse_bad_rewind_names_field() -> None:
    _raises(
        ValueError,
        "max_rewind_len",
        layers=[attention(0, window=64)],
        swa_scratch_reuse=SwaScratchReuseConfig(max_rewind_len=-1),
    )


def test_config_not_a_config() -> None:
    with pytest.raises(TypeError, match="config"):
        KVCacheManager(object())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- beam
@pytest.mark.parametrize("beam", [1, 2, -1])
def test_beam_other_than_zero(make_manager: MakeManager, beam: int) -> None:
    m = make_manager()
    kv = m.create_kv_cache()
    assert kv.resume()
    assert kv.resize(capacity=40)
    before = list(kv.get_base_page_indices(0))
    with pytest.raises(ValueError, match="beam"):
        kv.get_base_page_indices(0, beam)
    with pytest.raises(ValueError, match="beam"):
        kv.get_base_page_indices(0, beam=beam)
    with pytest.raises(ValueError, match="beam"):
        kv.get_aggregated_page_indices(0, beam)
    with pytest.raises(ValueError, match="beam"):
        kv.get_aggregated_page_indices(0, beam=beam, valid_only=True)
    buf = (ctypes.c_int32 * 8)(*([7] * 8))
    with pytest.raises(ValueError, match="beam"):
        kv.set_base_page_index_buf(beam, 0, buf)
    assert list(buf) == [7] * 8  # untouched
    assert list(kv.get_base_page_indices(0)) == before
    # beam 0 works
    kv.set_base_page_index_buf(0, 0, buf)
    assert list(buf)[:3] == before and list(buf)[3:] == [-1] * 5
    kv.close()


# ----------------------------------------------------------------------------- bad tokens
_DIGEST = bytes(range(32))

BAD_TOKENS: list[tuple[object, type[BaseException]]] = [
    (-1, ValueError),
    (1 << 32, ValueError),
    ((1 << 32) + 5, ValueError),
    (1.0, TypeError),
    ("a", TypeError),
    (None, TypeError),
    (b"\x00" * 31, ValueError),
    (b"\x00" * 33, ValueError),
    (b"", ValueError),
]


def _snapshot(m: KVCacheManager, probes: list[list[Any]]) -> tuple[Any, ...]:
    stats = tuple(
        (s.pool_group_id, s.total, s.free, s.evictable, s.available, s.slot_size) for s in m.get_storage_statistics(0)
    )
    return (stats, tuple(m.probe_reuse(input_tokens=p) for p in probes), m.get_quota(0))


def _prefilled(m: KVCacheManager, tokens: list[Any]) -> None:
    kv = m.create_kv_cache(input_tokens=tokens)
    assert kv.resume()
    assert kv.resize(capacity=len(tokens))
    kv.commit(tokens[kv.num_committed_tokens :])
    kv.close()


def _positions_for(prompt: list[Any]) -> list[int]:
    # inside the matched prefix, inside a partially matched block, past any match
    return [0, 5, 16, 20, len(prompt) - 1, len(prompt)]


@pytest.mark.parametrize("bad,exc", BAD_TOKENS)
def test_bad_tokens_create_and_probe_change_nothing(make_manager: MakeManager, bad: object, exc: type) -> None:
    m = make_manager()
    prompt: list[Any] = list(range(100, 140)) + [_DIGEST] + list(range(7))
    _prefilled(m, prompt)
    probes = [prompt, prompt[:20], list(range(100, 117))]
    before = _snapshot(m, probes)
    m.get_and_reset_iteration_stats()
    for pos in _positions_for(prompt):
        toks = list(prompt)
        toks.insert(pos, bad)
        with pytest.raises(exc):
            m.probe_reuse(input_tokens=toks)
        with pytest.raises(exc):
            m.create_kv_cache(input_tokens=toks)
        with pytest.raises(exc):
            m.create_kv_cache(reuse_scope=ReuseScope(lora_id=3), input_tokens=toks)
        # replacing instead of inserting
        if pos < len(prompt):
            toks = list(prompt)
            toks[pos] = bad
            with pytest.raises(exc):
                m.probe_reuse(input_tokens=toks)
            with pytest.raises(exc):
                m.create_kv_cache(input_tokens=toks)
    assert _snapshot(m, probes) == before
    stats = m.get_and_reset_iteration_stats()
    for st in stats.values():
        assert st.allocated_blocks == st.new_blocks == st.reused_blocks == st.missed_blocks == 0
    # no cache was left open by the failed calls
    m.clear_reusable_blocks()
    assert m.probe_reuse(input_tokens=prompt) == 0


@pytest.mark.parametrize("bad", ["abc", b"x" * 32, 5, 3.5])
def test_input_tokens_not_a_sequence(make_manager: MakeManager, bad: object) -> None:
    m = make_manager()
    with pytest.raises(TypeError):
        m.create_kv_cache(input_tokens=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        m.probe_reuse(input_tokens=bad)  # type: ignore[arg-type]
    m.clear_reusable_blocks()  # nothing open


def test_bool_token_rejected(make_manager: MakeManager) -> None:
    m = make_manager()
    with pytest.raises(TypeError):
        m.probe_reuse(input_tokens=[1, True, 3])
    with pytest.raises(TypeError):
        m.create_kv_cache(input_tokens=[False])
    m.clear_reusable_blocks()


def test_token_limits_accepted(make_manager: MakeManager) -> None:
    m = make_manager()
    toks: list[Any] = [0, (1 << 32) - 1, 1 << 31, (1 << 31) - 1, _DIGEST] + list(range(11)) + [(1 << 32) - 1]
    _prefilled(m, toks)
    assert m.probe_reuse(input_tokens=toks) == len(toks)


@pytest.mark.parametrize("bad,exc", BAD_TOKENS)
def test_bad_tokens_commit_changes_nothing(make_manager: MakeManager, bad: object, exc: type) -> None:
    m = make_manager()
    kv = m.create_kv_cache()
    assert kv.resume()
    assert kv.resize(capacity=64)
    good: list[Any] = list(range(500, 510))
    kv.commit(good)
    probes = [good + list(range(6)), list(range(500, 516))]
    before = _snapshot(m, probes)
    state = (kv.num_committed_tokens, kv.committed_tokens, kv.history_length, kv.capacity,
             list(kv.get_base_page_indices(0)))
    for tokens in (
        [bad],
        [1, 2, bad],
        [bad, 1, 2],
        [_DIGEST, bad],
        list(range(6)) + [bad],  # would complete block 0
        list(range(30)) + [bad],  # would complete blocks 0 and 1
        [_DIGEST] + list(range(20)) + [bad],
    ):
        with pytest.raises(exc):
            kv.commit(tokens)
        after = (kv.num_committed_tokens, kv.committed_tokens, kv.history_length, kv.capacity,
                 list(kv.get_base_page_indices(0)))
        assert after == state, tokens
        assert _snapshot(m, probes) == before
    # the cache still works afterwards
    kv.commit(list(range(6)))
    assert kv.num_committed_tokens == 16
    assert kv.committed_tokens == good + list(range(6))
    assert m.probe_reuse(input_tokens=good + list(range(6))) == 16
    kv.close()


def test_commit_str_as_tokens(make_manager: MakeManager) -> None:
    m = make_manager()
    kv = m.create_kv_cache()
    assert kv.resume() and kv.resize(capacity=32)
    with pytest.raises(TypeError):
        kv.commit("abc")  # type: ignore[arg-type]
    assert kv.num_committed_tokens == 0
    kv.close()


def test_commit_validates_after_state_checks(make_manager: MakeManager) -> None:
    m = make_manager()
    kv = m.create_kv_cache()
    # not ACTIVE: LogicError (misuse of state), not a token error
    with pytest.raises(LogicError):
        kv.commit([1])
    kv.close()


# ----------------------------------------------------------------------------- reuse scope
@pytest.mark.parametrize("make_scope,exc", [
    (lambda: "lora", TypeError),
    (lambda: ReuseScope(lora_id=-1), ValueError),
    (lambda: ReuseScope(salt=1.5), TypeError),  # type: ignore[arg-type]
    (lambda: ReuseScope(lora_id=1 << 64), ValueError),
])
def test_bad_reuse_scope(make_manager: MakeManager, make_scope: Callable[[], object], exc: type) -> None:
    m = make_manager()
    try:
        scope = make_scope()
    except TypeError:
        assert is_compiled() and exc is TypeError  # compiled dataclass refused the wrong type
        return
    with pytest.raises(exc):
        m.create_kv_cache(reuse_scope=scope, input_tokens=[1, 2, 3])
    with pytest.raises(exc):
        m.probe_reuse(reuse_scope=scope, input_tokens=[1, 2, 3])
    m.clear_reusable_blocks()


def test_bad_tokens_create_with_new_scope_leaves_tree_unchanged(make_manager: MakeManager) -> None:
    m = make_manager()
    _prefilled(m, list(range(40)))
    tree = m._ctx.tree
    before = (len(tree.live_nodes()), sorted(tree.roots))
    for salt in range(5):
        with pytest.raises(ValueError):
            m.create_kv_cache(reuse_scope=ReuseScope(salt=salt), input_tokens=[1, 2, -3])
    assert (len(tree.live_nodes()), sorted(tree.roots)) == before
