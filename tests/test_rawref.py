"""Tests for the ``rawref`` C extension (non-owning references).

Besides in-process tests against the installed (release) build, this file
compiles a debug copy of the extension (-O0 -g, asserts on) into a temporary
directory and exercises it in a subprocess running with ``-X dev`` (which
implies ``PYTHONMALLOC=debug``: freed memory is poisoned, so returning a freed
object would crash or fail the identity checks), and, when mypyc is available,
compiles a tiny module of native classes (which cannot be weakref'd) and
exercises refs to them under the same debug setup.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import rawref
from rawref import _rawref as _impl

REPO_ROOT = Path(__file__).resolve().parent.parent
RAWREF_SRC = REPO_ROOT / "rawref" / "rawref.c"
RAWREF_INIT = REPO_ROOT / "rawref" / "__init__.py"


# --------------------------------------------------------------------------
# Test classes
# --------------------------------------------------------------------------


class Slotted:
    __slots__ = ("value",)

    def __init__(self, value: int = 0) -> None:
        self.value = value


class SlottedChild(Slotted):
    __slots__ = ("extra",)

    def __init__(self, value: int = 0) -> None:
        super().__init__(value)
        self.extra = value * 2


class SlottedGrandChild(SlottedChild):
    __slots__ = ()


class EmptySlots:
    __slots__ = ()


@dataclasses.dataclass(slots=True)
class DataSlots:
    a: int
    b: list[int] = dataclasses.field(default_factory=list)


class Plain:
    """Supports weakrefs natively (has __weakref__)."""

    def __init__(self, value: int = 0) -> None:
        self.value = value


class SlottedNode:
    __slots__ = ("next", "value")

    def __init__(self, value: int, nxt: SlottedNode | None = None) -> None:
        self.value = value
        self.next = nxt


class IntSub(int):
    __slots__ = ()


class ListSub(list[Any]):
    __slots__ = ()


def _check_registry() -> None:
    _impl._check_registry()


# --------------------------------------------------------------------------
# Basic behaviour
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory",
    [
        lambda: Slotted(1),
        lambda: SlottedChild(2),
        lambda: SlottedGrandChild(3),
        lambda: EmptySlots(),
        lambda: DataSlots(4, [1, 2]),
        lambda: Plain(5),
        lambda: IntSub(123456789),
        lambda: ListSub([1, 2, 3]),
    ],
    ids=["slots", "slots-child", "slots-grandchild", "empty-slots", "dataclass-slots", "plain",
         "int-subclass", "list-subclass"],
)
def test_alive_then_none(factory: Any) -> None:
    obj = factory()
    r = rawref.ref(obj)
    assert r() is obj
    assert r.is_alive()
    assert bool(r)
    assert "dead" not in repr(r)
    del obj
    assert r() is None
    assert not r.is_alive()
    assert not bool(r)
    assert "dead" in repr(r)
    _check_registry()


def test_dataclass_slots_is_not_weakrefable() -> None:
    import weakref

    with pytest.raises(TypeError):
        weakref.ref(DataSlots(1))
    d = DataSlots(1)
    r = rawref.ref(d)
    assert r() is d
    del d
    assert r() is None


def test_static_types_without_weakref_raise() -> None:
    for obj in (5, "s", (1, 2), [1], {1: 2}, 1.5, None):
        with pytest.raises(TypeError, match="static type without weak reference support"):
            rawref.ref(obj)


def test_weakrefable_builtin_instances_work() -> None:
    def f() -> None:
        pass

    r = rawref.ref(f)
    assert r() is f
    del f
    gc.collect()
    assert r() is None


def test_bad_call_signatures() -> None:
    obj = Slotted()
    with pytest.raises(TypeError):
        rawref.ref()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        rawref.ref(obj, obj)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        rawref.ref(obj=obj)  # type: ignore[call-arg]
    r = rawref.ref(obj)
    with pytest.raises(TypeError):
        r(1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        r(x=1)  # type: ignore[call-arg]
    # the type itself also works through tp_call / tp_new
    r2 = type(r).__new__(type(r), obj)
    assert r2() is obj


def test_generic_alias() -> None:
    alias = rawref.ref[Slotted]
    assert alias.__origin__ is rawref.ref


def test_multiple_refs_to_one_object() -> None:
    obj = Slotted(7)
    refs = [rawref.ref(obj) for _ in range(10)]
    # without weakref support there is one ref per live target
    assert all(r is refs[0] for r in refs)
    assert all(r() is obj for r in refs)
    assert len({hash(r) for r in refs}) == 1
    del obj
    assert all(r() is None for r in refs)

    p = Plain(1)
    prefs = [rawref.ref(p) for _ in range(3)]
    assert all(r() is p for r in prefs)
    assert prefs[0] == prefs[1]
    assert hash(prefs[0]) == hash(prefs[1])
    del p
    gc.collect()
    assert all(r() is None for r in prefs)
    assert prefs[0] != prefs[1]  # dead and distinct ref objects
    assert prefs[0] == prefs[0]


def test_eq_hash() -> None:
    a, b = Slotted(1), Slotted(2)
    ra, rb = rawref.ref(a), rawref.ref(b)
    assert ra == rawref.ref(a)
    assert ra != rb
    assert (ra == 1) is False
    d = {ra: "a", rb: "b"}
    assert d[rawref.ref(a)] == "a"
    h = hash(ra)
    del a
    assert hash(ra) == h  # stable after death


def test_ref_outlives_object_and_address_reuse() -> None:
    refs = []
    for i in range(2000):
        obj = Slotted(i)
        r = rawref.ref(obj)
        assert r() is obj
        refs.append(r)
        del obj  # the next object very likely reuses the address
        assert r() is None
    assert all(r() is None for r in refs)
    assert _impl._registry_size() == 0 or all(r() is None for r in refs)
    _check_registry()


def test_ref_dies_before_object() -> None:
    base = _impl._registry_size()
    obj = Slotted(1)
    r = rawref.ref(obj)
    assert _impl._registry_size() == base + 1
    del r
    assert _impl._registry_size() == base
    r2 = rawref.ref(obj)
    assert r2() is obj
    del obj
    assert r2() is None
    assert _impl._registry_size() == base
    _check_registry()


def test_subclass_defined_after_base_is_hooked() -> None:
    class Base:
        __slots__ = ("x",)

    b = Base()
    rb = rawref.ref(b)

    class Derived(Base):
        __slots__ = ("y",)

    class DerivedWithDict(Base):
        pass  # gets __dict__ and __weakref__

    d = Derived()
    dd = DerivedWithDict()
    rd, rdd = rawref.ref(d), rawref.ref(dd)
    assert (rb(), rd(), rdd()) == (b, d, dd)
    del b, d, dd
    gc.collect()
    assert (rb(), rd(), rdd()) == (None, None, None)
    _check_registry()


def test_hooked_types_diagnostics() -> None:
    class Fresh:
        __slots__ = ("a",)

    f = Fresh()
    r = rawref.ref(f)
    kinds = {t: how for t, how in _impl._hooked_types()}
    assert kinds[Fresh] == "tp_free"
    del f
    assert r() is None


def test_many_objects() -> None:
    objs = [SlottedChild(i) if i % 3 else DataSlots(i) for i in range(20000)]
    refs = [rawref.ref(o) for o in objs]
    for o, r in zip(objs, refs):
        assert r() is o
    del o, r
    _check_registry()
    # drop every other object
    keep = objs[::2]
    del objs
    for i, r in enumerate(refs):
        if i % 2 == 0:
            assert r() is keep[i // 2]
        else:
            assert r() is None
    del keep
    assert all(r() is None for r in refs)
    _check_registry()


def test_gc_cycle_collection() -> None:
    gc.collect()
    gc.disable()
    try:
        a, b = SlottedNode(1), SlottedNode(2)
        a.next, b.next = b, a  # cycle
        c = DataSlots(3)
        c.b.append(0)
        holder: list[Any] = [c]
        c.b = holder  # type: ignore[assignment]  # cycle through a list
        ra, rb, rc = rawref.ref(a), rawref.ref(b), rawref.ref(c)
        del a, b, c, holder
        # still alive: only the cycle keeps them
        assert ra() is not None and rb() is not None and rc() is not None
        assert gc.collect() > 0
        assert (ra(), rb(), rc()) == (None, None, None)
    finally:
        gc.enable()
    _check_registry()


def test_access_from_finalizer_during_gc() -> None:
    """A finalizer that runs during cycle collection may call the ref; it must
    get either None or a fully valid object, never freed memory."""
    seen: list[object] = []

    class Observer:
        def __init__(self, target_ref: rawref.ref[SlottedNode]) -> None:
            self.target_ref = target_ref
            self.cycle = self

        def __del__(self) -> None:
            t = self.target_ref()
            seen.append(None if t is None else t.value)

    gc.collect()
    a, b = SlottedNode(10), SlottedNode(20)
    a.next, b.next = b, a
    obs = Observer(rawref.ref(a))
    obs.keep = a  # type: ignore[attr-defined]
    r = rawref.ref(a)
    del a, b, obs
    gc.collect()
    assert r() is None
    assert seen and seen[0] in (10, None)
    _check_registry()


def test_resurrection_in_finalizer() -> None:
    graveyard: list[object] = []

    class Phoenix:
        __slots__ = ("v",)

        def __init__(self) -> None:
            self.v = 1

        def __del__(self) -> None:
            graveyard.append(self)

    p = Phoenix()
    r = rawref.ref(p)
    del p
    # resurrected: the memory was not freed, so r() may return it, and if it
    # does it must be the very same valid object
    got = r()
    assert got is None or got is graveyard[0]
    del got
    graveyard.clear()  # __del__ is not called again (PEP 442): freed now
    assert r() is None
    _check_registry()


def test_deep_chain_dealloc() -> None:
    head: SlottedNode | None = None
    refs = []
    for i in range(200_000):
        head = SlottedNode(i, head)
        if i % 997 == 0:
            refs.append(rawref.ref(head))
    assert all(r() is not None for r in refs)
    del head
    assert all(r() is None for r in refs)
    _check_registry()


def test_random_create_delete_cycles() -> None:
    rng = random.Random(1234)
    factories = [Slotted, SlottedChild, SlottedGrandChild, lambda i: DataSlots(i), Plain,
                 lambda i: IntSub(i + 10**12)]
    live: dict[int, Any] = {}
    refs: list[tuple[int, rawref.ref[Any]]] = []
    next_key = 0
    for step in range(30_000):
        op = rng.random()
        if op < 0.45 or not live:
            obj = rng.choice(factories)(step)
            live[next_key] = obj
            refs.append((next_key, rawref.ref(obj)))
            next_key += 1
        elif op < 0.85:
            key = rng.choice(list(live)) if len(live) < 64 else next(iter(live))
            del live[key]
        elif op < 0.95 and refs:
            # drop a ref (possibly the only one) before its object
            refs.pop(rng.randrange(len(refs)))
        else:
            key, r = refs[rng.randrange(len(refs))]
            refs.append((key, rawref.ref(live[key]) if key in live else r))
        if step % 500 == 0:
            for key, r in refs:
                got = r()  # noqa: F841 (reset below)
                if key in live:
                    assert got is live[key]
                else:
                    assert got is None
            refs = [(k, r) for k, r in refs if k in live or rng.random() < 0.5]
            _check_registry()
    obj = got = None
    live.clear()
    gc.collect()
    assert all(r() is None for _, r in refs)
    _check_registry()


# --------------------------------------------------------------------------
# Debug build + mypyc native classes (subprocesses)
# --------------------------------------------------------------------------

_BUILD_DEBUG = """
import sys
from setuptools import Distribution, Extension
src, build_lib, build_temp = sys.argv[1:4]
ext = Extension(
    "rawref._rawref",
    [src],
    extra_compile_args=["-O0", "-g", "-UNDEBUG", "-Wall"],
    undef_macros=["NDEBUG"],
)
dist = Distribution({"name": "rawref_debug", "ext_modules": [ext]})
cmd = dist.get_command_obj("build_ext")
cmd.build_lib = build_lib
cmd.build_temp = build_temp
cmd.ensure_finalized()
cmd.run()
"""

# Exercise run in a subprocess under -X dev (PYTHONMALLOC=debug).  Every ref is
# checked against the set of objects known to be alive: a ref that returned a
# freed (poisoned) object would crash or fail an identity check.
_EXERCISE = """
import gc, os, random, sys
import rawref
from rawref import _rawref as impl

