"""Fixtures shared by the tasks app's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from time_machine import TimeMachineFixture

from tasks.registry import HANDLERS
from tests.tasks.helpers import T0


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
