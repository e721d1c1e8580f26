"""How a level's byte quota is split among pool groups (SPEC 3: initial_pool_ratio, else
typical_step, else constraints, else every layer group gets the same number of slots)."""

from __future__ import annotations

from ._common import div_up
from ._config import BatchDesc, KVCacheManagerConfig
from ._life_cycle_registry import LifeCycleRegistry
from ._storage._layout import StorageLayout


def batch_blocks(
    batch: BatchDesc,
    registry: LifeCycleRegistry,
    tokens_per_block: int,
    layout: StorageLayout | None = None,
    max_rewind: int | None = None,
) -> list[int]:
    """Pages each layer group needs to hold every cache of `batch` at once (the system prompt's
    full blocks are shared, so they count once).

    Scratch-aware sizing (SPEC 4.8): with `max_rewind` given (swa_scratch_reuse configured),
    an SWA group's scratch blocks of each step take only their shared scratch slots,
    ceil(n x frac), instead of one page each; so a windowed group's share of the quota
    shrinks when scratch reuse is on. The default split (no typical_step, no constraints)
    does not depend on steps and is unchanged."""
    out = [0] * registry.num_groups
    shared = batch.system_prompt_length // tokens_per_block
    for i, kv in enumerate(batch.kv_caches):
        nb = div_up(kv.capacity, tokens_per_block)
        for g, lc in enumerate(registry.life_cycles):
            stale = lc.stale_end(kv.history_length) - lc.stale_beg(kv.history_length)
            blocks = nb - stale
            if layout is not None and max_rewind is not None and lc.is_windowed:
                x = max(0, kv.capacity - max_rewind)
                sb = max(lc.stale_beg(x), div_up(kv.history_length, tokens_per_block))
                se = min(lc.stale_end(x), nb)
                if se > sb:
                    blocks -= se - sb
                    blocks += layout.layer_groups[g].scratch_slots(se - sb)
            if i > 0 and not lc.is_windowed:
                blocks -= min(shared, nb)
            out[g] += max(0, blocks)
    return out


def _max_rewind(config: KVCacheManagerConfig) -> int | None:
    scratch = config.swa_scratch_reuse
    return scratch.max_rewind_len if scratch is not None else None


def _check_batch(batch: BatchDesc, where: str) -> None:
    if not isinstance(batch.kv_caches, list):
        raise TypeError(f"{where}.kv_caches must be a list of KVCacheDesc")
    if isinstance(batch.system_prompt_length, bool) or not isinstance(batch.system_prompt_length, int) or batch.system_prompt_length < 0:
        raise ValueError(f"{where}.system_prompt_length must be an int >= 0")
    for j, kv in enumerate(batch.kv_caches):
        for name in ("capacity", "history_length"):
            v = getattr(kv, name, None)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{where}.kv_caches[{j}].{name} must be an int >= 0")
        if kv.history_length > kv.capacity:
            raise ValueError(f"{where}.kv_caches[{j}].history_length exceeds its capacity")


def layer_group_weights(
    config: KVCacheManagerConfig, registry: LifeCycleRegistry, layout: StorageLayout, ratio: list[float] | None
) -> list[float] | None:
    """Each layer group's share of a level's bytes, or None for the default split."""
    if ratio is not None:
        return ratio
    batch = config.typical_step
    if batch is None and config.constraints:
        # The largest constraint stands for the typical step.
        batch = max(config.constraints, key=lambda b: sum(batch_blocks(b, registry, config.tokens_per_block)))
    if batch is None:
        return None
    blocks = batch_blocks(batch, registry, config.tokens_per_block, layout, _max_rewind(config))
    bytes_ = [blocks[g] * layout.layer_groups[g].slot_size for g in range(registry.num_groups)]
    total = sum(bytes_)
    if total == 0:
        return None
    # Never starve a group completely: it could not hold a single block.
    floor = 0.01 / registry.num_groups
    w = [max(b / total, floor) for b in bytes_]
    s = sum(w)
    return [x / s for x in w]


def level0_floors(config: KVCacheManagerConfig, registry: LifeCycleRegistry, layout: StorageLayout) -> list[int] | None:
    """Slots per pool group that every constraint needs on level 0 at once (max over constraints)."""
    if config.typical_step is not None:
        _check_batch(config.typical_step, "typical_step")
    if not config.constraints:
        return None
    floors = [0] * len(layout.pool_groups)
    for i, batch in enumerate(config.constraints):
        _check_batch(batch, f"constraints[{i}]")
        blocks = batch_blocks(batch, registry, config.tokens_per_block, layout, _max_rewind(config))
        need = [0] * len(layout.pool_groups)
        for g in range(registry.num_groups):
            need[layout.layer_groups[g].pool_group] += blocks[g]
        floors = [max(a, b) for a, b in zip(floors, need)]
    return floors
