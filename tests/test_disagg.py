"""Disaggregated transfer helpers (SPEC §4.10) and an end-to-end prefill -> decode transfer."""

from __future__ import annotations

import ctypes
from typing import Callable

import pytest
from conftest import attention, make_config
from fake_engine import FakeEngine, Step
from fake_engine._cli import main as cli_main

from kv_cache_manager_v2 import (
    BufferId,
    DataIntegrityError,
    KVCache,
    KVCacheManager,
    align_block_spans,
    cached_tokens_per_layer_group,
    is_compiled,
)

TPB = 64


def _type_msg(name: str) -> str | None:
    """A compiled build refuses a wrong scalar type in the function's C wrapper (TypeError with
    mypyc's own message); interpreted, our check names the argument."""
    return None if is_compiled() else name


def test_align_same_start() -> None:
    assert align_block_spans([10, 11, 12], 0, [20, 21, 22], 0, TPB) == ([10, 11, 12], [20, 21, 22])


def test_align_dst_starts_later() -> None:
    assert align_block_spans([10, 11, 12, 13, 14], 0, [20, 21, 22], 128, TPB) == ([12, 13, 14], [20, 21, 22])


def test_align_src_starts_later() -> None:
    assert align_block_spans([10, 11, 12], 64, [20, 21, 22, 23], 0, TPB) == ([10, 11, 12], [21, 22, 23])


def test_align_both_offset() -> None:
    assert align_block_spans([10, 11, 12], 64, [20, 21], 128, TPB) == ([11, 12], [20, 21])


def test_align_no_overlap() -> None:
    assert align_block_spans([10, 11, 12], 0, [20, 21], 192, TPB) == ([], [])


@pytest.mark.parametrize("s0,d0,name", [(1, 0, "src_start"), (0, 65, "dst_start"), (32, 64, "src_start")])
def test_align_non_multiple_start(s0: int, d0: int, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        align_block_spans([1, 2], s0, [3, 4], d0, TPB)


def test_align_bad_types() -> None:
    with pytest.raises(TypeError, match="src_blocks"):
        align_block_spans(None, 0, [1], 0, TPB)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dst_blocks"):
        align_block_spans([1], 0, [1.5], 0, TPB)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=_type_msg("tokens_per_block")):
        align_block_spans([1], 0, [1], 0, "64")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tokens_per_block"):
        align_block_spans([1], 0, [1], 0, 0)
    with pytest.raises(ValueError, match="dst_start"):
        align_block_spans([1], 0, [1], -64, TPB)


