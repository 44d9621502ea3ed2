"""A worker process driven command by command, for tests of forget and fencing across processes.

    python _redis_command_worker.py '<json config>'

Builds a RedisGroup (``"mode": "sync"``: callers are threads) or an
AsyncRedisGroup (``"async"``: tasks of one loop), with a LoadingCache /
AsyncLoadingCache in front when ``"cache": true``.  The loader reads the
"database" (the text of ``db_file``) when it starts, appends ``start``/``end``
lines (pid, time) to ``loads_file``, and, when gated, waits for ``release``
before returning what it read.  Prints ``ready``, then answers each JSON
command on stdin with one JSON line:

``start``   ``callers`` calls of ``key`` in the background, tagged ``tag``
``join``    wait for the calls started so far: their outcomes (tag, value, error)
``gate``    make the next loads wait for ``release``; ``release`` lets them go
``forget``  group.forget (``aforget``), or the cache's ``invalidate``,
            ``put`` (``value``) or ``clear``, as ``how`` says; returns when done
``contains`` whether the cache holds ``key``; ``stats`` the group's stats
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _redis_clients import async_client, sync_client

from singleflight import AsyncLoadingCache, LoadingCache
from singleflight.redis import AsyncRedisGroup, RedisGroup


def _note(path: str, what: str) -> None:
    line = f"{what} {os.getpid()} {time.monotonic():.6f}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _outcome(tag: Any, value: Any = None, error: BaseException | None = None) -> dict[str, Any]:
    return {
        "tag": tag,
        "value": value,
        "error": None if error is None else f"{type(error).__name__}: {error}",
    }


def _group_options(config: dict[str, Any]) -> dict[str, Any]:
    options = {"namespace": "test", "lease": 3.0, "result_ttl": 5.0, "max_wait": 30.0}
    options.update(config.get("group", {}))
    return options


def _stats(group: Any) -> dict[str, Any]:
    return dataclasses.asdict(group.stats())


def run_sync(config: dict[str, Any]) -> None:
    client = sync_client(config)
    group: RedisGroup[str, Any] = RedisGroup(client, **_group_options(config))
    gate = threading.Event()
    gate.set()

    def load(key: str) -> Any:
        _note(config["loads_file"], "start")
        value = Path(config["db_file"]).read_text()
        assert gate.wait(30)
        _note(config["loads_file"], "end")
        return value

    cache = LoadingCache(load, ttl=60.0, jitter=0.0, group=group) if config.get("cache") else None
    pending: list[threading.Thread] = []
    outcomes: list[dict[str, Any]] = []
    lock = threading.Lock()

    def call(key: str, tag: Any) -> None:
        try:
            outcome = _outcome(
                tag, cache.get(key) if cache is not None else group.do(key, load, key)
            )
        except Exception as exc:
            outcome = _outcome(tag, error=exc)
        with lock:
            outcomes.append(outcome)

    print("ready", flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        reply: dict[str, Any] = {}
        if op == "start":
            for _ in range(command.get("callers", 1)):
                thread = threading.Thread(target=call, args=(command["key"], command.get("tag")))
                thread.start()
                pending.append(thread)
        elif op == "join":
            for thread in pending:
                thread.join(30)
            pending = []
            with lock:
                reply["outcomes"], outcomes = outcomes, []
        elif op == "gate":
            gate.clear()
        elif op == "release":
            gate.set()
        elif op == "forget":
            how, key = command["how"], command.get("key")
            if how == "forget":
                group.forget(key)
            elif how == "invalidate":
                cache.invalidate(key)  # type: ignore[union-attr]
            elif how == "put":
                cache.put(key, command["value"])  # type: ignore[union-attr]
            else:
                cache.clear()  # type: ignore[union-attr]
        elif op == "contains":
            reply["contains"] = command["key"] in cache  # type: ignore[operator]
        elif op == "quit":
            break
        reply["stats"] = _stats(group)
        print(json.dumps(reply), flush=True)
    if cache is not None:
        cache.close()
    group.close()
    client.close()


async def run_async(config: dict[str, Any]) -> None:
    client = async_client(config)
    group: AsyncRedisGroup[str, Any] = AsyncRedisGroup(client, **_group_options(config))
    gate = asyncio.Event()
    gate.set()

    async def load(key: str) -> Any:
        _note(config["loads_file"], "start")
        value = Path(config["db_file"]).read_text()
        await asyncio.wait_for(gate.wait(), 30)
        _note(config["loads_file"], "end")
        return value

    cache = (
        AsyncLoadingCache(load, ttl=60.0, jitter=0.0, group=group) if config.get("cache") else None
    )
    pending: list[asyncio.Task[dict[str, Any]]] = []

    async def call(key: str, tag: Any) -> dict[str, Any]:
        try:
            return _outcome(
                tag, await cache.get(key) if cache is not None else await group.do(key, load, key)
            )
        except Exception as exc:
            return _outcome(tag, error=exc)

    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command = json.loads(line)
        op = command["op"]
        reply: dict[str, Any] = {}
        if op == "start":
            for _ in range(command.get("callers", 1)):
                pending.append(loop.create_task(call(command["key"], command.get("tag"))))
            await asyncio.sleep(0.01)  # let them reach the group before the next command
        elif op == "join":
            reply["outcomes"] = list(await asyncio.wait_for(asyncio.gather(*pending), 30))
            pending = []
        elif op == "gate":
            gate.clear()
        elif op == "release":
            gate.set()
        elif op == "forget":
            how, key = command["how"], command.get("key")
            if how == "forget":
                await group.aforget(key)
            elif how == "invalidate":
                cache.invalidate(key)  # type: ignore[union-attr]
                await asyncio.sleep(0)
                await asyncio.gather(*group_forgets(group))
            elif how == "put":
                cache.put(key, command["value"])  # type: ignore[union-attr]
                await asyncio.gather(*group_forgets(group))
            else:
                cache.clear()  # type: ignore[union-attr]
                await asyncio.gather(*group_forgets(group))
        elif op == "contains":
            reply["contains"] = command["key"] in cache  # type: ignore[operator]
        elif op == "quit":
            break
        reply["stats"] = _stats(group)
        print(json.dumps(reply), flush=True)
    if cache is not None:
        await cache.aclose()
    await group.aclose()
    await client.aclose()


def group_forgets(group: Any) -> list[Any]:
    """The Redis parts of forgets an AsyncRedisGroup runs in tasks: awaited before replying."""
    return [
        asyncio.shield(task)
        for state in list(group._clients.values())
        for task in list(state.forgets.values())
    ]


def main() -> None:
    config = json.loads(sys.argv[1])
    if config["mode"] == "sync":
        run_sync(config)
    else:
        asyncio.run(run_async(config))


if __name__ == "__main__":
    main()
