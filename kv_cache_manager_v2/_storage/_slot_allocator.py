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

    def resize(self, num_slots: i64) -> None:
        """Grows with free slots, or shrinks (slots past the new end must all be free)."""
        old = self.num_slots
        if num_slots > old:
            for s in range(num_slots - 1, old - 1, -1):
                self.free = append(self.free, s)
            for _ in range(num_slots - old):
                self.slot_page = append(self.slot_page, NIL)
        elif num_slots < old:
            for s in range(num_slots, old):
                assert self.slot_page[s] == NIL, "shrinking over a used slot"
            keep = vec[i64]()
            for s in self.free:
                if s < num_slots:
                    keep = append(keep, s)
            self.free = keep
            self.slot_page = self.slot_page[:num_slots]
        self.num_slots = num_slots

    def claim(self, slots: list[i64], pages: list[i64]) -> None:
        """Takes specific free slots for pages (used when compacting)."""
        wanted = set(slots)
        keep = vec[i64]()
        for s in self.free:
            if s not in wanted:
                keep = append(keep, s)
        assert len(keep) == len(self.free) - len(slots), "claiming a slot that is not free"
        self.free = keep
        for i in range(len(slots)):
            self.slot_page[slots[i]] = pages[i]
