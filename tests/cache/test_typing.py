"""The wrappers' types as users' type checkers see them: mypy --strict and pyright (strict)
on ``typing/user_code.py``, which uses every attribute on functions, coroutine functions,
methods, classmethods and staticmethods; each line marked ``# E<n>`` must be an error, and
no other line.  The same file runs, so the types are what the wrappers do."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

USER_CODE = Path(__file__).parent / "typing" / "user_code.py"
SRC = Path(__file__).resolve().parents[2] / "src"


def _marked() -> set[int]:
    return {
        n
        for n, line in enumerate(USER_CODE.read_text().splitlines(), 1)
        if re.search(r"# E\d+$", line)
    }


def test_mypy_strict(tmp_path: Path) -> None:
    import mypy.api as mypy_api  # in the test extra: this test must run, not skip

    code = tmp_path / "user_code.py"
    shutil.copy(USER_CODE, code)
    stdout, stderr, _ = mypy_api.run(
        ["--strict", "--no-incremental", "--cache-dir", os.devnull, "--config-file",
         os.devnull, "--python-version", "3.11", str(code)]
    )  # fmt: skip
    errors = {int(line.split(":")[1]) for line in stdout.splitlines() if ": error:" in line}
    assert errors == _marked(), (stdout, stderr)


def test_pyright_strict(tmp_path: Path) -> None:
    pyright = shutil.which("pyright", path=str(Path(sys.executable).parent))
    assert pyright is not None, "pyright is in the test extra"
    code = tmp_path / "user_code.py"
    shutil.copy(USER_CODE, code)
    (tmp_path / "pyrightconfig.json").write_text(
        json.dumps(
            {
                "pythonVersion": "3.11",
                "typeCheckingMode": "strict",
                "reportUnusedVariable": False,
                "extraPaths": [str(SRC)],
            }
        )
    )
    result = subprocess.run(
        [pyright, "--outputjson", str(code)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    report = json.loads(result.stdout)
    errors = {
        d["range"]["start"]["line"] + 1
        for d in report["generalDiagnostics"]
        if d["severity"] == "error"
    }
    assert errors == _marked(), result.stdout


def test_user_code_runs() -> None:
    spec = importlib.util.spec_from_file_location("_singleflight_user_code", USER_CODE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    asyncio.run(module.main())
