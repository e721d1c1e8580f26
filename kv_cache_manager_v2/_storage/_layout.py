"""Coalesced slot layout: which bytes of which pool hold each (layer, role) buffer of a block."""

from __future__ import annotations

from .._config import AttentionLayerConfig, KVCacheManagerConfig
from .._life_cycle_registry import LifeCycleRegistry


class BufferLayout:
    """Where one (layer, role) buffer lives inside its layer group's coalesced slot."""

    __slots__ = (
        "layer_id",
        "role",
        "buffer_index",
        "size",
        "expansion",
        "expanded_size",
        "layer_group",
        "pool_index",
        "layer_offset",
        "scratch_pages_per_block",
    )

    def __init__(
        self, layer_id: int, role: str, buffer_index: int, size: int, expansion: int, layer_group: int
    ) -> None:
        self.layer_id = layer_id
        self.role = role
        self.buffer_index = buffer_index
        self.size = size
        self.expansion = expansion
        self.expanded_size = size * expansion
        self.layer_group = layer_group
        self.pool_index = -1
        self.layer_offset = -1
        self.scratch_pages_per_block = 0


class PoolLayout:
    """One pool of a layer group: every buffer of one expanded size, one record per slot."""

    __slots__ = ("expanded_size", "buffers")

    def __init__(self, expanded_size: int) -> None:
        self.expanded_size = expanded_size
        self.buffers: list[BufferLayout] = []

    @property
    def scale(self) -> int:
        return len(self.buffers)

    @property
    def record_size(self) -> int:
        return self.expanded_size * len(self.buffers)


class LayerGroupLayout:
    __slots__ = ("group_id", "layer_ids", "pools", "pool_group")

    def __init__(self, group_id: int, layer_ids: list[int]) -> None:
        self.group_id = group_id
        self.layer_ids = layer_ids
        self.pools: list[PoolLayout] = []
        self.pool_group = -1

    @property
    def slot_size(self) -> int:
        return sum(p.record_size for p in self.pools)

    def scratch_slots(self, num_blocks: int) -> int:
        """Scratch slots `num_blocks` scratch blocks of this group share (SPEC 4.8):
        ceil(n x frac), frac = max over layers L and pools P of (buffers of L in P) / scale(P).
        Computed exactly as the max over buffers of ceil(n x scratch_pages_per_block / scale)."""
        if num_blocks <= 0:
            return 0
        out = 0
        for p in self.pools:
            scale = len(p.buffers)
            for b in p.buffers:
                k = -(-(num_blocks * b.scratch_pages_per_block) // scale)
                if k > out:
                    out = k
        return out

    def pool_signature(self) -> tuple[tuple[int, int], ...]:
        return tuple((p.expanded_size, p.scale) for p in self.pools)


class PoolGroupLayout:
    """Layer groups with identical pool lists share one allocator and one set of pools."""

    __slots__ = ("pool_group_id", "record_sizes", "layer_groups")

    def __init__(self, pool_group_id: int, record_sizes: list[int]) -> None:
        self.pool_group_id = pool_group_id
        self.record_sizes = record_sizes
        self.layer_groups: list[int] = []

    @property
    def slot_size(self) -> int:
        return sum(self.record_sizes)


class StorageLayout:
    """The whole layout of a manager: layer groups, pools, pool groups, buffer positions."""

    __slots__ = ("tokens_per_block", "layer_groups", "pool_groups", "buffers", "layer_buffers")

    def __init__(self, config: KVCacheManagerConfig, registry: LifeCycleRegistry) -> None:
        tpb = config.tokens_per_block
        self.tokens_per_block = tpb
        self.layer_groups: list[LayerGroupLayout] = [
            LayerGroupLayout(g, list(ids)) for g, ids in enumerate(registry.group_layers)
        ]
        self.buffers: dict[tuple[int, str], BufferLayout] = {}
        self.layer_buffers: dict[int, list[BufferLayout]] = {}
        for layer in config.layers:
            assert isinstance(layer, AttentionLayerConfig)
            gid = registry.layer_to_group[layer.layer_id]
            group = self.layer_groups[gid]
            own: list[BufferLayout] = []
            for j, b in enumerate(layer.buffers):
                t = b.tokens_per_block_override if b.tokens_per_block_override is not None else tpb
                bl = BufferLayout(layer.layer_id, b.role, j, b.size, tpb // t, gid)
                pool = None
                for pi, p in enumerate(group.pools):
                    if p.expanded_size == bl.expanded_size:
                        pool = p
                        bl.pool_index = pi
                        break
                if pool is None:
                    pool = PoolLayout(bl.expanded_size)
                    bl.pool_index = len(group.pools)
                    group.pools.append(pool)
                bl.layer_offset = len(pool.buffers)
                pool.buffers.append(bl)
                own.append(bl)
                self.buffers[(layer.layer_id, b.role)] = bl
            self.layer_buffers[layer.layer_id] = own
            for bl in own:
                bl.scratch_pages_per_block = sum(1 for o in own if o.pool_index == bl.pool_index)
        # Pool groups: one per distinct pool signature, in order of first appearance.
        self.pool_groups: list[PoolGroupLayout] = []
        sigs: dict[tuple[tuple[int, int], ...], int] = {}
        for group in self.layer_groups:
            sig = group.pool_signature()
            pg = sigs.get(sig)
            if pg is None:
                pg = len(self.pool_groups)
                sigs[sig] = pg
                self.pool_groups.append(PoolGroupLayout(pg, [p.record_size for p in group.pools]))
            group.pool_group = pg
            self.pool_groups[pg].layer_groups.append(group.group_id)

    def buffer(self, layer_id: int, role: str) -> BufferLayout:
        bl = self.buffers.get((layer_id, role))
        if bl is None:
            if layer_id not in self.layer_buffers:
                raise ValueError(f"layer_id {layer_id} is not a configured layer")
            raise ValueError(f"role {role!r} is not a buffer of layer {layer_id}")
        return bl
