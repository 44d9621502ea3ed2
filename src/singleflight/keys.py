"""Keys from call arguments, for the decorators.

Two calls get the same key exactly when they bind the same values to the same
parameters: ``f(1, b=2)``, ``f(1, 2)`` and ``f(a=1)`` (when ``b`` defaults to 2)
are one key.  Unhashable arguments are replaced by hashable copies of their
contents (lists, dicts, sets, bytearrays, and tuples holding them); anything
else unhashable is a ``TypeError`` naming the parameter and asking for
``make_key=``.  A parameter named ``self`` is keyed by identity, so two
instances of a class never share a key, even when they compare equal, and a
cache does not keep them alive.  With ``typed=True`` (as in
:func:`functools.lru_cache`) arguments of different types are keyed apart
(``f(1)`` and ``f(1.0)``).

Parameters a web framework fills per request are left out of the key: one
annotated with Starlette's or FastAPI's ``Request``, ``Response``,
``WebSocket``, ``HTTPConnection`` or ``BackgroundTasks``, or whose default (or
``Annotated`` metadata) is a ``Depends(...)``/``Security(...)``.  They are told
apart by the class's module and name, so neither framework is imported here.

The key is compiled once per function (:class:`KeyBuilder`): a small function
with the decorated function's own parameters returns the key, so Python's own
argument binding fills defaults and normalises keywords, and a call does no
``inspect`` work.
"""

from __future__ import annotations

import inspect
import keyword
import weakref
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["KeyBuilder", "freeze"]

_P = inspect.Parameter
_FRAMEWORK_MODULES = ("starlette.", "fastapi.")
_PER_REQUEST = frozenset({"Request", "Response", "WebSocket", "HTTPConnection", "BackgroundTasks"})
_DEPENDENCY = frozenset({"Depends", "Security"})


_FOLDABLE = frozenset({str, int, float, bytes, bool, type(None)})


class _Marker:
    """Starts a key that holds every parameter (a call not left at its defaults)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<all parameters>"


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
    """Stands for an object by identity; does not keep it alive if it can be weakly referenced.

    One per live object and key builder (see :meth:`KeyBuilder.identity`), so
    equal keys hold the same ``_Identity`` and compare by ``is``.
    """

    __slots__ = ("__weakref__", "_id", "_ref", "weak")

    def __init__(self, obj: object, on_death: Callable[[Any], None] | None = None) -> None:
        self._id = id(obj)
        try:
            self._ref: Callable[[], object] = weakref.ref(obj, on_death)
            self.weak = True
        except TypeError:  # no weak references (e.g. __slots__ without __weakref__)
            self._ref = lambda: obj
            self.weak = False

    def __hash__(self) -> int:
        return self._id

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Identity) or other._id != self._id:
            return False
        mine = self._ref()
        # A dead reference equals nothing: its id may have been reused.
        return mine is not None and mine is other._ref()

    @property
    def alive(self) -> bool:
        return self._ref() is not None

    def __repr__(self) -> str:
        obj = self._ref()
        return f"<self {type(obj).__name__} at {self._id:#x}>"


def freeze(value: object, where: str = "an argument") -> Hashable:
    """``value`` itself if hashable, else a hashable copy of its contents.

    Raises:
      - ``TypeError`` naming ``where`` for an unhashable value that is not a
        list, tuple, dict, set or bytearray.
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


def _thaw(value: object) -> Any:
    """The argument a frozen key part stands for (a copy with the same contents)."""
    if isinstance(value, _Frozen):
        kind, contents = value.kind, value.contents
        if kind is list:
            return [_thaw(item) for item in contents]  # type: ignore[attr-defined]
        if kind is dict:
            return {_thaw(k): _thaw(v) for k, v in contents}  # type: ignore[attr-defined]
        return kind(contents)
    if type(value) is tuple:
        return tuple(_thaw(item) for item in value)
    return value


def _kwargs_key(kwargs: dict[str, Any], fn: str) -> Any:
    """The key part of ``**kwargs``: order does not matter (``f(a=1, b=2)`` is ``f(b=2, a=1)``)."""
    if not kwargs:
        return ()
    try:
        return frozenset(kwargs.items())
    except TypeError:
        return frozenset(
            (name, freeze(value, f"argument {name!r} of {fn}()")) for name, value in kwargs.items()
        )


def _kwargs_types(kwargs: dict[str, Any]) -> Any:
    return frozenset((name, type(value)) for name, value in kwargs.items()) if kwargs else ()


