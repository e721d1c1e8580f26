#!/usr/bin/env python3
"""CPU overhead of the KV cache manager on a serving loop (SPEC §8).

Workload (host backend, tokens_per_block 16):

* 256 requests; prompt = one of 8 shared 1024-token prefixes (request ``r`` uses prefix ``r % 8``)
  + 256 tokens unique to the request (their first token differs between requests, so no partial
  match reaches into them);
* admission, request by request: ``create_kv_cache(input_tokens=prompt)``, ``resume()``,
  ``resize(capacity=len(prompt))``, ``commit(prompt[kv.num_committed_tokens:])`` (the reused part
  is already committed);
* 64 decode steps; a step is, for every request, ``resize(capacity=kv.capacity + 1)`` then
  ``commit([tok])`` (one pre-built one-token list per step, shared by all requests, so the loop
  allocates nothing itself);
* ``close()`` every request.

Each phase is timed with ``time.perf_counter_ns`` around the loop over all requests (not per
call); reported as µs per request (admission, close) and µs per request per step (decode).
Config A: one full-attention layer group (2 layers, K and V of 512 B per block); config B: the
same plus an SWA group (2 more layers, window 512 tokens). The level-0 quota holds every page the
run creates with margin, so nothing is ever evicted (checked after the decode phase: every pool
group still has free slots). Each repetition uses a fresh manager; one warm-up repetition runs
first and is discarded; figures are medians over the repetitions. The garbage collector stays
enabled (as in an engine); ``gc.collect()`` runs before each timed phase, outside the timing.

``objects_per_page``: long-lived Python objects per (block, layer group) page. Counted as
``len(gc.get_objects())`` after ``gc.collect()`` just before the admission phase (prompts and the
pre-allocated KVCache handle list already built) and again right after it (all caches open and
ACTIVE, their pages locked and the prompts' blocks in the reuse tree). The difference minus the
KVCache handles themselves (the harness keeps them; they are per request, not per page) is
divided by the pages held = sum over pool groups of level-0 ``total - free`` slots (each page
occupies one slot; this covers caches and tree). Only gc-tracked objects count: containers and
class instances, including mypyc native instances; ints, floats, str and bytes are not tracked by
the gc, so they are not counted.

Modes run in subprocesses of the same interpreter: ``dev`` with ``PYTHONPATH=<repo root>``
(cwd = repo root) and ``compiled`` with ``PYTHONPATH=<compiled dir>`` (cwd = compiled dir); each
child checks ``kv_cache_manager_v2.is_compiled()`` matches its mode.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from kv_cache_manager_v2 import KVCache, KVCacheManager

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.abspath(__file__)

TOKENS_PER_BLOCK = 16
NUM_REQUESTS = 256
NUM_PREFIXES = 8
PREFIX_LEN = 1024
UNIQUE_LEN = 256
DECODE_STEPS = 64
BUFFER_SIZE = 512  # bytes per block per buffer (K and V); the data is never touched
LAYERS_PER_GROUP = 2
SWA_WINDOW = 512
QUOTA_MARGIN = 1.25

# Token id ranges (all < 2**32): prefixes, unique tails, decode tokens never collide.
_PREFIX_BASE = 1
_UNIQUE_BASE = 1 << 24
_DECODE_BASE = 1 << 30

CONFIGS = ("A", "B")
MODES = ("dev", "compiled")

# SPEC §8 targets (compiled mode): (key, {config: bound}) — figure must be <= bound.
TARGETS: dict[str, dict[str, float]] = {
    "decode_us_per_req_step": {"A": 0.3, "B": 0.4},
    "admission_us_per_req": {"A": 25.0, "B": 25.0},
    "close_us_per_req": {"A": 2.0, "B": 3.0},
    "objects_per_page": {"A": 2.0, "B": 2.0},
}
SPEEDUP_TARGET = 3.0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Workload (runs in the child, or in-process from the smoke test)
# --------------------------------------------------------------------------------------------


def _layer_specs(config: str) -> list[tuple[int, int | None]]:
    """(layer_id, sliding_window_size) for each layer of the config."""
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; expected one of {CONFIGS}")
    specs: list[tuple[int, int | None]] = [(i, None) for i in range(LAYERS_PER_GROUP)]
    if config == "B":
        specs += [(LAYERS_PER_GROUP + i, SWA_WINDOW) for i in range(LAYERS_PER_GROUP)]
    return specs


def _quota_bytes(config: str, num_requests: int, decode_steps: int) -> int:
    """Level-0 quota so that no page is ever evicted: every layer group gets room for every block
    of every request at its final length (SWA groups included: their stale committed pages stay
    in the tree as DROPPABLE and still occupy slots) plus the shared prefixes, with margin."""
    blocks_per_req = math.ceil((PREFIX_LEN + UNIQUE_LEN + decode_steps) / TOKENS_PER_BLOCK)
    slots = num_requests * blocks_per_req + NUM_PREFIXES * (PREFIX_LEN // TOKENS_PER_BLOCK)
    slot_size = LAYERS_PER_GROUP * 2 * BUFFER_SIZE  # one group's coalesced slot: K+V of each layer
    num_groups = 2 if config == "B" else 1
    return int(num_groups * slots * slot_size * QUOTA_MARGIN) + (4 << 20)


def make_manager(config: str, num_requests: int, decode_steps: int) -> KVCacheManager:
    from kv_cache_manager_v2 import (
        AttentionLayerConfig,
        BufferConfig,
        GpuCacheTierConfig,
        KVCacheManager,
        KVCacheManagerConfig,
    )

    layers: list[Any] = [
        AttentionLayerConfig(
            layer_id=lid,
            buffers=[BufferConfig(role="key", size=BUFFER_SIZE), BufferConfig(role="value", size=BUFFER_SIZE)],
            sliding_window_size=window,
        )
        for lid, window in _layer_specs(config)
    ]
    cfg = KVCacheManagerConfig(
        tokens_per_block=TOKENS_PER_BLOCK,
        cache_tiers=[GpuCacheTierConfig(quota=_quota_bytes(config, num_requests, decode_steps))],
        layers=layers,
        backend="host",
    )
    return KVCacheManager(cfg)


def build_prompts(num_requests: int) -> list[list[int]]:
    prefixes = [
        [_PREFIX_BASE + p * PREFIX_LEN + i for i in range(PREFIX_LEN)] for p in range(NUM_PREFIXES)
    ]
    return [
        prefixes[r % NUM_PREFIXES] + [_UNIQUE_BASE + r * UNIQUE_LEN + i for i in range(UNIQUE_LEN)]
        for r in range(num_requests)
    ]


def _used_slots(manager: KVCacheManager) -> int:
    return sum(s.total - s.free for s in manager.get_storage_statistics(0))


@dataclass
class RepResult:
    admission_ns: int
    decode_ns: int
    close_ns: int
    objects_delta: int
    kv_handles_excluded: int
    pages_held: int
    reused_tokens: int
    objects_per_page: float = field(init=False)

    def __post_init__(self) -> None:
        counted = self.objects_delta - self.kv_handles_excluded
        self.objects_per_page = counted / self.pages_held if self.pages_held else math.nan


def run_rep(
    config: str, num_requests: int, decode_steps: int, manager: KVCacheManager | None = None
) -> tuple[RepResult, KVCacheManager]:
    """One repetition on a fresh manager (or `manager`). Returns the result and the manager with
    every cache closed and the reuse tree still populated; the caller shuts it down."""
    if manager is None:
        manager = make_manager(config, num_requests, decode_steps)
    totals = [s.total for s in manager.get_storage_statistics(0)]
    prompts = build_prompts(num_requests)
    step_tokens = [[_DECODE_BASE + s] for s in range(decode_steps)]
    kvs: list[Any] = [None] * num_requests
    perf = time.perf_counter_ns

    # ---- admission -------------------------------------------------------------------------
    gc.collect()
    objs_before = len(gc.get_objects())
    t0 = perf()
    for i in range(num_requests):
        prompt = prompts[i]
        kv = manager.create_kv_cache(input_tokens=prompt)
        if not kv.resume():
            raise RuntimeError(f"request {i}: resume() returned False (quota {totals} slots)")
        if not kv.resize(capacity=len(prompt)):
            raise RuntimeError(f"request {i}: resize(capacity={len(prompt)}) returned False")
        kv.commit(prompt[kv.num_committed_tokens :])
        kvs[i] = kv
    t1 = perf()
    gc.collect()
    objs_after = len(gc.get_objects())
    pages_held = _used_slots(manager)
    handles = sum(1 for kv in kvs if gc.is_tracked(kv))
    # Sanity: a new request on prefix 0 would reuse the whole shared prefix (informational).
    reused = manager.probe_reuse(input_tokens=prompts[0][:PREFIX_LEN] + [_DECODE_BASE - 1] * 16)

    # ---- decode ----------------------------------------------------------------------------
    gc.collect()
    t2 = perf()
    for toks in step_tokens:
        for kv in kvs:
            if not kv.resize(capacity=kv.capacity + 1):
                raise RuntimeError("decode: resize(capacity + 1) returned False")
            kv.commit(toks)
    t3 = perf()
    stats = manager.get_storage_statistics(0)
    for g, s in enumerate(stats):
        if s.free <= 0:
            raise RuntimeError(
                f"pool group {g}: no free level-0 slot left after decode (total {s.total}); "
                "the quota is too small and pages may have been evicted"
            )

    # ---- close -----------------------------------------------------------------------------
    gc.collect()
    t4 = perf()
    for kv in kvs:
        kv.close()
    t5 = perf()
    kvs.clear()
    result = RepResult(
        admission_ns=t1 - t0,
        decode_ns=t3 - t2,
        close_ns=t5 - t4,
        objects_delta=objs_after - objs_before,
        kv_handles_excluded=handles,
        pages_held=pages_held,
        reused_tokens=reused,
    )
    return result, manager


def _check_drained(manager: KVCacheManager) -> None:
    manager.clear_reusable_blocks()
    for g, s in enumerate(manager.get_storage_statistics(0)):
        if s.free != s.total:
            raise RuntimeError(
                f"leak: pool group {g} has {s.total - s.free} of {s.total} level-0 slots in use "
                "after closing every cache and clearing the reuse tree"
            )


def run_config(
    config: str,
    num_requests: int = NUM_REQUESTS,
    decode_steps: int = DECODE_STEPS,
    reps: int = 5,
    warmup: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Runs `warmup` discarded repetitions then `reps` measured ones (fresh manager each) and
    returns the medians (µs)."""
    if reps < 1:
        raise ValueError("reps must be >= 1")
    results: list[RepResult] = []
    for r in range(warmup + reps):
        if progress:
            what = "warm-up" if r < warmup else f"rep {r - warmup + 1}/{reps}"
            _log(f"    config {config}: {what}")
        res, manager = run_rep(config, num_requests, decode_steps)
        _check_drained(manager)
        manager.shutdown()
        del manager
        if r >= warmup:
            results.append(res)

    med = statistics.median
    adm = med([r.admission_ns for r in results]) / 1e3 / num_requests
    dec = med([r.decode_ns for r in results]) / 1e3 / (num_requests * max(decode_steps, 1))
    clo = med([r.close_ns for r in results]) / 1e3 / num_requests
    tot = med([r.admission_ns + r.decode_ns + r.close_ns for r in results]) / 1e3
    return {
        "config": config,
        "admission_us_per_req": adm,
        "decode_us_per_req_step": dec,
        "close_us_per_req": clo,
        "objects_per_page": med([r.objects_per_page for r in results]),
        "total_us": tot,
        "reps": reps,
        "num_requests": num_requests,
        "decode_steps": decode_steps,
        "pages_held": results[-1].pages_held,
        "objects_delta": results[-1].objects_delta,
        "kv_handles_excluded": results[-1].kv_handles_excluded,
        "probe_reuse_prefix": results[-1].reused_tokens,
        "raw_ns": [[r.admission_ns, r.decode_ns, r.close_ns] for r in results],
    }


