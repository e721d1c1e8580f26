"""Exceptions raised by the library (kept interpreted: mypyc does not compile this module)."""

from __future__ import annotations


class LogicError(RuntimeError):
    """A call that is not allowed in the current state (for example resizing a suspended cache)."""


class CacheCapacityError(RuntimeError):
    """Not enough room in the cache for what was asked."""


class OutOfPagesError(CacheCapacityError):
    """A level has no slot left for a page, even after eviction."""


class OutOfMemoryError(CacheCapacityError):
    """The backend could not allocate memory (host, disk or CUDA)."""


class CuError(RuntimeError):
    """A CUDA driver call failed; carries the driver's status code and name."""

    def __init__(self, code: int, name: str, message: str = "") -> None:
        super().__init__(f"CUDA driver error {code} ({name}){': ' + message if message else ''}")
        self.code = code
        self.name = name


class DataIntegrityError(RuntimeError):
    """Bytes read back do not match what was written (checksum or fake-engine mismatch)."""
