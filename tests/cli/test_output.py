"""What the command line prints: a table that fits the terminal, clean piped output, no
credentials in any message, and ``--version``."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest
from rich.console import Console

import singleflight
from singleflight.cli import demo
from singleflight.cli._redact import redact
from singleflight.cli.measure import ModeSummary

from .conftest import run_cli

SECRET = "s3cret"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _summary(mode: str, title: str, n: int) -> ModeSummary:
    return ModeSummary(
        mode=mode,
        title=title,
        requests=229_043 + n,
        errors=n,
        queries=1_258 + n,
        duplicates=1_092 + n,
        most_at_once=196 + n,
        keys_queried=50,
        per_key_per_ttl=1.25 + n,
        peak_qps=362.0 + n,
        p50=0.4e-6 * (n + 1),
        p99=9.1e-6 * (n + 1),
        max=1.37 * (n + 1),
        rates=[],
    )


SUMMARIES = [
    _summary("naive", "naive cache-aside", 0),
    _summary("group", "cache + AsyncRedisGroup", 1),
    _summary("loading", "AsyncLoadingCache (stale, early refresh)", 2),
]


def _figures(s: ModeSummary) -> list[str]:
    return [
        f"{s.requests:,}",
        f"{s.queries:,}",
        f"{s.duplicates:,}",
        f"{s.most_at_once:,}",
        f"{s.peak_qps:,.0f}",
        f"{s.per_key_per_ttl:.2f}",
        demo.latency(s.p50),
        demo.latency(s.p99),
        demo.latency(s.max),
    ]


def _render(width: int) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(demo.render_table(SUMMARIES, 0.5, columns=width))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(text, str)
    return text


@pytest.mark.parametrize("width", [80, 100, 200])
def test_the_table_fits_the_terminal_and_shows_every_mode_and_figure(width: int) -> None:
    text = _render(width)
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    assert "…" not in text  # nothing cut short
    words = text.split()
    for s in SUMMARIES:
        for word in s.title.split():  # a narrow table may wrap a title, never cut it
            assert word in words, (word, text)
        for figure in _figures(s):
            assert figure in text, (figure, text)
    columns = ("requests", "DB queries", "duplicates", "at once", "peak q/s", "q/key/TTL")
    for column in (*columns, "p50", "p99"):
        assert column in text


def test_a_wide_terminal_gets_one_row_per_mode() -> None:
    lines = _render(200).splitlines()
    for s in SUMMARIES:
        row = next(line for line in lines if line.strip().startswith(s.title))
        for figure in _figures(s):
            assert figure in row, (figure, row)


@pytest.mark.timeout(120)
def test_piped_output_has_no_padding(tmp_path: Path) -> None:
    done = run_cli(
        "demo", "--duration", "0.5", "--ttl", "0.2", "--clients", "4", "--keys", "2",
        "--rows", "500", "--think", "5", "--modes", "naive,group", "--no-chart",
        "--json", str(tmp_path / "demo.json"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.strip().startswith("cache + Group") for line in lines), done.stdout
    assert [line for line in lines if line != line.rstrip()] == []
    assert max(len(line) for line in lines) < 136, done.stdout
    assert json.loads((tmp_path / "demo.json").read_text())["modes"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("at redis://user:s3cret@cache:1/0: refused", "at redis://user:***@cache:1/0: refused"),
        ("'postgresql://u:p@ss:s3cret@db/x' is bad", "'postgresql://u:***@db/x' is bad"),
        ("postgresql://postgres@127.0.0.1:5432/test", "postgresql://postgres@127.0.0.1:5432/test"),
        ("host=db password=s3cret user=x", "host=db password=*** user=x"),
        ("redis://h/0?password=s3cret&db=1", "redis://h/0?password=***&db=1"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--redis", "redis://:s3cret@127.0.0.1:{port}/0", "--processes", "2"],
        ["demo", "--redis", "redis://default:s3cret@127.0.0.1:{port}/0", "--modes", "redis"],
        ["demo", "--dsn", "postgresql://nobody:s3cret@127.0.0.1:{port}/none"],
        ["demo", "--dsn", "mysql://root:s3cret@127.0.0.1:{port}/none"],
        ["demo", "--redis", "http://:s3cret@127.0.0.1:{port}/0"],
    ],
    ids=["redis", "redis-user", "postgresql", "bad-dsn", "bad-redis-url"],
)
def test_no_message_shows_a_password(argv: list[str]) -> None:
    port = _closed_port()
    done = run_cli(*[arg.format(port=port) for arg in argv])
    assert done.returncode in (1, 2), done.stdout + done.stderr
    assert done.stderr.strip(), "the failure is told"
    assert SECRET not in done.stdout + done.stderr


def test_the_json_report_has_no_password(tmp_path: Path) -> None:
    cfg = demo.DemoConfig(
        redis="redis://:s3cret@127.0.0.1:6379/0",
        dsn="postgresql://u:s3cret@127.0.0.1/x",
        modes=["naive"],
    )
    path = tmp_path / "demo.json"
    demo._write_json(path, cfg, [SUMMARIES[0]], {"naive": demo.RawRun([], 0, "", [])})
    text = path.read_text()
    assert SECRET not in text
    assert json.loads(text)["config"]["redis"] == "redis://:***@127.0.0.1:6379/0"


@pytest.mark.timeout(60)
def test_version() -> None:
    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"pysingleflight {singleflight.__version__}"
