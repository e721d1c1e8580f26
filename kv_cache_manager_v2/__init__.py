"""kv_cache_manager_v2: paged KV-cache management for LLM inference engines."""

from ._common import (
    BAD_PAGE_INDEX,
    BufferId,
    HalfOpenRange,
    KVCacheStatus,
    PageIndexMode,
    ScratchDesc,
    TokenIdExt,
)
from ._config import (
    AttentionLayerConfig,
    BatchDesc,
    BufferConfig,
    DiskCacheTierConfig,
    GpuCacheTierConfig,
    HostCacheTierConfig,
    KVCacheDesc,
    KVCacheManagerConfig,
    KVCacheRequest,
    ReuseScope,
    SsmLayerConfig,
    SwaScratchReuseConfig,
)
from ._core._index import PageIndexConverter
from ._core._kv_cache import KVCache
from ._core._kv_cache_manager import KVCacheManager
from ._disagg import align_block_spans, cached_tokens_per_layer_group
from ._exceptions import (
    CacheCapacityError,
    CuError,
    DataIntegrityError,
    LogicError,
    OutOfMemoryError,
    OutOfPagesError,
)
from ._stats import AggregatedPageDesc, IterationStats, KVCacheStatsDelta, StorageStatistics
from ._version import is_compiled

__all__ = [
    "BAD_PAGE_INDEX",
    "AggregatedPageDesc",
    "AttentionLayerConfig",
    "BatchDesc",
    "BufferConfig",
    "BufferId",
    "CacheCapacityError",
    "CuError",
    "DataIntegrityError",
    "DiskCacheTierConfig",
    "GpuCacheTierConfig",
    "HalfOpenRange",
    "HostCacheTierConfig",
    "IterationStats",
    "KVCache",
    "KVCacheDesc",
    "KVCacheManager",
    "KVCacheManagerConfig",
    "KVCacheRequest",
    "KVCacheStatsDelta",
    "KVCacheStatus",
    "LogicError",
    "OutOfMemoryError",
    "OutOfPagesError",
    "PageIndexConverter",
    "PageIndexMode",
    "ReuseScope",
    "ScratchDesc",
    "SsmLayerConfig",
    "StorageStatistics",
    "SwaScratchReuseConfig",
    "TokenIdExt",
    "align_block_spans",
    "cached_tokens_per_layer_group",
    "is_compiled",
]
