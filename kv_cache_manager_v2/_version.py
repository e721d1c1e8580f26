"""Build-mode introspection."""

from __future__ import annotations


def is_compiled() -> bool:
    """True when the package was loaded as mypyc-compiled extension modules."""
    return not __file__.endswith(".py")
