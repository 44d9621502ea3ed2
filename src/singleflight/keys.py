"""Keys from call arguments, for the decorators.

Two calls get the same key exactly when they bind the same values to the same
parameters: ``f(1, b=2)``, ``f(1, 2)`` and ``f(a=1)`` (when ``b`` defaults to 2)
are one key.  Unhashable arguments are replaced by hashable copies of their
contents (lists, dicts, sets, bytearrays, and tuples holding them); anything
else unhashable is a ``TypeError`` asking for ``make_key=``.  A parameter named
``self`` is keyed by identity, so two instances of a class never share a key,
even when they compare equal, and a cache does not keep them alive.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["KeyBuilder", "freeze"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class _Frozen:
    """A hashable copy of an unhashable container; equal only to the same kind of copy."""

    __slots__ = ("_hash", "contents", "kind")

    def __init__(self, kind: type, contents: Hashable) -> None:
        self.kind = kind
        self.contents = contents
        self._hash = hash((kind, contents))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Frozen)
            and self.kind is other.kind
            and self.contents == other.contents
        )

    def __repr__(self) -> str:
        return f"{self.kind.__name__}({self.contents!r})"


class _Identity:
    """Stands for an object by identity; does not keep it alive if it can be weakly referenced."""

    __slots__ = ("_id", "_ref")

    def __init__(self, obj: object) -> None:
        self._id = id(obj)
        try:
            self._ref: Callable[[], object] = weakref.ref(obj)
        except TypeError:  # no weak references (e.g. __slots__ without __weakref__)
            self._ref = lambda: obj

    def __hash__(self) -> int:
        return self._id

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Identity) or other._id != self._id:
            return False
        mine = self._ref()
        # A dead reference equals nothing: its id may have been reused.
        return mine is not None and mine is other._ref()

    def __repr__(self) -> str:
        obj = self._ref()
        return f"<self {type(obj).__name__} at {self._id:#x}>"


class _Watched(_Identity):
    """An identity that tells ``on_death`` when its object dies: the one in a stored key."""

    __slots__ = ()

    def __init__(self, obj: object, on_death: Callable[[Any], object]) -> None:
        self._id = id(obj)
        self._ref = weakref.ref(obj, on_death)  # TypeError if obj has no weak references


def freeze(value: object, where: str = "an argument") -> Hashable:
    """``value`` itself if hashable, else a hashable copy of its contents.

    ``TypeError`` naming ``where`` for an unhashable value that is not a list,
    tuple, dict, set or bytearray.
    """
    try:
        hash(value)
    except TypeError:
        pass
    else:
        return value
    if isinstance(value, tuple):
        return tuple(freeze(item, where) for item in value)
    if isinstance(value, list):
        return _Frozen(list, tuple(freeze(item, where) for item in value))
    if isinstance(value, dict):
        return _Frozen(
            dict, frozenset((freeze(k, where), freeze(v, where)) for k, v in value.items())
        )
    if isinstance(value, set):
        return _Frozen(set, frozenset(value))
    if isinstance(value, bytearray):
        return _Frozen(bytearray, bytes(value))
    raise TypeError(
        f"{where} is unhashable ({type(value).__name__}: {value!r}), so it cannot be part of "
        "a key; pass make_key=... to the decorator to build the key yourself"
    )


class KeyBuilder:
    """Builds the key of a call of ``fn`` from its arguments (see the module docstring).

    ``key`` (a function taking the same arguments) replaces the default key.
    ``prefix``, when given, is put in front of the default key: a group shared
    by several functions then keeps their calls apart.
    """

    __slots__ = (
        "_direct",
        "_fn",
        "_identity_first",
        "_names",
        "_nargs",
        "_prefix",
        "_signature",
        "_simple",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        prefix: Hashable | None = None,
    ) -> None:
        signature = inspect.signature(fn)
        parameters = list(signature.parameters.values())
        self._fn = fn
        self._signature = signature
        self._names = [p.name for p in parameters]
        self._prefix = prefix
        # Every parameter can be filled positionally: a call passing all of them
        # so has its values in parameter order already, without binding.
        self._simple = all(p.kind in _POSITIONAL for p in parameters)
        self._nargs = len(parameters)
        self._identity_first = bool(parameters) and parameters[0].name == "self"
        # Then the arguments tuple of a call passing every parameter positionally
        # is the key as it is: no copy.
        self._direct = self._simple and not self._identity_first and prefix is None

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        """The call's key: hashable, with unhashable arguments frozen."""
        key = self.raw(args, kwargs)
        try:
            hash(key)
        except TypeError:
            key = self._freeze(key)
        return key

    def raw(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """The call's key before freezing: equal to ``self(args, kwargs)`` whenever it is
        hashable.  For a hit path that hashes the key anyway (a dict lookup) and
        freezes only when that fails."""
        if self._direct and not kwargs and len(args) == self._nargs:
            return args
        if self._simple and not kwargs and len(args) == self._nargs:
            values: list[Any] = list(args)
        else:
            try:
                bound = self._signature.bind(*args, **kwargs)
            except TypeError as exc:
                # Report it as the call itself would.
                raise TypeError(f"{self._fn.__qualname__}(): {exc}") from None
            bound.apply_defaults()
            values = []
            for parameter in self._signature.parameters.values():
                value = bound.arguments[parameter.name]
                if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                    # Keyword order does not matter: f(a=1, b=2) is f(b=2, a=1).
                    value = freeze(
                        value, f"argument {parameter.name!r} of {self._fn.__qualname__}()"
                    )
                values.append(value)
        if self._identity_first and values:
            values[0] = _Identity(values[0])
        if self._prefix is not None:
            values.insert(0, self._prefix)
        return tuple(values)

    @property
    def by_identity(self) -> bool:
        """Whether keys hold their first argument (``self``) by identity."""
        return self._identity_first

    def watched(self, key: Hashable, on_death: Callable[[Hashable], object]) -> Hashable:
        """``key`` as a cache stores it: equal to ``key``, and when the instance it holds
        by identity dies, ``on_death`` is called with it (so its entry can go).

        ``key`` itself when it holds nothing by identity, or an instance that
        cannot be weakly referenced (it is kept alive by the key anyway).
        """
        if not self._identity_first or not isinstance(key, tuple):
            return key
        at = 0 if self._prefix is None else 1
        identity = key[at] if len(key) > at else None
        if type(identity) is not _Identity:
            return key
        obj = identity._ref()
        if obj is None:
            return key
        stored: list[Hashable] = []

        def died(_: object) -> None:
            on_death(stored[0])

        try:
            watched = _Watched(obj, died)
        except TypeError:
            return key
        stored.append((*key[:at], watched, *key[at + 1 :]))
        return stored[0]

    def _freeze(self, key: tuple[Any, ...]) -> tuple[Any, ...]:
        names = ([""] if self._prefix is not None else []) + self._names
        return tuple(
            freeze(value, f"argument {name!r} of {self._fn.__qualname__}()")
            for name, value in zip(names, key, strict=True)
        )
