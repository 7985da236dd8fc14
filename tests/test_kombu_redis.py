"""The Redis transport keeps one client per channel (no redis.Redis built per publish or ack),
loses nothing with it, and builds a new one when the channel replaces its pool. The real Redis
of the PostgreSQL leg (scripts/with-redis.sh)."""

from __future__ import annotations

import os

import pytest
from kombu import Connection

from scheduler_site.celery import app
from scheduler_site.kombu_redis import Transport

pytestmark = pytest.mark.postgres


def _redis_url() -> str:
    url = os.environ.get("TEST_REDIS_URL", "")
    assert url, "the PostgreSQL leg runs with scripts/with-redis.sh: TEST_REDIS_URL is missing"
    return url


def test_redis_broker__url_resolves_to_the_kept_client_transport() -> None:
    assert app.main == "scheduler_site"  # importing the app registers the alias
    with Connection(_redis_url()) as conn:
        assert type(conn.transport) is Transport


def test_redis_broker__one_client_for_every_publish_and_ack_and_nothing_lost() -> None:
    with Connection(_redis_url()) as conn:
        channel = conn.default_channel
        queue = conn.SimpleQueue("kept-client", channel=channel)
        queue.clear()
        # The unacked index is one key of the whole Redis database: an earlier test's killed
        # worker may have left its deliveries there, so only this test's must be gone.
        with channel.conn_or_acquire() as client:
            left_before = set(client.zrange(channel.unacked_index_key, 0, -1))
        for n in range(50):
            queue.put(n)
        received = []
        for _ in range(50):
            message = queue.get(timeout=5)
            received.append(message.payload)
            message.ack()
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.connection_pool is channel.pool
            left_after = set(first.zrange(channel.unacked_index_key, 0, -1))
            assert left_after <= left_before  # every ack cleared its entry
        queue.close()

    assert received == list(range(50))


def test_redis_broker__a_new_pool_gets_a_new_client() -> None:
    with Connection(_redis_url()) as conn:
        channel = conn.default_channel
        with channel.conn_or_acquire() as before:
            pass
        channel._disconnect_pools()
        with channel.conn_or_acquire() as after:
            assert after is not before
            assert after.connection_pool is channel.pool
            assert after.ping()
