"""Statistics records returned by the manager and caches."""

from __future__ import annotations

from typing import Sequence

from ._common import BufferId


class StorageStatistics:
    """Slot counts of one pool group at one level."""

    __slots__ = ("pool_group_id", "total", "free", "evictable", "available", "slot_size")

    def __init__(self, pool_group_id: int, total: int, free: int, evictable: int, slot_size: int) -> None:
        self.pool_group_id = pool_group_id
        self.total = total
        self.free = free
        self.evictable = evictable
        self.available = free + evictable
        self.slot_size = slot_size

    @property
    def utilization(self) -> float:
        return 0.0 if self.total == 0 else (self.total - self.available) / self.total

    def __repr__(self) -> str:
        return (
            f"StorageStatistics(pool_group_id={self.pool_group_id}, total={self.total}, free={self.free}, "
            f"evictable={self.evictable}, available={self.available}, slot_size={self.slot_size})"
        )


class IterationStats:
    """Per layer group counts since the last `get_and_reset_iteration_stats()`."""

    __slots__ = (
        "allocated_blocks",
        "new_blocks",
        "reused_full_blocks",
        "reused_partial_blocks",
        "missed_blocks",
        "onboarded_blocks",
        "offloaded_blocks",
        "dropped_blocks",
        "block_bytes",
        "onboarded_from_level",
    )

    def __init__(self, block_bytes: int) -> None:
        self.allocated_blocks = 0
        self.new_blocks = 0
        self.reused_full_blocks = 0
        self.reused_partial_blocks = 0
        self.missed_blocks = 0
        self.onboarded_blocks = 0
        self.offloaded_blocks = 0
        self.dropped_blocks = 0
        self.block_bytes = block_bytes
        # Onboarded blocks by the level they came from (index = level; entry 0 is always 0).
        self.onboarded_from_level: list[int] = []

    @property
    def reused_blocks(self) -> int:
        return self.reused_full_blocks + self.reused_partial_blocks

    @property
    def allocated_bytes(self) -> int:
        return self.allocated_blocks * self.block_bytes

    @property
    def new_bytes(self) -> int:
        return self.new_blocks * self.block_bytes

    @property
    def reused_bytes(self) -> int:
        return self.reused_blocks * self.block_bytes

    @property
    def onboarded_bytes(self) -> int:
        return self.onboarded_blocks * self.block_bytes

    @property
    def offloaded_bytes(self) -> int:
        return self.offloaded_blocks * self.block_bytes

    @property
    def dropped_bytes(self) -> int:
        return self.dropped_blocks * self.block_bytes

    def as_dict(self) -> dict[str, int | list[int]]:
        return {
            "allocated_blocks": self.allocated_blocks,
            "new_blocks": self.new_blocks,
            "reused_full_blocks": self.reused_full_blocks,
            "reused_partial_blocks": self.reused_partial_blocks,
            "missed_blocks": self.missed_blocks,
            "onboarded_blocks": self.onboarded_blocks,
            "offloaded_blocks": self.offloaded_blocks,
            "dropped_blocks": self.dropped_blocks,
            "allocated_bytes": self.allocated_bytes,
            "new_bytes": self.new_bytes,
            "reused_bytes": self.reused_bytes,
            "onboarded_bytes": self.onboarded_bytes,
            "offloaded_bytes": self.offloaded_bytes,
            "dropped_bytes": self.dropped_bytes,
            "onboarded_from_level": list(self.onboarded_from_level),
        }

    def __repr__(self) -> str:
        return f"IterationStats({self.as_dict()})"


class KVCacheStatsDelta:
    __slots__ = ("alloc_total_blocks", "alloc_new_blocks", "reused_blocks", "missed_blocks")

    def __init__(self, alloc_total_blocks: int, alloc_new_blocks: int, reused_blocks: int, missed_blocks: int) -> None:
        self.alloc_total_blocks = alloc_total_blocks
        self.alloc_new_blocks = alloc_new_blocks
        self.reused_blocks = reused_blocks
        self.missed_blocks = missed_blocks

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KVCacheStatsDelta):
            return NotImplemented
        return (
            self.alloc_total_blocks == other.alloc_total_blocks
            and self.alloc_new_blocks == other.alloc_new_blocks
            and self.reused_blocks == other.reused_blocks
            and self.missed_blocks == other.missed_blocks
        )

    def __repr__(self) -> str:
        return (
            f"KVCacheStatsDelta(alloc_total_blocks={self.alloc_total_blocks}, alloc_new_blocks="
            f"{self.alloc_new_blocks}, reused_blocks={self.reused_blocks}, missed_blocks={self.missed_blocks})"
        )


class AggregatedPageDesc:
    """Bytes of block i for `buffers`: [base + stride * agg_index[i], + size)."""

    __slots__ = ("base", "size", "stride", "layer_group_id", "buffers")

    def __init__(self, base: int, size: int, stride: int, layer_group_id: int, buffers: Sequence[BufferId]) -> None:
        self.base = base
        self.size = size
        self.stride = stride
        self.layer_group_id = layer_group_id
        self.buffers = list(buffers)

    def __repr__(self) -> str:
        return (
            f"AggregatedPageDesc(base={self.base:#x}, size={self.size}, stride={self.stride}, "
            f"layer_group_id={self.layer_group_id}, buffers={self.buffers})"
        )
