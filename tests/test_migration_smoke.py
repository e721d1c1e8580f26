"""Smoke test of benchmarks/migration_bandwidth.py: the benchmark logic runs in-process at 16 MiB
(64 KiB pages), every page makes the full level 0 -> host -> disk -> host -> level 0 trip and
its bytes come back intact. No timing thresholds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from conftest import find_benchmark, load_benchmark

pytest.importorskip("kv_cache_manager_v2._backends._disk")
pytest.importorskip("numpy")


SCRIPT = find_benchmark("migration_bandwidth.py")
REPO_ROOT = os.path.dirname(os.path.dirname(SCRIPT))
SIZE_MB = 16
PAGE_KB = 64
PAGES = SIZE_MB * 1024 // PAGE_KB
DIRECTIONS = ("level0_to_host", "host_to_disk", "disk_to_host", "host_to_level0", "level0_to_host_evict")
BASELINES = ("memcpy_gbps", "memcpy_fresh_gbps", "raw_pwrite_gbps", "raw_pread_gbps", "raw_pread_fresh_gbps")


def _load() -> ModuleType:
    return load_benchmark(SCRIPT, "_bench_migration_bandwidth")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load()


def _finite_positive(v: Any) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_round_trip_both_variants(bench: Any, tmp_path: Path) -> None:
    res = bench.run_benchmark(size_mb=SIZE_MB, page_kb=PAGE_KB, directory=str(tmp_path), reps=1, warmup=0)
    assert res["size_bytes"] == SIZE_MB << 20 and res["page_bytes"] == PAGE_KB << 10
    assert res["pages"] == PAGES
    assert res["mode"] in ("dev", "compiled")
    for key in BASELINES:
        assert _finite_positive(res[key]), key
    assert _finite_positive(res["release_seconds"])
    assert _finite_positive(res["release_huge_seconds"])
    assert set(res["variants"]) == {"as-is", "prefaulted"}
    for name, fig in res["variants"].items():
        assert fig["variant"] == name
        # every page went through every level, and every byte came back
        assert fig["moved_pages"] == {d: PAGES for d in DIRECTIONS}, fig["moved_pages"]
        assert fig["complete"] is True
        assert fig["bytes_ok"] is True and fig["bad_blocks"] == 0
        assert fig["verified_bytes"] == 2 * (SIZE_MB << 20)  # after the trip, and after the eviction
        assert fig["onboarded_from_level"] == [0, PAGES, 0]  # resume brought them from host
        assert fig["onboarded_blocks"] == PAGES
        assert fig["offloaded_blocks"] == 2 * PAGES  # level 0 -> host, host -> disk
        for d in DIRECTIONS:
            assert _finite_positive(fig[f"{d}_gbps"]), d
            assert fig["seconds"][d] > 0
    assert res["bytes_ok"] is True and res["complete"] is True
    for d in DIRECTIONS:
        assert res[f"{d}_gbps"] == res["variants"]["as-is"][f"{d}_gbps"]
    targets = res["targets"]
    assert len(targets) == 2 * len(DIRECTIONS)
    for t in targets:
        assert t["target"] in (0.8, 0.5)
        assert isinstance(t["pass"], bool)
        assert t["ratio"] == pytest.approx(t["gbps"] / t["baseline_gbps"])
    table = bench.format_table(res)
    assert "level 0 -> host" in table and "raw pwrite" in table and ("PASS" in table or "MISS" in table)
    json.dumps(res)
    # the disk level's files and the raw-I/O file are gone
    assert list(tmp_path.iterdir()) == []


def test_cli_json(tmp_path: Path) -> None:
    out = tmp_path / "mig.json"
    work = tmp_path / "work"
    proc = subprocess.run(
        [
            sys.executable, SCRIPT, "--size-mb", str(SIZE_MB), "--page-kb", str(PAGE_KB), "--reps", "1",
            "--warmup", "0", "--variant", "as-is", "--dir", str(work), "--json", str(out), "--quiet",
        ],  # fmt: skip
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert list(data["variants"]) == ["as-is"]
    assert data["bytes_ok"] is True
    for d in DIRECTIONS:
        assert d + "_gbps" in data
    assert "memcpy" in proc.stdout and "GB/s" in proc.stdout


def test_cli_rejects_bad_sizes(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--size-mb", "1", "--page-kb", "3", "--dir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "multiple" in proc.stderr
