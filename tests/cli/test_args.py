"""The command line's contract: one-line errors and non-zero exits for bad options and
unreachable services, help text for every option, and no dependency for the core."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from singleflight.cli import main
from singleflight.cli._args import build_parser

from .conftest import run_cli


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


BAD = [
    (["demo", "--clients", "0"], "--clients: 0 is out of range"),
    (["demo", "--clients", "many"], "--clients: 'many' is not a whole number"),
    (["demo", "--duration", "-1"], "--duration: -1 is out of range"),
    (["demo", "--ttl", "nan"], "--ttl: nan is out of range"),
    (["demo", "--think", "fast"], "--think: 'fast' is not a number of milliseconds"),
    (["demo", "--zipf", "9"], "--zipf: 9 is out of range"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["demo", "--modes", "naive,fast"], "unknown mode 'fast'"),
    (["demo", "--modes", "redis"], "mode redis needs --redis URL"),
    (["demo", "--modes", "fleet"], "mode fleet needs --redis URL"),
    (["demo", "--processes", "4"], "--processes above 1 shows cross-process coalescing"),
    (["demo", "--dsn", "mysql://db/x"], "is not a PostgreSQL URL"),
    (["demo", "--redis", "http://cache"], "is not a Redis URL"),
    (["demo", "--dsn", "postgresql://h/d", "--db-file", "x.db"], "not allowed with argument"),
    (["demo", "--keys", "500", "--rows", "100"], "--keys 500 is more than --rows 100"),
    (["demo", "--clients", "2", "--processes", "3", "--redis", "redis://h"], "fewer than"),
    (["demo", "--out", "/no/such/dir/chart.png"], "directory /no/such/dir does not exist"),
    (["bench", "--only", "disk"], "unknown benchmark 'disk'"),
    (["serve"], "invalid choice: 'serve'"),
    ([], "the following arguments are required: COMMAND"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) or "none" for a, _ in BAD])
def test_bad_options_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("singleflight")
    assert message in lines[0]


@pytest.mark.timeout(30)
def test_out_must_not_be_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_bad_option_from_the_shell_has_no_traceback() -> None:
    done = run_cli("demo", "--clients", "-5")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "singleflight demo: argument --clients: -5 is out of range: use 1 to 2,000 (see --help)"
    ]


@pytest.mark.timeout(60)
def test_unreachable_postgresql_is_one_line_and_exit_1() -> None:
    port = _closed_port()
    done = run_cli("demo", "--dsn", f"postgresql://nobody@127.0.0.1:{port}/none")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(
        f"singleflight demo: cannot connect to PostgreSQL at 127.0.0.1:{port}"
    )
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(60)
def test_unreachable_redis_is_one_line_and_exit_1() -> None:
    port = _closed_port()
    done = run_cli("demo", "--redis", f"redis://127.0.0.1:{port}/0", "--processes", "2")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"singleflight demo: cannot reach Redis at redis://127.0.0.1:{port}")


@pytest.mark.timeout(60)
def test_sqlite_file_that_is_not_a_database_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a SQLite database" * 100)
    done = run_cli("demo", "--db-file", str(junk), "--no-chart")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"singleflight demo: cannot build SQLite file {junk}")


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def test_every_option_has_help_text() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"demo", "bench"}
    for name, sub in commands.choices.items():
        options = _options(sub)
        assert options, name
        for action in options:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)


@pytest.mark.timeout(60)
def test_help_lists_the_options() -> None:
    done = run_cli("demo", "--help")
    assert done.returncode == 0
    for option in ("--clients", "--duration", "--ttl", "--asyncio", "--dsn", "--db-file",
                   "--redis", "--processes", "--out", "--json", "--modes"):  # fmt: skip
        assert option in done.stdout
    assert "python -m singleflight demo" in done.stdout  # the examples
    done = run_cli("bench", "--help")
    assert done.returncode == 0 and "--quick" in done.stdout


@pytest.mark.timeout(60)
def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / (
        "singleflight.exe" if os.name == "nt" else "singleflight"
    )
    assert script.exists(), "pip install -e . installs the singleflight command"
    done = subprocess.run(
        [str(script), "demo", "--ttl", "0"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert "--ttl: 0 is out of range" in done.stderr


@pytest.mark.timeout(60)
def test_core_import_needs_no_demo_dependency() -> None:
    code = (
        "import sys, singleflight, singleflight.cli, singleflight.cli._args\n"
        "heavy = {'rich', 'matplotlib', 'psycopg', 'starlette', 'uvicorn', 'httpx', 'redis'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("missing", ["rich", "matplotlib"])
def test_demo_without_the_extra_says_what_to_install(missing: str) -> None:
    # Block the module as if it were not installed, then run the CLI as usual.
    code = (
        f"import sys; sys.modules[{missing!r}] = None\n"
        "from singleflight.cli import main\n"
        "sys.exit(main(['demo', '--duration', '60']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"singleflight demo needs the demo extra ({missing} is missing): "
        "pip install 'pysingleflight[demo]'"
    ]


@pytest.mark.timeout(60)
def test_interrupt_stops_at_once_with_one_line() -> None:
    import signal
    import time

    # A shell starts background jobs with SIGINT ignored, and a child inherits that: the CLI
    # then never sees the signal.  So the child restores Python's own SIGINT handler first,
    # as an interactive shell would have left it, then runs the CLI as ``-m singleflight``.
    launch = (
        "import runpy, signal, sys; "
        "signal.signal(signal.SIGINT, signal.default_int_handler); "
        "runpy.run_module('singleflight', run_name='__main__', alter_sys=True)"
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            launch,
            "demo",
            "--duration",
            "60",
            "--rows",
            "5000",
            "--no-chart",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()  # the first mode has started
        assert line.startswith("running naive cache-aside"), line
        time.sleep(0.5)
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
        assert time.monotonic() - sent < 10
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err
    assert err.splitlines() == ["singleflight demo: interrupted"]
