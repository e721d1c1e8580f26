"""Storage layout: coalesced slots, pools, pool groups and slot allocators."""
