"""Disaggregated serving demo: a prompt's KV goes from a prefill-side manager to a decode-side
manager through the aggregated page descriptors (SPEC §4.10), and every byte is verified."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from kv_cache_manager_v2 import (
    BufferId,
    KVCache,
    KVCacheManager,
    KVCacheManagerConfig,
    align_block_spans,
    cached_tokens_per_layer_group,
)

from ._engine import FakeEngine, Step


def _all_buffers(config: KVCacheManagerConfig) -> list[BufferId]:
    return [BufferId(layer.layer_id, b.role) for layer in config.layers for b in layer.buffers]


def block_spans(kv: KVCache, layer_group_id: int, sink_blocks: int) -> list[tuple[list[int], int]]:
    """The cache's valid aggregated page indices of one group as (blocks, start token) spans:
    the valid list is the trailing blocks, or (SWA with sinks) the sink blocks then the window."""
    tpb = kv.tokens_per_block
    valid = kv.get_aggregated_page_indices(layer_group_id, valid_only=True)
    nb = kv.num_blocks
    if sink_blocks > 0 and len(valid) < nb:
        sb = min(sink_blocks, len(valid))
        rest = valid[sb:]
        return [(valid[:sb], 0), (rest, (nb - len(rest)) * tpb)]
    return [(valid, (nb - len(valid)) * tpb)]


@dataclass
class TransferStats:
    blocks: list[int] = field(default_factory=list)  # per layer group
    bytes: list[int] = field(default_factory=list)


def transfer(
    src_mgr: KVCacheManager,
    src_kv: KVCache,
    dst_mgr: KVCacheManager,
    dst_kv: KVCache,
    config: KVCacheManagerConfig,
    sink_blocks: list[int],
) -> TransferStats:
    """Copies every block both caches hold (aligned by token position) with ctypes.memmove.
    Both managers must use the same layer configuration."""
    buffers = _all_buffers(config)
    src_descs = src_mgr.get_aggregated_pages(buffers)
    dst_descs = dst_mgr.get_aggregated_pages(buffers)
    if len(src_descs) != len(dst_descs):
        raise ValueError("the two managers lay out their buffers differently")
    tpb = src_kv.tokens_per_block
    num_groups = len(src_mgr.layer_grouping)
    stats = TransferStats([0] * num_groups, [0] * num_groups)
    for lg in range(num_groups):
        pairs: list[tuple[list[int], list[int]]] = []
        for (sb, s0), (db, d0) in zip(block_spans(src_kv, lg, sink_blocks[lg]), block_spans(dst_kv, lg, sink_blocks[lg])):
            pairs.append(align_block_spans(sb, s0, db, d0, tpb))
        for sd, dd in zip(src_descs, dst_descs):
            if sd.layer_group_id != lg:
                continue
            if sd.size != dd.size or sd.layer_group_id != dd.layer_group_id or sd.buffers != dd.buffers:
                raise ValueError(f"descriptor mismatch: {sd!r} vs {dd!r}")
            for src_blocks, dst_blocks in pairs:
                for s, d in zip(src_blocks, dst_blocks):
                    ctypes.memmove(dd.base + dd.stride * d, sd.base + sd.stride * s, sd.size)
                    stats.bytes[lg] += sd.size
        stats.blocks[lg] = sum(len(p[0]) for p in pairs)
    return stats


@dataclass
class DisaggResult:
    prompt_len: int
    tokens_per_block: int
    layer_grouping: tuple[tuple[int, ...], ...]
    cached_tokens: list[int]
    blocks_sent: list[int]
    bytes_sent: list[int]
    decode_tokens: int
    bytes_verified: int

    def format_summary(self) -> str:
        lines = [
            f"disaggregated transfer: prompt {self.prompt_len} tokens, tpb {self.tokens_per_block}",
        ]
        for lg, layers in enumerate(self.layer_grouping):
            lines.append(
                f"  layer group {lg} (layers {list(layers)}): cached tokens {self.cached_tokens[lg]}, "
                f"{self.blocks_sent[lg]} blocks / {self.bytes_sent[lg]} bytes sent"
            )
        lines.append(
            f"verified: prompt and {self.decode_tokens} decoded tokens on the decode side "
            f"({self.bytes_verified} bytes read back)"
        )
        return "\n".join(lines)


def run_disagg(config: KVCacheManagerConfig, prompt: list[int], decode_tokens: int = 8) -> DisaggResult:
    """Prefill `prompt` on one manager, send it to a second one, verify and decode there."""
    prefill = KVCacheManager(config)
    decode = KVCacheManager(config)
    pe = FakeEngine(prefill, config)
    de = FakeEngine(decode, config)
    n = len(prompt)
    tpb = prefill.tokens_per_block
    src = prefill.create_kv_cache(input_tokens=prompt)
    dst = decode.create_kv_cache()
    try:
        if not src.resume() or not src.resize(n):
            raise RuntimeError("prefill side: out of pages")
        written = list(prompt[: src.num_committed_tokens])
        pe.forward([Step(src, prompt[len(written) :], written)])
        src.commit(prompt[src.num_committed_tokens :])
        cached = cached_tokens_per_layer_group(src, n)
        if not dst.resume() or not dst.resize(n, n):
            raise RuntimeError("decode side: out of pages")
        sinks = [g.sink_blocks for g in pe.groups]
        stats = transfer(prefill, src, decode, dst, config, sinks)
        de.verify(dst, prompt)
        dst.commit(prompt)
        seq = list(prompt)
        for i in range(decode_tokens):
            tok = 100_000 + i
            if not dst.resize(len(seq) + 1):
                raise RuntimeError("decode side: out of pages")
            de.forward([Step(dst, [tok], list(seq))])
            seq.append(tok)
            dst.commit([tok])
        de.verify(dst, seq)
        return DisaggResult(
            n, tpb, prefill.layer_grouping, cached, stats.blocks, stats.bytes, decode_tokens, de.bytes_verified
        )
    finally:
        src.close()
        dst.close()
        prefill.shutdown()
        decode.shutdown()


__all__ = ["DisaggResult", "TransferStats", "block_spans", "run_disagg", "transfer"]
