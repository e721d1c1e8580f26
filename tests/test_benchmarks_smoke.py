"""Smoke test of benchmarks/manager_overhead.py: the benchmark logic runs in-process on a tiny
scale, returns well-formed figures and leaves the manager without leaks. No timing thresholds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest

from conftest import find_benchmark, load_benchmark


SCRIPT = find_benchmark("manager_overhead.py")
REPO_ROOT = os.path.dirname(os.path.dirname(SCRIPT))

NUM_REQUESTS = 16
DECODE_STEPS = 4

REQUIRED_KEYS = (
    "config",
    "admission_us_per_req",
    "decode_us_per_req_step",
    "close_us_per_req",
    "objects_per_page",
)


def _load_bench() -> ModuleType:
    return load_benchmark(SCRIPT, "_bench_manager_overhead")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load_bench()


@pytest.mark.parametrize("config", ["A", "B"])
def test_run_config_result_shape(bench: Any, config: str) -> None:
    res = bench.run_config(config, num_requests=NUM_REQUESTS, decode_steps=DECODE_STEPS, reps=1)
    for key in REQUIRED_KEYS:
        assert key in res, key
    assert res["config"] == config
    for key in ("admission_us_per_req", "decode_us_per_req_step", "close_us_per_req", "total_us"):
        v = res[key]
        assert isinstance(v, float) and math.isfinite(v) and v > 0, (key, v)
    opp = res["objects_per_page"]
    assert isinstance(opp, float) and math.isfinite(opp), opp
    assert res["pages_held"] > 0
    assert res["reps"] == 1
    # A fresh request on a shared prefix reuses the whole prefix.
    assert res["probe_reuse_prefix"] == bench.PREFIX_LEN
    json.dumps(res)  # serialisable as the child's output


@pytest.mark.parametrize("config", ["A", "B"])
def test_no_leaks_after_run(bench: Any, config: str) -> None:
    result, manager = bench.run_rep(config, NUM_REQUESTS, DECODE_STEPS)
    try:
        assert result.pages_held > 0
        # Every cache is closed by run_rep; only the reuse tree holds pages now.
        manager.check_invariants()
        manager.clear_reusable_blocks()
        stats = manager.get_storage_statistics(0)
        assert stats
        for s in stats:
            assert s.free == s.total, (s.free, s.total)
        manager.check_invariants()
    finally:
        manager.shutdown()


def test_cli_dev_mode_json(tmp_path: Any) -> None:
    """The parent/child path: one dev-mode child, tiny scale, JSON keys as the SPEC names them."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable, SCRIPT, "--mode", "dev", "--config", "A", "--reps", "1",
            "--warmup", "0", "--requests", str(NUM_REQUESTS), "--steps", str(DECODE_STEPS),
            "--json", str(out),
        ],  # fmt: skip
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert isinstance(data, list) and len(data) == 1
    entry = data[0]
    assert entry["mode"] == "dev" and entry["config"] == "A"
    for key in REQUIRED_KEYS:
        assert key in entry
    assert "admission" in proc.stdout


def test_cli_missing_compiled_dir(tmp_path: Any) -> None:
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--mode", "compiled", "--compiled-dir", str(tmp_path / "nope")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "make build" in proc.stderr


def test_callgrind_phases_runs() -> None:
    """benchmarks/callgrind_phases.py (run under valgrind by hand) works on a tiny scale."""
    script = find_benchmark("callgrind_phases.py")
    proc = subprocess.run(
        [sys.executable, script, "--config", "B", "--requests", "8", "--decode-steps", "2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "config B: 8 requests, 2 decode steps" in proc.stdout