def test_cached_tokens_formula(make_manager: Callable[..., KVCacheManager]) -> None:
    # groups: full, SWA 100 without sinks, SWA 100 with 4 sinks
    mgr = make_manager(
        layers=[attention(0), attention(1, window=100), attention(2, window=100, sinks=4)],
        tokens_per_block=16,
    )
    kv = mgr.create_kv_cache()
    assert kv.resume()
    assert kv.resize(185)
    prompt = list(range(185))
    kv.commit(prompt[:150])
    g = 144  # 150 rounded down to a block
    stale_end = (185 + 1 - 100) // 16  # 5 -> 80 tokens
    assert cached_tokens_per_layer_group(kv, 185) == [g, max(g, stale_end * 16), g]
    # Less committed than the stale edge: the SWA group without sinks reports the edge.
    assert cached_tokens_per_layer_group(kv, 400) == [g, ((400 + 1 - 100) // 16) * 16, g]
    assert cached_tokens_per_layer_group(kv, 0) == [g, g, g]
    with pytest.raises(TypeError, match=_type_msg("kv_cache")):
        cached_tokens_per_layer_group(object(), 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prompt_len"):
        cached_tokens_per_layer_group(kv, -1)
    with pytest.raises(TypeError, match=_type_msg("prompt_len")):
        cached_tokens_per_layer_group(kv, 1.0)  # type: ignore[arg-type]
    kv.close()


def _copy(src_mgr: KVCacheManager, src: KVCache, dst_mgr: KVCacheManager, dst: KVCache,
          buffers: list[BufferId], skip: int = -1) -> list[int]:
    """Copies every aligned block of every layer group; returns blocks sent per group.
    `skip` (a block position in the aligned span of group 0) is left out, to test detection."""
    tpb = src.tokens_per_block
    sent: list[int] = []
    src_descs = src_mgr.get_aggregated_pages(buffers)
    dst_descs = dst_mgr.get_aggregated_pages(buffers)
    assert [d.size for d in src_descs] == [d.size for d in dst_descs]
    for lg in range(len(src_mgr.layer_grouping)):
        sv = src.get_aggregated_page_indices(lg, valid_only=True)
        dv = dst.get_aggregated_page_indices(lg, valid_only=True)
        s0 = (src.num_blocks - len(sv)) * tpb
        d0 = (dst.num_blocks - len(dv)) * tpb
        sb, db = align_block_spans(sv, s0, dv, d0, tpb)
        assert len(sb) == len(db) > 0
        for sd, dd in zip(src_descs, dst_descs):
            if sd.layer_group_id != lg:
                continue
            for k, (s, d) in enumerate(zip(sb, db)):
                if lg == 0 and k == skip:
                    continue
                ctypes.memmove(dd.base + dd.stride * d, sd.base + sd.stride * s, sd.size)
        sent.append(len(sb))
    return sent


@pytest.mark.parametrize("skip", [-1, 3])
def test_end_to_end_transfer(skip: int) -> None:
    layers = [attention(0, size=16 * 32), attention(1, size=16 * 32, window=64),
              attention(2, size=16 * 32), attention(3, size=16 * 32, window=64)]
    cfg = make_config(layers=layers, tokens_per_block=16, quota=4 << 20)
    prefill, decode = KVCacheManager(cfg), KVCacheManager(cfg)
    pe, de = FakeEngine(prefill, cfg), FakeEngine(decode, cfg)
    n = 185
    prompt = [1000 + 3 * i for i in range(n)]
    src = prefill.create_kv_cache(input_tokens=prompt)
    assert src.resume() and src.resize(n)
    pe.forward([Step(src, prompt, [])])
    src.commit(prompt)
    assert cached_tokens_per_layer_group(src, n) == [176, 176]

    dst = decode.create_kv_cache()
    assert dst.resume()
    assert dst.resize(n, n)
    # SWA stale blocks [0, 7) got no page on the decode side.
    swa = decode.get_layer_group_id(1)
    assert list(dst.get_base_page_indices(swa)[:7]) == [-1] * 7
    assert len(dst.get_aggregated_page_indices(swa, valid_only=True)) == 12 - 7
    buffers = [BufferId(layer.layer_id, b.role) for layer in layers for b in layer.buffers]
    sent = _copy(prefill, src, decode, dst, buffers, skip)
    assert sent == [12, 5]
    if skip >= 0:
        with pytest.raises(DataIntegrityError):
            de.verify(dst, prompt)
    else:
        de.verify(dst, prompt)
        dst.commit(prompt)
        seq = list(prompt)
        for i in range(20):
            assert dst.resize(len(seq) + 1)
            de.forward([Step(dst, [7 + i], list(seq))])
            seq.append(7 + i)
            dst.commit([7 + i])
        de.verify(dst, seq)
    for kv in (src, dst):
        kv.close()
    for m in (prefill, decode):
        m.check_invariants()
        m.shutdown()


def test_cli_disagg(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["disagg"]) == 0
    out = capsys.readouterr().out
    assert "layer group 0" in out and "verified" in out and "blocks" in out


def test_cli_disagg_other_shape(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["disagg", "--prompt-len", "300", "--tpb", "32", "--window", "96", "--decode-tokens", "40"]) == 0
    assert "verified" in capsys.readouterr().out
