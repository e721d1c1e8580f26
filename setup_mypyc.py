#!/usr/bin/env python3
"""Build the compiled (production) mode of kv_cache_manager_v2 with mypyc.

Usage (from anywhere; paths are resolved relative to this file)::

    python setup_mypyc.py build_ext --inplace [-j N]   (add -v to echo compiler commands)

Compiles every ``.py`` module of ``kv_cache_manager_v2/`` (recursively, including
the subpackages' ``__init__.py``) except ``kv_cache_manager_v2/_exceptions.py`` and
``kv_cache_manager_v2/_config.py`` (the public config dataclasses: kept interpreted so that
validation sees exactly what the caller passed and names the field, see docs/DESIGN.md)
into one mypyc compilation group (a shared ``*__mypyc`` library plus one small
shim extension per module), with ``-O3``.  The C sources are compiled in
parallel (``-j``, default: number of CPUs), and progress is printed because the
whole build takes a while.

Environment knobs (defaults are the measured-best settings):
    KVCM_MYPYC_OPT_LEVEL   C optimisation level (default "3")
    KVCM_MYPYC_MULTI_FILE  "1": one C file per module, compiled in parallel
                           (default); "0": one big C file
    KVCM_MYPYC_JOBS        parallel C compiler processes (default: CPU count)
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
PACKAGE = "kv_cache_manager_v2"
# Not compiled: exception classes stay interpreted (subclassable, picklable).
EXCLUDE = {f"{PACKAGE}/_exceptions.py", f"{PACKAGE}/_config.py"}

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[setup_mypyc +{time.monotonic() - _T0:6.1f}s] {msg}", flush=True)


def find_modules() -> list[str]:
    """All .py files of the package (relative posix paths), minus EXCLUDE."""
    pkg_dir = ROOT / PACKAGE
    if not (pkg_dir / "__init__.py").is_file():
        sys.exit(f"setup_mypyc: {pkg_dir}/__init__.py not found")
    files = []
    for path in sorted(pkg_dir.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if "__pycache__" in rel.split("/") or rel in EXCLUDE:
            continue
        # only real (sub)packages: every parent directory must have __init__.py
        parents = path.relative_to(ROOT).parents
        if any(not (ROOT / p / "__init__.py").is_file() for p in list(parents)[:-1]):
            continue
        files.append(rel)
    return files


def _jobs() -> int:
    env = os.environ.get("KVCM_MYPYC_JOBS")
    if env:
        return max(1, int(env))
    return max(1, os.cpu_count() or 1)


def main() -> None:
    os.chdir(ROOT)  # mypyc writes C into ./build and resolves paths from cwd
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))

    from setuptools import setup
    from setuptools.command.build_ext import build_ext

    try:
        from mypyc.build import mypycify
    except ImportError:
        sys.exit("setup_mypyc: mypyc is not installed (pip install -e '.[dev]')")

    opt_level = os.environ.get("KVCM_MYPYC_OPT_LEVEL", "3")
    multi_file = os.environ.get("KVCM_MYPYC_MULTI_FILE", "1") == "1"
    jobs = _jobs()

    files = find_modules()
    building = any(a.startswith("build") for a in sys.argv[1:])
    verbose = any(a in ("-v", "--verbose") for a in sys.argv[1:])
    if building and not verbose and not any(a in ("-q", "--quiet") for a in sys.argv[1:]):
        # our own progress lines replace setuptools' echo of every compiler command
        # (compiler errors and warnings are still shown); pass -v to see them
        sys.argv.insert(1, "--quiet")
    if building:
        log(f"mypyc: type-checking and generating C for {len(files)} modules of {PACKAGE} "
            f"(opt_level={opt_level}, multi_file={multi_file}); excluded: {sorted(EXCLUDE)}")
        for f in files:
            print(f"    {f}", flush=True)
    ext_modules = mypycify(
        files,
        opt_level=opt_level,
        multi_file=multi_file,
        separate=False,
        # keep asserts: the library relies on them in debug paths only
        strip_asserts=False,
    )
    if building:
        log(f"mypyc: C generation done; {len(ext_modules)} extension(s) to compile "
            f"with {jobs} parallel job(s)")

    up_to_date: list[str] = []

    class ParallelBuildExt(build_ext):  # type: ignore[misc]
        """build_ext that compiles the C files of all extensions in parallel
        (at most `jobs` compiler processes in total) and reports progress."""

        def finalize_options(self) -> None:
            if self.parallel is None:
                self.parallel = jobs  # extension-level parallelism (setuptools)
            super().finalize_options()

        def build_extensions(self) -> None:
            compiler = self.compiler
            orig_compile = compiler.compile
            slots = threading.BoundedSemaphore(jobs)
            lock = threading.Lock()
            counts = {"done": 0}
            total = sum(len(e.sources) for e in self.extensions)

            def compile_one(source: str, output_dir: str | None, args: Any,
                            kwargs: Any) -> list[str]:
                with slots:
                    t = time.monotonic()
                    objs: list[str] = orig_compile([source], output_dir, *args, **kwargs)
                with lock:
                    counts["done"] += 1
                    log(f"  compiled [{counts['done']}/{total}] {os.path.basename(source)} "
                        f"({time.monotonic() - t:.1f}s)")
                return objs

            def parallel_compile(sources: list[str], output_dir: str | None = None,
                                 *args: Any, **kwargs: Any) -> list[str]:
                # create object directories up front (mkpath is not thread safe)
                for obj in compiler.object_filenames(sources, output_dir=output_dir):
                    os.makedirs(os.path.dirname(obj) or ".", exist_ok=True)
                if len(sources) <= 1:
                    return [o for s in sources for o in compile_one(s, output_dir, args, kwargs)]
                with ThreadPoolExecutor(max_workers=jobs) as pool:
                    results = list(pool.map(
                        lambda s: compile_one(s, output_dir, args, kwargs), sources))
                return [o for objs in results for o in objs]

            compiler.compile = parallel_compile
            try:
                super().build_extensions()
            finally:
                compiler.compile = orig_compile

        def build_extension(self, ext: Any) -> None:
            t0 = time.monotonic()
            mtime = self._ext_mtime(ext)
            super().build_extension(ext)
            if self._ext_mtime(ext) == mtime:
                up_to_date.append(ext.name)
            elif len(ext.sources) > 1:
                log(f"built {ext.name} ({len(ext.sources)} C files) in "
                    f"{time.monotonic() - t0:.1f}s")

        def _ext_mtime(self, ext: Any) -> float | None:
            try:
                return os.path.getmtime(self.get_ext_fullpath(ext.name))
            except OSError:
                return None

        def run(self) -> None:
            super().run()
            if up_to_date:
                log(f"{len(up_to_date)}/{len(self.extensions)} extension(s) were up to date")

    setup(
        ext_modules=ext_modules,
        cmdclass={"build_ext": ParallelBuildExt},
        # pyproject.toml describes the package; this script only builds extensions
        packages=[],
        py_modules=[],
    )
    if building:
        log("done")


if __name__ == "__main__":
    main()
