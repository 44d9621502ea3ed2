"""What ``import singleflight`` costs: code using threads never imports asyncio.

Each check runs in a fresh interpreter, since this one has long imported everything.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import singleflight

SRC = str(Path(singleflight.__file__).resolve().parent.parent)


def run(code: str) -> str:
    """Run ``code`` in a fresh interpreter importing this checkout's package; return stdout."""
    done = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {SRC!r})\n{code}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_thread_api_does_not_import_asyncio() -> None:
    out = run(
        "import singleflight\n"
        "from singleflight import Group, LoadingCache, GroupStats, CacheStats, Result\n"
        "from singleflight import SingleflightError, WaitTimeoutError, TooManyFlightsError\n"
        "from singleflight.cache import LoadingCache as L\n"
        "assert L is LoadingCache\n"
        "print(Group[str, int]().do('k', lambda: 1), LoadingCache(str).get(7))\n"
        "print(sorted(m for m in sys.modules if m == 'asyncio' or m.startswith('asyncio.')))\n"
    )
    assert out.splitlines() == ["1 7", "[]"]


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("AsyncGroup", "singleflight._asyncio"),
        ("AsyncLoadingCache", "singleflight.cache._async"),
        ("cached", "singleflight.func"),
        ("coalesce", "singleflight.func"),
    ],
)
def test_the_asyncio_api_is_imported_on_first_use(name: str, module: str) -> None:
    out = run(
        "import singleflight\n"
        "print('asyncio' in sys.modules)\n"
        f"value = singleflight.{name}\n"
        f"print('asyncio' in sys.modules, value is getattr(sys.modules[{module!r}], {name!r}))\n"
    )
    assert out.splitlines() == ["False", "True True"]


def test_every_name_in_all_resolves_and_is_listed_by_dir() -> None:
    out = run(
        "import singleflight, singleflight.cache\n"
        "from singleflight import *\n"
        "for m in (singleflight, singleflight.cache):\n"
        "    missing = [n for n in m.__all__ if n not in dir(m) or getattr(m, n) is None]\n"
        "    print(missing)\n"
        "print(AsyncGroup.__name__, AsyncLoadingCache.__name__, cached.__name__)\n"
    )
    assert out.splitlines() == ["[]", "[]", "AsyncGroup AsyncLoadingCache cached"]


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        singleflight.no_such_thing  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(ImportError):
        from singleflight import no_such_thing  # type: ignore[attr-defined]  # noqa: F401
    with pytest.raises(AttributeError, match="no_such_thing"):
        singleflight.cache.no_such_thing  # type: ignore[attr-defined]  # noqa: B018
