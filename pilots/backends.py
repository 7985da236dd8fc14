"""Compute Element backends behind one small interface: submit a pilot, report on many.

`simulated` (default): reliability is the chance that a submission succeeds and that a
running pilot ends DONE. Outcomes are drawn per (seed, pilot, step), so a seeded run is
reproducible and the backend keeps no state. `local`: each pilot is a real local process (the
pull runner is the natural pilot), tracked by pid and by an exit-code file its shell writes. It
runs only commands of the server's PILOT_LOCAL_COMMANDS, by name: an API or admin user picks
one, never supplies one (DESIGN §9.2).
"""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from django.conf import settings
from django.utils import timezone

from pilots.backend_registry import BACKENDS, BackendSpec, register
from pilots.models import ComputeElement, PilotStatus, PilotSubmission


class SubmitError(Exception):
    pass


@dataclass(frozen=True)
class PilotNews:
    status: str  # RUNNING, DONE or FAILED
    reason: str = ""


class PilotBackend(Protocol):
    def submit(self, pilot: PilotSubmission) -> str: ...

    def status(self, pilots: list[PilotSubmission]) -> dict[str, PilotNews]: ...


class SimulatedBackend:
    def __init__(self, ce: ComputeElement) -> None:
        options = ce.backend_settings or {}
        self.seed = str(options.get("seed", settings.PILOT_SIMULATION_SEED))
        self.reliability = ce.reliability
        self.start_after = float(options.get("start_after_seconds", 5))
        self.run_for = float(options.get("run_seconds", 20))

    def _draw(self, pilot: PilotSubmission, step: str) -> float:
        return random.Random(f"{self.seed}:{pilot.id}:{step}").random()

    def submit(self, pilot: PilotSubmission) -> str:
        if self._draw(pilot, "submit") >= self.reliability:
            raise SubmitError("simulated submission refused by the CE")
        return f"sim-{pilot.id.hex[:12]}"

    def status(self, pilots: list[PilotSubmission]) -> dict[str, PilotNews]:
        now = timezone.now()
        news: dict[str, PilotNews] = {}
        for pilot in pilots:
            age = (now - pilot.submitted_at).total_seconds()
            if age < self.start_after:
                continue  # still waiting in the CE's queue: no news
            if age < self.start_after + self.run_for:
                news[pilot.external_id] = PilotNews(PilotStatus.RUNNING)
            elif self._draw(pilot, "outcome") < self.reliability:
                news[pilot.external_id] = PilotNews(PilotStatus.DONE)
            else:
                news[pilot.external_id] = PilotNews(PilotStatus.FAILED, "simulated pilot failure")
        return news


# A CE's backend_settings names a command of the server's PILOT_LOCAL_COMMANDS; without a name
# it runs this one (the built-in default is a short sleep).
DEFAULT_LOCAL_COMMAND = "sleep"

# Runs the argv given as its positional parameters, never parsed as shell text, then records
# its exit code, which any process can read later (only the parent could wait() for it).
_EXIT_CODE_WRAPPER = (
    'exit_file=$1; shift; "$@"; echo $? > "$exit_file.tmp" && mv "$exit_file.tmp" "$exit_file"'
)


def local_command(name: object) -> list[str] | None:
    """The argv the server's settings give this name, or None: commands come only from
    PILOT_LOCAL_COMMANDS, never from a CE's settings (DESIGN §9.2)."""
    if not isinstance(name, str):
        return None
    argv = settings.PILOT_LOCAL_COMMANDS.get(name)
    # The environment variable is checked at start; this also guards a settings module's own.
    if not (isinstance(argv, list | tuple) and argv and all(isinstance(a, str) for a in argv)):
        return None
    return list(argv)


class LocalBackend:
    """Pilots as local processes running one of the server's PILOT_LOCAL_COMMANDS, the one
    `backend_settings.command` names (default: `sleep`); the pilot id is in its environment as
    PILOT_ID."""

    def __init__(self, ce: ComputeElement) -> None:
        options = ce.backend_settings or {}
        self.command = options.get("command", DEFAULT_LOCAL_COMMAND)
        self.folder = Path(settings.VAR_DIR) / "pilots"

    def _exit_file(self, external_id: str) -> Path:
        return self.folder / f"{external_id}.exit"

    def submit(self, pilot: PilotSubmission) -> str:
        argv = local_command(self.command)
        if argv is None:  # the setting changed since the CE was saved
            raise SubmitError(f"no command {self.command!r} in the server's PILOT_LOCAL_COMMANDS")
        self.folder.mkdir(parents=True, exist_ok=True)
        token = pilot.id.hex
        try:
            # A new session keeps the pilot alive past its submitter.
            process = subprocess.Popen(
                ["/bin/sh", "-c", _EXIT_CODE_WRAPPER, "pilot", str(self._exit_file(token)), *argv],
                env={**os.environ, "PILOT_ID": str(pilot.id)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise SubmitError(f"could not start the pilot process: {exc}") from None
        return f"{token}:{process.pid}"

    def status(self, pilots: list[PilotSubmission]) -> dict[str, PilotNews]:
        news: dict[str, PilotNews] = {}
        for pilot in pilots:
            token, _, pid = pilot.external_id.partition(":")
            exit_file = self._exit_file(token)
            # Liveness first, then the file: the shell writes the file before it exits, so a
            # process found dead has left its file. The other order missed a pilot that wrote
            # its file and exited between the two checks.
            alive = pid.isdigit() and _alive(int(pid))
            if exit_file.exists():
                code = exit_file.read_text().strip()
                news[pilot.external_id] = (
                    PilotNews(PilotStatus.DONE)
                    if code == "0"
                    else PilotNews(PilotStatus.FAILED, f"pilot process exited with {code}")
                )
            elif alive:
                news[pilot.external_id] = PilotNews(PilotStatus.RUNNING)
        return news


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie has exited


def _command_problem(options: dict[str, Any]) -> str | None:
    """A local CE names one of the server's commands; a command line or argv is refused."""
    name = options.get("command", DEFAULT_LOCAL_COMMAND)
    if local_command(name) is not None:
        return None
    known = ", ".join(sorted(settings.PILOT_LOCAL_COMMANDS)) or "none are configured"
    given = f"{name!r} is not" if isinstance(name, str) else "must be"
    return (
        f"command: {given} the name of one of the server's PILOT_LOCAL_COMMANDS ({known}); "
        "a command line or argv is never accepted."
    )


register(
    BackendSpec(
        name="simulated",
        label="simulated (reliability drives outcomes; seedable)",
        factory=SimulatedBackend,
        options=frozenset({"seed", "start_after_seconds", "run_seconds"}),
        number_options=frozenset({"start_after_seconds", "run_seconds"}),
    )
)
register(
    BackendSpec(
        name="local",
        label="local (pilots are real local processes)",
        factory=LocalBackend,
        options=frozenset({"command"}),
        check=_command_problem,
    )
)


def backend_for(ce: ComputeElement) -> PilotBackend:
    """The CE's backend; one that is not registered (a row from another version) cannot
    submit, rather than running as some other backend."""
    spec = BACKENDS.get(ce.backend)
    if spec is None:
        raise SubmitError(f"backend {ce.backend!r} is not registered")
    return spec.factory(ce)
