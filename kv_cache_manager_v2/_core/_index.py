"""Page-index conversion: block base indices (slot ids) to the page indices kernels read."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .._common import BAD_PAGE_INDEX, PageIndexMode, ScratchDesc

if TYPE_CHECKING:
    # numpy is imported only when the vectorised form is used: importing it starts OpenBLAS
    # worker threads, which spin on the engine's cores.
    import numpy as np
    import numpy.typing as npt


class PageIndexConverter:
    """Converts one cache's base page indices for one (layer, role) buffer.

    SHARED: index = slot * scale (the buffer's base address carries its layer offset).
    PER_LAYER: index = slot * scale + layer_offset (one base address per pool).
    Each index i then expands to i * expansion + k for k < expansion; -1 stays -1.
    """

    __slots__ = ("scale", "expansion", "layer_offset", "scratch_pages_per_block")

    def __init__(self, scale: int, expansion: int, layer_offset: int, scratch_pages_per_block: int) -> None:
        for name, v in (("scale", scale), ("expansion", expansion), ("scratch_pages_per_block", scratch_pages_per_block)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(layer_offset, int) or not 0 <= layer_offset < scale:
            raise ValueError(f"layer_offset must be in [0, scale), got {layer_offset!r}")
        self.scale = scale
        self.expansion = expansion
        self.layer_offset = layer_offset
        self.scratch_pages_per_block = scratch_pages_per_block

    def __call__(
        self,
        base_indices: Sequence[int],
        index_mode: PageIndexMode | None = None,
        scratch: ScratchDesc | None = None,
    ) -> list[int]:
        per_layer = index_mode is PageIndexMode.PER_LAYER
        if index_mode is not None and not isinstance(index_mode, PageIndexMode):
            raise TypeError(f"index_mode must be a PageIndexMode or None, got {type(index_mode).__name__}")
        has_scratch = scratch is not None and bool(scratch)
        if has_scratch and not per_layer:
            raise ValueError("index_mode SHARED cannot address scratch blocks; use PageIndexMode.PER_LAYER")
        scale = self.scale
        e = self.expansion
        off = self.layer_offset if per_layer else 0
        out: list[int] = []
        sbeg = 0
        send = 0
        slot_ids: Sequence[int] = ()
        if scratch is not None and has_scratch:
            sbeg = scratch.range.beg
            send = scratch.range.end
            slot_ids = scratch.slot_ids
        for o, b in enumerate(base_indices):
            if sbeg <= o < send:
                t = (o - sbeg) * self.scratch_pages_per_block
                slot = slot_ids[t // scale]
                i = slot * scale + ((t % scale) + self.layer_offset) % scale
            elif b < 0:
                for _ in range(e):
                    out.append(BAD_PAGE_INDEX)
                continue
            else:
                i = b * scale + off
            if e == 1:
                out.append(i)
            else:
                i *= e
                for k in range(e):
                    out.append(i + k)
        return out

    def convert_array(
        self, base_indices: "npt.ArrayLike", index_mode: PageIndexMode | None = None
    ) -> "npt.NDArray[np.int64]":
        """Vectorised form for many caches at once: any-shaped int array in, the last axis
        expanded by `expansion` out (-1 stays -1). Scratch blocks are not handled here."""
        import numpy as np

        a = np.asarray(base_indices, dtype=np.int64)
        off = self.layer_offset if index_mode is PageIndexMode.PER_LAYER else 0
        e = self.expansion
        idx = (a * self.scale + off)[..., None] * e + np.arange(e, dtype=np.int64)
        idx = np.where((a < 0)[..., None], BAD_PAGE_INDEX, idx)
        return idx.reshape(*a.shape[:-1], a.shape[-1] * e) if a.ndim > 0 else idx.reshape(e)
