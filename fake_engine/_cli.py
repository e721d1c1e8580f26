"""Command line: ``python -m fake_engine <subcommand>``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Sequence

from kv_cache_manager_v2 import DataIntegrityError, PageIndexMode

from ._disagg import run_disagg
from ._plot import PlotUnavailableError, load_pyplot, plot_timeline
from ._simulate import MiB, SimulationResult, Simulator, model_config
from ._workload import Request, mooncake_trace, synthetic_workload

DEFAULT_SYNTHETIC_REQUESTS = 600
DEFAULT_TRACE_SCALE = 16
DEFAULT_HOST_MB = 16.0


def run_simulation(
    trace: str | None = None,
    requests: int | None = None,
    tpb: int = 16,
    gpu_mb: float = 4.0,
    max_batch: int = 16,
    seed: int = 0,
    scale: int = DEFAULT_TRACE_SCALE,
    chunk: int = 0,
    progress: bool = True,
    shutdown: bool = True,
    index_mode: PageIndexMode = PageIndexMode.PER_LAYER,
    host_mb: float = DEFAULT_HOST_MB,
    disk_mb: float = 0.0,
    disk_path: str | None = None,
    sample_every: int = 10,
    resume_retries: int = 8,
) -> SimulationResult:
    """Build the workload and the manager, replay, verify every byte; the Python
    entry point behind ``python -m fake_engine simulate``.

    ``host_mb`` / ``disk_mb`` > 0 add a host / disk tier.  Without ``disk_path`` the disk
    tier lives in a fresh temporary directory, removed afterwards (kept, and named in
    ``result.disk_path``, only when ``shutdown=False`` leaves the manager open)."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    for name, mb in (("gpu_mb", gpu_mb), ("host_mb", host_mb), ("disk_mb", disk_mb)):
        if mb < 0:
            raise ValueError(f"{name} must be >= 0")
    reqs: list[Request]
    if trace:
        reqs = mooncake_trace(trace, num_requests=requests, scale=scale, seed=seed)
        workload = f"mooncake trace {trace} ({len(reqs)} requests, lengths / {scale})"
    else:
        n = DEFAULT_SYNTHETIC_REQUESTS if requests is None else requests
        reqs = synthetic_workload(num_requests=n, seed=seed)
        workload = f"synthetic multi-turn chat ({len(reqs)} requests, 8 shared system prompts)"
    tmp_dir: str | None = None
    sim: Simulator | None = None
    finished = False
    try:
        path = disk_path
        if disk_mb > 0:
            if path:
                os.makedirs(path, exist_ok=True)
            else:
                tmp_dir = path = tempfile.mkdtemp(prefix="fake_engine_disk_")
        config = model_config(
            tokens_per_block=tpb,
            gpu_quota_bytes=int(gpu_mb * MiB),
            host_quota_bytes=int(host_mb * MiB),
            disk_quota_bytes=int(disk_mb * MiB),
            disk_path=path,
        )
        sim = Simulator(
            reqs,
            config,
            max_batch=max_batch,
            chunk=chunk,
            workload=workload,
            seed=seed,
            progress=progress,
            index_mode=index_mode,
            sample_every=sample_every,
            resume_retries=resume_retries,
        )
        result = sim.run()
        result.disk_path = path or ""
        if shutdown:
            sim.shutdown()
        finished = True
        return result
    finally:
        if tmp_dir is not None and (shutdown or not finished):
            if not finished and sim is not None:
                _close_quietly(sim)  # disk files go before their directory
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _close_quietly(sim: Simulator) -> None:
    """Best-effort shutdown after a failed run (the caches were closed by ``run``)."""
    try:
        sim.manager.clear_reusable_blocks()
        sim.manager.shutdown()
    except Exception:  # noqa: BLE001 - the original error is what matters
        pass


