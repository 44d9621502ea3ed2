"""A private Redis Cluster (three masters, no replicas) and a private Sentinel, for tests.

Every node is a redis-server process on 127.0.0.1 on a free port, with its
files in a temporary directory; the cluster is made with CLUSTER ADDSLOTSRANGE
and CLUSTER MEET (no redis-cli needed).  ``kill``/``restart`` stop and bring back
one master (it comes back with its slots, from its nodes.conf, empty).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from _redis_server import free_port

__all__ = ["Cluster", "SentinelServer"]

_SLOTS = 16384


class _ExitedAtStart(RuntimeError):
    """A node exited as it started: most likely its port was taken meanwhile."""


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (so at most 55535)."""
    while True:
        port = free_port()
        if port > 55535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _wait(check: object, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout}s")
        time.sleep(0.05)


class Cluster:
    """Three masters sharing the slots; ``ports[i]`` is master i."""

    def __init__(self, binary: str, masters: int = 3) -> None:
        self.binary = binary
        self.ports = [_cluster_port() for _ in range(masters)]
        self._dir = tempfile.TemporaryDirectory(prefix="sf-cluster-")
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def _spawn(self, port: int) -> None:
        directory = Path(self._dir.name)
        self.processes[port] = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(directory / f"nodes-{port}.conf"),
                "--cluster-node-timeout",
                "60000",  # a killed master is not declared failed during a test
                "--dir",
                str(directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        process = self.processes[port]

        def answers() -> bool:
            if process.poll() is not None:
                raise _ExitedAtStart(f"cluster node {port} exited at start")
            with self.node(port) as node:  # this node, not another server on a port taken
                return int(node.info("server")["process_id"]) == process.pid

        _wait(answers, f"cluster node {port} did not answer PING", 10)

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)

    def start(self) -> None:
        try:
            for i in range(len(self.ports)):
                for attempt in range(5):
                    try:
                        self._spawn(self.ports[i])
                        break
                    except _ExitedAtStart:
                        # its port (or bus port) was taken meanwhile, by a parallel run
                        self.processes.pop(self.ports[i]).wait(timeout=10)
                        if attempt == 4:
                            raise
                        self.ports[i] = _cluster_port()
            share = _SLOTS // len(self.ports)
            for i, port in enumerate(self.ports):
                last = _SLOTS - 1 if i == len(self.ports) - 1 else (i + 1) * share - 1
                with self.node(port) as node:
                    node.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
            with self.node(self.ports[0]) as first:
                for port in self.ports[1:]:
                    first.execute_command("CLUSTER", "MEET", "127.0.0.1", port)
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node says cluster_state:ok and knows every other."""

        def ok() -> bool:
            for port in self.ports:
                with self.node(port) as node:
                    info = node.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    known = f"cluster_known_nodes:{len(self.ports)}"
                    if "cluster_state:ok" not in text or known not in text:
                        return False
            return True

        _wait(ok, "the cluster did not reach cluster_state:ok", timeout)

    def port_of(self, key: str) -> int:
        """The port of the master owning ``key``'s slot."""
        with self.node(self.ports[0]) as node:
            slot = int(node.execute_command("CLUSTER", "KEYSLOT", key))
        share = _SLOTS // len(self.ports)
        return self.ports[min(slot // share, len(self.ports) - 1)]

    def kill(self, port: int) -> None:
        process = self.processes.pop(port)
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait(timeout=10)

    def restart(self, port: int) -> None:
        self._spawn(port)
        self.wait_ok()

    def flushall(self) -> None:
        for port in self.ports:
            with self.node(port) as node:
                node.flushall()
                node.config_resetstat()
                node.script_flush()

    def commandstats(self) -> dict[str, int]:
        """Calls per command, summed over the masters."""
        total: dict[str, int] = {}
        for port in self.ports:
            with self.node(port) as node:
                for name, v in node.info("commandstats").items():
                    name = name.removeprefix("cmdstat_")
                    total[name] = total.get(name, 0) + int(v["calls"])
        return total

    def stop(self) -> None:
        for port in list(self.processes):
            self.kill(port)
        self._dir.cleanup()

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class SentinelServer:
    """One redis-server in sentinel mode watching ``master_port`` as ``mymaster``."""

    def __init__(self, binary: str, master_port: int, name: str = "mymaster") -> None:
        self.binary = binary
        self.master_port = master_port
        self.name = name
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="sf-sentinel-")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = Path(self._dir.name) / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self._dir.name}\n"
            f"sentinel monitor {self.name} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {self.name} 60000\n"
        )
        self.process = subprocess.Popen(
            [self.binary, str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.binary} --sentinel exited at start")
            with redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2) as r:
                return bool(r.sentinel_get_master_addr_by_name(self.name))

        try:
            _wait(answers, "the sentinel did not name the master", 15)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            process.wait(timeout=10)
        self._dir.cleanup()

    def __enter__(self) -> SentinelServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