expected_dir = os.environ["RAWREF_EXPECT_DIR"]
assert os.path.realpath(impl.__file__).startswith(os.path.realpath(expected_dir)), impl.__file__
assert sys.flags.dev_mode

class Slotted:
    __slots__ = ("v", "nxt")
    def __init__(self, v, nxt=None):
        self.v = v
        self.nxt = nxt

class Child(Slotted):
    __slots__ = ("w",)

class Plain:
    def __init__(self, v):
        self.v = v

factories = [Slotted, Child, Plain]

def stress(factories, steps, seed):
    rng = random.Random(seed)
    live = {}
    refs = []
    key = 0
    for step in range(steps):
        op = rng.random()
        if op < 0.5 or not live:
            obj = rng.choice(factories)(step)
            live[key] = obj
            refs.append((key, rawref.ref(obj)))
            key += 1
        elif op < 0.9:
            del live[rng.choice(list(live)) if len(live) < 32 else next(iter(live))]
        elif refs:
            refs.pop(rng.randrange(len(refs)))
        if step % 97 == 0:
            for k, r in refs:
                got = r()
                if k in live:
                    assert got is live[k], (k, got)
                else:
                    assert got is None, (k, type(got))
            refs = [(k, r) for k, r in refs if k in live or rng.random() < 0.3]
            impl._check_registry()
    obj = got = None
    live.clear()
    gc.collect()
    assert all(r() is None for _, r in refs)
    impl._check_registry()

