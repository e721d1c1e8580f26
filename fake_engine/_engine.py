"""The fake engine: plays a model's forward pass over the manager's pages.

Every token a layer writes into the KV cache is a 16-byte record
``(token, layer_id, buffer_index, beam)`` (little-endian uint32) repeated over
the token's bytes.  Before writing, the engine reads back the history tokens
each layer can see and compares them with that pattern, so any page that holds
wrong bytes, is unmapped, or is mapped where it must not be, is caught on the
spot.

Memory is addressed only through the manager's public API: the pool base
address of a buffer, its page stride and its page-index converter, applied to
the cache's base page indices (``base + index * stride``).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import numpy.typing as npt

from kv_cache_manager_v2 import (
    AttentionLayerConfig,
    DataIntegrityError,
    KVCacheManager,
    KVCacheManagerConfig,
    KVCacheStatus,
    PageIndexMode,
)

Token = Union[int, bytes]
U32Array = npt.NDArray[np.uint32]
I64Array = npt.NDArray[np.int64]

RECORD_BYTES = 16
_EMPTY_I64: I64Array = np.zeros(0, dtype=np.int64)
_EMPTY_U32: U32Array = np.zeros(0, dtype=np.uint32)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def token_value(token: Token) -> int:
    """The uint32 a token contributes to its record (bytes: first 4 bytes, LE)."""
    if isinstance(token, bytes):
        return int.from_bytes(token[:4], "little")
    return token


def tokens_to_array(tokens: Sequence[Token]) -> U32Array:
    """Vectorised token -> uint32 conversion (falls back per token for bytes)."""
    if len(tokens) == 0:
        return _EMPTY_U32
    arr = np.asarray(tokens)
    if arr.dtype.kind in "iu" and arr.ndim == 1:
        return arr.astype(np.uint32)
    # bytes tokens present (numpy would make strings of the whole list)
    return np.fromiter((token_value(t) for t in tokens), dtype=np.uint32, count=len(tokens))


@dataclass(frozen=True)
class Step:
    """One request's share of a forward pass.

    ``history_tokens`` are the tokens already in the cache (positions
    ``[0, len(history_tokens))``); ``input_tokens`` are written at the positions
    that follow.  The engine keeps a reference to ``history_tokens`` (to verify
    later without copying), so the caller may append to it afterwards but must
    not change its first ``len(history_tokens)`` entries.
    """

    kv_cache: Any
    input_tokens: Sequence[Token]
    history_tokens: Sequence[Token]


def stale_block_range(
    history: int, tokens_per_block: int, window: int | None, sink_blocks: int
) -> tuple[int, int]:
    """Stale range (blocks, half open) of an attention group at ``history`` (SPEC §2)."""
    if window is None:
        return (0, 0)
    s = min(_ceil_div(history, tokens_per_block), sink_blocks)
    e = max(s, (history + 1 - window) // tokens_per_block)
    return (s, e)


def visible_ranges(history: int, window: int | None, sink_tokens: int) -> list[tuple[int, int]]:
    """Positions of history a layer reads when the next token is at ``history``."""
    if history <= 0:
        return []
    if window is None:
        return [(0, history)]
    ws = max(0, history + 1 - window)
    out: list[tuple[int, int]] = []
    sink_end = min(sink_tokens, ws)
    if sink_end > 0:
        out.append((0, sink_end))
    out.append((ws, history))
    return out


class _Group:
    __slots__ = ("group_id", "window", "sink_blocks", "buffers")

    def __init__(self, group_id: int, window: int | None, sink_blocks: int) -> None:
        self.group_id = group_id
        self.window = window
        self.sink_blocks = sink_blocks
        self.buffers: list[_Buffer] = []


class _Buffer:
    """One (layer, role) buffer and its lazily grown view of the pool."""

    __slots__ = (
        "layer_id",
        "role",
        "buffer_index",
        "group",
        "window",
        "sink_tokens",
        "tokens_per_page",
        "expansion",
        "token_bytes",
        "words_per_token",
        "reps",
        "stride",
        "base",
        "converter",
        "view",
    )

    def __init__(
        self,
        manager: KVCacheManager,
        layer: AttentionLayerConfig,
        buffer_index: int,
        group: _Group,
        index_mode: PageIndexMode,
    ) -> None:
        buf = layer.buffers[buffer_index]
        tpb = manager.tokens_per_block
        self.layer_id: int = layer.layer_id
        self.role: str = buf.role
        self.buffer_index = buffer_index
        self.group = group
        self.window: int | None = layer.sliding_window_size
        self.sink_tokens: int = layer.num_sink_tokens or 0
        tpp = buf.tokens_per_block_override or tpb
        self.tokens_per_page: int = tpp
        self.expansion: int = tpb // tpp
        self.stride: int = int(manager.get_page_stride(layer.layer_id, buf.role))
        if self.stride % tpp != 0 or self.stride // tpp <= 0 or (self.stride // tpp) % RECORD_BYTES:
            raise ValueError(
                f"layer {layer.layer_id} buffer {buf.role!r}: page stride {self.stride} over "
                f"{tpp} tokens is not a positive multiple of {RECORD_BYTES} bytes per token"
            )
        self.token_bytes: int = self.stride // tpp
        self.words_per_token: int = self.token_bytes // 4
        self.reps: int = self.token_bytes // RECORD_BYTES
        self.base: int = int(manager.get_mem_pool_base_address(layer.layer_id, buf.role, index_mode))
        if self.base % 4:
            raise ValueError(f"layer {layer.layer_id} buffer {buf.role!r}: pool base not 4-byte aligned")
        self.converter = manager.get_page_index_converter(layer.layer_id, buf.role)
        # rows = token slots of ``token_bytes`` each; slot = page * tokens_per_page + j
        self.view: npt.NDArray[np.uint32] = np.zeros((0, self.words_per_token), dtype=np.uint32)

    def ensure_rows(self, rows: int) -> npt.NDArray[np.uint32]:
        """A uint32 view [rows, words_per_token] of the pool from its base address.

        Pool base addresses never change (SPEC §2), so the view is only ever grown.
        Creating a view touches no memory; only mapped pages are read or written.
        """
        if rows > self.view.shape[0]:
            rows = max(rows, self.view.shape[0] + self.view.shape[0] // 2, 64)
            nbytes = rows * self.token_bytes
            raw = (ctypes.c_uint8 * nbytes).from_address(self.base)
            self.view = np.ctypeslib.as_array(raw).view(np.uint32).reshape(rows, self.words_per_token)
        return self.view

    def describe(self) -> str:
        return f"layer {self.layer_id} buffer {self.role!r} (#{self.buffer_index})"


class _CacheState:
    __slots__ = ("kv", "full", "dirty_lo", "written", "tokens", "stale_checked")

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self.full = True  # next step verifies everything visible
        self.dirty_lo = 0  # positions >= dirty_lo are re-checked at the next step
        self.written = 0  # positions [0, written) hold engine data
        # (history sequence, its length, input tokens): the tokens in the cache
        self.tokens: tuple[Sequence[Token], int, Sequence[Token]] = ((), 0, ())
        self.stale_checked: dict[int, int] = {}  # group -> stale blocks below this checked

    def expected_tokens(self, lo: int, hi: int) -> Sequence[Token]:
        hist, h, inp = self.tokens
        if hi <= h:
            return hist[lo:hi]
        if lo >= h:
            return inp[lo - h : hi - h]
        return list(hist[lo:h]) + list(inp[: hi - h])


class _Pending:
    """Per-buffer reads and writes collected over a batch."""

    __slots__ = (
        "read_slots",
        "read_tokens",
        "read_owner",
        "write_slots",
        "write_tokens",
        "write_owner",
        "scratch_slots",
        "scratch_tokens",
        "scratch_owner",
    )

    def __init__(self) -> None:
        self.read_slots: list[I64Array] = []
        self.read_tokens: list[U32Array] = []
        self.read_owner: list[tuple[int, I64Array]] = []  # (step index, positions)
        self.write_slots: list[I64Array] = []
        self.write_tokens: list[U32Array] = []
        self.write_owner: list[tuple[int, I64Array]] = []
        # Writes that land on SWA scratch slots (SPEC 4.8): every layer of the group reuses the
        # same slots one after another, so they are read back right after this buffer's write,
        # before the next layer overwrites them.
        self.scratch_slots: list[I64Array] = []
        self.scratch_tokens: list[U32Array] = []
        self.scratch_owner: list[tuple[int, I64Array]] = []


def _positions(ranges: Sequence[tuple[int, int]]) -> I64Array:
    parts = [np.arange(a, b, dtype=np.int64) for a, b in ranges if b > a]
    if not parts:
        return _EMPTY_I64
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts)


def _clip(ranges: Sequence[tuple[int, int]], lo: int) -> list[tuple[int, int]]:
    return [(max(a, lo), b) for a, b in ranges if b > max(a, lo)]


class FakeEngine:
    """Plays forward passes over a :class:`KVCacheManager`'s pages on real bytes.

    ``forward(steps)`` reads back and verifies, per layer and buffer, the history
    each request's layer can see (blocks touched since that cache's last step, or
    everything visible when the cache is new or marked dirty), then writes the
    new tokens.  ``verify(kv, tokens)`` does a full check on demand.
    """

    def __init__(
        self,
        manager: KVCacheManager,
        config: KVCacheManagerConfig,
        index_mode: PageIndexMode = PageIndexMode.PER_LAYER,
        beam: int = 0,
    ) -> None:
        self.manager = manager
        self.config = config
        self.index_mode = index_mode
        self.beam = beam
        self.tokens_per_block: int = int(manager.tokens_per_block)
        self.bytes_verified = 0
        self.bytes_written = 0
        self.tokens_verified = 0
        self.steps = 0
        self._states: dict[int, _CacheState] = {}
        tpb = self.tokens_per_block
        self.groups: list[_Group] = []
        layers: dict[int, AttentionLayerConfig] = {}
        for layer in config.layers:
            if not isinstance(layer, AttentionLayerConfig):
                raise ValueError(f"fake engine supports attention layers only (layer {layer.layer_id})")
            layers[layer.layer_id] = layer
        for gid, layer_ids in enumerate(manager.layer_grouping):
            first = layers[layer_ids[0]]
            sink_blocks = _ceil_div(first.num_sink_tokens or 0, tpb)
            group = _Group(gid, first.sliding_window_size, sink_blocks)
            for lid in layer_ids:
                layer = layers[lid]
                if manager.get_layer_group_id(lid) != gid:
                    raise ValueError(f"layer {lid}: get_layer_group_id disagrees with layer_grouping")
                if layer.sliding_window_size != group.window or _ceil_div(
                    layer.num_sink_tokens or 0, tpb
                ) != sink_blocks:
                    raise ValueError(f"layer {lid}: attention shape differs from its layer group {gid}")
                for bi in range(len(layer.buffers)):
                    group.buffers.append(_Buffer(manager, layer, bi, group, index_mode))
            self.groups.append(group)
        self._buffer_by_key: dict[int, _Buffer] = {id(b): b for g in self.groups for b in g.buffers}
        self.buffers: list[_Buffer] = [b for g in self.groups for b in g.buffers]

    # ------------------------------------------------------------------ state
    def _state(self, kv: Any) -> _CacheState:
        st = self._states.get(id(kv))
        if st is None or st.kv is not kv:
            st = _CacheState(kv)
            self._states[id(kv)] = st
        return st

    def mark_dirty(self, kv: Any) -> None:
        """Next step (or ``verify_all``) re-checks everything ``kv``'s layers can see
        (call after resume, reuse, quota change, anything that may move pages)."""
        st = self._states.get(id(kv))
        if st is not None and st.kv is kv:
            st.full = True
            st.stale_checked.clear()

    def resume(self, kv: Any, cuda_stream: Any = None) -> bool:
        """``kv.resume()``; on success the next step re-checks everything visible
        (pages may have come back from another tier or slot)."""
        ok = bool(kv.resume() if cuda_stream is None else kv.resume(cuda_stream))
        if ok:
            self.mark_dirty(kv)
        return ok

    def mark_all_dirty(self) -> None:
        """E.g. after ``manager.resize(level, quota)``."""
        for st in self._states.values():
            st.full = True
            st.stale_checked.clear()

    def forget(self, kv: Any) -> None:
        """Drop the engine's record of ``kv`` (call when closing it)."""
        st = self._states.get(id(kv))
        if st is not None and st.kv is kv:
            del self._states[id(kv)]

    @property
    def tracked_caches(self) -> int:
        return len(self._states)

    # ----------------------------------------------------------------- checks
    def verify(self, kv: Any, tokens: Sequence[Token]) -> None:
        """Full check: every position of ``tokens`` each layer of ``kv`` can see."""
        st = self._state(kv)
        st.full = True
        st.stale_checked.clear()
        self._run([Step(kv, (), tokens)], count_step=False)

    def verify_all(self) -> None:
        """Full check of every tracked active cache against the tokens last written."""
        steps: list[Step] = []
        for key, st in list(self._states.items()):
            if st.kv.status == KVCacheStatus.CLOSED:
                del self._states[key]  # closed without forget(): drop it
                continue
            if not st.kv.is_active:
                continue
            hist, h, inp = st.tokens
            st.full = True
            st.stale_checked.clear()
            steps.append(Step(st.kv, (), st.expected_tokens(0, h + len(inp))))
        if steps:
            self._run(steps, count_step=False)

    def forward(self, steps: Sequence[Step]) -> None:
        """One forward pass of a batch: verify visible history, then write inputs."""
        self._run(steps, count_step=True)

    # ------------------------------------------------------------------- core
    def _run(self, steps: Sequence[Step], count_step: bool) -> None:
        tpb = self.tokens_per_block
        pending: dict[int, _Pending] = {}
        states: list[_CacheState] = []
        seen: set[int] = set()
        for si, step in enumerate(steps):
            kv = step.kv_cache
            if id(kv) in seen:
                raise ValueError("a cache appears twice in one forward batch")
            seen.add(id(kv))
            if not kv.is_active:
                raise ValueError(f"step {si}: cache is not active")
            h = len(step.history_tokens)
            n = len(step.input_tokens)
            if kv.capacity < h + n:
                raise ValueError(f"step {si}: cache capacity {kv.capacity} < {h + n} tokens to hold")
            st = self._state(kv)
            if not st.full and h > st.written:
                st.full = True  # positions this engine never wrote for this cache
            lo = 0 if st.full else min(st.dirty_lo, h)
            st.tokens = (step.history_tokens, h, step.input_tokens)
            states.append(st)
            self._collect(si, step, st, h, n, lo, pending)
        # reads of every buffer before any write (caches may share reused pages)
        for key, p in pending.items():
            buf = self._buffer_by_key[key]
            self._check_reads(buf, p, steps)
        for key, p in pending.items():
            buf = self._buffer_by_key[key]
            self._apply_writes(buf, p, steps)
        for st, step in zip(states, steps):
            h = len(step.history_tokens)
            n = len(step.input_tokens)
            st.written = h + n
            st.dirty_lo = (h // tpb) * tpb
            st.full = False
        if count_step:
            self.steps += 1

    def _collect(
        self,
        si: int,
        step: Step,
        st: _CacheState,
        h: int,
        n: int,
        lo: int,
        pending: dict[int, _Pending],
    ) -> None:
        kv = step.kv_cache
        tpb = self.tokens_per_block
        full = st.full
        has_scratch = bool(getattr(kv, "has_scratch_slots", False))
        write_tokens: U32Array | None = None
        tok_cache: dict[tuple[int, int], U32Array] = {}

        def token_array(a: int, b: int) -> U32Array:
            arr = tok_cache.get((a, b))
            if arr is None:
                arr = tokens_to_array(st.expected_tokens(a, b))
                tok_cache[(a, b)] = arr
            return arr

        for group in self.groups:
            gid = group.group_id
            base_seq = kv.get_base_page_indices(gid)
            nblocks = len(base_seq)
            need_blocks = _ceil_div(h + n, tpb)
            if nblocks < need_blocks:
                raise DataIntegrityError(
                    f"layer group {gid}: cache has {nblocks} blocks of base page indices, "
                    f"{need_blocks} needed for {h + n} tokens"
                )
            # -1 rule: blocks stale at the manager's history hold no page
            hm = int(kv.history_length)
            s, e = stale_block_range(hm, tpb, group.window, group.sink_blocks)
            if e > s:
                s2 = max(s, st.stale_checked.get(gid, s))
                if e > s2:
                    seg = np.asarray(base_seq[s2:e], dtype=np.int64)
                    bad = np.nonzero(seg != -1)[0]
                    if bad.size:
                        b = s2 + int(bad[0])
                        raise DataIntegrityError(
                            f"layer group {gid} (layers {self.manager.layer_grouping[gid]}): block {b} "
                            f"is stale at history {hm} (stale blocks [{s}, {e})) but maps base page "
                            f"{int(seg[bad[0]])} instead of -1"
                        )
                st.stale_checked[gid] = e
            # positions per distinct layer shape in the group (sinks may differ per layer)
            shape_cache: dict[tuple[int | None, int], tuple[I64Array, list[tuple[int, int]]]] = {}
            for buf in group.buffers:
                key = (buf.window, buf.sink_tokens)
                cached = shape_cache.get(key)
                if cached is None:
                    vis = visible_ranges(h, buf.window, buf.sink_tokens)
                    rd_ranges = vis if full else _clip(vis, lo)
                    cached = (_positions(rd_ranges), rd_ranges)
                    shape_cache[key] = cached
                rd_pos, rd_ranges = cached
                # mapped check of every visible block on full checks (touched ones always)
                if full and not has_scratch:
                    for a, b in rd_ranges:
                        blk = np.asarray(base_seq[a // tpb : _ceil_div(b, tpb)], dtype=np.int64)
                        miss = np.nonzero(blk < 0)[0]
                        if miss.size:
                            bb = a // tpb + int(miss[0])
                            raise DataIntegrityError(
                                f"{buf.describe()}: block {bb} is unmapped (base page index -1) but "
                                f"holds visible history (token {max(a, bb * tpb)}, history {h})"
                            )
                wr_ranges = [(h, h + n)] if n else []
                all_ranges = rd_ranges + wr_ranges
                if not all_ranges:
                    continue
                b0 = min(a for a, _ in all_ranges) // tpb
                b1 = _ceil_div(max(b for _, b in all_ranges), tpb)
                desc = None
                if has_scratch:
                    desc = kv.get_scratch_desc(gid)
                    conv_list = buf.converter(base_seq, self.index_mode, desc) if desc else buf.converter(
                        base_seq, self.index_mode
                    )
                    conv = np.asarray(conv_list, dtype=np.int64)[b0 * buf.expansion : b1 * buf.expansion]
                else:
                    conv = np.asarray(buf.converter(base_seq[b0:b1], self.index_mode), dtype=np.int64)
                if conv.shape[0] != (b1 - b0) * buf.expansion:
                    raise DataIntegrityError(
                        f"{buf.describe()}: converter returned {conv.shape[0]} page indices for "
                        f"{b1 - b0} blocks (expected x{buf.expansion})"
                    )
                tpp = buf.tokens_per_page
                sub0 = b0 * buf.expansion
                all_mapped = conv.shape[0] == 0 or int(conv.min()) >= 0
                pend = pending.get(id(buf))
                if pend is None:
                    pend = pending[id(buf)] = _Pending()
                if rd_pos.size:
                    idx = conv[rd_pos // tpp - sub0]
                    if not all_mapped:
                        self._check_mapped(buf, idx, rd_pos, h, "visible history")
                    pend.read_slots.append(idx * tpp + rd_pos % tpp)
                    pend.read_tokens.append(
                        np.concatenate([token_array(a, b) for a, b in rd_ranges])
                        if len(rd_ranges) > 1
                        else token_array(*rd_ranges[0])
                    )
                    pend.read_owner.append((si, rd_pos))
                if n:
                    wr_pos = np.arange(h, h + n, dtype=np.int64)
                    idx = conv[wr_pos // tpp - sub0]
                    if not all_mapped:
                        self._check_mapped(buf, idx, wr_pos, h, "tokens being written")
                    if write_tokens is None:
                        write_tokens = tokens_to_array(step.input_tokens)
                    wr_slots = idx * tpp + wr_pos % tpp
                    pend.write_slots.append(wr_slots)
                    pend.write_tokens.append(write_tokens)
                    pend.write_owner.append((si, wr_pos))
                    if desc:
                        blk = wr_pos // tpb
                        in_scr = (blk >= desc.range.beg) & (blk < desc.range.end)
                        if in_scr.any():
                            pend.scratch_slots.append(wr_slots[in_scr])
                            pend.scratch_tokens.append(write_tokens[in_scr])
                            pend.scratch_owner.append((si, wr_pos[in_scr]))

    def _check_mapped(self, buf: _Buffer, idx: I64Array, pos: I64Array, h: int, what: str) -> None:
        miss = np.nonzero(idx < 0)[0]
        if miss.size:
            p = int(pos[miss[0]])
            raise DataIntegrityError(
                f"{buf.describe()} (layer group {buf.group.group_id}): block {p // self.tokens_per_block} "
                f"is unmapped (page index -1) but holds {what} (token position {p}, history {h})"
            )

    def _records(self, buf: _Buffer, toks: U32Array) -> U32Array:
        rec = np.empty((toks.shape[0], 4), dtype=np.uint32)
        rec[:, 0] = toks
        rec[:, 1] = buf.layer_id
        rec[:, 2] = buf.buffer_index
        rec[:, 3] = self.beam
        return rec

    def _check_reads(self, buf: _Buffer, p: _Pending, steps: Sequence[Step]) -> None:
        if not p.read_slots:
            return
        self._check_slots(buf, p.read_slots, p.read_tokens, p.read_owner)

    def _check_slots(
        self,
        buf: _Buffer,
        read_slots: list[I64Array],
        read_tokens: list[U32Array],
        read_owner: list[tuple[int, I64Array]],
    ) -> None:
        slots = np.concatenate(read_slots) if len(read_slots) > 1 else read_slots[0]
        toks = np.concatenate(read_tokens) if len(read_tokens) > 1 else read_tokens[0]
        view = buf.ensure_rows(int(slots.max()) + 1)
        found = view[slots]
        m = slots.shape[0]
        exp = self._records(buf, toks)
        bad = (found.reshape(m, buf.reps, 4) != exp[:, None, :]).any(axis=(1, 2))
        if bad.any():
            k = int(np.argmax(bad))
            off = 0
            for si, pos in read_owner:
                if k < off + pos.shape[0]:
                    break
                off += pos.shape[0]
            position = int(pos[k - off])
            row = found[k].reshape(buf.reps, 4)
            wrong = int(np.argmax((row != exp[k]).any(axis=1)))
            got = tuple(int(x) for x in row[wrong])
            want = tuple(int(x) for x in exp[k])
            slot = int(slots[k])
            raise DataIntegrityError(
                f"{buf.describe()} (layer group {buf.group.group_id}), batch entry {si}: block "
                f"{position // self.tokens_per_block}, token position {position} (page "
                f"{slot // buf.tokens_per_page}, token {slot % buf.tokens_per_page} in page, record {wrong}): "
                f"expected (token, layer, buffer, beam) = {want}, found {got}"
            )
        self.bytes_verified += m * buf.token_bytes
        self.tokens_verified += m

    def _apply_writes(self, buf: _Buffer, p: _Pending, steps: Sequence[Step]) -> None:
        if not p.write_slots:
            return
        slots = np.concatenate(p.write_slots) if len(p.write_slots) > 1 else p.write_slots[0]
        toks = np.concatenate(p.write_tokens) if len(p.write_tokens) > 1 else p.write_tokens[0]
        if len(p.write_slots) > 1:
            uniq = np.unique(slots)
            if uniq.shape[0] != slots.shape[0]:
                raise DataIntegrityError(
                    f"{buf.describe()}: two requests of one batch write the same page token slot "
                    f"(pages shared between writers)"
                )
        view = buf.ensure_rows(int(slots.max()) + 1)
        rec = self._records(buf, toks)
        view[slots] = np.tile(rec, (1, buf.reps)) if buf.reps > 1 else rec
        self.bytes_written += slots.shape[0] * buf.token_bytes
        if p.scratch_slots:
            # Layer by layer: this layer's scratch tokens are verified before the next layer
            # of the group writes over the same scratch slots.
            self._check_slots(buf, p.scratch_slots, p.scratch_tokens, p.scratch_owner)