def _add_simulate(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "simulate",
        help="replay a workload over the manager (host backend), verifying every byte",
        description=(
            "Replays a synthetic multi-turn workload (default) or a Mooncake JSONL trace through a "
            "continuous-batching loop over KVCacheManager on the host backend; the fake engine "
            "verifies every KV byte it reads back. With a host (--host-mb, default "
            f"{DEFAULT_HOST_MB:g}) and/or disk (--disk-mb) tier, requests are suspended when level 0 "
            "runs short (their pages move colder) and resumed later. Prints a summary table with "
            "the prefix hit rate by tier."
        ),
    )
    p.add_argument(
        "--trace", metavar="PATH", help="Mooncake JSONL trace (timestamp, input_length, output_length, hash_ids)"
    )
    p.add_argument(
        "--requests",
        type=int,
        default=None,
        help=f"number of requests (synthetic default {DEFAULT_SYNTHETIC_REQUESTS}; trace default: all)",
    )
    p.add_argument("--tpb", type=int, default=16, help="tokens per block (default 16)")
    p.add_argument("--gpu-mb", type=float, default=4.0, help="level-0 (GPU tier) quota in MiB (default 4)")
    p.add_argument(
        "--host-mb",
        type=float,
        default=DEFAULT_HOST_MB,
        help=f"host tier (level 1) quota in MiB; 0: no host tier (default {DEFAULT_HOST_MB:g})",
    )
    p.add_argument("--disk-mb", type=float, default=0.0, help="disk tier quota in MiB; 0: no disk tier (default 0)")
    p.add_argument(
        "--disk-path",
        metavar="DIR",
        default=None,
        help="directory of the disk tier's files (default: a fresh temporary directory, removed afterwards)",
    )
    p.add_argument("--max-batch", type=int, default=16, help="max running requests (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scale",
        type=int,
        default=DEFAULT_TRACE_SCALE,
        help=f"divide trace lengths (and tokens per hash id) by this (default {DEFAULT_TRACE_SCALE})",
    )
    p.add_argument("--chunk", type=int, default=0, help="prefill chunk size in tokens (0: whole prompt)")
    p.add_argument(
        "--index-mode",
        choices=("per_layer", "shared"),
        default="per_layer",
        help="page-index mode the fake kernels address memory with (default per_layer)",
    )
    p.add_argument("--json", metavar="FILE", help="write the summary as JSON (timeline included)")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw the cumulative hit rate (by tier) and per-level occupancy over time (needs matplotlib)",
    )
    p.add_argument(
        "--sample-every",
        type=int,
        default=10,
        metavar="N",
        help="sample hit rate and tier occupancy every N engine steps (default 10)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    if args.plot:
        try:
            load_pyplot()  # fail before a long run, not after it
        except PlotUnavailableError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if args.sample_every < 1:
        print("error: --sample-every must be >= 1", file=sys.stderr)
        return 1
    try:
        result = run_simulation(
            trace=args.trace,
            requests=args.requests,
            tpb=args.tpb,
            gpu_mb=args.gpu_mb,
            max_batch=args.max_batch,
            seed=args.seed,
            scale=args.scale,
            chunk=args.chunk,
            progress=not args.no_progress,
            index_mode=PageIndexMode.SHARED if args.index_mode == "shared" else PageIndexMode.PER_LAYER,
            host_mb=args.host_mb,
            disk_mb=args.disk_mb,
            disk_path=args.disk_path,
            sample_every=args.sample_every,
        )
    except DataIntegrityError as exc:
        print(f"DATA INTEGRITY ERROR: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        if args.disk_mb > 0:
            print(f"error: the disk tier is not available in this build of kv_cache_manager_v2 ({exc})", file=sys.stderr)
            return 1
        raise
    print(result.format_table())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
    if args.plot:
        plot_timeline(result, args.plot)
        print(f"plot written to {args.plot}")
    return 0 if result.completed + result.skipped == result.requests else 1


def _add_disagg(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "disagg",
        help="send a prompt's KV from a prefill-side manager to a decode-side one, verifying every byte",
        description=(
            "Two managers (host backend) with the same small model (full attention, SWA, SWA with "
            "sinks): the prefill side writes and commits a prompt; the decode side sizes a cache with "
            "resize(prompt_len, prompt_len), receives the bytes through the aggregated page "
            "descriptors (aligned with align_block_spans), verifies the prompt and decodes a few "
            "tokens with verification. Prints blocks and bytes sent per layer group."
        ),
    )
    p.add_argument("--prompt-len", type=int, default=185, help="prompt length in tokens (default 185)")
    p.add_argument("--tpb", type=int, default=16, help="tokens per block (default 16)")
    p.add_argument("--window", type=int, default=64, help="SWA window in tokens (default 64)")
    p.add_argument("--decode-tokens", type=int, default=8, help="tokens decoded after the transfer (default 8)")
    p.set_defaults(func=_cmd_disagg)


def _cmd_disagg(args: argparse.Namespace) -> int:
    if args.prompt_len < 1 or args.tpb < 1 or args.window < 1 or args.decode_tokens < 0:
        print("error: --prompt-len, --tpb and --window must be >= 1, --decode-tokens >= 0", file=sys.stderr)
        return 1
    config = model_config(
        tokens_per_block=args.tpb,
        gpu_quota_bytes=4 * MiB,
        window=args.window,
        small_window=args.window,
        sink_tokens=4,
    )
    prompt = [(7 * i + 3) % 50_000 for i in range(args.prompt_len)]
    try:
        result = run_disagg(config, prompt, decode_tokens=args.decode_tokens)
    except DataIntegrityError as exc:
        print(f"DATA INTEGRITY ERROR: {exc}", file=sys.stderr)
        return 2
    print(result.format_summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fake_engine", description="Fake inference engine over kv_cache_manager_v2"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_simulate(sub)
    _add_disagg(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc
