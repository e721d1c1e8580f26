"""Helpers for disaggregated serving (SPEC §4.10): what a prefill side holds per layer group,
and how to line up its block spans with a receiver's."""

from __future__ import annotations

from typing import Sequence

from ._core._kv_cache import KVCache


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def cached_tokens_per_layer_group(kv_cache: KVCache, prompt_len: int) -> list[int]:
    """Per layer group, how many leading prompt tokens the cache covers for transfer.

    With `g` = the committed tokens rounded down to a block: a full-attention group gives `g`;
    an SWA group without sinks gives `max(g, stale_end * tpb)` (its stale blocks need no bytes);
    an SWA group with sinks gives `g` (its valid blocks are the sinks, then the window).
    """
    if not isinstance(kv_cache, KVCache):
        raise TypeError(f"kv_cache must be a KVCache, got {type(kv_cache).__name__}")
    plen = _check_int(prompt_len, "prompt_len", 0)
    ctx = kv_cache._ctx
    tpb = int(ctx.tokens_per_block)
    g = (kv_cache.num_committed_tokens // tpb) * tpb
    out: list[int] = []
    for lc in ctx.life_cycles:
        if not lc.is_windowed or lc.sink_blocks > 0:
            out.append(g)
        else:
            stale_end = max(0, (plen + 1 - lc.window) // tpb)
            out.append(max(g, stale_end * tpb))
    return out


def _check_blocks(blocks: object, name: str) -> list[int]:
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(blocks).__name__}")
    out: list[int] = []
    for i, b in enumerate(blocks):
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"{name}[{i}] must be an int, got {type(b).__name__}")
        out.append(b)
    return out


def align_block_spans(
    src_blocks: Sequence[int],
    src_start: int,
    dst_blocks: Sequence[int],
    dst_start: int,
    tokens_per_block: int,
) -> tuple[list[int], list[int]]:
    """Lines up two block spans: `src_blocks` cover tokens from `src_start`, `dst_blocks` from
    `dst_start` (both multiples of `tokens_per_block`). Returns the equally long parts of both
    that cover the same tokens, starting at the later of the two starts; ([], []) if none."""
    src = _check_blocks(src_blocks, "src_blocks")
    dst = _check_blocks(dst_blocks, "dst_blocks")
    tpb = _check_int(tokens_per_block, "tokens_per_block", 1)
    s0 = _check_int(src_start, "src_start", 0)
    d0 = _check_int(dst_start, "dst_start", 0)
    if s0 % tpb:
        raise ValueError(f"src_start must be a multiple of tokens_per_block ({tpb}), got {s0}")
    if d0 % tpb:
        raise ValueError(f"dst_start must be a multiple of tokens_per_block ({tpb}), got {d0}")
    o = max(s0, d0)
    i = (o - s0) // tpb
    j = (o - d0) // tpb
    n = min(len(src) - i, len(dst) - j)
    if n <= 0:
        return ([], [])
    return (src[i : i + n], dst[j : j + n])
