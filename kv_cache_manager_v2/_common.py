"""Ids, enums, constants and small value classes shared by every layer of the library."""

from __future__ import annotations

import enum
from typing import Final, NamedTuple, NewType, Sequence, Union

LayerId = NewType("LayerId", int)
LayerGroupId = NewType("LayerGroupId", int)
PoolGroupId = NewType("PoolGroupId", int)
CacheLevel = NewType("CacheLevel", int)
BlockOrdinal = NewType("BlockOrdinal", int)
PageId = NewType("PageId", int)
SlotId = NewType("SlotId", int)

TokenIdExt = Union[int, bytes]

BAD_PAGE_INDEX: Final = -1
GPU_LEVEL: Final = 0
DEFAULT_PRIORITY: Final = 35
MIN_PRIORITY: Final = 0
MAX_PRIORITY: Final = 100
NUM_PRIORITIES: Final = 101
TOKEN_ID_LIMIT: Final = 1 << 32
BYTES_TOKEN_LEN: Final = 32
# Host allocations are aligned to this many bytes (a page, so copies and pointers stay fast).
HOST_ALIGNMENT: Final = 4096


class PageIndexMode(enum.Enum):
    """How page indices address a pool: one base per buffer (SHARED) or per pool (PER_LAYER)."""

    SHARED = 0
    PER_LAYER = 1


class KVCacheStatus(enum.Enum):
    ACTIVE = 0
    SUSPENDED = 1
    CLOSED = 2


class BufferId(NamedTuple):
    layer_id: int
    role: str


class HalfOpenRange:
    """Blocks [beg, end); a slotted class (not a tuple) so len/bool survive mypyc compilation."""

    __slots__ = ("beg", "end")

    def __init__(self, beg: int, end: int) -> None:
        self.beg = beg
        self.end = end

    def __len__(self) -> int:
        return max(0, self.end - self.beg)

    def __bool__(self) -> bool:
        return self.end > self.beg

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HalfOpenRange):
            return NotImplemented
        return self.beg == other.beg and self.end == other.end

    def __hash__(self) -> int:
        return hash((self.beg, self.end))

    def __repr__(self) -> str:
        return f"HalfOpenRange({self.beg}, {self.end})"


class ScratchDesc:
    """Scratch blocks of one layer group: the block range and the slots they share."""

    __slots__ = ("range", "slot_ids")

    def __init__(self, range: HalfOpenRange, slot_ids: Sequence[int]) -> None:
        self.range = range
        self.slot_ids = slot_ids

    def __bool__(self) -> bool:
        return bool(self.range)

    def __repr__(self) -> str:
        return f"ScratchDesc({self.range!r}, {list(self.slot_ids)!r})"


def div_up(a: int, b: int) -> int:
    return (a + b - 1) // b
