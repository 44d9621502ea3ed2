"""Credentials out of every message the command line prints.

A URL's password (``redis://:PASSWORD@host``, ``postgresql://user:PASSWORD@host``) and
``password=`` parameters (a URL's query, a libpq keyword DSN) become ``***``.  Standard
library only.
"""

from __future__ import annotations

import re

# scheme://user:password@ -- the password runs to the last "@" before whitespace, so a
# password holding an unescaped "@" or ":" is hidden whole.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):(?P<password>\S*)@")
_PARAMETER = re.compile(r"(?i)\b(?P<name>password|passwd|pwd)=(?P<value>[^\s&;]+)")


def redact(text: str) -> str:
    """``text`` with every password it holds replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m['head']}:***@", text)
    return _PARAMETER.sub(lambda m: f"{m['name']}=***", text)
