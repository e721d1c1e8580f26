"""``python -m fake_engine simulate``: a continuous-batching serving loop over the
manager on the host backend, every byte verified by the fake engine."""

from __future__ import annotations

import importlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence, TextIO

import kv_cache_manager_v2 as kvm
from kv_cache_manager_v2 import (
    AttentionLayerConfig,
    BufferConfig,
    GpuCacheTierConfig,
    KVCacheManager,
    KVCacheManagerConfig,
    PageIndexMode,
    SsmLayerConfig,
)

from ._engine import FakeEngine, Step, Token
from ._workload import Request

MiB = 1 << 20


def model_config(
    tokens_per_block: int = 16,
    gpu_quota_bytes: int = 16 * MiB,
    window: int = 256,
    small_window: int = 128,
    sink_tokens: int = 4,
    **manager_kwargs: Any,
) -> KVCacheManagerConfig:
    """A small model: 2 full-attention layers (one V buffer with a per-block token
    override, i.e. expansion 2), 2 SWA layers (window 256) and 1 SWA layer with
    attention sinks (window 128, 4 sink tokens).  64 or 32 bytes per token."""
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
        cache_tiers=[GpuCacheTierConfig(quota=gpu_quota_bytes)],
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


@dataclass
class SimulationResult:
    workload: str
    requests: int = 0
    completed: int = 0
    skipped: int = 0
    admissions: int = 0
    admission_retries: int = 0
    preemptions: int = 0
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
    max_batch: int = 0
    seed: int = 0
    closes: int = 0
    manager_phase_seconds: dict[str, float] = field(default_factory=dict)
    tiers: list[str] = field(default_factory=list)
    onboarded_tokens: int = 0
    iteration_stats: dict[str, int] = field(default_factory=dict)
    iteration_stats_per_group: dict[int, dict[str, int]] = field(default_factory=dict)
    skipped_rids: list[int] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.reused_tokens / self.admitted_tokens if self.admitted_tokens else 0.0

    @property
    def first_admission_hit_rate(self) -> float:
        return self.first_admission_reused / self.first_admission_tokens if self.first_admission_tokens else 0.0

    @property
    def manager_us_per_step(self) -> float:
        return 1e6 * self.manager_seconds / self.engine_steps if self.engine_steps else 0.0

    @property
    def manager_us_per_request_step(self) -> float:
        return 1e6 * self.manager_seconds / self.request_steps if self.request_steps else 0.0

    def phase_us(self, phase: str, count: int) -> float:
        return 1e6 * self.manager_phase_seconds.get(phase, 0.0) / count if count else 0.0

    def tier_rows(self) -> list[tuple[str, int, float]]:
        """(tier, reused tokens, share of admitted tokens).  Level 0 serves every hit
        that needed no onboarding; colder tiers the onboarded ones."""
        denom = self.admitted_tokens or 1
        rows: list[tuple[str, int, float]] = []
        onboarded = min(self.onboarded_tokens, self.reused_tokens)
        rows.append((self.tiers[0] if self.tiers else "gpu (level 0)", self.reused_tokens - onboarded, 0.0))
        if len(self.tiers) > 1:
            rows.append((" + ".join(self.tiers[1:]) + " (onboarded)", onboarded, 0.0))
        rows = [(name, n, n / denom) for name, n, _ in rows]
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
        skipped = f"  (skipped {self.skipped}: too long for the quota)" if self.skipped else ""
        add("requests completed", f"{self.completed:,} / {self.requests:,}{skipped}")
        add("prompt tokens", f"{self.prompt_tokens:,}")
        add("generated tokens", f"{self.generated_tokens:,}")
        add("admissions", f"{self.admissions:,}  (retries {self.admission_retries:,})")
        add("preemptions", f"{self.preemptions:,}")
        add("prefix reuse (tier)", "reused tokens    hit rate")
        for name, n, r in self.tier_rows():
            add(f"  {name}", f"{n:>13,}    {100 * r:6.2f} %")
        add("  first admissions", f"{self.first_admission_reused:>13,}    {100 * self.first_admission_hit_rate:6.2f} %")
        add("prefilled tokens", f"{self.prefilled_tokens:,}")
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
        add("fake engine time", f"{self.engine_seconds:.3f} s")
        add("bytes verified", f"{self.bytes_verified:,}  ({self.bytes_verified / MiB:.1f} MiB)")
        add("bytes written", f"{self.bytes_written:,}  ({self.bytes_written / MiB:.1f} MiB)")
        add("wall time", f"{self.wall_seconds:.2f} s")
        add("library mode", "compiled (mypyc)" if self.compiled else "dev (pure Python)")
        width = max(len(k) for k, _ in rows)
        line = "-" * (width + 2 + max(len(v) for _, v in rows))
        out = [line] + [f"{k.ljust(width)}  {v}" for k, v in rows] + [line]
        return "\n".join(out)


