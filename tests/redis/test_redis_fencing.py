"""Fencing epochs and fenced leaders: epochs only grow, and a fenced value is never kept."""

from __future__ import annotations

from typing import Any

import pytest
from _redis_server import RedisServer
from _redis_sides import Loader

from singleflight.redis import current_flight

pytestmark = pytest.mark.timeout(60)


class EpochLoader(Loader):
    """Records the epoch of every flight it runs in."""

    def __init__(self) -> None:
        super().__init__("v")
        self.epochs: list[int] = []

    def _exit(self) -> Any:
        flight = current_flight()
        assert flight is not None
        self.epochs.append(flight.epoch)
        return super()._exit()


@pytest.mark.parametrize("loss", ["flushall", "restart", "fence evicted"])
def test_the_epoch_grows_across_the_loss_of_the_fence_record(
    sides: Any, own_server: RedisServer, loss: str
) -> None:
    a = sides(own_server.port, result_ttl=0)
    loader = EpochLoader()
    for _ in range(3):
        assert a.call("k", loader).value == "v"
    admin = own_server.client()
    if loss == "flushall":
        admin.flushall()
    elif loss == "restart":  # no persistence: every key is gone
        own_server.restart()
        admin.close()
        admin = own_server.client()
    else:
        assert admin.delete("sf:{test:k}:fence") == 1
    admin.close()
    for _ in range(2):
        outcome = a.call("k", loader)
        if outcome.error is not None:  # the restart broke a pooled connection: once
            outcome = a.call("k", loader)
        assert outcome.value == "v"
    epochs = loader.epochs
    assert len(epochs) == 5 and len(set(epochs)) == 5, epochs
    assert epochs == sorted(epochs), epochs
