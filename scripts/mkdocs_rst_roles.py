"""A griffe extension for the API reference (mkdocs.yml): docstrings are written in reST
(``:class:`Group```, ``::`` before a literal block); mkdocstrings renders Markdown.

Each ``:role:`target``` becomes a cross-reference to the target when the reference
renders it, and stays code otherwise (an optional autoref, which never fails the
strict build); a paragraph ending in ``::`` ends in ``:``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|attr|exc|data|obj|const):`(?P<target>[^`]+)`")
_EXPLICIT = re.compile(r"(?P<title>.+?)\s*<(?P<target>[^<>]+)>")
_LITERAL = re.compile(r"(?<=\S)::\n")


class RstRoles(griffe.Extension):
    """Rewrites reST roles and literal-block markers in every docstring of the package."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self._modules = loader.modules_collection
        self._visit(pkg, set())

    def _visit(self, obj: griffe.Object | griffe.Alias, seen: set[str]) -> None:
        if obj.path in seen or obj.is_alias:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = self._rewrite(obj, obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._visit(member, seen)

    def _rewrite(self, obj: griffe.Object | griffe.Alias, text: str) -> str:
        def reference(match: re.Match[str]) -> str:
            target = " ".join(match["target"].split())
            explicit = _EXPLICIT.fullmatch(target)  # :meth:`title <target>`
            if explicit:
                title, target = explicit["title"], explicit["target"]
            short = target.startswith("~")
            target = target.lstrip("~.")
            if not explicit:
                title = target.rsplit(".", 1)[-1] if short else target
            path = self._canonical(self._resolve(obj, target))
            if path is None:
                return f"`{title}`"
            return f'<autoref identifier="{path}" optional><code>{title}</code></autoref>'

        return _LITERAL.sub(":\n", _ROLE.sub(reference, text))

    def _canonical(self, path: str | None) -> str | None:
        """The path where the object is defined (what the reference is anchored on)."""
        if path is None:
            return None
        try:
            return str(self._modules[path].canonical_path)
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return path

    @staticmethod
    def _resolve(obj: griffe.Object | griffe.Alias, target: str) -> str | None:
        scopes = [obj]
        parent = obj.parent
        while parent is not None:
            scopes.append(parent)
            parent = parent.parent
        head, _, rest = target.partition(".")
        for scope in scopes:
            try:
                path = scope.members[head].path if head in scope.members else scope.resolve(head)
            except (griffe.NameResolutionError, AttributeError, KeyError):
                continue
            return f"{path}.{rest}" if rest else path
        if target.startswith("singleflight"):
            return target
        return None
