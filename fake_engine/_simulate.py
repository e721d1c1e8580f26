"""``python -m fake_engine simulate``: a continuous-batching serving loop over the
manager on the host backend, every byte verified by the fake engine.

Storage tiers: level 0 (the "GPU" tier, host RAM on the host backend), optionally a
host tier (level 1) and a disk tier (next level).  When level 0 runs short, the
scheduler suspends the most recently admitted running request (its pages may move
to host / disk) and resumes it later (full verify of its pages once back); closing
it and queueing it to restart stays as the fallback when resume keeps failing.
"""

from __future__ import annotations

import bisect
import importlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence, TextIO

import kv_cache_manager_v2 as kvm
from kv_cache_manager_v2 import (
    AttentionLayerConfig,
    BufferConfig,
    DataIntegrityError,
    DiskCacheTierConfig,
    GpuCacheTierConfig,
    HostCacheTierConfig,
    KVCacheManager,
    KVCacheManagerConfig,
    PageIndexMode,
    SsmLayerConfig,
)

from ._engine import FakeEngine, Step, Token
from ._workload import Request

MiB = 1 << 20

# Tier configs in `cache_tiers` order (GpuCacheTierConfig | HostCacheTierConfig | DiskCacheTierConfig).
CacheTier = Any


def cache_tiers(
    gpu_quota_bytes: int, host_quota_bytes: int = 0, disk_quota_bytes: int = 0, disk_path: str | None = None
) -> list[CacheTier]:
    """Level 0, then a host tier if its quota is > 0, then a disk tier if its quota is > 0."""
    tiers: list[CacheTier] = [GpuCacheTierConfig(quota=gpu_quota_bytes)]
    if host_quota_bytes > 0:
        tiers.append(HostCacheTierConfig(quota=host_quota_bytes))
    if disk_quota_bytes > 0:
        if not disk_path:
            raise ValueError("a disk tier needs a directory (disk_path)")
        tiers.append(DiskCacheTierConfig(quota=disk_quota_bytes, path=disk_path))
    return tiers


def tier_names(config: KVCacheManagerConfig) -> list[str]:
    """'gpu (level 0)', 'host (level 1)', ... one per configured level."""
    names: list[str] = []
    for lvl, tier in enumerate(config.cache_tiers):
        kind = type(tier).__name__.replace("CacheTierConfig", "").lower() or "tier"
        names.append(f"{kind} (level {lvl})")
    return names


def model_config(
    tokens_per_block: int = 16,
    gpu_quota_bytes: int = 16 * MiB,
    window: int = 256,
    small_window: int = 128,
    sink_tokens: int = 4,
    host_quota_bytes: int = 0,
    disk_quota_bytes: int = 0,
    disk_path: str | None = None,
    **manager_kwargs: Any,
) -> KVCacheManagerConfig:
    """A small model: 2 full-attention layers (one V buffer with a per-block token
    override, i.e. expansion 2), 2 SWA layers (window 256) and 1 SWA layer with
    attention sinks (window 128, 4 sink tokens).  64 or 32 bytes per token.
    ``host_quota_bytes`` / ``disk_quota_bytes`` > 0 add a host / disk tier."""
    tpb = tokens_per_block
    half = tpb // 2 if tpb % 2 == 0 and tpb >= 2 else None
    v1 = BufferConfig("V", half * 32, tokens_per_block_override=half) if half else BufferConfig("V", tpb * 32)
    layers: list[AttentionLayerConfig | SsmLayerConfig] = [
        AttentionLayerConfig(0, [BufferConfig("K", tpb * 64), BufferConfig("V", tpb * 64)]),
        AttentionLayerConfig(1, [BufferConfig("K", tpb * 64), v1]),
        AttentionLayerConfig(2, [BufferConfig("K", tpb * 64), BufferConfig("V", tpb * 64)], sliding_window_size=window),
        AttentionLayerConfig(3, [BufferConfig("K", tpb * 64), BufferConfig("V", tpb * 64)], sliding_window_size=window),
        AttentionLayerConfig(
            4,
            [BufferConfig("K", tpb * 32), BufferConfig("V", tpb * 32)],
            sliding_window_size=small_window,
            num_sink_tokens=sink_tokens,
        ),
    ]
    return KVCacheManagerConfig(
        tokens_per_block=tpb,
        cache_tiers=cache_tiers(gpu_quota_bytes, host_quota_bytes, disk_quota_bytes, disk_path),
        layers=layers,
        backend="host",
        **manager_kwargs,
    )


