"""``python -m singleflight demo`` / ``bench``: see :mod:`singleflight.cli`."""

from __future__ import annotations

import sys


def main() -> int:
    """The ``singleflight`` console script."""
    from .cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