def immediate(factories, rounds):
    for i in range(rounds):
        for f in factories:
            obj = f(i)
            r = rawref.ref(obj)
            assert r() is obj
            del obj
            assert r() is None

def cycles(make, n):
    gc.collect()
    refs = []
    for i in range(n):
        a, b = make(i), make(i + 1)
        a.nxt, b.nxt = b, a
        refs += [rawref.ref(a), rawref.ref(b)]
    del a, b
    gc.collect()
    assert all(r() is None for r in refs)
    impl._check_registry()

immediate(factories, 300)
cycles(Slotted, 200)
stress(factories, 20000, 1)

if len(sys.argv) > 1:
    sys.path.insert(0, sys.argv[1])
    import rr_native as m
    assert m.__file__.endswith((".so", ".pyd")), m.__file__
    import weakref
    try:
        weakref.ref(m.Node(1))
    except TypeError:
        pass
    else:
        raise AssertionError("native class unexpectedly supports weakref")

    class PySub(m.Extensible):
        __slots__ = ("z",)

    class PySubDict(m.Extensible):
        pass

    native = [lambda i: m.Node(i), lambda i: m.Leaf(i), lambda i: m.Acyclic(i),
              lambda i: m.Pooled(i), lambda i: m.Extensible(i), lambda i: PySub(i),
              lambda i: PySubDict(i), lambda i: m.Cyclic(i)]
    immediate(native, 300)

    # free-list reuse: the dead instance's memory is immediately recycled for
    # a new instance at the same address; the old ref must stay dead.
    p = m.Pooled(1)
    rp = rawref.ref(p)
    addr = id(p)
    del p
    assert rp() is None
    q = m.Pooled(2)
    assert rp() is None
    rq = rawref.ref(q)
    assert rq is not rp and rq() is q
    reused = id(q) == addr
    del q
    assert rq() is None and rp() is None

    # native cycles collected by the GC
    cycles(lambda i: m.Cyclic(i), 200)

    # a deep chain of native objects: deallocation must not overflow the C
    # stack although tp_dealloc is hooked (rawref provides a trashcan)
    head = m.make_chain(300000)
    chain_refs = []
    node = head
    i = 0
    while node is not None:
        if i % 1000 == 0:
            chain_refs.append(rawref.ref(node))
        node = node.next
        i += 1
    del node
    del head
    assert all(r() is None for r in chain_refs)

    stress(native + factories, 20000, 2)
    hooked = {t.__name__: how for t, how in impl._hooked_types()}
    for name in ("Node", "Leaf", "Acyclic", "Pooled", "Extensible", "Cyclic"):
        assert hooked.get(name) == "tp_dealloc", (name, hooked)
    print("free-list address reused:", reused)

