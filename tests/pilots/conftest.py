"""Fixtures of the pilots tests: a frozen clock, and local pilots' files in a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from pytest_django.fixtures import Settings
from time_machine import TimeMachineFixture

from tests.e2e.conftest import broker_url, start_worker  # noqa: F401 (real workers, e2e)
from tests.pilots.helpers import T0


@pytest.fixture
def clock(time_machine: TimeMachineFixture) -> TimeMachineFixture:
    """Time frozen at T0; move it with clock.move_to(T0 + delta, tick=False)."""
    time_machine.move_to(T0, tick=False)
    return time_machine


@pytest.fixture
def var_dir(settings: Settings, tmp_path: Path) -> Path:
    """VAR_DIR in a temporary folder: the local backend writes its exit files there."""
    settings.VAR_DIR = tmp_path
    return tmp_path
