"""rawref: non-owning references that also work for objects without weakref support.

``rawref.ref(obj)`` returns a reference ``r`` that does not keep ``obj`` alive;
``r()`` returns ``obj`` while it is alive and ``None`` once it has been
deallocated (it never returns a freed object).  Unlike :mod:`weakref` it works
for mypyc native classes and ``__slots__`` classes without ``__weakref__``.

The implementation is the C extension :mod:`rawref._rawref` (``rawref/rawref.c``).
"""

from rawref._rawref import ref as ref

__all__ = ["ref"]
