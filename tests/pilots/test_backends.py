"""CE backends: the simulated one (seeded, reliability-driven, time-driven) and the local one
(real processes, tracked by pid and by the exit code their shell records)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured, ValidationError
from pytest_django.fixtures import Settings
from time_machine import TimeMachineFixture

from pilots import backend_registry
from pilots.backends import (
    LocalBackend,
    PilotNews,
    SimulatedBackend,
    SubmitError,
    backend_for,
    local_command,
)
from pilots.models import ComputeElement, PilotStatus, PilotSubmission
from scheduler_site.env import env_commands
from tests.pilots.helpers import T0

P = PilotStatus
PILOT_IDS = [uuid.UUID(int=n * 7919 + 1) for n in range(200)]


def _ce(reliability: float = 0.5, backend: str = "simulated", **options: object) -> ComputeElement:
    return ComputeElement(
        name="ce-x", reliability=reliability, backend=backend, backend_settings=options
    )


def _pilot(pilot_id: uuid.UUID | None = None, **fields: object) -> PilotSubmission:
    return PilotSubmission(id=pilot_id or uuid.uuid4(), **fields)


def _submits(backend: SimulatedBackend, pilot: PilotSubmission) -> bool:
    try:
        external_id = backend.submit(pilot)
    except SubmitError as exc:
        assert str(exc) == "simulated submission refused by the CE"
        return False
    assert external_id == f"sim-{pilot.id.hex[:12]}"
    return True


# --- simulated -------------------------------------------------------------------------------


def test_backend_for__picks_by_the_ce_backend() -> None:
    assert isinstance(backend_for(_ce(backend="simulated")), SimulatedBackend)
    assert isinstance(backend_for(_ce(backend="local")), LocalBackend)


def test_simulated_submit__same_seed_and_pilot_same_outcome() -> None:
    pilots = [_pilot(pilot_id) for pilot_id in PILOT_IDS]

    first = [_submits(SimulatedBackend(_ce(seed="s1")), p) for p in pilots]
    again = [_submits(SimulatedBackend(_ce(seed="s1")), p) for p in pilots]
    other_seed = [_submits(SimulatedBackend(_ce(seed="s2")), p) for p in pilots]

    assert first == again
    assert first != other_seed
    # reliability 0.5 over 200 pilots: both outcomes happen, in roughly equal numbers
    assert 60 < sum(first) < 140


def test_simulated_submit__seed_defaults_to_the_setting(settings: Settings) -> None:
    pilots = [_pilot(pilot_id) for pilot_id in PILOT_IDS]
    explicit = [_submits(SimulatedBackend(_ce(seed="from-settings")), p) for p in pilots]

    settings.PILOT_SIMULATION_SEED = "from-settings"
    default = [_submits(SimulatedBackend(_ce()), p) for p in pilots]
    settings.PILOT_SIMULATION_SEED = "something-else"
    changed = [_submits(SimulatedBackend(_ce()), p) for p in pilots]

    assert default == explicit
    assert changed != explicit


def test_simulated_outcome__reproducible_per_seed_and_pilot(clock: TimeMachineFixture) -> None:
    pilots = [
        _pilot(pilot_id, submitted_at=T0, external_id=f"ext-{n}")
        for n, pilot_id in enumerate(PILOT_IDS)
    ]
    clock.move_to(T0 + timedelta(seconds=60), tick=False)

    first = SimulatedBackend(_ce(seed="s1", start_after_seconds=1, run_seconds=1)).status(pilots)
    again = SimulatedBackend(_ce(seed="s1", start_after_seconds=1, run_seconds=1)).status(pilots)
    other = SimulatedBackend(_ce(seed="s2", start_after_seconds=1, run_seconds=1)).status(pilots)

    assert first == again
    assert first != other
    assert {news.status for news in first.values()} == {P.DONE, P.FAILED}


def test_simulated_submit__reliability_1_always_succeeds_0_always_fails() -> None:
    pilots = [_pilot(pilot_id) for pilot_id in PILOT_IDS]

    assert all(_submits(SimulatedBackend(_ce(reliability=1.0)), p) for p in pilots)
    assert not any(_submits(SimulatedBackend(_ce(reliability=0.0)), p) for p in pilots)


def test_simulated_status__progresses_with_time(clock: TimeMachineFixture) -> None:
    backend = SimulatedBackend(_ce(reliability=1.0, start_after_seconds=10, run_seconds=30))
    pilot = _pilot(submitted_at=T0, external_id="sim-1")

    def at(seconds: float) -> dict[str, PilotNews]:
        clock.move_to(T0 + timedelta(seconds=seconds), tick=False)
        return backend.status([pilot])

    assert at(0) == {}
    assert at(9.9) == {}  # still in the CE's queue: no news
    assert at(10) == {"sim-1": PilotNews(P.RUNNING)}
    assert at(39.9) == {"sim-1": PilotNews(P.RUNNING)}
    assert at(40) == {"sim-1": PilotNews(P.DONE)}
    assert at(4000) == {"sim-1": PilotNews(P.DONE)}


def test_simulated_status__reliability_0_ends_failed(clock: TimeMachineFixture) -> None:
    backend = SimulatedBackend(_ce(reliability=0.0, start_after_seconds=10, run_seconds=30))
    pilots = [_pilot(pid, submitted_at=T0, external_id=f"e{n}") for n, pid in enumerate(PILOT_IDS)]

    clock.move_to(T0 + timedelta(seconds=20), tick=False)
    assert {news.status for news in backend.status(pilots).values()} == {P.RUNNING}
    clock.move_to(T0 + timedelta(seconds=40), tick=False)
    news = backend.status(pilots)

    assert len(news) == len(pilots)
    assert set(news.values()) == {PilotNews(P.FAILED, "simulated pilot failure")}


def test_simulated_status__default_timing_is_5s_queue_then_20s_run(
    clock: TimeMachineFixture,
) -> None:
    backend = SimulatedBackend(_ce(reliability=1.0))
    pilot = _pilot(submitted_at=T0, external_id="sim-1")

    for seconds, expected in [(4, None), (5, P.RUNNING), (24, P.RUNNING), (25, P.DONE)]:
        clock.move_to(T0 + timedelta(seconds=seconds), tick=False)
        news = backend.status([pilot]).get("sim-1")
        assert (news.status if news else None) == expected, seconds


# --- local -----------------------------------------------------------------------------------


def _local(settings: Settings, argv: list[str]) -> tuple[LocalBackend, PilotSubmission]:
    """A local backend whose CE names a command the server's settings define as `argv`."""
    settings.PILOT_LOCAL_COMMANDS = {"under-test": argv}
    ce = _ce(backend="local", command="under-test")
    return LocalBackend(ce), _pilot()


