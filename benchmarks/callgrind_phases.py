#!/usr/bin/env python3
"""One repetition of manager_overhead's serving loop, for instruction counting per phase.

Timings on a shared VM drift by 30-60 %; instruction counts do not. Run under callgrind with
`--toggle-collect` on the calls of one phase so only they are counted, e.g. admission (the four
calls of an admission, decode steps off):

    PYTHONPATH=build/compiled valgrind --tool=callgrind \\
        --toggle-collect='CPyPy__kv_cache_manager___KVCacheManager___create_kv_cache' \\
        --toggle-collect='CPyPy__kv_cache___KVCache___resume' \\
        --toggle-collect='CPyPy__kv_cache___KVCache___resize' \\
        --toggle-collect='CPyPy__kv_cache___KVCache___commit' \\
        .venv/bin/python benchmarks/callgrind_phases.py --config A --decode-steps 0

and close: `--toggle-collect='CPyPy__kv_cache___KVCache___close'` with the default 64 decode
steps. "Collected" divided by the 256 requests is the instruction count per request. The
symbol names are mypyc's (compiled mode); `callgrind_annotate --inclusive=yes` breaks them down.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--config", choices=("A", "B"), default="A")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--decode-steps", type=int, default=64)
    args = p.parse_args()
    sys.path.insert(0, HERE)
    import manager_overhead as mo

    import kv_cache_manager_v2 as kvm

    result, manager = mo.run_rep(args.config, args.requests, args.decode_steps)
    manager.clear_reusable_blocks()
    manager.shutdown()
    mode = "compiled" if kvm.is_compiled() else "dev"
    print(f"{mode} config {args.config}: {args.requests} requests, {args.decode_steps} decode steps; "
          f"admission {result.admission_ns / args.requests / 1e3:.1f} µs/request (timed, informational)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
