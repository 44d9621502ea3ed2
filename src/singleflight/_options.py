"""The options groups, caches and decorators share, checked in one place.

Each check raises at construction, with a message that says what to pass
instead; nothing is registered or started by a call with a bad option.
"""

from __future__ import annotations


def missing(module: str, extra: str, what: str) -> ImportError:
    """What ``singleflight.<module>`` raises when ``what``, which it needs, is not installed."""
    return ImportError(f"singleflight.{module} needs {what}: pip install 'pysingleflight[{extra}]'")


def check_options(
    name: object, on_event: object, max_flights: object, on_limit: object, timeout: object
) -> None:
    """Validate the options every group takes."""
    check_name(name)
    if on_event is not None and not callable(on_event):
        raise TypeError(f"on_event must be a callable taking one event; got {on_event!r}")
    if max_flights is not None and (
        isinstance(max_flights, bool) or not isinstance(max_flights, int) or max_flights < 1
    ):
        raise ValueError(f"max_flights must be a positive int or None; got {max_flights!r}")
    if on_limit not in ("raise", "wait"):
        raise ValueError(f'on_limit must be "raise" or "wait"; got {on_limit!r}')
    check_seconds("timeout", timeout)


def check_name(name: object) -> None:
    """A group's or cache's name labels its events and metrics: a non-empty str."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str; got {name!r}")
    if not name:
        raise ValueError(
            f"name must be a non-empty str (it labels events and metrics); got {name!r}: "
            'pass a name such as name="users"'
        )


def check_seconds(option: str, seconds: object) -> None:
    """A duration option: a positive number of seconds, or None for no limit."""
    if seconds is not None and (
        isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0
    ):
        raise ValueError(f"{option} must be a positive number of seconds or None; got {seconds!r}")


def check_flag(option: str, value: object) -> None:
    """A yes/no option: exactly True or False (a truthy string is a mistake, not a yes)."""
    if not isinstance(value, bool):
        raise TypeError(f"{option} must be True or False; got {value!r}")


def check_duration(option: str, value: object, *, zero: bool = False) -> float:
    """A required duration: a finite number of seconds, > 0 (>= 0 with ``zero``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{option} must be a number of seconds; got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{option} must be finite; got {value!r}")
    if value < 0 or (value == 0 and not zero):
        raise ValueError(f"{option} must be {'>= 0' if zero else '> 0'} seconds; got {value!r}")
    return float(value)


def check_count(option: str, value: object, expected: str) -> int:
    """A positive int (not a bool); the message says ``option must be <expected>``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be {expected}; got {value!r}")
    return value
