"""Fixtures shared by the tasks app's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tasks.registry import HANDLERS


@pytest.fixture
def restore_handlers() -> Iterator[None]:
    """Handlers a test registers are gone after it; the app's own are back."""
    before = dict(HANDLERS)
    yield
    HANDLERS.clear()
    HANDLERS.update(before)