print("RAWREF-EXERCISE-OK")
"""

_NATIVE_MODULE = """
from __future__ import annotations

from mypy_extensions import mypyc_attr


class Node:
    def __init__(self, value: int, nxt: Node | None = None) -> None:
        self.value = value
        self.next = nxt
        self.nxt: object = None


class Leaf(Node):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.extra = str(value)


@mypyc_attr(allow_interpreted_subclasses=True)
class Extensible:
    def __init__(self, value: int) -> None:
        self.payload = [value]


@mypyc_attr(acyclic=True)
class Acyclic:
    def __init__(self, value: int) -> None:
        self.value = value


@mypyc_attr(free_list_len=1)
class Pooled:
    def __init__(self, value: int) -> None:
        self.value = value


class Cyclic:
    def __init__(self, value: int) -> None:
        self.value = value
        self.nxt: object = None


def make_chain(n: int) -> Node:
    head = Node(0)
    for i in range(1, n):
        head = Node(i, head)
    return head
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                    f"--- stdout ---\n{proc.stdout[-5000:]}\n--- stderr ---\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def debug_rawref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build a debug copy (-O0 -g, assertions enabled) of the extension."""
    if shutil.which(os.environ.get("CC", "gcc").split()[0]) is None and shutil.which("cc") is None:
        pytest.skip("no C compiler available")
    tmp = tmp_path_factory.mktemp("rawref_debug")
    lib = tmp / "lib"
    (lib / "rawref").mkdir(parents=True)
    shutil.copy(RAWREF_INIT, lib / "rawref" / "__init__.py")
    _run([sys.executable, "-c", _BUILD_DEBUG, str(RAWREF_SRC), str(lib), str(tmp / "temp")],
         cwd=tmp)
    assert list((lib / "rawref").glob("_rawref*")), "debug build produced no extension"
    return lib