def _environ_after_exec(pid: int) -> list[bytes]:
    """The pilot's environment once it has exec'd (just after fork it reads empty)."""
    deadline = time.monotonic() + 5
    while True:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        if environ or time.monotonic() > deadline:
            return environ.split(b"\0")
        time.sleep(0.01)


def _poll_until_final(backend: LocalBackend, pilot: PilotSubmission) -> PilotNews:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        news = backend.status([pilot]).get(pilot.external_id)
        assert news is not None, "a live or finished local pilot always has news"
        if news.status != P.RUNNING:
            return news
        time.sleep(0.05)
    raise AssertionError("the local pilot did not finish in 20 s")


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _pid(pilot: PilotSubmission) -> int:
    token, _, pid = pilot.external_id.partition(":")
    assert token == pilot.id.hex
    assert pid.isdigit()
    return int(pid)


def _sleep_then(code: int, seconds: float = 0.5) -> list[str]:
    """Each pilot sleeps half a second first, so the test sees it RUNNING before it ends."""
    return [sys.executable, "-c", f"import sys, time; time.sleep({seconds}); sys.exit({code})"]


@pytest.mark.parametrize(
    ("code", "expected"),
    [(0, PilotNews(P.DONE)), (3, PilotNews(P.FAILED, "pilot process exited with 3"))],
)
def test_local__real_process_runs_then_reports_its_exit_code(
    var_dir: Path, settings: Settings, code: int, expected: PilotNews
) -> None:
    backend, pilot = _local(settings, _sleep_then(code))

    pilot.external_id = backend.submit(pilot)
    pid = _pid(pilot)
    environ = _environ_after_exec(pid)
    running = backend.status([pilot])

    assert running == {pilot.external_id: PilotNews(P.RUNNING)}
    assert f"PILOT_ID={pilot.id}".encode() in environ
    assert _poll_until_final(backend, pilot) == expected
    assert (var_dir / "pilots" / f"{pilot.id.hex}.exit").read_text().strip() == str(code)
    _reap(pid)


def test_local__immediate_exit_is_seen_done(var_dir: Path, settings: Settings) -> None:
    backend, pilot = _local(settings, [sys.executable, "-c", "import sys; sys.exit(0)"])

    pilot.external_id = backend.submit(pilot)

    assert _poll_until_final(backend, pilot) == PilotNews(P.DONE)
    _reap(_pid(pilot))


def test_local__killed_process_gives_no_news(var_dir: Path, settings: Settings) -> None:
    backend, pilot = _local(settings, _sleep_then(0, seconds=60))
    pilot.external_id = backend.submit(pilot)
    pid = _pid(pilot)
    assert backend.status([pilot]) == {pilot.external_id: PilotNews(P.RUNNING)}

    os.killpg(pid, signal.SIGKILL)  # no exit code is written; the shell is a zombie until reaped
    deadline = time.monotonic() + 10
    while backend.status([pilot]) and time.monotonic() < deadline:
        time.sleep(0.05)

    assert backend.status([pilot]) == {}
    _reap(pid)
    assert backend.status([pilot]) == {}