@dataclass(eq=False)  # identity semantics: `in` / remove() on the running list
class _Running:
    req: Request
    kv: Any
    tokens: list[Token]  # prompt + generated so far: what the cache holds / will hold
    pos: int  # tokens written into the cache
    generated: int
    seq: int = 0  # admission order: the most recently admitted running request is suspended first
    resume_failures: int = 0  # consecutive failed resume() attempts while suspended


@dataclass
class SimulationResult:
    workload: str
    requests: int = 0
    completed: int = 0
    skipped: int = 0
    admissions: int = 0
    admission_retries: int = 0
    preemptions: int = 0  # close + requeue (the fallback when suspend/resume cannot help)
    suspends: int = 0
    resumes: int = 0
    resume_failures: int = 0  # resume() calls that returned False
    data_loss_restarts: int = 0  # resume() raised DataIntegrityError (corrupt stored pages): closed, redone
    prompt_tokens: int = 0
    generated_tokens: int = 0
    admitted_tokens: int = 0  # tokens presented to create_kv_cache (restarts included)
    reused_tokens: int = 0
    first_admission_tokens: int = 0
    first_admission_reused: int = 0
    prefilled_tokens: int = 0
    engine_steps: int = 0
    request_steps: int = 0
    manager_seconds: float = 0.0
    engine_seconds: float = 0.0
    bytes_verified: int = 0
    bytes_written: int = 0
    wall_seconds: float = 0.0
    compiled: bool = False
    tokens_per_block: int = 0
    gpu_quota_bytes: int = 0
    host_quota_bytes: int = 0
    disk_quota_bytes: int = 0
    disk_path: str = ""
    max_batch: int = 0
    seed: int = 0
    closes: int = 0
    manager_phase_seconds: dict[str, float] = field(default_factory=dict)
    tiers: list[str] = field(default_factory=list)
    # Reused tokens of successful admissions by the level their pages came from (index = level):
    # blocks onboarded from level L during the admission's resume() came from L, the rest was on level 0.
    reused_tokens_by_level: list[int] = field(default_factory=list)
    # Blocks (of the stats layer group) onboarded when resuming suspended requests, by source level.
    resume_onboarded_blocks_by_level: list[int] = field(default_factory=list)
    stats_layer_group: int = 0
    iteration_stats: dict[str, int] = field(default_factory=dict)
    iteration_stats_per_group: dict[int, dict[str, int]] = field(default_factory=dict)
    onboarded_from_level: list[int] = field(default_factory=list)  # all groups, by source level
    skipped_rids: list[int] = field(default_factory=list)
    sample_every: int = 0
    # One sample every `sample_every` engine steps (and one at the end): engine step, completed
    # requests, cumulative hit rate (total and by level), per-level occupancy (slots holding
    # something / total) and utilization ((total - available) / total).
    timeline: list[dict[str, Any]] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.reused_tokens / self.admitted_tokens if self.admitted_tokens else 0.0

    @property
    def first_admission_hit_rate(self) -> float:
        return self.first_admission_reused / self.first_admission_tokens if self.first_admission_tokens else 0.0

    def hit_rate_by_level(self) -> list[float]:
        d = self.admitted_tokens
        return [n / d if d else 0.0 for n in self.reused_tokens_by_level]

    @property
    def manager_us_per_step(self) -> float:
        return 1e6 * self.manager_seconds / self.engine_steps if self.engine_steps else 0.0

    @property
    def manager_us_per_request_step(self) -> float:
        return 1e6 * self.manager_seconds / self.request_steps if self.request_steps else 0.0

    def phase_us(self, phase: str, count: int) -> float:
        return 1e6 * self.manager_phase_seconds.get(phase, 0.0) / count if count else 0.0

    def stat(self, name: str) -> int:
        """An iteration-stats total (summed over layer groups), 0 when absent."""
        return self.iteration_stats.get(name, 0)

    def tier_rows(self) -> list[tuple[str, int, float]]:
        """(tier, reused tokens, share of admitted tokens) per level, then the total."""
        denom = self.admitted_tokens or 1
        names = self.tiers or ["gpu (level 0)"]
        by_level = list(self.reused_tokens_by_level) + [0] * (len(names) - len(self.reused_tokens_by_level))
        rows = [(names[lvl], by_level[lvl], by_level[lvl] / denom) for lvl in range(len(names))]
        rows.append(("total", self.reused_tokens, self.reused_tokens / denom))
        return rows

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: v for k, v in self.__dict__.items()}
        d["hit_rate"] = self.hit_rate
        d["first_admission_hit_rate"] = self.first_admission_hit_rate
        d["manager_us_per_step"] = self.manager_us_per_step
        d["manager_us_per_request_step"] = self.manager_us_per_request_step
        d["manager_us_per_admission"] = self.phase_us("admission", self.admissions + self.admission_retries)
        d["manager_us_per_decode_step"] = self.phase_us("decode", self.generated_tokens)
        d["manager_us_per_close"] = self.phase_us("close", self.closes)
        d["hit_rate_by_tier"] = {name: {"reused_tokens": n, "hit_rate": r} for name, n, r in self.tier_rows()}
        d["iteration_stats_per_group"] = {str(k): v for k, v in self.iteration_stats_per_group.items()}
        return d

    def format_table(self) -> str:
        rows: list[tuple[str, str]] = []

        def add(label: str, value: str) -> None:
            rows.append((label, value))

        add("workload", self.workload)
        add(
            "model / quota",
            f"tpb {self.tokens_per_block}, level-0 quota {self.gpu_quota_bytes / MiB:.1f} MiB, "
            f"max batch {self.max_batch}, seed {self.seed}",
        )
        tiers = [f"{self.tiers[0] if self.tiers else 'gpu (level 0)'} {self.gpu_quota_bytes / MiB:.1f} MiB"]
        for name in self.tiers[1:]:
            q = self.host_quota_bytes if name.startswith("host") else self.disk_quota_bytes
            tiers.append(f"{name} {q / MiB:.1f} MiB")
        add("tiers", ", ".join(tiers))
        skipped = f"  (skipped {self.skipped}: too long for the quota)" if self.skipped else ""
        add("requests completed", f"{self.completed:,} / {self.requests:,}{skipped}")
        add("prompt tokens", f"{self.prompt_tokens:,}")
        add("generated tokens", f"{self.generated_tokens:,}")
        add("admissions", f"{self.admissions:,}  (retries {self.admission_retries:,})")
        add(
            "suspends / resumes",
            f"{self.suspends:,} / {self.resumes:,}  (failed resume attempts {self.resume_failures:,})",
        )
        add("preemptions", f"{self.preemptions:,}  (closed and restarted)")
        if self.data_loss_restarts:
            add("  corrupt pages", f"{self.data_loss_restarts:,} resume() calls found stored pages corrupt (redone)")
        add("prefix reuse (tier)", "reused tokens    hit rate")
        for name, n, r in self.tier_rows():
            add(f"  {name}", f"{n:>13,}    {100 * r:6.2f} %")
        add("  first admissions", f"{self.first_admission_reused:>13,}    {100 * self.first_admission_hit_rate:6.2f} %")
        add("prefilled tokens", f"{self.prefilled_tokens:,}")
        add(
            "evictions",
            f"{self.stat('offloaded_blocks'):,} blocks offloaded, {self.stat('dropped_blocks'):,} dropped",
        )
        onb = self.stat("onboarded_bytes")
        off = self.stat("offloaded_bytes")
        add("onboard / offload", f"{onb / MiB:,.1f} MiB / {off / MiB:,.1f} MiB  ({onb:,} / {off:,} bytes)")
        if len(self.onboarded_from_level) > 1:
            parts = [
                f"{self.onboarded_from_level[lvl]:,} from {self.tiers[lvl] if lvl < len(self.tiers) else lvl}"
                for lvl in range(1, len(self.onboarded_from_level))
            ]
            add("  onboarded blocks", ", ".join(parts))
        if any(self.resume_onboarded_blocks_by_level[1:]):
            parts = [
                f"{self.resume_onboarded_blocks_by_level[lvl]:,} from level {lvl}"
                for lvl in range(1, len(self.resume_onboarded_blocks_by_level))
            ]
            add("  by resumes", ", ".join(parts) + f"  (layer group {self.stats_layer_group})")
        st = self.iteration_stats
        for key in sorted(st):
            words = ("alloc", "new", "reused", "missed", "onboard", "offload", "drop", "evict")
            if "block" in key and any(w in key for w in words):
                add(f"  {key}", f"{st[key]:,}")
        add("engine steps", f"{self.engine_steps:,}  (request steps {self.request_steps:,})")
        add(
            "manager time",
            f"{self.manager_seconds:.3f} s  ({self.manager_us_per_step:.1f} µs / engine step, "
            f"{self.manager_us_per_request_step:.2f} µs / request step)",
        )
        add(
            "  admission",
            f"{self.phase_us('admission', self.admissions + self.admission_retries):.1f} µs / attempt "
            "(create + resume + resize; + prompt commits)",
        )
        add("  decode", f"{self.phase_us('decode', self.generated_tokens):.2f} µs / request step (resize + commit)")
        add("  close", f"{self.phase_us('close', self.closes):.2f} µs / close")
        n_sr = self.suspends + self.resumes + self.resume_failures
        add("  suspend + resume", f"{self.phase_us('suspend_resume', n_sr):.1f} µs / call")
        add("fake engine time", f"{self.engine_seconds:.3f} s")
        add("bytes verified", f"{self.bytes_verified:,}  ({self.bytes_verified / MiB:.1f} MiB)")
        add("bytes written", f"{self.bytes_written:,}  ({self.bytes_written / MiB:.1f} MiB)")
        add("wall time", f"{self.wall_seconds:.2f} s")
        add("library mode", "compiled (mypyc)" if self.compiled else "dev (pure Python)")
        width = max(len(k) for k, _ in rows)
        line = "-" * (width + 2 + max(len(v) for _, v in rows))
        out = [line] + [f"{k.ljust(width)}  {v}" for k, v in rows] + [line]
        return "\n".join(out)


