"""Shared fixtures. After every test, every live manager's invariants are checked."""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
from types import ModuleType
from typing import Callable, Iterator

import pytest

from kv_cache_manager_v2 import (
    AttentionLayerConfig,
    BufferConfig,
    GpuCacheTierConfig,
    KVCacheManager,
    KVCacheManagerConfig,
)


def _live_managers() -> list[KVCacheManager]:
    return [o for o in gc.get_objects() if isinstance(o, KVCacheManager)]


@pytest.fixture(autouse=True)
def _check_invariants_after_test() -> Iterator[None]:
    before = {id(m) for m in _live_managers()}
    yield
    for m in _live_managers():
        if id(m) in before:
            continue
        try:
            alive = not m._ctx.shut_down
        except AttributeError:
            alive = True
        if alive:
            m.check_invariants()


def attention(layer_id: int, size: int = 512, window: int | None = None, sinks: int | None = None,
              roles: tuple[str, ...] = ("k", "v")) -> AttentionLayerConfig:
    return AttentionLayerConfig(
        layer_id, [BufferConfig(r, size) for r in roles], sliding_window_size=window, num_sink_tokens=sinks
    )


def make_config(
    layers: list[AttentionLayerConfig] | None = None,
    tokens_per_block: int = 16,
    quota: int = 1 << 20,
    **kwargs: object,
) -> KVCacheManagerConfig:
    if layers is None:
        layers = [attention(0), attention(1)]
    return KVCacheManagerConfig(
        tokens_per_block=tokens_per_block,
        cache_tiers=[GpuCacheTierConfig(quota=quota)],
        layers=list(layers),
        backend="host",
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
def make_manager() -> Iterator[Callable[..., KVCacheManager]]:
    """Factory: make_manager(layers=..., tokens_per_block=..., quota=..., **config_kwargs)."""
    made: list[KVCacheManager] = []

    def factory(**kwargs: object) -> KVCacheManager:
        m = KVCacheManager(make_config(**kwargs))  # type: ignore[arg-type]
        made.append(m)
        return m

    yield factory
    for m in made:
        m.check_invariants()


def find_benchmark(name: str) -> str:
    """benchmarks/<name> in the nearest ancestor of the tests (the suite may run from a copy of
    tests/ inside a build directory of the repository)."""
    d = os.path.dirname(os.path.abspath(__file__))
    while True:
        cand = os.path.join(d, "benchmarks", name)
        if os.path.isfile(cand):
            return cand
        parent = os.path.dirname(d)
        if parent == d:
            raise FileNotFoundError(f"benchmarks/{name} not found above {__file__}")
        d = parent


def load_benchmark(path: str, module_name: str) -> ModuleType:
    """Imports a benchmark script as a module (registered in sys.modules: dataclasses resolve
    annotations through it)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod
