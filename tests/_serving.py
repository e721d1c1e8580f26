"""Helpers shared by the cache and manager tests: a fake-engine-driven request."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from conftest import make_config
from fake_engine import FakeEngine, Step

from kv_cache_manager_v2 import KVCache, KVCacheManager

MakeManager = Callable[..., KVCacheManager]


def setup(make_manager: MakeManager, **kw: Any) -> tuple[KVCacheManager, FakeEngine]:
    cfg = make_config(**kw)
    mgr = make_manager(**kw)
    return mgr, FakeEngine(mgr, cfg)


def toks(n: int, base: int) -> list[int]:
    return list(range(base, base + n))


class Seq:
    """One request driven like an engine: resize, forward (write + verify), commit."""

    def __init__(self, eng: FakeEngine, kv: KVCache, written: Sequence[Any] = ()) -> None:
        self.eng = eng
        self.kv = kv
        self.written: list[Any] = list(written)

    def step(self, new: Sequence[Any], commit: bool = True) -> bool:
        kv = self.kv
        need = len(self.written) + len(new)
        if need > kv.capacity and not kv.resize(capacity=need):
            return False
        self.eng.forward([Step(kv, list(new), list(self.written))])
        self.written.extend(new)
        if commit:
            kv.commit(self.written[kv.num_committed_tokens :])
        else:
            kv.resize(history_length=need)
        return True

    def verify(self) -> None:
        self.eng.verify(self.kv, list(self.written))

    def close(self) -> None:
        self.kv.close()
        self.eng.forget(self.kv)