def _stats_layer_group(manager: KVCacheManager, config: KVCacheManagerConfig) -> int:
    """The first layer group without a window: it has a page on every reused block."""
    windows = {layer.layer_id: getattr(layer, "sliding_window_size", None) for layer in config.layers}
    for gid, layer_ids in enumerate(manager.layer_grouping):
        if all(windows.get(lid) is None for lid in layer_ids):
            return gid
    return 0


class Simulator:
    """FCFS continuous batching.  When level 0 runs short, the most recently admitted
    running request is suspended (its pages may move to colder tiers) and resumed
    later, before any new admission; close-and-restart is the fallback when resume
    keeps failing (``resume_retries`` failed attempts, or nothing else runs), and the
    only policy without a colder tier (a suspended cache's pages would stay on level 0)."""

    def __init__(
        self,
        requests: Sequence[Request],
        config: KVCacheManagerConfig,
        max_batch: int = 16,
        chunk: int = 0,
        workload: str = "",
        seed: int = 0,
        progress: bool = True,
        progress_file: TextIO | None = None,
        index_mode: PageIndexMode = PageIndexMode.PER_LAYER,
        sample_every: int = 10,
        resume_retries: int = 8,
    ) -> None:
        if sample_every < 1:
            raise ValueError("sample_every must be >= 1")
        if resume_retries < 1:
            raise ValueError("resume_retries must be >= 1")
        self.requests = list(requests)
        self.config = config
        self.max_batch = max_batch
        self.chunk = chunk
        self.progress = progress
        self.progress_file = progress_file
        self.sample_every = sample_every
        self.resume_retries = resume_retries
        self.manager = KVCacheManager(config)
        self.engine = FakeEngine(self.manager, config, index_mode=index_mode)
        self.num_levels = len(config.cache_tiers)
        # Suspending frees level 0 only when pages can move colder; else close and restart.
        self.can_offload = self.num_levels > 1
        host_q = sum(t.quota for t in config.cache_tiers if isinstance(t, HostCacheTierConfig))
        disk_q = sum(t.quota for t in config.cache_tiers if isinstance(t, DiskCacheTierConfig))
        self._stats_group = _stats_layer_group(self.manager, config)
        self.result = SimulationResult(
            workload=workload,
            requests=len(self.requests),
            compiled=bool(kvm.is_compiled()) if hasattr(kvm, "is_compiled") else False,
            tokens_per_block=int(self.manager.tokens_per_block),
            gpu_quota_bytes=int(config.cache_tiers[0].quota),
            host_quota_bytes=int(host_q),
            disk_quota_bytes=int(disk_q),
            max_batch=max_batch,
            seed=seed,
            tiers=tier_names(config),
            reused_tokens_by_level=[0] * self.num_levels,
            resume_onboarded_blocks_by_level=[0] * self.num_levels,
            onboarded_from_level=[0] * self.num_levels,
            stats_layer_group=self._stats_group,
            sample_every=sample_every,
        )
        self._mgr_s = 0.0
        self._phase_s: dict[str, float] = {
            "admission": 0.0,
            "decode": 0.0,
            "close": 0.0,
            "suspend_resume": 0.0,
            "stats": 0.0,
        }
        self._seq = 0
        self._n_suspended = 0

    # --------------------------------------------------------------- helpers
    def _timed(self, phase: str, t0: float) -> None:
        dt = time.perf_counter() - t0
        self._mgr_s += dt
        self._phase_s[phase] += dt

    def _accumulate_stats(self) -> list[int]:
        """Drains ``get_and_reset_iteration_stats()`` into the totals; returns the stats
        layer group's ``onboarded_from_level`` of this drain."""
        t0 = time.perf_counter()
        stats = self.manager.get_and_reset_iteration_stats()
        self._timed("stats", t0)
        res = self.result
        mine = [0] * self.num_levels
        for gid, s in stats.items():
            per = res.iteration_stats_per_group.setdefault(int(gid), {})
            for name in dir(s):
                if name.startswith("_") or name == "block_bytes":  # a size, not a count
                    continue
                try:
                    v = getattr(s, name)
                except Exception:  # noqa: BLE001 - display only
                    continue
                if isinstance(v, int) and not isinstance(v, bool):
                    per[name] = per.get(name, 0) + v
                    res.iteration_stats[name] = res.iteration_stats.get(name, 0) + v
            from_level = list(getattr(s, "onboarded_from_level", []) or [])
            for lvl, n in enumerate(from_level[: self.num_levels]):
                res.onboarded_from_level[lvl] += int(n)
                if int(gid) == self._stats_group:
                    mine[lvl] = int(n)
        return mine

    def _attribute_reuse(self, reused: int, onboarded: list[int]) -> None:
        """Reused tokens by source level: blocks onboarded from level L came from L (coldest
        first, capped at what was reused); the rest of the reused blocks were on level 0."""
        tpb = self.result.tokens_per_block
        left = reused
        by_level = self.result.reused_tokens_by_level
        for lvl in range(self.num_levels - 1, 0, -1):
            n = min(onboarded[lvl] * tpb, left)
            by_level[lvl] += n
            left -= n
        by_level[0] += left

    def _sample(self, completed: int) -> None:
        res = self.result
        occupancy: list[float] = []
        utilization: list[float] = []
        t0 = time.perf_counter()
        per_level = [self.manager.get_storage_statistics(lvl) for lvl in range(self.num_levels)]
        self._timed("stats", t0)
        for stats in per_level:
            total = sum(int(s.total) for s in stats)
            free = sum(int(s.free) for s in stats)
            avail = sum(int(s.available) for s in stats)
            occupancy.append((total - free) / total if total else 0.0)
            utilization.append((total - avail) / total if total else 0.0)
        res.timeline.append(
            {
                "step": res.engine_steps,
                "completed": completed,
                "admitted_tokens": res.admitted_tokens,
                "hit_rate": res.hit_rate,
                "hit_rate_by_level": res.hit_rate_by_level(),
                "occupancy": occupancy,
                "utilization": utilization,
                "suspended": self._n_suspended,
            }
        )

    def _close(self, r: _Running) -> None:
        self.engine.forget(r.kv)
        t0 = time.perf_counter()
        r.kv.close()
        self._timed("close", t0)
        self.result.closes += 1

    # ------------------------------------------------------------------ loop
    def run(self) -> SimulationResult:
        res = self.result
        eng = self.engine
        perf = time.perf_counter
        waiting: deque[tuple[Request, int]] = deque((r, 0) for r in self.requests)  # (req, generated)
        done: set[int] = set()
        running: list[_Running] = []  # in admission order (`seq`)
        suspended: deque[_Running] = deque()  # in suspension order
        first_seen: set[int] = set()
        blocked = False
        self._n_suspended = 0
        wall0 = perf()
        bar: Any = None
        if self.progress:
            tqdm: Any = importlib.import_module("tqdm").tqdm
            bar = tqdm(total=len(self.requests), unit="req", file=self.progress_file, dynamic_ncols=True)
        try:
            self._sample(0)
            while waiting or running or suspended:
                steps: list[Step] = []
                commits: list[tuple[_Running, list[Token], bool]] = []  # (req, tokens, is_decode)
                preempted_this_step = False
                # ---- decode: grow every running request by one token (oldest first)
                i = 0
                while i < len(running):
                    r = running[i]
                    if r.pos < len(r.tokens):
                        i += 1
                        continue  # still prefilling (chunked)
                    ok = False
                    while True:
                        t0 = perf()
                        ok = r.kv.resize(capacity=r.pos + 1)
                        self._timed("decode", t0)
                        if ok:
                            break
                        preempted_this_step = True
                        victim = running[-1]
                        if not self.can_offload:
                            # no colder tier: a suspended cache would keep its pages on level 0
                            if victim is r and len(running) == 1:
                                break
                            running.remove(victim)
                            self._preempt(victim, waiting)
                            if victim is r:
                                break
                            continue
                        if victim is not r:
                            self._suspend(victim, running, suspended)
                            continue
                        if len(running) > 1:
                            self._suspend(r, running, suspended)  # r is the most recent one
                            break
                        if suspended:
                            # r runs alone: what suspended requests hold may be stuck on level 0
                            # (colder tiers full of held pages): restart the latest suspended one.
                            self._preempt(suspended.pop(), waiting)
                            continue
                        break  # alone, nothing else holds pages: it never fits
                    if r not in running:
                        continue  # suspended (or restarted) itself
                    if not ok:
                        self._skip(r, running, done, bar)
                        continue
                    tok = r.req.output[r.generated]
                    steps.append(Step(r.kv, [tok], r.tokens))
                    commits.append((r, [tok], True))
                    i += 1
                # ---- chunked prefill continuation
                for r in running:
                    if r.pos < len(r.tokens) and not any(c[0] is r for c in commits):
                        self._prefill_step(r, steps, commits)
                # ---- resume suspended requests first, then admit new ones (FCFS; a turn waits
                # for its session's previous turn); after a failure, wait until a request finishes
                failed: Request | None = None
                if not preempted_this_step and (not blocked or not running):
                    blocked = self._resume_suspended(running, suspended, waiting, steps, commits)
                    if not suspended and not blocked:
                        failed = self._admit(waiting, done, running, steps, commits, first_seen)
                        blocked = failed is not None
                self._n_suspended = len(suspended)
                if not steps:
                    if not running and not suspended and failed is not None:
                        # nothing runs and it still cannot be admitted: it never fits
                        req = failed
                        for k, (wreq, _) in enumerate(waiting):
                            if wreq is req:
                                del waiting[k]
                                break
                        res.skipped += 1
                        res.skipped_rids.append(req.rid)
                        done.add(req.rid)
                        if bar is not None:
                            bar.update(1)
                        continue
                    if running or suspended or preempted_this_step:
                        continue  # only resumes / fully reused admissions / preemptions this step
                    raise RuntimeError("scheduler made no progress")
                # ---- the forward pass
                t0 = perf()
                eng.forward(steps)
                res.engine_seconds += perf() - t0
                res.engine_steps += 1
                res.request_steps += len(steps)
                # ---- commit what was written
                for r, toks, is_decode in commits:
                    t0 = perf()
                    r.kv.commit(toks)
                    self._timed("decode" if is_decode else "admission", t0)
                    r.pos += len(toks)
                    if is_decode:
                        r.tokens.append(toks[0])
                        r.generated += 1
                        res.generated_tokens += 1
                    else:
                        res.prefilled_tokens += len(toks)
                finished = [r for r in running if r.pos == len(r.tokens) and r.generated >= len(r.req.output)]
                for r in finished:
                    t0 = perf()
                    eng.verify(r.kv, r.tokens)  # full check before close
                    res.engine_seconds += perf() - t0
                    running.remove(r)
                    self._close(r)
                    done.add(r.req.rid)
                    res.completed += 1
                    blocked = False
                    res.prompt_tokens += len(r.req.prompt)
                    if bar is not None:
                        bar.update(1)
                        if res.completed % 16 == 0:
                            bar.set_postfix(
                                hit=f"{100 * res.hit_rate:.1f}%", sus=res.suspends, pre=res.preemptions, refresh=False
                            )
                self._accumulate_stats()
                if res.engine_steps % self.sample_every == 0:
                    self._sample(res.completed)
            eng.verify_all()
        finally:
            if bar is not None:
                bar.close()
            for r in running:
                r.kv.close()
            for r in suspended:
                r.kv.close()
        res.bytes_verified = eng.bytes_verified
        res.bytes_written = eng.bytes_written
        self._accumulate_stats()
        self._n_suspended = 0
        self._sample(res.completed)
        res.manager_seconds = self._mgr_s
        res.manager_phase_seconds = dict(self._phase_s)
        res.wall_seconds = perf() - wall0
        return res

    def shutdown(self) -> None:
        check = getattr(self.manager, "check_invariants", None)
        if check is not None:
            check()
        self.manager.clear_reusable_blocks()
        self.manager.shutdown()

    def _skip(self, r: _Running, running: list[_Running], done: set[int], bar: Any) -> None:
        running.remove(r)
        self._close(r)
        self.result.skipped += 1
        self.result.skipped_rids.append(r.req.rid)
        done.add(r.req.rid)  # its session's next turn must not wait for it forever
        if bar is not None:
            bar.update(1)

    def _suspend(self, victim: _Running, running: list[_Running], suspended: deque[_Running]) -> None:
        """Suspend ``victim``: its pages become HELD and may move to colder tiers."""
        running.remove(victim)
        t0 = time.perf_counter()
        victim.kv.suspend()
        self._timed("suspend_resume", t0)
        victim.resume_failures = 0
        suspended.append(victim)
        self.result.suspends += 1

    def _preempt(self, victim: _Running, waiting: deque[tuple[Request, int]]) -> None:
        """Close ``victim`` (its committed tokens stay reusable) and queue it to restart."""
        self._close(victim)
        self.result.preemptions += 1
        waiting.appendleft((victim.req, victim.generated))

    def _resume_suspended(
        self,
        running: list[_Running],
        suspended: deque[_Running],
        waiting: deque[tuple[Request, int]],
        steps: list[Step],
        commits: list[tuple[_Running, list[Token], bool]],
    ) -> bool:
        """Resume suspended requests in suspension order; True when one had to stay
        suspended (the scheduler then waits for a request to finish)."""
        res = self.result
        perf = time.perf_counter
        while suspended and len(running) < self.max_batch:
            r = suspended[0]
            self._accumulate_stats()
            t0 = perf()
            try:
                ok = self.engine.resume(r.kv)  # marks the cache for a full check
            except DataIntegrityError:
                # the library found stored bytes of this cache corrupt (disk checksum) and
                # dropped them: only close() works now; recompute it from what is still reusable
                self._timed("suspend_resume", t0)
                self._accumulate_stats()
                suspended.popleft()
                res.data_loss_restarts += 1
                self._preempt(r, waiting)
                continue
            self._timed("suspend_resume", t0)
            onboarded = self._accumulate_stats()
            if ok:
                suspended.popleft()
                res.resumes += 1
                r.resume_failures = 0
                for lvl, n in enumerate(onboarded):
                    res.resume_onboarded_blocks_by_level[lvl] += n
                bisect.insort(running, r, key=lambda x: x.seq)
                t0 = perf()
                self.engine.verify(r.kv, r.tokens[: r.pos])  # every byte back where it belongs
                res.engine_seconds += perf() - t0
                if r.pos < len(r.tokens):
                    self._prefill_step(r, steps, commits)  # chunked prefill goes on
                continue
            res.resume_failures += 1
            r.resume_failures += 1
            if running and r.resume_failures < self.resume_retries:
                return True
            # fallback: nothing else runs to free pages, or it kept failing: restart it
            suspended.popleft()
            self._preempt(r, waiting)
        return False

    def _prefill_step(self, r: _Running, steps: list[Step], commits: list[tuple[_Running, list[Token], bool]]) -> None:
        end = len(r.tokens) if self.chunk <= 0 else min(len(r.tokens), r.pos + self.chunk)
        inp = r.tokens[r.pos : end]
        steps.append(Step(r.kv, inp, r.tokens[: r.pos]))
        commits.append((r, inp, False))

    def _admit(
        self,
        waiting: deque[tuple[Request, int]],
        done: set[int],
        running: list[_Running],
        steps: list[Step],
        commits: list[tuple[_Running, list[Token], bool]],
        first_seen: set[int],
    ) -> Request | None:
        """Admit what fits; returns the request that failed to fit, if any."""
        res = self.result
        mgr = self.manager
        perf = time.perf_counter
        scanned = 0
        idx = 0
        lost = 0
        while len(running) < self.max_batch and idx < len(waiting) and scanned < 4 * self.max_batch:
            req, gen = waiting[idx]
            scanned += 1
            if req.depends_on is not None and req.depends_on not in done:
                idx += 1
                continue
            tokens: list[Token] = list(req.prompt) + list(req.output[:gen])
            t0 = perf()
            kv = mgr.create_kv_cache(input_tokens=tokens)
            reused = int(kv.num_committed_tokens)
            self._timed("admission", t0)
            self._accumulate_stats()  # so the next drain holds this resume's onboarding only
            t0 = perf()
            try:
                ok = kv.resume()
            except DataIntegrityError:
                # a matched page failed its checksum: it is dropped and the tree pruned, so the
                # next match is shorter; retry this request now (bounded)
                kv.close()
                self._timed("admission", t0)
                self._accumulate_stats()
                res.data_loss_restarts += 1
                lost += 1
                if lost > 16:  # each loss prunes the tree: this only guards against a library bug
                    raise
                continue
            self._timed("admission", t0)
            onboarded = self._accumulate_stats()
            t0 = perf()
            if ok:
                ok = kv.resize(capacity=max(len(tokens), reused))
            if not ok:
                kv.close()
            self._timed("admission", t0)
            if not ok:
                res.admission_retries += 1
                return req  # retry at a later step, when running requests have freed pages
            del waiting[idx]
            res.admissions += 1
            res.admitted_tokens += len(tokens)
            res.reused_tokens += reused
            self._attribute_reuse(reused, onboarded)
            if req.rid not in first_seen:
                first_seen.add(req.rid)
                res.first_admission_tokens += len(tokens)
                res.first_admission_reused += reused
            self._seq += 1
            r = _Running(req, kv, tokens, reused, gen, seq=self._seq)
            running.append(r)
            if reused < len(tokens):
                self._prefill_step(r, steps, commits)  # its first forward is a full check
            else:
                self.engine.verify(kv, tokens)  # fully reused: verify before decoding
        return None
