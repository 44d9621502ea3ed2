"""The demo's chart: database queries per second over time, one line per mode."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # no display needed; must come before pyplot is imported

import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from .demo import DemoConfig
    from .measure import ModeSummary

__all__ = ["write"]

# One colour per mode, the same in every run: the stampede in red.
_COLOURS = {"naive": "#d62728", "group": "#1f77b4", "redis": "#9467bd", "loading": "#2ca02c"}


def write(path: Path, summaries: list[ModeSummary], cfg: DemoConfig, subtitle: str = "") -> None:
    """Write the chart of ``summaries`` to ``path`` (PNG): queries per second on top,
    queries so far below."""
    fig, (rate_ax, total_ax) = plt.subplots(
        2,
        1,
        sharex=True,
        figsize=(10, 7),
        dpi=110,
        height_ratios=(3, 2),
        layout="constrained",
    )
    try:
        width = cfg.bucket
        for s in summaries:
            edges = [i * width for i in range(len(s.rates) + 1)]
            style = {
                "color": _COLOURS.get(s.mode),
                "linewidth": 2.0 if s.mode == "naive" else 1.6,
            }
            # A step per bucket: what was counted, not an interpolation.
            label = f"{s.title}: {s.queries:,} queries"
            rate_ax.stairs(s.rates, edges, baseline=None, label=label, **style)
            totals = list(itertools.accumulate(rate * width for rate in s.rates))
            total_ax.stairs(totals, edges, baseline=None, **style)
        expiries = [k * cfg.ttl for k in range(1, math.ceil(cfg.duration / cfg.ttl))]
        for ax in (rate_ax, total_ax):
            for t in expiries:
                ax.axvline(t, color="#999999", linestyle=":", linewidth=1)
            ax.set_ylim(bottom=0)
            ax.grid(True, axis="y", color="#e8e8e8")
            ax.spines[["top", "right"]].set_visible(False)
        rate_ax.set_xlim(0, cfg.duration)
        rate_ax.set_ylabel(f"DB queries / s\n(per {width * 1000:g} ms)")
        total_ax.set_ylabel("DB queries so far")
        total_ax.set_xlabel(
            "seconds since the clients started with a cold cache; "
            f"dotted: every TTL ({cfg.ttl:g} s), when entries loaded at 0 expire"
        )
        fig.suptitle(
            "Cache stampede: the queries the database executed", x=0.01, ha="left", fontsize=13
        )
        if subtitle:
            rate_ax.set_title(subtitle, loc="left", fontsize=9, color="#555555")
        fig.legend(loc="outside lower center", ncols=min(2, len(summaries)), frameon=False)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
