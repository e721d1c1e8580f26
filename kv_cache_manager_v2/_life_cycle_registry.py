"""Layer groups ("life cycles"): layers sharing one attention shape, and their stale ranges."""

from __future__ import annotations

from typing import Final

from ._common import div_up
from ._config import AttentionLayerConfig, LayerConfig

NO_WINDOW: Final = 0


class LifeCycle:
    """Attention shape of a layer group: window (NO_WINDOW for full attention) and sink blocks."""

    __slots__ = ("window", "sink_tokens", "sink_blocks", "tokens_per_block")

    def __init__(self, window: int, sink_tokens: int, tokens_per_block: int) -> None:
        self.window = window
        self.sink_tokens = sink_tokens
        self.sink_blocks = div_up(sink_tokens, tokens_per_block)
        self.tokens_per_block = tokens_per_block

    @property
    def is_windowed(self) -> bool:
        return self.window != NO_WINDOW

    def stale_beg(self, history: int) -> int:
        return min(div_up(history, self.tokens_per_block), self.sink_blocks)

    def stale_end(self, history: int) -> int:
        """End of the stale block range at `history` (equal to stale_beg when it is empty)."""
        s = min(div_up(history, self.tokens_per_block), self.sink_blocks)
        if self.window == NO_WINDOW:
            return s
        e = (history + 1 - self.window) // self.tokens_per_block
        return e if e > s else s

    def is_stale(self, block: int, history: int) -> bool:
        return self.stale_beg(history) <= block < self.stale_end(history)


class LifeCycleRegistry:
    """Assigns dense layer-group ids in order of first appearance in `config.layers`."""

    __slots__ = ("life_cycles", "layer_to_group", "group_layers")

    def __init__(self, layers: list[LayerConfig], tokens_per_block: int) -> None:
        self.life_cycles: list[LifeCycle] = []
        self.layer_to_group: dict[int, int] = {}
        self.group_layers: list[list[int]] = []
        keys: dict[tuple[int, int], int] = {}
        for layer in layers:
            assert isinstance(layer, AttentionLayerConfig)
            window = layer.sliding_window_size if layer.sliding_window_size is not None else 0
            sinks = layer.num_sink_tokens if layer.num_sink_tokens is not None else 0
            if window == NO_WINDOW:
                sinks = 0
            lc = LifeCycle(window, sinks, tokens_per_block)
            key = (window, lc.sink_blocks)
            gid = keys.get(key)
            if gid is None:
                gid = len(self.life_cycles)
                keys[key] = gid
                self.life_cycles.append(lc)
                self.group_layers.append([])
            elif self.life_cycles[gid].sink_tokens != sinks:
                # Same sink blocks, different sink tokens: keep the largest so every layer's sinks stay visible.
                old = self.life_cycles[gid]
                self.life_cycles[gid] = LifeCycle(window, max(old.sink_tokens, sinks), tokens_per_block)
            self.layer_to_group[layer.layer_id] = gid
            self.group_layers[gid].append(layer.layer_id)

    @property
    def num_groups(self) -> int:
        return len(self.life_cycles)
