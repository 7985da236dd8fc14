"""kombu's Redis transport, keeping one synchronous client per channel.

The stock channel builds a new `redis.Redis` for every synchronous operation
(`conn_or_acquire`): each message published, and twice for each message a worker receives
and acknowledges with `acks_late` (the unacked index is written on delivery and cleared on
ack). A client is cheap to connect (it borrows from the channel's connection pool) but not to
build: redis-py fills a case-insensitive table of about 200 response callbacks each time.
Profiled in the worker bench (issue 12) this was the largest single cost of a worker's main
process, and a tenth of a child's sends. The client built here is the same as the stock one,
on the same pool; it is rebuilt whenever the channel replaces its pool (a reconnect). A
`redis.Redis` is safe to share between threads: every command borrows its own connection
from the pool, and a pipeline is a new object each time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis


class Channel(redis.Channel):
    _kept_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        kept = self._kept_client
        if kept is None or kept.connection_pool is not self.pool:
            kept = self._kept_client = self._create_client()
        yield kept

    def _disconnect_pools(self) -> None:
        self._kept_client = None
        super()._disconnect_pools()


class Transport(redis.Transport):
    Channel = Channel
