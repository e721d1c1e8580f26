"""``simulate --plot FILE.png``: cumulative prefix hit rate (total and by tier) and per-level
occupancy over the run.  matplotlib is an optional extra (``pip install matplotlib``)."""

from __future__ import annotations

import importlib
from typing import Any

from ._simulate import SimulationResult

MATPLOTLIB_HINT = "--plot needs matplotlib, which is not installed: pip install matplotlib"


class PlotUnavailableError(RuntimeError):
    """matplotlib is missing."""


def load_pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend, or PlotUnavailableError."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
    except ImportError as exc:
        raise PlotUnavailableError(MATPLOTLIB_HINT) from exc
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def plot_timeline(result: SimulationResult, path: str) -> None:
    """Two panels over engine steps: cumulative hit rate (total, and the share served
    from each tier), and per-level occupancy (slots holding a page / total slots, solid)
    with utilization ((total - available) / total: pages nothing can reclaim, dashed)."""
    plt = load_pyplot()
    tl = result.timeline
    if not tl:
        raise ValueError("the simulation recorded no timeline samples")
    x = [s["step"] for s in tl]
    names = result.tiers or ["gpu (level 0)"]
    fig, (ax_hit, ax_occ) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    ax_hit.plot(x, [100 * s["hit_rate"] for s in tl], color="black", linewidth=2, label="total")
    for lvl, name in enumerate(names):
        ax_hit.plot(x, [100 * s["hit_rate_by_level"][lvl] for s in tl], label=f"from {name}")
    ax_hit.set_ylabel("prefix hit rate, cumulative (%)")
    ax_hit.set_ylim(0, 100)
    ax_hit.grid(True, alpha=0.3)
    ax_hit.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")  # outside: never over data
    ax_hit.set_title(
        f"{result.workload}\n{result.completed} requests, hit rate {100 * result.hit_rate:.1f} %, "
        f"{result.suspends} suspends, {result.preemptions} restarts",
        fontsize="medium",
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
    for lvl, name in enumerate(names):
        c = colors[lvl % len(colors)]
        ax_occ.plot(x, [100 * s["occupancy"][lvl] for s in tl], color=c, label=f"{name} occupancy")
        ax_occ.plot(
            x, [100 * s["utilization"][lvl] for s in tl], color=c, linestyle="--", alpha=0.7, label=f"{name} utilization"
        )
    ax_occ.set_ylabel("slots used (%)")
    ax_occ.set_xlabel(f"engine step (sampled every {result.sample_every})")
    ax_occ.set_ylim(0, 105)
    ax_occ.grid(True, alpha=0.3)
    ax_occ.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
