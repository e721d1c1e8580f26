"""State shared by a manager and its caches (kept apart so the two modules need not import each other)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from librt.vecs import vec
from mypy_extensions import i64

from .._block_radix_tree import BlockRadixTree
from .._config import KVCacheManagerConfig
from .._life_cycle_registry import LifeCycle, LifeCycleRegistry
from .._storage._layout import StorageLayout
from .._storage_manager import StorageManager

if TYPE_CHECKING:
    from ._kv_cache import KVCache


class CacheContext:
    def __init__(
        self,
        config: KVCacheManagerConfig,
        registry: LifeCycleRegistry,
        layout: StorageLayout,
        storage: StorageManager,
        tree: BlockRadixTree,
    ) -> None:
        self.config = config
        self.tokens_per_block: i64 = config.tokens_per_block
        self.life_cycles: list[LifeCycle] = registry.life_cycles
        self.num_groups: i64 = registry.num_groups
        self.layout = layout
        self.storage = storage
        self.tree = tree
        self.lg_pool_group: vec[i64] = vec[i64]([g.pool_group for g in layout.layer_groups])
        self.windowed: list[bool] = [lc.is_windowed for lc in registry.life_cycles]
        self.swa_groups: list[int] = [g for g, lc in enumerate(registry.life_cycles) if lc.is_windowed]
        # The group whose blocks are counted in per-cache stats: the first with a page on every block.
        full = [g for g, lc in enumerate(registry.life_cycles) if not lc.is_windowed]
        self.stats_group: i64 = full[0] if full else 0
        self.open_caches: dict[i64, KVCache] = {}
        self.next_serial: i64 = 0
        self.max_util_for_resume: float = float(config.max_util_for_resume)
        self.shut_down: bool = False
        # Cross-attention caches (cache_kind="cross"): sized once, with resize(L, L).
        self.cross: bool = config.cache_kind == "cross"
        # SWA scratch reuse (SPEC 4.8): configured on the manager; each cache may turn it off.
        scratch = config.swa_scratch_reuse
        self.scratch_on: bool = scratch is not None
        self.max_rewind: i64 = scratch.max_rewind_len if scratch is not None else 0
        # Iteration stats, one entry per layer group.
        g = registry.num_groups
        self.st_allocated: vec[i64] = vec[i64]([0] * g)
        self.st_new: vec[i64] = vec[i64]([0] * g)
        self.st_reused_full: vec[i64] = vec[i64]([0] * g)
        self.st_reused_partial: vec[i64] = vec[i64]([0] * g)
        self.st_missed: vec[i64] = vec[i64]([0] * g)