def test_local__unknown_pid_and_no_exit_file_give_no_news(
    var_dir: Path, settings: Settings
) -> None:
    backend, pilot = _local(settings, ["true"])
    pilot.external_id = f"{pilot.id.hex}:999999999"
    bad = _pilot(external_id="garbage")

    assert backend.status([pilot, bad]) == {}


def test_local__default_command_is_the_servers_short_sleep(var_dir: Path) -> None:
    backend = LocalBackend(_ce(backend="local"))

    assert backend.command == "sleep"
    assert local_command(backend.command) == ["sleep", "5"]
    assert backend.folder == var_dir / "pilots"


def test_local__argv_is_passed_as_is_never_through_a_shell(
    var_dir: Path, settings: Settings
) -> None:
    out, marker = var_dir / "argv.json", var_dir / "ran"
    tricky = f"$(touch {marker}); `touch {marker}` && touch {marker} '\""
    write_argv = "import json, sys; open(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))"
    backend, pilot = _local(settings, [sys.executable, "-c", write_argv, str(out), tricky, ""])

    pilot.external_id = backend.submit(pilot)

    assert _poll_until_final(backend, pilot) == PilotNews(P.DONE)
    _reap(_pid(pilot))
    assert json.loads(out.read_text()) == [tricky, ""]
    assert not marker.exists()


def test_local__a_name_the_settings_no_longer_have_is_a_submit_error(
    var_dir: Path, settings: Settings
) -> None:
    backend, pilot = _local(settings, ["true"])
    settings.PILOT_LOCAL_COMMANDS = {}

    with pytest.raises(SubmitError, match="no command 'under-test' in the server's"):
        backend.submit(pilot)
    assert not (var_dir / "pilots").exists()


def test_local_command__only_a_name_the_settings_map_to_an_argv(settings: Settings) -> None:
    settings.PILOT_LOCAL_COMMANDS = {
        "ok": ["true"],
        "text": "touch /tmp/x",  # a settings module's mistake: never run through a shell
        "empty": [],
        "mixed": ["true", 1],
    }

    assert local_command("ok") == ["true"]
    for name in ["text", "empty", "mixed", "missing", ["true"], None, {"ok": 1}]:
        assert local_command(name) is None, name


# --- PILOT_LOCAL_COMMANDS from the environment ------------------------------------------------


def test_env_commands__a_json_object_of_name_to_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    default = {"sleep": ["sleep", "5"]}
    monkeypatch.delenv("PILOT_LOCAL_COMMANDS", raising=False)
    assert env_commands("PILOT_LOCAL_COMMANDS", default) == default

    monkeypatch.setenv("PILOT_LOCAL_COMMANDS", "  ")
    assert env_commands("PILOT_LOCAL_COMMANDS", default) == default

    monkeypatch.setenv("PILOT_LOCAL_COMMANDS", "{}")
    assert env_commands("PILOT_LOCAL_COMMANDS", default) == {}

    runner = {"runner": ["/srv/bin/runner", "--scheduler", "demo-pull"], "noop": ["true"]}
    monkeypatch.setenv("PILOT_LOCAL_COMMANDS", json.dumps(runner))
    assert env_commands("PILOT_LOCAL_COMMANDS", default) == runner


@pytest.mark.parametrize(
    "raw",
    [
        "sleep 5",  # a command line, not JSON
        '["sleep", "5"]',
        '{"sleep": "sleep 5"}',  # a shell string, not an argv
        '{"sleep": []}',
        '{"sleep": [""]}',
        '{"sleep": ["sleep", 5]}',
        '{"": ["true"]}',
        '{"nul": ["true", "a\\u0000b"]}',
    ],
)
def test_env_commands__anything_else_stops_the_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("PILOT_LOCAL_COMMANDS", raw)

    with pytest.raises(ImproperlyConfigured, match="PILOT_LOCAL_COMMANDS"):
        env_commands("PILOT_LOCAL_COMMANDS", {})


def test_registry__choices_validation_and_backend_for_come_from_one_registration() -> None:
    spec = backend_registry.register(
        backend_registry.BackendSpec(
            name="test-grid", label="test grid", factory=SimulatedBackend, options=frozenset({"x"})
        )
    )
    try:
        assert ("test-grid", "test grid") in backend_registry.choices()
        backend_registry.check_settings("test-grid", {"x": 1})
        with pytest.raises(ValidationError, match="unknown option"):
            backend_registry.check_settings("test-grid", {"command": "id"})
        assert isinstance(backend_for(_ce(backend="test-grid")), SimulatedBackend)
    finally:
        del backend_registry.BACKENDS[spec.name]
    with pytest.raises(SubmitError, match="not registered"):
        backend_for(_ce(backend="test-grid"))  # never run as another backend
    with pytest.raises(ValidationError, match="is not a backend"):
        backend_registry.check_settings("test-grid", {})
