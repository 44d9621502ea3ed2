"""Importing singleflight.redis without redis-py says what to install."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.timeout(30)
def test_import_without_redis_py_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"  # makes `import redis` fail
        "import singleflight\n"  # the core needs nothing
        "try:\n"
        "    import singleflight.redis\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert "pip install 'pysingleflight[redis]'" in out.stdout


@pytest.mark.timeout(30)
def test_msgpack_codec_without_msgpack_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['msgpack'] = None\n"
        "from singleflight.redis import MsgpackCodec\n"
        "try:\n"
        "    MsgpackCodec()\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert "pysingleflight[msgpack]" in out.stdout