# --------------------------------------------------------------------------------------------
# Child: one (mode, config) in a fresh interpreter
# --------------------------------------------------------------------------------------------


def _child_main(args: argparse.Namespace) -> int:
    import kv_cache_manager_v2 as lib

    compiled = bool(lib.is_compiled())
    want = args.mode == "compiled"
    if compiled != want:
        hint = (
            "run `make build` (or `make bench`) to build the compiled copy"
            if want
            else "a compiled build shadows the sources: run `make dev` to clean in-place builds"
        )
        _log(
            f"error: mode {args.mode!r} expected is_compiled() == {want}, got {compiled} "
            f"(kv_cache_manager_v2 loaded from {lib.__file__}); {hint}"
        )
        return 3
    out = run_config(
        args.config[0],
        num_requests=args.requests,
        decode_steps=args.steps,
        reps=args.reps,
        warmup=args.warmup,
        progress=True,
    )
    out = {"mode": args.mode, **out}
    out["python"] = f"{platform.python_implementation()} {platform.python_version()}"
    out["module_file"] = lib.__file__
    print(json.dumps(out))
    return 0


# --------------------------------------------------------------------------------------------
# Parent: subprocesses, table, targets
# --------------------------------------------------------------------------------------------


def _mode_env(mode: str, compiled_dir: str) -> tuple[str, dict[str, str]]:
    path = REPO_ROOT if mode == "dev" else compiled_dir
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = path + (os.pathsep + old if old else "")
    return path, env


