"""The embedded broker must not lose messages when consumers race a producer."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

from kombu import Connection

from scheduler_site.celery import app


def _connection(folder: Path) -> Connection:
    options = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(folder / "control"),
    }
    return Connection("filesystem://", transport_options=options)


def _consume(folder: Path, results: Any, stop: Any) -> None:
    received = []
    with _connection(folder) as conn:
        queue = conn.SimpleQueue("race")
        while True:
            try:
                message = queue.get(timeout=0.2)
            except queue.Empty:
                if stop.is_set():
                    break
                continue
            received.append(message.payload)
            message.ack()
    results.put(received)


def test_filesystem_broker__racing_consumers_lose_no_message(tmp_path: Path) -> None:
    total = 3000
    context = multiprocessing.get_context("fork")
    results, stop = context.Queue(), context.Event()
    consumers = [context.Process(target=_consume, args=(tmp_path, results, stop)) for _ in range(2)]
    for consumer in consumers:
        consumer.start()
    with _connection(tmp_path) as conn:
        queue = conn.SimpleQueue("race")
        for n in range(total):
            queue.put(n)
    stop.set()
    received = [n for _ in consumers for n in results.get(timeout=120)]
    for consumer in consumers:
        consumer.join(30)

    assert sorted(received) == list(range(total)), f"{total - len(received)} messages lost"
    assert not list(tmp_path.glob("*.partial"))


def test_filesystem_broker__url_resolves_to_the_atomic_transport(tmp_path: Path) -> None:
    from scheduler_site.kombu_filesystem import Transport

    assert app.main == "scheduler_site"  # importing the app registers the alias
    with _connection(tmp_path) as conn:
        assert type(conn.transport) is Transport
