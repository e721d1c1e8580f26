"""Slot allocator of one (level, pool group): a stack of free slot ids and the page in each slot."""

from __future__ import annotations

from librt.vecs import append, pop, vec
from mypy_extensions import i64

from .._page import NIL


class SlotAllocator:
    def __init__(self, num_slots: int) -> None:
        self.num_slots: i64 = num_slots
        # Pop order gives low slot ids first, which keeps touched memory compact.
        self.free: vec[i64] = vec[i64](range(num_slots - 1, -1, -1))
        self.slot_page: vec[i64] = vec[i64]([NIL] * num_slots)

    @property
    def num_free(self) -> i64:
        return len(self.free)

    def take(self, page: i64) -> i64:
        self.free, s = pop(self.free)
        self.slot_page[s] = page
        return s

    def give_back(self, slot: i64) -> None:
        self.slot_page[slot] = NIL
        self.free = append(self.free, slot)