def _run_child(mode: str, config: str, args: argparse.Namespace) -> dict[str, Any]:
    cwd, env = _mode_env(mode, args.compiled_dir)
    cmd = [
        sys.executable,
        SCRIPT,
        "--child",
        "--mode", mode,
        "--config", config,
        "--reps", str(args.reps),
        "--warmup", str(args.warmup),
        "--requests", str(args.requests),
        "--steps", str(args.steps),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {mode}/{config} benchmark child failed (exit {proc.returncode})")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        raise SystemExit(f"error: {mode}/{config} benchmark child printed no result")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _fmt_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        out.append("  ".join(c.rjust(w) if j >= 2 else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def report(results: list[dict[str, Any]]) -> str:
    """The table, the compiled speedups and the SPEC §8 targets (which apply to compiled mode)."""
    lines: list[str] = []
    header = ["mode", "config", "admission µs/req", "decode µs/req/step", "close µs/req", "objects/page", "total ms"]
    rows = [header]
    for r in results:
        cfg = r["config"]
        cells = [r["mode"], cfg]
        for key, fmt in (
            ("admission_us_per_req", "{:.2f}"),
            ("decode_us_per_req_step", "{:.3f}"),
            ("close_us_per_req", "{:.2f}"),
            ("objects_per_page", "{:.2f}"),
        ):
            s = fmt.format(r[key])
            if r["mode"] == "compiled":
                bound = TARGETS[key][cfg]
                s += f" (≤{bound:g} {_mark(r[key] <= bound)})"
            cells.append(s)
        cells.append(f"{r['total_us'] / 1e3:.2f}")
        rows.append(cells)
    lines.append(_fmt_table(rows))

    by_key = {(r["mode"], r["config"]): r for r in results}
    speedups = []
    for cfg in CONFIGS:
        dev, comp = by_key.get(("dev", cfg)), by_key.get(("compiled", cfg))
        if dev and comp:
            sp = dev["total_us"] / comp["total_us"] if comp["total_us"] > 0 else math.inf
            comp["speedup_total"] = sp
            speedups.append(
                f"config {cfg}: compiled is {sp:.2f}x faster than dev on total time "
                f"(target ≥ {SPEEDUP_TARGET:g}x: {_mark(sp >= SPEEDUP_TARGET)})"
            )
    if speedups:
        lines.append("")
        lines.extend(speedups)
    lines.append("")
    lines.append(
        "SPEC §8 targets (compiled mode): decode ≤ 0.3 µs (A) / ≤ 0.4 µs (B) per request per step; "
        "admission ≤ 25 µs; close ≤ 2 µs (A) / ≤ 3 µs (B); compiled ≥ 3x dev on total; "
        "≤ 2 objects per page."
    )
    if not any(r["mode"] == "compiled" for r in results):
        lines.append("(compiled mode not run: targets not evaluated)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--config", choices=CONFIGS, action="append", help="config to run (default: both)")
    p.add_argument("--mode", choices=("dev", "compiled", "both"), default="both")
    p.add_argument("--json", metavar="FILE", help="write the results as a JSON list to FILE")
    p.add_argument(
        "--compiled-dir",
        default=os.path.join(REPO_ROOT, "build", "compiled"),
        help="directory holding the compiled kv_cache_manager_v2 (default: build/compiled)",
    )
    p.add_argument("--reps", type=int, default=5, help="measured repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="discarded warm-up repetitions")
    p.add_argument("--requests", type=int, default=NUM_REQUESTS, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=DECODE_STEPS, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reps < 1 or args.warmup < 0 or args.requests < 1 or args.steps < 0:
        p.error("--reps and --requests must be >= 1, --warmup and --steps >= 0")
    args.compiled_dir = os.path.abspath(args.compiled_dir)
    if args.child:
        if args.mode == "both" or not args.config:
            p.error("--child needs one --mode and one --config")
        return _child_main(args)

    configs = list(dict.fromkeys(args.config)) if args.config else list(CONFIGS)
    modes = list(MODES) if args.mode == "both" else [args.mode]
    if "compiled" in modes and not os.path.isdir(os.path.join(args.compiled_dir, "kv_cache_manager_v2")):
        _log(
            f"error: no compiled build at {args.compiled_dir}/kv_cache_manager_v2; "
            "run `make build` (or `make bench`, which builds it), or use --mode dev"
        )
        return 2

    results: list[dict[str, Any]] = []
    for mode in modes:
        for cfg in configs:
            _log(f"[{mode}] config {cfg}: {args.requests} requests, {args.steps} decode steps, "
                 f"{args.warmup} warm-up + {args.reps} reps")
            results.append(_run_child(mode, cfg, args))
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        _log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
