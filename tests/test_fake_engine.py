"""Tests of the fake engine (fake_engine/): it writes and reads back real bytes
through the manager's public page-index API, and catches every kind of fault."""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

from kv_cache_manager_v2 import (
    AttentionLayerConfig,
    BufferConfig,
    DataIntegrityError,
    GpuCacheTierConfig,
    KVCacheManager,
    KVCacheManagerConfig,
    PageIndexMode,
    SsmLayerConfig,
)

from fake_engine import (
    FakeEngine,
    Step,
    main,
    mooncake_trace,
    run_simulation,
    stale_block_range,
    synthetic_workload,
    tokens_to_array,
    visible_ranges,
)

TPB = 16
MiB = 1 << 20


def _config(
    window: int | None = 40,
    sinks: int | None = None,
    override: bool = True,
    quota: int = 8 * MiB,
    token_bytes: int = 32,
) -> KVCacheManagerConfig:
    """Layer 0: full attention, K + V (V with 8-token pages -> expansion 2);
    layer 1: full attention; layer 2: SWA (``window``, ``sinks``)."""
    v0 = (
        BufferConfig("V", 8 * token_bytes, tokens_per_block_override=8)
        if override
        else BufferConfig("V", TPB * token_bytes)
    )
    layers: list[AttentionLayerConfig | SsmLayerConfig] = [
        AttentionLayerConfig(0, [BufferConfig("K", TPB * token_bytes), v0]),
        AttentionLayerConfig(1, [BufferConfig("K", TPB * token_bytes), BufferConfig("V", TPB * token_bytes)]),
    ]
    if window is not None:
        layers.append(
            AttentionLayerConfig(
                2,
                [BufferConfig("K", TPB * token_bytes), BufferConfig("V", TPB * token_bytes)],
                sliding_window_size=window,
                num_sink_tokens=sinks,
            )
        )
    return KVCacheManagerConfig(
        tokens_per_block=TPB, cache_tiers=[GpuCacheTierConfig(quota=quota)], layers=layers, backend="host"
    )


@pytest.fixture
def env() -> Iterator[tuple[KVCacheManager, KVCacheManagerConfig]]:
    cfg = _config()
    mgr = KVCacheManager(cfg)
    yield mgr, cfg
    mgr.clear_reusable_blocks()
    mgr.shutdown()


def _prompt(n: int, seed: int = 1) -> list[int | bytes]:
    return [(seed * 7919 + i * 104729) % 50000 for i in range(n)]


def _prefill(mgr: KVCacheManager, eng: FakeEngine, tokens: Sequence[int | bytes]) -> Any:
    """Admission the way an engine does it; returns the ACTIVE cache (prompt committed)."""
    kv = mgr.create_kv_cache(input_tokens=list(tokens))
    reused = kv.num_committed_tokens
    assert kv.resume()
    assert kv.resize(capacity=len(tokens))
    eng.forward([Step(kv, list(tokens[reused:]), list(tokens[:reused]))])
    kv.commit(list(tokens[reused:]))
    return kv