def _debug_env(lib: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(lib)] + ([env["PYTHONPATH"]]
                                                       if env.get("PYTHONPATH") else []))
    env["PYTHONMALLOC"] = "debug"
    env["PYTHONFAULTHANDLER"] = "1"
    env["RAWREF_EXPECT_DIR"] = str(lib)
    return env


def test_debug_build_never_returns_freed_objects(debug_rawref: Path) -> None:
    proc = _run([sys.executable, "-X", "dev", "-c", _EXERCISE], cwd=debug_rawref.parent,
                env=_debug_env(debug_rawref), timeout=120)
    assert "RAWREF-EXERCISE-OK" in proc.stdout


def test_mypyc_native_classes(debug_rawref: Path, tmp_path: Path) -> None:
    pytest.importorskip("mypyc.build")
    pytest.importorskip("mypy_extensions")
    src = tmp_path / "native"
    src.mkdir()
    (src / "rr_native.py").write_text(textwrap.dedent(_NATIVE_MODULE))
    build = (
        "from setuptools import setup\n"
        "from mypyc.build import mypycify\n"
        "setup(name='rr_native', ext_modules=mypycify(['rr_native.py'], opt_level='0'),\n"
        "      script_args=['build_ext', '--inplace'])\n"
    )
    t0 = time.monotonic()
    _run([sys.executable, "-c", build], cwd=src, timeout=300)
    build_s = time.monotonic() - t0
    assert any(p.suffix in (".so", ".pyd") for p in src.glob("rr_native*")), list(src.iterdir())
    proc = _run([sys.executable, "-X", "dev", "-c", _EXERCISE, str(src)], cwd=src,
                env=_debug_env(debug_rawref), timeout=180)
    assert "RAWREF-EXERCISE-OK" in proc.stdout, proc.stdout
    print(f"mypyc build took {build_s:.1f}s; {proc.stdout.strip()}")