def _class_names(obj: object) -> set[str]:
    cls = obj if isinstance(obj, type) else type(obj)
    return {
        c.__name__
        for c in getattr(cls, "__mro__", (cls,))
        if getattr(c, "__module__", "").startswith(_FRAMEWORK_MODULES)
    }


def per_request(parameter: inspect.Parameter) -> bool:
    """Whether a web framework fills ``parameter`` per request (so it is no part of a key)."""
    default = parameter.default
    if default is not _P.empty and _class_names(default) & _DEPENDENCY:
        return True
    annotation = parameter.annotation
    for meta in getattr(annotation, "__metadata__", ()):  # Annotated[T, Depends(...)]
        if _class_names(meta) & _DEPENDENCY:
            return True
    annotation = getattr(annotation, "__origin__", annotation)
    if isinstance(annotation, type):
        return bool(_class_names(annotation) & _PER_REQUEST)
    return False  # (an annotation left a string, which could not be evaluated, is keyed)


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn, eval_str=True)
    except (NameError, SyntaxError, TypeError):
        pass
    try:
        return inspect.signature(fn)
    except (ValueError, TypeError):  # builtins without a signature
        return None


class KeyBuilder:
    """The compiled key of calls of ``fn`` (see the module docstring).

    ``prefix``, when given, is put in front of the key: a group shared by
    several functions then keeps their calls apart.  ``typed`` keys arguments
    of different types apart.  ``builder(args, kwargs)`` is the key of a call;
    the decorators use the generated sources (``params``, ``key``, ``call``)
    to build wrappers whose hit path is one function.

    Raises:
      - ``TypeError`` if every parameter is filled per request (nothing to key on).
    """

    __slots__ = (
        "_bare",
        "_folded",
        "_kinds",
        "_make_key",
        "_marker",
        "_ns",
        "_raw",
        "_track",
        "call",
        "dead",
        "identities",
        "invertible",
        "key",
        "method",
        "name",
        "names",
        "params",
        "prefix",
        "self_index",
        "typed",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        prefix: Hashable | None = None,
        typed: bool = False,
        track_deaths: bool = False,
        make_key: Callable[..., Hashable] | None = None,
    ) -> None:
        self._track = track_deaths
        self._make_key = make_key
        self.name = getattr(fn, "__qualname__", repr(fn))
        self.prefix = prefix
        self.typed = typed
        # id(instance) -> its _Identity, while the instance lives; identities of
        # instances that died, for the cache to drop their entries.
        self.identities: dict[int, _Identity] = {}
        self.dead: list[_Identity] = []
        ns: dict[str, Any] = {
            "__sf_kw": lambda kwargs: _kwargs_key(kwargs, self.name),
            "__sf_kwt": _kwargs_types,
            "__sf_ids": self.identities,
            "__sf_ident": self.identity,
            "__sf_id": id,
            "__sf_type": type,
            "__sf_tuple": tuple,
            "__sf_map": map,
        }
        signature = _signature(fn)
        params: list[str] = []
        parts: list[str] = []  # expressions of the key's parts
        types: list[str] = []
        call: list[str] = []
        names: list[str] = []
        kinds: list[tuple[str, Any]] = []
        self.self_index = -1
        # part index -> (parameter index, default) of keyed parameters whose
        # defaults can be folded (see below).
        foldable: dict[int, tuple[int, Any]] = {}
        # Whether the first parameter is self or cls: the function is a method.
        self.method = False
        invertible = True
        if signature is None or not all(
            p.name.isidentifier() and not keyword.iskeyword(p.name)
            for p in signature.parameters.values()
        ):
            params = ["*args", "**kwargs"]
            parts = ["args", "__sf_kw(kwargs)"]
            types = ["__sf_tuple(__sf_map(__sf_type, args))", "__sf_kwt(kwargs)"]
            call = ["*args", "**kwargs"]
            names = ["*args", "**kwargs"]
            kinds = [("args", _P.VAR_POSITIONAL), ("kwargs", _P.VAR_KEYWORD)]
        else:
            seen_positional_only = False
            star = False
            skipped: list[str] = []
            for i, p in enumerate(signature.parameters.values()):
                name = p.name
                if i == 0 and name in ("self", "cls"):
                    self.method = True
                if p.kind is _P.POSITIONAL_ONLY:
                    seen_positional_only = True
                elif seen_positional_only:
                    params.append("/")
                    seen_positional_only = False
                if p.kind is _P.KEYWORD_ONLY and not star:
                    params.append("*")
                    star = True
                if p.kind is _P.VAR_POSITIONAL:
                    params.append(f"*{name}")
                    star = True
                elif p.kind is _P.VAR_KEYWORD:
                    params.append(f"**{name}")
                elif p.default is _P.empty:
                    params.append(name)
                else:
                    ns[f"__sf_d{i}"] = p.default
                    params.append(f"{name}=__sf_d{i}")
                if p.kind is _P.VAR_POSITIONAL:
                    call.append(f"*{name}")
                elif p.kind is _P.VAR_KEYWORD:
                    call.append(f"**{name}")
                elif p.kind is _P.KEYWORD_ONLY:
                    call.append(f"{name}={name}")
                else:
                    call.append(name)
                if per_request(p):
                    skipped.append(name)
                    invertible = False
                    continue
                names.append(name)
                kinds.append((name, p.kind))
                if p.kind is _P.VAR_KEYWORD:
                    parts.append(f"__sf_kw({name})")
                    types.append(f"__sf_kwt({name})")
                    continue
                if p.kind is _P.VAR_POSITIONAL:
                    types.append(f"__sf_tuple(__sf_map(__sf_type, {name}))")
                else:
                    types.append(f"__sf_type({name})")
                if i == 0 and name == "self":
                    self.self_index = len(parts)
                    parts.append(f"(__sf_ids.get(__sf_id({name})) or __sf_ident({name}))")
                else:
                    if p.kind is not _P.POSITIONAL_ONLY and type(p.default) in _FOLDABLE:
                        foldable[len(parts)] = (i, p.default)
                    parts.append(name)
            if seen_positional_only:
                params.append("/")
            if skipped and not parts:
                raise TypeError(
                    f"every parameter of {self.name}() ({', '.join(skipped)}) is filled per "
                    "request by the web framework, so none can key a cache; pass "
                    "make_key=... to build the key yourself"
                )
        if make_key is not None:
            # The key is make_key's, called with the caller's own arguments.
            ns["__sf_make_key"] = make_key
            params, call = ["*args", "**kwargs"], ["*args", "**kwargs"]
            parts, names, invertible, typed, prefix = (
                ["__sf_make_key(*args, **kwargs)"],
                [],
                False,
                False,
                None,
            )
            self.self_index = -1
        if typed:
            parts.extend(types)
        if prefix is not None:
            ns["__sf_prefix"] = prefix
            parts.insert(0, "__sf_prefix")
            if self.self_index >= 0:
                self.self_index += 1
        # Folding: a call leaving the trailing parameters at their defaults (plain
        # values: str, int, float, bytes, bool, None) is keyed by the others alone,
        # e.g. load(7) by 7; any other call by the full tuple behind a private
        # marker, so the two forms never meet.  Equal calls still share a key.
        run = 0
        if prefix is None and not typed and make_key is None and self.self_index < 0:
            while run < len(parts) - 1 and (len(parts) - 1 - run) in foldable:
                run += 1
        self._folded: tuple[Any, ...] = ()
        self._marker: object = None
        if run:
            kept = parts[: len(parts) - run]
            checks = []
            folded = []
            for at in range(len(parts) - run, len(parts)):
                i, default = foldable[at]
                name = parts[at]
                folded.append(default)
                if default is None:
                    checks.append(f"{name} is None")
                else:
                    ns[f"__sf_t{i}"] = type(default)
                    checks.append(
                        f"({name} is __sf_d{i} or "
                        f"(__sf_type({name}) is __sf_t{i} and {name} == __sf_d{i}))"
                    )
            self._folded = tuple(folded)
            self._marker = ns["__sf_full"] = _Marker()
            short = kept[0] if len(kept) == 1 else "(" + "".join(f"{k}, " for k in kept) + ")"
            full = "(__sf_full, " + "".join(f"{part}, " for part in parts) + ")"
            key = f"({short} if {' and '.join(checks)} else {full})"
            self._bare = len(kept) == 1
        elif len(parts) == 1 and prefix is None:
            key = parts[0]  # one value keys itself (as in functools.lru_cache)
            self._bare = True
        else:
            key = "(" + "".join(f"{part}, " for part in parts) + ")"
            self._bare = False
        self.params = ", ".join(params)
        self.key = key
        self.call = ", ".join(call)
        self.names = ([""] if prefix is not None else []) + names
        self._kinds = kinds
        self.invertible = invertible
        self._ns = ns
        self._raw: Callable[..., Any] = self.compile(
            f"def __sf_key({self.params}):\n    return {key}\n", "__sf_key"
        )

    def namespace(self, **more: Any) -> dict[str, Any]:
        """The globals of a function generated from ``params``, ``key`` and ``call``."""
        return {**self._ns, **more}

    def compile(self, source: str, name: str, **more: Any) -> Any:
        """Define ``name`` by running ``source`` with :meth:`namespace` as its globals."""
        ns = self.namespace(**more)
        exec(compile(source, f"<singleflight key of {self.name}>", "exec"), ns)
        fn = ns[name]
        fn.__qualname__ = self.name
        return fn

    def identity(self, obj: object) -> _Identity:
        """``obj``'s identity key part: the same object while ``obj`` lives (for an
        object that can be weakly referenced).  With ``track_deaths``, the
        identities of instances that died are listed in ``dead``."""
        identities, dead = self.identities, self.dead if self._track else None
        ident: _Identity

        def died(_: object) -> None:
            # Before the memory can be reused: a new object with the same id
            # must not find this identity.
            identities.pop(ident._id, None)
            if dead is not None:
                dead.append(ident)

        ident = _Identity(obj, died)
        if ident.weak:
            identities[id(obj)] = ident
        return ident

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        """The key of a call with ``args`` and ``kwargs``: hashable, with unhashable
        arguments frozen.

        Raises:
          - ``TypeError`` for arguments the function would not accept, or an
            unhashable one that cannot be frozen (naming its parameter).
        """
        return self.hashable(self._raw(*args, **kwargs))

    def hashable(self, key: Any) -> Hashable:
        """``key`` (a raw key) itself if hashable, else frozen part by part.

        Raises:
          - ``TypeError`` naming the parameter of an argument that cannot be
            frozen, or for an unhashable key ``make_key`` returned.
        """
        try:
            hash(key)
        except TypeError:
            pass
        else:
            return key  # type: ignore[no-any-return]
        if self._make_key is not None:
            raise TypeError(
                f"make_key={self._make_key!r} returned an unhashable key for {self.name}(): "
                f"{type(key).__name__} {key!r}"
            )
        names = self.names
        marker = self._marker
        if marker is not None and type(key) is tuple and key and key[0] is marker:
            return (marker, *self._freeze_parts(key[1:]))
        if self._bare:
            return freeze(key, self._where(names[0] if names else "?"))
        return tuple(self._freeze_parts(key))

    def _freeze_parts(self, parts: tuple[Any, ...]) -> list[Hashable]:
        names = self.names
        return [
            freeze(value, self._where(names[i] if i < len(names) else "?"))
            for i, value in enumerate(parts)
        ]

    def _where(self, name: str) -> str:
        return f"argument {name!r} of {self.name}()"

    def arguments(self, key: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call a default key stands for: ``(args, kwargs)`` (unhashable arguments as
        copies of their contents).

        Raises:
          - ``TypeError`` if ``key`` does not come from this builder, leaves
            parameters out (ones filled per request), or names a dead instance.
        """
        if not self.invertible:
            raise TypeError(
                f"the key of {self.name}() leaves out parameters filled per request, so "
                "the call cannot be made from it; call the function instead"
            )
        count = len(self._kinds)
        values: tuple[Any, ...]
        marker = self._marker
        if marker is not None and type(key) is tuple and key and key[0] is marker:
            values = key[1:]
        elif marker is not None:
            values = (key,) if self._bare else tuple(key)
            values += self._folded
        elif self.prefix is None and not self.typed and count == 1:
            values = (key,)
        else:
            start = 0 if self.prefix is None else 1
            if (
                not isinstance(key, tuple)
                or len(key) != start + count * (2 if self.typed else 1)
                or (start and key[0] != self.prefix)
            ):
                raise TypeError(f"{key!r} is not a key of {self.name}()")
            values = key[start : start + count]
        if len(values) != count:
            raise TypeError(f"{key!r} is not a key of {self.name}()")
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for (name, kind), value in zip(self._kinds, values, strict=True):
            if isinstance(value, _Identity):
                value = value._ref()
                if value is None:
                    raise TypeError(f"the instance of {key!r} no longer exists")
            value = _thaw(value)
            if kind is _P.VAR_POSITIONAL:
                args.extend(value)
            elif kind is _P.VAR_KEYWORD:
                kwargs.update({k: _thaw(v) for k, v in value})
            elif kind is _P.KEYWORD_ONLY:
                kwargs[name] = value
            else:
                args.append(value)
        return tuple(args), kwargs
