"""The ``singleflight`` command (``python -m singleflight``): ``demo`` and ``bench``.

Importing this package imports only the standard library; the demo's
dependencies (the ``demo`` extra) are imported when the demo runs.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import fields

from ._redact import redact

__all__ = ["main"]

# The modules the demo extra brings, and what the demo says when one is missing.
_DEMO_MODULES = frozenset({"rich", "matplotlib", "psycopg", "redis", "numpy", "PIL"})


def _fail(message: str, code: int) -> int:
    print(redact(message), file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failed, 2 bad usage)."""
    from ._args import UsageError, parse

    try:
        args = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        return _fail(str(exc), 2)
    try:
        if args.command == "bench":
            return _bench(args)
        return _demo(args)
    except KeyboardInterrupt:
        return _fail(f"singleflight {args.command}: interrupted", 130)
    except Exception:
        # A bug, or a failure nobody foresaw: the traceback, but never a password from
        # the command line (a driver's message may quote a URL).
        return _fail(traceback.format_exc().rstrip(), 1)


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchError, run_bench

    try:
        return run_bench(
            args.only,
            quick=args.quick,
            as_json=args.json,
            repo=args.repo,
            out=sys.stdout,
            err=sys.stderr,
        )
    except BenchError as exc:
        return _fail(f"singleflight bench: {exc}", 1)


def _demo(args: argparse.Namespace) -> int:
    try:
        from . import demo

        if not args.no_chart:
            from . import chart  # noqa: F401  (matplotlib: missing is told now, not after the run)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _DEMO_MODULES:
            raise
        return _fail(
            f"singleflight demo needs the demo extra ({exc.name} is missing): "
            "pip install 'pysingleflight[demo]'",
            1,
        )
    cfg = demo.DemoConfig(**{f.name: getattr(args, f.name) for f in fields(demo.DemoConfig)})
    if args.no_chart:
        cfg.out = None
    try:
        return demo.main(cfg)
    except demo.DemoError as exc:
        return _fail(f"singleflight demo: {exc}", 1)
