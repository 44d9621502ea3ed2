"""The demo's chart: database queries per second over time, one line per mode."""

from __future__ import annotations

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
    """Write the chart of ``summaries`` to ``path`` (PNG)."""
    fig, ax = plt.subplots(figsize=(10, 5.2), dpi=110, layout="constrained")
    try:
        width = cfg.bucket
        for s in summaries:
            times = [i * width for i in range(len(s.rates) + 1)]
            # A step per bucket, drawn to the bucket's end: what was counted, not an interpolation.
            ax.stairs(
                s.rates,
                times,
                label=f"{s.title}: {s.queries:,} queries",
                color=_COLOURS.get(s.mode),
                linewidth=2.0 if s.mode == "naive" else 1.6,
                baseline=None,
            )
        expiries = [k * cfg.ttl for k in range(1, math.ceil(cfg.duration / cfg.ttl))]
        for i, t in enumerate(expiries):
            label = "entries loaded at 0 expire" if i == 0 else None
            ax.axvline(t, color="#888888", linestyle=":", linewidth=1, label=label)
        ax.set_xlim(0, cfg.duration)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("seconds since the clients started (cold cache at 0)")
        ax.set_ylabel(f"database queries / s (per {width * 1000:g} ms)")
        fig.suptitle(
            "Cache stampede: queries the database executed", x=0.01, ha="left", fontsize=13
        )
        if subtitle:
            ax.set_title(subtitle, loc="left", fontsize=9, color="#555555")
        ax.grid(True, axis="y", color="#e5e5e5")
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(loc="upper right", frameon=False, fontsize=9)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
