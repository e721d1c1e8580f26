"""Public configuration dataclasses and their validation (run once, at manager construction).

Not compiled by mypyc (setup_mypyc.py excludes it): compiled dataclasses check field types in
their generated __init__ (with messages that do not name the field) and turn True into 1 in an
int field, so validation here could not report what the caller actually passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Sequence, Union

from ._common import MAX_PRIORITY, TokenIdExt

BACKENDS: Final = ("auto", "host", "cuda")
CACHE_KINDS: Final = ("self", "cross")


@dataclass
class BufferConfig:
    """One buffer of a layer (e.g. role "key"): `size` bytes per block, or per `t'` tokens with an
    override `tokens_per_block_override = t'` (t' must divide tokens_per_block)."""

    role: str
    size: int
    tokens_per_block_override: int | None = None


@dataclass
class AttentionLayerConfig:
    layer_id: int
    buffers: list[BufferConfig]
    sliding_window_size: int | None = None
    num_sink_tokens: int | None = None


@dataclass
class SsmLayerConfig:
    layer_id: int
    buffers: list[BufferConfig]


LayerConfig = Union[AttentionLayerConfig, SsmLayerConfig]


@dataclass
class GpuCacheTierConfig:
    quota: int


@dataclass
class HostCacheTierConfig:
    quota: int


@dataclass
class DiskCacheTierConfig:
    quota: int
    path: str


CacheTierConfig = Union[GpuCacheTierConfig, HostCacheTierConfig, DiskCacheTierConfig]


@dataclass
class SwaScratchReuseConfig:
    max_rewind_len: int = 0


@dataclass
class KVCacheDesc:
    capacity: int
    history_length: int


@dataclass
class BatchDesc:
    kv_caches: list[KVCacheDesc]
    system_prompt_length: int = 0


@dataclass
class ReuseScope:
    """A reuse namespace: blocks committed under one scope never match under another."""

    lora_id: int | None = None
    salt: int | None = None


@dataclass
class KVCacheRequest:
    """One member of a batch admission (`KVCacheManager.create_kv_caches`).

    `capacity` defaults to `len(input_tokens)`; `history_length` to the member's reused length."""

    input_tokens: Sequence[TokenIdExt]
    reuse_scope: ReuseScope | None = None
    id: object = None
    capacity: int | None = None
    history_length: int | None = None


@dataclass
class KVCacheManagerConfig:
    tokens_per_block: int
    cache_tiers: list[CacheTierConfig]
    layers: list[LayerConfig]
    backend: str = "auto"
    max_util_for_resume: float = 0.97
    enable_partial_reuse: bool = True
    reuse_match_backoff: int = 0
    constraints: list[BatchDesc] = field(default_factory=list)
    typical_step: BatchDesc | None = None
    initial_pool_ratio: list[float] | None = None
    swa_scratch_reuse: SwaScratchReuseConfig | None = None
    commit_min_snapshot: bool = False
    cache_kind: str = "self"


def _check_int(value: object, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_priority(value: object, name: str) -> int:
    v = _check_int(value, name, 0)
    if v > MAX_PRIORITY:
        raise ValueError(f"{name} must be in [0, {MAX_PRIORITY}], got {v}")
    return v


def check_reuse_scope(scope: object) -> ReuseScope | None:
    if scope is None:
        return None
    if not isinstance(scope, ReuseScope):
        raise TypeError(f"reuse_scope must be a ReuseScope or None, got {type(scope).__name__}")
    for name, v in (("reuse_scope.lora_id", scope.lora_id), ("reuse_scope.salt", scope.salt)):
        if v is not None:
            _check_int(v, name, 0)
            if v >= 1 << 63:
                raise ValueError(f"{name} must be < 2**63, got {v}")
    return scope


def _validate_buffers(buffers: object, where: str, tpb: int) -> None:
    if not isinstance(buffers, list) or not buffers:
        raise ValueError(f"{where}.buffers must be a non-empty list of BufferConfig")
    roles: set[str] = set()
    for j, b in enumerate(buffers):
        bw = f"{where}.buffers[{j}]"
        if not isinstance(b, BufferConfig):
            raise TypeError(f"{bw} must be a BufferConfig, got {type(b).__name__}")
        if not isinstance(b.role, str) or not b.role:
            raise TypeError(f"{bw}.role must be a non-empty str")
        if b.role in roles:
            raise ValueError(f"{bw}.role {b.role!r} is duplicated in {where}")
        roles.add(b.role)
        _check_int(b.size, f"{bw}.size", 1)
        if b.tokens_per_block_override is not None:
            t = _check_int(b.tokens_per_block_override, f"{bw}.tokens_per_block_override", 1)
            if tpb % t != 0:
                raise ValueError(
                    f"{bw}.tokens_per_block_override={t} does not divide tokens_per_block={tpb}"
                )


def validate_config(config: object) -> KVCacheManagerConfig:
    """Checks every field; raises ValueError/TypeError naming the offending one."""
    if not isinstance(config, KVCacheManagerConfig):
        raise TypeError(f"config must be a KVCacheManagerConfig, got {type(config).__name__}")
    tpb = _check_int(config.tokens_per_block, "tokens_per_block", 1)
    if not isinstance(config.backend, str) or config.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {config.backend!r}")
    if not isinstance(config.cache_kind, str) or config.cache_kind not in CACHE_KINDS:
        raise ValueError(f"cache_kind must be one of {CACHE_KINDS}, got {config.cache_kind!r}")
    if not isinstance(config.commit_min_snapshot, bool):
        raise TypeError("commit_min_snapshot must be a bool")
    if config.commit_min_snapshot:
        raise ValueError("commit_min_snapshot=True is not supported yet")
    if not isinstance(config.enable_partial_reuse, bool):
        raise TypeError("enable_partial_reuse must be a bool")
    _check_int(config.reuse_match_backoff, "reuse_match_backoff", 0)
    mu = config.max_util_for_resume
    if isinstance(mu, bool) or not isinstance(mu, (int, float)):
        raise TypeError("max_util_for_resume must be a float")
    if not 0.0 < float(mu) <= 1.0:
        raise ValueError(f"max_util_for_resume must be in (0, 1], got {mu}")
    if config.swa_scratch_reuse is not None:
        if not isinstance(config.swa_scratch_reuse, SwaScratchReuseConfig):
            raise TypeError("swa_scratch_reuse must be a SwaScratchReuseConfig or None")
        _check_int(config.swa_scratch_reuse.max_rewind_len, "swa_scratch_reuse.max_rewind_len", 0)
    # Tiers: exactly one GPU tier first; colder tiers come in later releases.
    tiers = config.cache_tiers
    if not isinstance(tiers, list) or not tiers:
        raise ValueError("cache_tiers must be a non-empty list starting with a GpuCacheTierConfig")
    for i, t in enumerate(tiers):
        if not isinstance(t, (GpuCacheTierConfig, HostCacheTierConfig, DiskCacheTierConfig)):
            raise TypeError(f"cache_tiers[{i}] must be a cache tier config, got {type(t).__name__}")
        _check_int(t.quota, f"cache_tiers[{i}].quota", 0)
        if isinstance(t, DiskCacheTierConfig) and (not isinstance(t.path, str) or not t.path):
            raise ValueError(f"cache_tiers[{i}].path must be a non-empty str")
    if not isinstance(tiers[0], GpuCacheTierConfig):
        raise ValueError("cache_tiers[0] must be a GpuCacheTierConfig")
    order = {GpuCacheTierConfig: 0, HostCacheTierConfig: 1, DiskCacheTierConfig: 2}
    for i in range(1, len(tiers)):
        if order[type(tiers[i])] <= order[type(tiers[i - 1])]:
            raise ValueError(
                f"cache_tiers[{i}]: tiers go warm to cold (GPU, then at most one host, then at most one disk)"
            )
    # Layers.
    layers = config.layers
    if not isinstance(layers, list) or not layers:
        raise ValueError("layers must be a non-empty list of layer configs")
    ids: set[int] = set()
    for i, layer in enumerate(layers):
        where = f"layers[{i}]"
        if isinstance(layer, SsmLayerConfig):
            raise ValueError("SSM layers are not supported yet")
        if not isinstance(layer, AttentionLayerConfig):
            raise TypeError(f"{where} must be an AttentionLayerConfig, got {type(layer).__name__}")
        lid = _check_int(layer.layer_id, f"{where}.layer_id", 0)
        if lid in ids:
            raise ValueError(f"{where}.layer_id {lid} is duplicated")
        ids.add(lid)
        if layer.sliding_window_size is not None:
            _check_int(layer.sliding_window_size, f"{where}.sliding_window_size", 1)
            if config.cache_kind == "cross":
                raise ValueError(
                    f"{where}.sliding_window_size: a cross-attention manager (cache_kind='cross') "
                    "takes full-attention layers only"
                )
        if layer.num_sink_tokens is not None:
            _check_int(layer.num_sink_tokens, f"{where}.num_sink_tokens", 0)
            if layer.sliding_window_size is None and layer.num_sink_tokens > 0:
                raise ValueError(f"{where}.num_sink_tokens requires sliding_window_size")
        _validate_buffers(layer.buffers, where, tpb)
    for i, c in enumerate(config.constraints if isinstance(config.constraints, list) else [None]):
        if not isinstance(c, BatchDesc):
            raise TypeError(f"constraints[{i}] must be a BatchDesc")
    if config.typical_step is not None and not isinstance(config.typical_step, BatchDesc):
        raise TypeError("typical_step must be a BatchDesc or None")
    return config


def validate_pool_ratio(ratio: Sequence[float] | None, num_groups: int) -> list[float] | None:
    if ratio is None:
        return None
    if not isinstance(ratio, list):
        raise TypeError("initial_pool_ratio must be a list of floats or None")
    if len(ratio) != num_groups:
        raise ValueError(
            f"initial_pool_ratio must have one weight per layer group ({num_groups}), got {len(ratio)}"
        )
    out: list[float] = []
    for i, r in enumerate(ratio):
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise TypeError(f"initial_pool_ratio[{i}] must be a float")
        if not float(r) > 0.0:
            raise ValueError(f"initial_pool_ratio[{i}] must be positive, got {r}")
        out.append(float(r))
    if abs(sum(out) - 1.0) > 1e-6:
        raise ValueError(f"initial_pool_ratio must sum to 1, got {sum(out)}")
    return out
