"""Orchestrator policies: each orders the due schedules its own way; weights share the room.

The room of a tick is split by largest remainder over the weights; a policy that cannot fill
its share hands the rest to the ones after it, and `most_overdue_first` takes what is left.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.db.models import F, Q

from tasks.models import POLICIES


@dataclass(frozen=True)
class Policy:
    name: str
    order_by: tuple[Any, ...]
    condition: Q | None = None


POLICY_BY_NAME: dict[str, Policy] = {
    "never_run_first": Policy("never_run_first", ("created_at", "id"), Q(last_run_at__isnull=True)),
    "most_overdue_first": Policy("most_overdue_first", ("deadline_at", "id")),
    "least_recently_run_first": Policy(
        "least_recently_run_first", (F("last_run_at").asc(nulls_first=True), "deadline_at", "id")
    ),
    "highest_priority_first": Policy("highest_priority_first", ("priority", "deadline_at", "id")),
}
assert set(POLICY_BY_NAME) == set(POLICIES)

# Narrow policies go first so what they cannot use flows on to the broad ones.
ORDER = (
    "never_run_first",
    "highest_priority_first",
    "least_recently_run_first",
    "most_overdue_first",
)
FALLBACK = POLICY_BY_NAME["most_overdue_first"]


def allocate(room: int, weights: Mapping[str, int]) -> list[tuple[Policy, int]]:
    """Split `room` over the weighted policies (largest remainder), in ORDER."""
    active = [(name, weights.get(name, 0)) for name in ORDER if weights.get(name, 0) > 0]
    total = sum(weight for _, weight in active)
    if room <= 0 or total == 0:
        return []
    exact = {name: room * weight / total for name, weight in active}
    shares = {name: int(value) for name, value in exact.items()}
    leftover = room - sum(shares.values())
    for name in sorted(exact, key=lambda n: exact[n] - shares[n], reverse=True)[:leftover]:
        shares[name] += 1
    return [(POLICY_BY_NAME[name], shares[name]) for name, _ in active]
