from typing import Final

STREAMING: Final[int]
STREAM_MIN_BATCH: Final[int]

def copy_runs(dsts: list[int], srcs: list[int], sizes: list[int], /) -> int: ...
