"""Fixtures shared by the tasks app's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from time_machine import TimeMachineFixture

from tasks.registry import HANDLERS
from tests.tasks.helpers import T0, purge_broker


@pytest.fixture
def restore_handlers() -> Iterator[None]:
    """Handlers a test registers are gone after it; the app's own are back."""
    before = dict(HANDLERS)
    yield
    HANDLERS.clear()
    HANDLERS.update(before)


@pytest.fixture
def frozen(time_machine: TimeMachineFixture) -> TimeMachineFixture:
    """The clock stopped at T0."""
    time_machine.move_to(T0, tick=False)
    return time_machine


@pytest.fixture
def empty_broker() -> Iterator[None]:
    """The broker holds no message when the test starts, nor after it."""
    purge_broker()
    yield
    purge_broker()
