"""One process of the cross-process Django test: get_or_set through a RedisGroup, printed.

python _django_worker.py PORT NAMESPACE KEY PROCESSES
"""

from __future__ import annotations

import json
import sys
import time

import django
import redis
from django.conf import settings

from singleflight.django import CoalescingCache
from singleflight.redis import RedisGroup

WAIT = 30.0


def main() -> None:
    port, namespace, key, processes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    settings.configure(
        CACHES={
            "redis": {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": f"redis://127.0.0.1:{port}/0",
            }
        }
    )
    django.setup()
    client = redis.Redis(port=int(port))
    cache = CoalescingCache("redis", group=RedisGroup(client, namespace=namespace))

    def compute() -> dict[str, object]:
        client.incr(f"{namespace}:computed")
        # Hold the value until every process has asked for it (bounded).
        deadline = time.monotonic() + WAIT
        while int(client.get(f"{namespace}:arrived") or 0) < processes:
            assert time.monotonic() < deadline, "the other processes never arrived"
            time.sleep(0.01)
        return {"report": 42}

    client.incr(f"{namespace}:arrived")
    print(json.dumps(cache.get_or_set(key, compute, timeout=60)))


if __name__ == "__main__":
    main()
