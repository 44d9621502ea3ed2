"""Run several _redis_worker.py processes against one server, with a common start time."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["Fleet", "Worker", "caller_errors", "caller_values", "read_loads"]

WORKER = str(Path(__file__).with_name("_redis_worker.py"))


class Worker:
    """One worker process; its stdout lines arrive on a queue, so every read has a timeout."""

    def __init__(self, config: dict[str, Any], script: str = WORKER) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, script, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _line(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=max(0.01, timeout))
        except queue.Empty:
            raise TimeoutError(f"worker {self.pid} said nothing for {timeout:.1f}s") from None
        if line is None:
            stderr = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"worker {self.pid} ended early:\n{stderr}")
        return line

    def wait_ready(self, timeout: float) -> None:
        line = self._line(timeout)
        assert line.strip() == "ready", line

    def start(self, t0: float, *more: str) -> None:
        self.send(" ".join((repr(t0), *more)))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def report(self, timeout: float, last: bool = True) -> dict[str, Any]:
        report: dict[str, Any] = json.loads(self._line(timeout))
        if last:
            self.proc.wait(timeout=10)
        return report

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@contextmanager
def started(configs: list[tuple[dict[str, Any], str]]) -> Iterator[list[Worker]]:
    """Workers of these (config, script), each ready; all stopped afterwards."""
    made = [Worker(config, script) for config, script in configs]
    try:
        for worker in made:
            worker.wait_ready(30)
        yield made
    finally:
        for worker in made:
            worker.stop()


class Fleet:
    """``n`` workers with one config; ``start`` releases them all at one instant."""

    def __init__(
        self, n: int, config: dict[str, Any], loads_file: Path, script: str = WORKER
    ) -> None:
        self.loads_file = loads_file
        config = {**config, "loads_file": str(loads_file)}
        self.workers = [Worker(config | {"index": i}, script) for i in range(n)]
        self._ready = False

    def start(self, timeout: float = 30.0, lead: float = 0.2, *more: str) -> float:
        deadline = time.monotonic() + timeout
        if not self._ready:
            for worker in self.workers:
                worker.wait_ready(deadline - time.monotonic())
            self._ready = True
        t0 = time.monotonic() + lead
        for worker in self.workers:
            worker.start(t0, *more)
        return t0

    def reports(
        self, timeout: float, workers: list[Worker] | None = None, last: bool = True
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        return [w.report(deadline - time.monotonic(), last) for w in workers or self.workers]

    def by_pid(self, pid: int) -> Worker:
        return next(w for w in self.workers if w.pid == pid)

    def loads(self) -> list[tuple[str, int, float]]:
        return read_loads(self.loads_file)

    def wait_for_load(self, count: int, timeout: float) -> list[tuple[str, int, float]]:
        """Wait until ``count`` loads have started; return the load lines so far."""
        deadline = time.monotonic() + timeout
        while True:
            loads = self.loads()
            if sum(kind == "start" for kind, _, _ in loads) >= count:
                return loads
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} loads did not start within {timeout}s: {loads}")
            time.sleep(0.005)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def read_loads(path: Path) -> list[tuple[str, int, float]]:
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        kind, pid, t = line.split()
        lines.append((kind, int(pid), float(t)))
    return lines


def caller_values(reports: list[dict[str, Any]]) -> list[Any]:
    """Every caller's value, over the workers' reports."""
    return [o["value"] for r in reports for o in r["outcomes"]]


def caller_errors(reports: list[dict[str, Any]]) -> list[Any]:
    """Every caller's error (its type and message), over the workers' reports."""
    return [o["error"] for r in reports for o in r["outcomes"] if o["error"]]
