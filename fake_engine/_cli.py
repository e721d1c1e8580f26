"""Command line: ``python -m fake_engine <subcommand>``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from kv_cache_manager_v2 import DataIntegrityError, PageIndexMode

from ._simulate import MiB, SimulationResult, Simulator, model_config
from ._workload import Request, mooncake_trace, synthetic_workload

DEFAULT_SYNTHETIC_REQUESTS = 600
DEFAULT_TRACE_SCALE = 16


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
) -> SimulationResult:
    """Build the workload and the manager, replay, verify every byte; the Python
    entry point behind ``python -m fake_engine simulate``."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    reqs: list[Request]
    if trace:
        reqs = mooncake_trace(trace, num_requests=requests, scale=scale, seed=seed)
        workload = f"mooncake trace {trace} ({len(reqs)} requests, lengths / {scale})"
    else:
        n = DEFAULT_SYNTHETIC_REQUESTS if requests is None else requests
        reqs = synthetic_workload(num_requests=n, seed=seed)
        workload = f"synthetic multi-turn chat ({len(reqs)} requests, 8 shared system prompts)"
    config = model_config(tokens_per_block=tpb, gpu_quota_bytes=int(gpu_mb * MiB))
    sim = Simulator(
        reqs,
        config,
        max_batch=max_batch,
        chunk=chunk,
        workload=workload,
        seed=seed,
        progress=progress,
        index_mode=index_mode,
    )
    result = sim.run()
    if shutdown:
        sim.shutdown()
    return result


def _add_simulate(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "simulate",
        help="replay a workload over the manager (host backend), verifying every byte",
        description=(
            "Replays a synthetic multi-turn workload (default) or a Mooncake JSONL trace through a "
            "continuous-batching loop over KVCacheManager on the host backend; the fake engine "
            "verifies every KV byte it reads back. Prints a summary table."
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
    p.add_argument("--json", metavar="FILE", help="write the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
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
        )
    except DataIntegrityError as exc:
        print(f"DATA INTEGRITY ERROR: {exc}", file=sys.stderr)
        return 2
    print(result.format_table())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
    return 0 if result.completed + result.skipped == result.requests else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fake_engine", description="Fake inference engine over kv_cache_manager_v2"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_simulate(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc
