"""The suite runs twice (see the Makefile): in dev mode with KVCM_EXPECT_COMPILED=0
and from inside build/compiled/ with KVCM_EXPECT_COMPILED=1.  Check that the
loaded library really is the expected build, so a compiled run can never
silently test the interpreted sources (or the reverse)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

import kv_cache_manager_v2

EXT_SUFFIXES = (".so", ".pyd")
NOT_COMPILED = {"_exceptions.py", "_config.py"}  # setup_mypyc.py leaves them interpreted


def _expected() -> bool | None:
    value = os.environ.get("KVCM_EXPECT_COMPILED")
    if value is None or value == "":
        return None
    assert value in ("0", "1"), f"KVCM_EXPECT_COMPILED must be '0' or '1', not {value!r}"
    return value == "1"


def _pkg_dir() -> Path:
    return Path(kv_cache_manager_v2.__file__).resolve().parent


def test_is_compiled_matches_expected_mode() -> None:
    expected = _expected()
    if expected is None:
        pytest.skip("KVCM_EXPECT_COMPILED not set (run through the Makefile)")
    assert kv_cache_manager_v2.is_compiled() is expected, kv_cache_manager_v2.__file__


def test_loaded_modules_match_mode() -> None:
    expected = _expected()
    if expected is None:
        pytest.skip("KVCM_EXPECT_COMPILED not set (run through the Makefile)")
    pkg_dir = _pkg_dir()
    # Every .py module has (compiled) or lacks (dev) its extension module next to it.
    for py in sorted(pkg_dir.rglob("*.py")):
        if "__pycache__" in py.parts:
            continue
        exts = [p for p in py.parent.glob(py.stem + ".*") if p.suffix in EXT_SUFFIXES]
        if expected and py.name not in NOT_COMPILED:
            assert exts, f"compiled build lacks an extension module for {py}"
        else:
            assert not exts, f"unexpected compiled artifact(s) {exts}"
    # Modules already imported all come from one tree, in the expected form.
    for name, mod in list(sys.modules.items()):
        if not (name == "kv_cache_manager_v2" or name.startswith("kv_cache_manager_v2.")):
            continue
        file = getattr(mod, "__file__", None)
        if file is None:
            continue
        path = Path(file).resolve()
        assert path.is_relative_to(pkg_dir), f"{name} loaded from {path}, not from {pkg_dir}"
        is_ext = path.suffix in EXT_SUFFIXES
        if expected and path.name.split(".")[0] + ".py" not in NOT_COMPILED:
            assert is_ext, f"{name} is interpreted in compiled mode ({path})"
        if not expected:
            assert not is_ext, f"{name} is compiled in dev mode ({path})"


def test_core_modules_are_extensions_in_compiled_mode() -> None:
    expected = _expected()
    if expected is None:
        pytest.skip("KVCM_EXPECT_COMPILED not set (run through the Makefile)")
    exc = importlib.import_module("kv_cache_manager_v2._exceptions")
    assert exc.__file__ is not None and exc.__file__.endswith(".py")
    for name in ("kv_cache_manager_v2._common", "kv_cache_manager_v2._core._kv_cache_manager"):
        mod = importlib.import_module(name)
        assert mod.__file__ is not None
        assert mod.__file__.endswith(EXT_SUFFIXES) is expected, mod.__file__


def test_compiled_run_uses_the_separate_build_directory() -> None:
    if _expected() is not True:
        pytest.skip("only meaningful for the compiled run")
    # run from inside build/compiled: the compiled copy must shadow the editable install
    assert _pkg_dir().is_relative_to(Path.cwd().resolve()), (_pkg_dir(), Path.cwd())
