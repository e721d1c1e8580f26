"""hostcopy: batched host-memory copies for page migrations (C extension ``hostcopy._hostcopy``).

``copy_runs(dsts, srcs, sizes)`` copies ``sizes[i]`` bytes from address ``srcs[i]`` to address
``dsts[i]`` for every ``i`` with the GIL released, merging runs that continue each other, and
returns how many copies it made. Batches of at least ``STREAM_MIN_BATCH`` bytes are written
with non-temporal stores on x86-64 (``STREAMING`` is 1 there). See ``hostcopy/hostcopy.c``.
"""

from hostcopy._hostcopy import STREAM_MIN_BATCH as STREAM_MIN_BATCH
from hostcopy._hostcopy import STREAMING as STREAMING
from hostcopy._hostcopy import copy_runs as copy_runs

__all__ = ["copy_runs", "STREAMING", "STREAM_MIN_BATCH"]