def _token_address(mgr: KVCacheManager, kv: Any, layer: int, role: str, pos: int) -> int:
    """Byte address of token ``pos`` of buffer (layer, role), from the public API only."""
    lg = mgr.get_layer_group_id(layer)
    base_idx = int(kv.get_base_page_indices(lg)[pos // TPB])
    assert base_idx >= 0
    conv = mgr.get_page_index_converter(layer, role)
    pages = conv([base_idx], PageIndexMode.PER_LAYER)
    stride = mgr.get_page_stride(layer, role)
    e = len(pages)
    tpp = TPB // e
    o = pos % TPB
    page = pages[o // tpp]
    return int(mgr.get_mem_pool_base_address(layer, role, PageIndexMode.PER_LAYER)) + page * stride + (
        o % tpp
    ) * (stride // tpp)


def _flip(addr: int) -> None:
    b = ctypes.c_uint8.from_address(addr)
    b.value ^= 0x5A


class _MaskedKV:
    """A view of a cache whose base page indices are overridden (engine-side fault injection)."""

    def __init__(self, kv: Any, group: int, block: int, value: int) -> None:
        self._kv, self._group, self._block, self._value = kv, group, block, value

    def get_base_page_indices(self, lg: int, beam: int = 0) -> list[int]:
        idx = [int(x) for x in self._kv.get_base_page_indices(lg)]
        if lg == self._group:
            idx[self._block] = self._value
        return idx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)


# --------------------------------------------------------------------- basics
def test_helpers() -> None:
    assert visible_ranges(0, None, 0) == []
    assert visible_ranges(100, None, 0) == [(0, 100)]
    assert visible_ranges(200, 40, 0) == [(161, 200)]
    assert visible_ranges(200, 40, 4) == [(0, 4), (161, 200)]
    assert visible_ranges(30, 40, 4) == [(0, 30)]  # window covers everything
    assert stale_block_range(5000, 32, 1024, 0) == (0, 124)  # SPEC §2 example
    assert stale_block_range(5000, 32, None, 0) == (0, 0)
    assert stale_block_range(200, 16, 40, 1) == (1, 10)
    digest = bytes(range(32))
    arr = tokens_to_array([1, digest, 2**32 - 1])
    assert arr.tolist() == [1, int.from_bytes(digest[:4], "little"), 2**32 - 1]
    assert tokens_to_array([b"12" + bytes(30)]).tolist() == [int.from_bytes(b"12\0\0", "little")]


def test_write_read_back_and_reuse(env: tuple[KVCacheManager, KVCacheManagerConfig]) -> None:
    mgr, cfg = env
    eng = FakeEngine(mgr, cfg)
    prompt = _prompt(100)
    kv = _prefill(mgr, eng, prompt)
    eng.verify(kv, prompt)
    # decode a few tokens, incremental checks every step
    toks = list(prompt)
    for t in range(5):
        assert kv.resize(capacity=len(toks) + 1)
        eng.forward([Step(kv, [t + 7], toks)])
        kv.commit([t + 7])
        toks.append(t + 7)
    eng.verify(kv, toks)
    verified = eng.bytes_verified
    assert verified > 0 and eng.bytes_written > 0
    kv.close()
    eng.forget(kv)
    # a second cache with the same prefix reuses pages written by the first
    prompt2 = toks[:96] + _prompt(20, seed=2)
    kv2 = mgr.create_kv_cache(input_tokens=prompt2)
    reused = kv2.num_committed_tokens
    assert reused >= 80  # at least the 5 full blocks
    assert kv2.history_length == kv2.capacity == reused
    assert kv2.resume()
    assert kv2.resize(capacity=len(prompt2))
    eng.forward([Step(kv2, prompt2[reused:], prompt2[:reused])])  # first sight: full check
    kv2.commit(prompt2[reused:])
    eng.verify(kv2, prompt2)
    assert eng.bytes_verified > verified
    kv2.close()


def test_batch_of_two_caches_and_bytes_tokens(env: tuple[KVCacheManager, KVCacheManagerConfig]) -> None:
    mgr, cfg = env
    eng = FakeEngine(mgr, cfg)
    digest = bytes(range(100, 132))
    head: list[int | bytes] = [digest]
    a = head + _prompt(50, seed=3)
    b: list[int | bytes] = _prompt(70, seed=4)
    kva = mgr.create_kv_cache(input_tokens=a)
    kvb = mgr.create_kv_cache(input_tokens=b)
    for kv, p in ((kva, a), (kvb, b)):
        assert kv.resume() and kv.resize(capacity=len(p))
    eng.forward([Step(kva, a, []), Step(kvb, b, [])])
    kva.commit(a)
    kvb.commit(b)
    eng.verify(kva, a)
    eng.verify(kvb, b)
    with pytest.raises(DataIntegrityError):
        other: list[int | bytes] = [bytes(range(1, 33))]
        eng.verify(kva, other + a[1:])  # another digest -> another record
    with pytest.raises(ValueError):
        eng.forward([Step(kva, [], a), Step(kva, [], a)])  # same cache twice
    kva.close()
    kvb.close()


def test_partial_reuse_copy_on_write_keeps_donor_bytes(env: tuple[KVCacheManager, KVCacheManagerConfig]) -> None:
    mgr, cfg = env
    eng = FakeEngine(mgr, cfg)
    a = _prompt(40)  # 2 full blocks + an 8-token tail (committed at close)
    kva = _prefill(mgr, eng, a)
    kva.close()
    eng.forget(kva)
    c = a[:36] + _prompt(30, seed=9)  # shares 36 tokens: 4 of the donor's tail block
    kvc = mgr.create_kv_cache(input_tokens=c)
    assert kvc.num_committed_tokens == 36
    assert kvc.resume() and kvc.resize(capacity=len(c))
    eng.forward([Step(kvc, c[36:], c[:36])])  # writes positions 36.. of its private copy
    kvc.commit(c[36:])
    eng.verify(kvc, c)
    kvc.close()
    kvd = mgr.create_kv_cache(input_tokens=a)  # the donor's tail must be intact
    assert kvd.num_committed_tokens == 40
    assert eng.resume(kvd)
    eng.verify(kvd, a)
    kvd.suspend()
    assert eng.resume(kvd)  # resume marks the cache dirty: the next step checks everything
    assert kvd.resize(capacity=41)
    eng.forward([Step(kvd, [3], a)])
    kvd.commit([3])
    eng.verify_all()
    kvd.close()


# ----------------------------------------------------------------- detection
@pytest.mark.parametrize("layer,role,pos", [(1, "K", 37), (0, "V", 45), (0, "V", 40), (2, "V", 90)])
def test_detects_corruption(env: tuple[KVCacheManager, KVCacheManagerConfig], layer: int, role: str, pos: int) -> None:
    mgr, cfg = env
    eng = FakeEngine(mgr, cfg)
    prompt = _prompt(100)
    kv = _prefill(mgr, eng, prompt)
    eng.verify(kv, prompt)
    _flip(_token_address(mgr, kv, layer, role, pos) + 5)
    with pytest.raises(DataIntegrityError) as exc:
        eng.verify(kv, prompt)
    msg = str(exc.value)
    assert f"layer {layer}" in msg and repr(role) in msg
    assert f"block {pos // TPB}" in msg and f"token position {pos}" in msg
    assert "expected" in msg and "found" in msg
    _flip(_token_address(mgr, kv, layer, role, pos) + 5)  # repair
    eng.verify(kv, prompt)
    kv.close()


def test_incremental_check_and_mark_dirty(env: tuple[KVCacheManager, KVCacheManagerConfig]) -> None:
    mgr, cfg = env
    eng = FakeEngine(mgr, cfg)
    toks = _prompt(64)
    kv = _prefill(mgr, eng, toks)
    eng.forward([Step(kv, [], toks)])  # establishes the incremental state
    _flip(_token_address(mgr, kv, 1, "K", 3))  # block 0, not touched since the last step
    assert kv.resize(capacity=65)
    eng.forward([Step(kv, [1], toks)])  # incremental: only recent blocks are re-read
    kv.commit([1])
    toks.append(1)
    eng.mark_dirty(kv)  # e.g. after resume: the next step checks everything
    assert kv.resize(capacity=66)
    with pytest.raises(DataIntegrityError, match="layer 1"):
        eng.forward([Step(kv, [2], toks)])
    _flip(_token_address(mgr, kv, 1, "K", 3))
    eng.verify(kv, toks)
    kv.close()


def test_detects_unmapped_block(env: tuple[KVCacheManager, KVCacheManagerConfig]) -> None:
    mgr, cfg = env
    eng = FakeEngine(mgr, cfg)
    prompt = _prompt(100)
    kv = _prefill(mgr, eng, prompt)
    lg = mgr.get_layer_group_id(0)
    with pytest.raises(DataIntegrityError, match="unmapped") as exc:
        eng.verify(_MaskedKV(kv, lg, 2, -1), prompt)
    assert "block 2" in str(exc.value)
    # a block being written must be mapped too
    assert kv.resize(capacity=101)
    eng.forget(kv)
    with pytest.raises(DataIntegrityError, match="unmapped"):
        eng.forward([Step(_MaskedKV(kv, lg, 6, -1), [5], prompt)])
    kv.close()


def test_swa_window_visibility_and_stale_rule(env: tuple[KVCacheManager, KVCacheManagerConfig]) -> None:
    mgr, cfg = env
    eng = FakeEngine(mgr, cfg)
    prompt = _prompt(200)
    kv = _prefill(mgr, eng, prompt)  # history 200 after commit: SWA blocks [0, 10) stale
    swa = mgr.get_layer_group_id(2)
    idx = [int(x) for x in kv.get_base_page_indices(swa)]
    assert idx[:10] == [-1] * 10 and all(i >= 0 for i in idx[10:])
    eng.verify(kv, prompt)  # reads only [161, 200) of layer 2: no unmapped error
    # a corrupt token just inside the window is caught, one just outside is never read
    _flip(_token_address(mgr, kv, 2, "K", 161))
    with pytest.raises(DataIntegrityError, match="layer 2"):
        eng.verify(kv, prompt)
    _flip(_token_address(mgr, kv, 2, "K", 161))
    _flip(_token_address(mgr, kv, 2, "K", 160))  # block 10 is mapped, position 160 out of window
    eng.verify(kv, prompt)
    _flip(_token_address(mgr, kv, 2, "K", 160))
    # a stale block that still shows a page violates the -1 rule
    with pytest.raises(DataIntegrityError, match="stale"):
        eng.verify(_MaskedKV(kv, swa, 3, idx[12]), prompt)
    kv.close()


def test_swa_with_sinks() -> None:
    cfg = _config(window=40, sinks=4)
    mgr = KVCacheManager(cfg)
    eng = FakeEngine(mgr, cfg)
    prompt = _prompt(200)
    kv = _prefill(mgr, eng, prompt)
    swa = mgr.get_layer_group_id(2)
    idx = [int(x) for x in kv.get_base_page_indices(swa)]
    assert idx[0] >= 0 and idx[1:10] == [-1] * 9  # sink block kept
    eng.verify(kv, prompt)
    _flip(_token_address(mgr, kv, 2, "V", 2))  # a sink token is visible
    with pytest.raises(DataIntegrityError, match="token position 2"):
        eng.verify(kv, prompt)
    _flip(_token_address(mgr, kv, 2, "V", 2))
    _flip(_token_address(mgr, kv, 2, "V", 9))  # in the sink block, past the sink tokens
    eng.verify(kv, prompt)
    kv.close()
    mgr.clear_reusable_blocks()
    mgr.shutdown()


def test_shared_and_per_layer_modes_agree(env: tuple[KVCacheManager, KVCacheManagerConfig]) -> None:
    mgr, cfg = env
    per_layer = FakeEngine(mgr, cfg, index_mode=PageIndexMode.PER_LAYER)
    shared = FakeEngine(mgr, cfg, index_mode=PageIndexMode.SHARED)
    prompt = _prompt(90)
    kv = _prefill(mgr, per_layer, prompt)
    shared.verify(kv, prompt)  # same bytes through the other addressing mode
    _flip(_token_address(mgr, kv, 0, "V", 88))  # second sub-page of an expanded buffer
    with pytest.raises(DataIntegrityError, match="layer 0 buffer 'V'"):
        shared.verify(kv, prompt)
    kv.close()


def test_rejects_token_size_not_multiple_of_16() -> None:
    cfg = KVCacheManagerConfig(
        tokens_per_block=TPB,
        cache_tiers=[GpuCacheTierConfig(quota=4 * MiB)],
        layers=[AttentionLayerConfig(0, [BufferConfig("K", TPB * 8)])],
        backend="host",
    )
    mgr = KVCacheManager(cfg)
    with pytest.raises(ValueError, match="multiple of 16"):
        FakeEngine(mgr, cfg)
    mgr.shutdown()


# ---------------------------------------------------------------- simulation
def test_synthetic_workload_shares_prefixes() -> None:
    reqs = synthetic_workload(num_requests=30, seed=5)
    assert len(reqs) == 30
    by_rid = {r.rid: r for r in reqs}
    followups = [r for r in reqs if r.depends_on is not None]
    assert followups
    for r in followups:
        prev = by_rid[r.depends_on]  # type: ignore[index]
        assert r.prompt[: len(prev.prompt) + len(prev.output)] == prev.prompt + prev.output
    assert reqs == synthetic_workload(num_requests=30, seed=5)  # deterministic


def test_simulate_synthetic() -> None:
    res = run_simulation(requests=24, gpu_mb=8, max_batch=8, progress=False)
    assert res.requests == 24 and res.completed == 24 and res.skipped == 0
    assert res.hit_rate > 0 and res.reused_tokens > 0
    assert res.generated_tokens > 0 and res.bytes_verified > 0
    assert res.engine_steps > 0 and res.manager_seconds > 0
    table = res.format_table()
    assert "gpu (level 0)" in table and "requests completed" in table


def test_simulate_under_memory_pressure() -> None:
    # a tiny quota and no colder tier: failed admissions / close-and-restart preemptions
    res = run_simulation(requests=16, gpu_mb=2, host_mb=0, max_batch=16, seed=3, chunk=64, progress=False)
    assert res.completed + res.skipped == 16
    assert res.completed > 0
    assert res.preemptions + res.admission_retries > 0
    assert res.suspends == 0  # a suspended cache would keep its pages on level 0
    assert res.tiers == ["gpu (level 0)"] and res.reused_tokens_by_level == [res.reused_tokens]


def test_mooncake_trace_and_cli(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    lines = [
        {"timestamp": 0, "input_length": 1500, "output_length": 40, "hash_ids": [0, 1, 2]},
        {"timestamp": 5, "input_length": 1100, "output_length": 20, "hash_ids": [0, 1, 3]},
        {"timestamp": 9, "input_length": 700, "output_length": 30, "hash_ids": [4, 5]},
    ]
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    reqs = mooncake_trace(str(trace), scale=8)
    assert [len(r.prompt) for r in reqs] == [187, 137, 87]
    assert reqs[0].prompt[:128] == reqs[1].prompt[:128] and reqs[0].prompt[128] != reqs[1].prompt[128]
    assert [len(r.output) for r in reqs] == [5, 2, 3]
    out = tmp_path / "s.json"
    argv = ["simulate", "--trace", str(trace), "--scale", "8", "--no-progress", "--json", str(out), "--max-batch", "1"]
    rc = main(argv)
    assert rc == 0
    summary = json.loads(out.read_text())
    assert summary["completed"] == 3 and summary["requests"] == 3
    assert summary["reused_tokens"] >= 128 and summary["hit_rate"] > 0


def test_simulate_exit_code_on_corruption(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    original = FakeEngine._apply_writes

    def corrupting(self: FakeEngine, buf: Any, p: Any, steps: Sequence[Step]) -> None:
        original(self, buf, p, steps)
        if self.steps == 5 and buf.layer_id == 1:  # a bad "kernel" write, read back next step
            buf.view[int(p.write_slots[0][0]), 0] ^= 1

    monkeypatch.setattr(FakeEngine, "_apply_writes", corrupting)
    assert main(["simulate", "--requests", "6", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "DATA INTEGRITY ERROR" in err and "layer 1" in err


# ------------------------------------------------------------- tiered storage
def test_simulate_host_tier_suspend_resume_and_reuse_from_host() -> None:
    # level 0 too small for the batch: the latest admitted requests are suspended (their pages
    # go to the host tier), resumed later and fully re-verified; evicted prefixes come back from host
    res = run_simulation(requests=40, gpu_mb=1, host_mb=2, max_batch=16, progress=False)
    assert res.completed == 40 and res.skipped == 0
    assert res.tiers == ["gpu (level 0)", "host (level 1)"]
    assert res.suspends > 0 and res.resumes == res.suspends
    assert res.resume_onboarded_blocks_by_level[1] > 0  # resumed pages came back from host
    gpu, host = res.reused_tokens_by_level
    assert host > 0 and gpu > 0
    assert gpu + host == res.reused_tokens
    assert res.onboarded_from_level[1] > 0
    assert res.stat("offloaded_blocks") > 0 and res.stat("onboarded_bytes") > 0 and res.stat("offloaded_bytes") > 0
    assert res.bytes_verified > 0
    rows = {name: (n, r) for name, n, r in res.tier_rows()}
    assert rows["host (level 1)"][0] == host and rows["host (level 1)"][1] > 0
    assert rows["total"][0] == res.reused_tokens
    table = res.format_table()
    for label in ("host (level 1)", "suspends / resumes", "evictions", "onboard / offload"):
        assert label in table
    # the timeline: first and last sample, occupancy per level
    assert res.timeline[0]["step"] == 0 and res.timeline[-1]["completed"] == 40
    assert all(len(s["occupancy"]) == 2 and len(s["hit_rate_by_level"]) == 2 for s in res.timeline)
    assert any(s["occupancy"][1] > 0 for s in res.timeline)
    assert res.timeline[-1]["hit_rate"] == pytest.approx(res.hit_rate)


def test_simulate_resume_failure_falls_back_to_close_and_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    # resume() that keeps failing: the suspended request is closed and restarted instead
    def failing_resume(self: FakeEngine, kv: Any, cuda_stream: Any = None) -> bool:
        return False

    monkeypatch.setattr(FakeEngine, "resume", failing_resume)
    res = run_simulation(requests=40, gpu_mb=1, host_mb=2, max_batch=16, progress=False)
    assert res.completed == 40 and res.skipped == 0
    assert res.suspends > 0 and res.resumes == 0
    assert res.resume_failures > 0
    assert res.preemptions == res.suspends  # every suspended request was restarted
    assert res.admissions == 40 + res.preemptions


def test_simulate_resume_data_loss_restarts_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    # resume() raising DataIntegrityError (stored pages failed their checksum): close and redo
    original = FakeEngine.resume
    calls = {"n": 0}

    def losing_resume(self: FakeEngine, kv: Any, cuda_stream: Any = None) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise DataIntegrityError("block 3 (layer group 0) failed its checksum")
        return original(self, kv, cuda_stream)

    monkeypatch.setattr(FakeEngine, "resume", losing_resume)
    res = run_simulation(requests=40, gpu_mb=1, host_mb=2, max_batch=16, progress=False)
    assert res.completed == 40 and res.skipped == 0
    assert res.data_loss_restarts == 1 and res.preemptions >= 1
    assert res.resumes == res.suspends - 1
    assert "corrupt pages" in res.format_table()


def test_simulate_cli_host_tier_json(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    rc = main(["simulate", "--requests", "24", "--gpu-mb", "1", "--host-mb", "2", "--no-progress", "--json", str(out)])
    assert rc == 0
    summary = json.loads(out.read_text())
    by_tier = summary["hit_rate_by_tier"]
    assert set(by_tier) == {"gpu (level 0)", "host (level 1)", "total"}
    assert by_tier["total"]["reused_tokens"] == summary["reused_tokens"]
    assert summary["host_quota_bytes"] == 2 * MiB and summary["disk_quota_bytes"] == 0
    assert summary["timeline"] and "occupancy" in summary["timeline"][0]


def test_simulate_disk_tier(tmp_path: Path) -> None:
    pytest.importorskip("kv_cache_manager_v2._backends._disk")
    disk_dir = tmp_path / "disk"
    res = run_simulation(requests=40, gpu_mb=1, host_mb=1, disk_mb=4, disk_path=str(disk_dir), progress=False)
    assert res.completed == 40 and res.skipped == 0
    assert res.tiers == ["gpu (level 0)", "host (level 1)", "disk (level 2)"]
    gpu, host, disk = res.reused_tokens_by_level
    assert disk > 0 and host > 0 and gpu > 0 and gpu + host + disk == res.reused_tokens
    assert res.onboarded_from_level[2] > 0
    assert "disk (level 2)" in res.format_table()
    assert disk_dir.is_dir() and not any(disk_dir.iterdir())  # the manager removed its files
    # disk right after level 0 (no host tier)
    res2 = run_simulation(requests=24, gpu_mb=1, host_mb=0, disk_mb=4, disk_path=str(disk_dir), progress=False)
    assert res2.completed == 24 and res2.tiers == ["gpu (level 0)", "disk (level 1)"]
    assert res2.suspends > 0 and res2.resume_onboarded_blocks_by_level[1] > 0


def test_simulate_disk_tier_default_temp_dir_is_removed() -> None:
    pytest.importorskip("kv_cache_manager_v2._backends._disk")
    res = run_simulation(requests=12, gpu_mb=1, host_mb=0.5, disk_mb=2, progress=False)
    assert res.completed == 12
    assert res.disk_path and not os.path.exists(res.disk_path)


def test_simulate_cli_disk_tier_missing_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # a build without the disk level (the manager's construction raises ImportError): a clear
    # error, not a traceback, and the default temporary directory is removed
    import fake_engine._cli as cli

    made: list[str] = []
    real_mkdtemp = cli.tempfile.mkdtemp

    def mkdtemp(*args: Any, **kwargs: Any) -> str:
        made.append(real_mkdtemp(*args, dir=str(tmp_path), **kwargs))
        return made[-1]

    def no_disk_level(*args: Any, **kwargs: Any) -> Any:
        raise ImportError("No module named 'kv_cache_manager_v2._backends._disk'")

    monkeypatch.setattr(cli.tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(cli, "Simulator", no_disk_level)
    rc = main(["simulate", "--requests", "4", "--disk-mb", "4", "--no-progress"])
    assert rc == 1
    assert "disk tier is not available" in capsys.readouterr().err
    assert len(made) == 1 and not os.path.exists(made[0])


def test_simulate_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "sim.png"
    rc = main(
        ["simulate", "--requests", "24", "--gpu-mb", "1", "--host-mb", "2", "--no-progress", "--plot", str(png),
         "--sample-every", "5"]  # fmt: skip
    )
    assert rc == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_simulate_plot_without_matplotlib(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    png = tmp_path / "sim.png"
    rc = main(["simulate", "--requests", "4", "--no-progress", "--plot", str(png)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err
    assert not png.exists()


def test_simulate_disk_corruption_is_never_wrong_data(tmp_path: Path) -> None:
    # corrupt half of the disk tier's stored slots every few steps: the manager drops them
    # (shorter matches, or DataIntegrityError on resume -> the request is redone); every byte
    # the fake engine reads back still verifies
    disk_mod = pytest.importorskip("kv_cache_manager_v2._backends._disk")
    from fake_engine import Simulator, model_config

    class CorruptingSimulator(Simulator):
        calls = 0
        corrupted = 0

        def _accumulate_stats(self) -> list[int]:
            self.calls += 1
            if self.calls % 7 == 0:
                for level in self.manager._ctx.storage.levels[-1].disk:  # internals
                    faults = disk_mod.DiskFaults()
                    level.set_faults(faults)
                    for slot in range(level.num_slots):
                        if slot % 2 == 0 and level.is_valid(slot):
                            faults.corrupt(slot, 0, 100)
                            self.corrupted += 1
            return super()._accumulate_stats()

    cfg = model_config(gpu_quota_bytes=1 * MiB, disk_quota_bytes=4 * MiB, disk_path=str(tmp_path))
    sim = CorruptingSimulator(synthetic_workload(num_requests=40), cfg, progress=False)
    try:
        res = sim.run()
    except AttributeError as exc:  # the storage internals moved: not what this test is about
        sim.manager.shutdown()
        pytest.skip(f"disk level internals changed: {exc}")
    sim.shutdown()
    assert sim.corrupted > 0
    assert res.completed == 40 and res.skipped == 0
    assert res.data_loss_restarts > 0
    assert res.stat("dropped_blocks") > 0
    assert res.bytes_verified > 0
