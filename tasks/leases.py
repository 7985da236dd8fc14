"""Who may report on a leased task: its holder, proven by the lease token its hand-out minted.

The attempt number fences a stale holder out after a reap, but anyone who can GET the task can
read it, and an operator's requeue starts it again at 0. The lease token is a random secret
minted for each hand-out (pop or worker claim), returned only to the holder, and cleared when
the attempt ends, so a report that shows it comes from the current holder and no other.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from tasks.exceptions import TransitionRefused
from tasks.models import Task

OVERRIDE_NOTE = "operator override, no lease token"


@dataclass(frozen=True)
class LeaseProof:
    """What a heartbeat, report or hand-back shows of its right to the task's lease.

    `token` is the holder's lease token. `operator` allows a report without one: an explicit
    override, recorded as such in the event. A service called with no proof at all (None) is
    a trusted in-process caller (the reaper, the dispatcher, an operator's command)."""

    token: str | None = None
    operator: bool = False

    @classmethod
    def holder(cls, token: str) -> LeaseProof:
        return cls(token=token)

    @property
    def is_override(self) -> bool:
        return self.token is None and self.operator


def fence_token(proof: LeaseProof | None, *, task_id: object, status: str) -> str | None:
    """The token a compare-and-swap must match (None: match any), or the refusal of a runner
    that showed none."""
    if proof is None or proof.is_override:
        return None
    if not proof.token:
        raise TransitionRefused(
            f"Task {task_id}: lease_token is required; send the one your pop returned.",
            current_status=status,
        )
    return proof.token


def check_holder(task: Task, proof: LeaseProof | None) -> None:
    """Refuse (409) a caller whose token is not the task's current one, before any write."""
    token = fence_token(proof, task_id=task.id, status=task.status)
    # Bytes: compare_digest refuses non-ASCII str, and a runner may send anything.
    held = (task.lease_token or "").encode()
    if token is not None and not hmac.compare_digest(token.encode(), held):
        raise TransitionRefused(
            f"Task {task.id} is not held with this lease_token: its lease ended, or it was "
            "handed out again, or it was never yours.",
            current_status=task.status,
        )


def with_override_note(note: str, proof: LeaseProof | None) -> str:
    if proof is not None and proof.is_override:
        return f"{note} ({OVERRIDE_NOTE})" if note else OVERRIDE_NOTE
    return note
