"""Fake inference engine: plays a model's forward pass over a KVCacheManager's pages
(host backend) and verifies every byte it reads back.  See SPEC §6."""

from ._cli import main, run_simulation
from ._engine import FakeEngine, Step, stale_block_range, token_value, tokens_to_array, visible_ranges
from ._simulate import SimulationResult, Simulator, model_config
from ._workload import Request, mooncake_trace, synthetic_workload

__all__ = [
    "FakeEngine",
    "Request",
    "SimulationResult",
    "Simulator",
    "Step",
    "main",
    "model_config",
    "mooncake_trace",
    "run_simulation",
    "stale_block_range",
    "synthetic_workload",
    "token_value",
    "tokens_to_array",
    "visible_ranges",
]