class Simulator:
    """FCFS continuous batching with preemption by close-and-restart."""

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
    ) -> None:
        self.requests = list(requests)
        self.config = config
        self.max_batch = max_batch
        self.chunk = chunk
        self.progress = progress
        self.progress_file = progress_file
        self.manager = KVCacheManager(config)
        self.engine = FakeEngine(self.manager, config, index_mode=index_mode)
        tiers = []
        for lvl, tier in enumerate(config.cache_tiers):
            kind = type(tier).__name__.replace("CacheTierConfig", "").lower() or "tier"
            tiers.append(f"{kind} (level {lvl})")
        self.result = SimulationResult(
            workload=workload,
            requests=len(self.requests),
            compiled=bool(kvm.is_compiled()) if hasattr(kvm, "is_compiled") else False,
            tokens_per_block=int(self.manager.tokens_per_block),
            gpu_quota_bytes=int(config.cache_tiers[0].quota),
            max_batch=max_batch,
            seed=seed,
            tiers=tiers,
        )
        self._mgr_s = 0.0
        self._phase_s: dict[str, float] = {"admission": 0.0, "decode": 0.0, "close": 0.0, "stats": 0.0}

    # --------------------------------------------------------------- helpers
    def _accumulate_stats(self) -> None:
        t0 = time.perf_counter()
        stats = self.manager.get_and_reset_iteration_stats()
        dt = time.perf_counter() - t0
        self._mgr_s += dt
        self._phase_s["stats"] += dt
        res = self.result
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
                    if gid == 0 and "onboard" in name and "block" in name:
                        res.onboarded_tokens += v * res.tokens_per_block

    def _close(self, r: _Running) -> None:
        self.engine.forget(r.kv)
        t0 = time.perf_counter()
        r.kv.close()
        dt = time.perf_counter() - t0
        self._mgr_s += dt
        self._phase_s["close"] += dt
        self.result.closes += 1

    # ------------------------------------------------------------------ loop
    def run(self) -> SimulationResult:
        res = self.result
        mgr = self.manager
        eng = self.engine
        perf = time.perf_counter
        waiting: deque[tuple[Request, int]] = deque((r, 0) for r in self.requests)  # (req, generated)
        done: set[int] = set()
        running: list[_Running] = []
        first_seen: set[int] = set()
        blocked = False
        wall0 = perf()
        bar: Any = None
        if self.progress:
            tqdm: Any = importlib.import_module("tqdm").tqdm
            bar = tqdm(total=len(self.requests), unit="req", file=self.progress_file, dynamic_ncols=True)
        try:
            while waiting or running:
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
                    while True:
                        t0 = perf()
                        ok = r.kv.resize(capacity=r.pos + 1)
                        dt = perf() - t0
                        self._mgr_s += dt
                        self._phase_s["decode"] += dt
                        if ok:
                            break
                        victim = running[-1]
                        if victim is r and len(running) == 1:
                            break
                        self._preempt(victim, running, waiting)
                        preempted_this_step = True
                        if victim is r:
                            break
                    if r not in running:
                        continue  # preempted itself
                    if not ok:
                        self._skip(r, running, bar)
                        continue
                    tok = r.req.output[r.generated]
                    steps.append(Step(r.kv, [tok], r.tokens))
                    commits.append((r, [tok], True))
                    i += 1
                # ---- chunked prefill continuation
                for r in running:
                    if r.pos < len(r.tokens) and not any(c[0] is r for c in commits):
                        self._prefill_step(r, steps, commits)
                # ---- admission (FCFS; a turn waits for its session's previous turn)
                failed: Request | None = None
                # after a failed admission, wait until a request finishes (frees pages)
                if not preempted_this_step and (not blocked or not running):
                    failed = self._admit(waiting, done, running, steps, commits, first_seen)
                    blocked = failed is not None
                if not steps:
                    if not running and failed is not None:
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
                    if running:
                        continue  # only fully reused admissions this step: they decode next
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
                    dt = perf() - t0
                    self._mgr_s += dt
                    self._phase_s["decode" if is_decode else "admission"] += dt
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
                            bar.set_postfix(hit=f"{100 * res.hit_rate:.1f}%", pre=res.preemptions, refresh=False)
                self._accumulate_stats()
            eng.verify_all()
        finally:
            if bar is not None:
                bar.close()
            for r in running:
                r.kv.close()
        res.bytes_verified = eng.bytes_verified
        res.bytes_written = eng.bytes_written
        res.manager_seconds = self._mgr_s
        res.manager_phase_seconds = dict(self._phase_s)
        self._accumulate_stats()
        res.wall_seconds = perf() - wall0
        return res

    def shutdown(self) -> None:
        check = getattr(self.manager, "check_invariants", None)
        if check is not None:
            check()
        self.manager.clear_reusable_blocks()
        self.manager.shutdown()

    def _skip(self, r: _Running, running: list[_Running], bar: Any) -> None:
        running.remove(r)
        self._close(r)
        self.result.skipped += 1
        self.result.skipped_rids.append(r.req.rid)
        if bar is not None:
            bar.update(1)

    def _preempt(self, victim: _Running, running: list[_Running], waiting: deque[tuple[Request, int]]) -> None:
        """Close ``victim`` (its committed tokens stay reusable) and queue it to restart."""
        running.remove(victim)
        self._close(victim)
        self.result.preemptions += 1
        waiting.appendleft((victim.req, victim.generated))

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
            ok = kv.resume()
            if ok:
                ok = kv.resize(capacity=max(len(tokens), reused))
            if not ok:
                kv.close()
            dt = perf() - t0
            self._mgr_s += dt
            self._phase_s["admission"] += dt
            if not ok:
                res.admission_retries += 1
                return req  # retry at a later step, when running requests have freed pages
            del waiting[idx]
            res.admissions += 1
            res.admitted_tokens += len(tokens)
            res.reused_tokens += reused
            if req.rid not in first_seen:
                first_seen.add(req.rid)
                res.first_admission_tokens += len(tokens)
                res.first_admission_reused += reused
            r = _Running(req, kv, tokens, reused, gen)
            running.append(r)
            if reused < len(tokens):
                self._prefill_step(r, steps, commits)  # its first forward is a full check
            else:
                self.engine.verify(kv, tokens)  # fully reused: verify before decoding
        return None
