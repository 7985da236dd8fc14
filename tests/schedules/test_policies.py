"""allocate(): the room of a tick split over the weighted policies by largest remainder."""

from __future__ import annotations

import pytest

from schedules.policies import ORDER, allocate

DEFAULT = {"most_overdue_first": 49, "never_run_first": 49, "least_recently_run_first": 2}


def _shares(room: int, weights: dict[str, int]) -> dict[str, int]:
    return {policy.name: share for policy, share in allocate(room, weights)}


def test_allocate__49_49_2_of_100() -> None:
    assert _shares(100, DEFAULT) == {
        "never_run_first": 49,
        "least_recently_run_first": 2,
        "most_overdue_first": 49,
    }


def test_allocate__49_49_2_of_7_gives_the_leftover_to_the_largest_remainder() -> None:
    # Exact shares 3.43 / 3.43 / 0.14: floors 3 + 3 + 0, the one left over to a 0.43.
    shares = _shares(7, DEFAULT)

    assert sum(shares.values()) == 7
    assert shares["least_recently_run_first"] == 0
    assert sorted([shares["never_run_first"], shares["most_overdue_first"]]) == [3, 4]


def test_allocate__49_49_2_of_1() -> None:
    shares = _shares(1, DEFAULT)

    assert sum(shares.values()) == 1
    assert shares["least_recently_run_first"] == 0


@pytest.mark.parametrize("room", [1, 2, 3, 5, 7, 10, 11, 99, 100, 101, 997])
@pytest.mark.parametrize(
    "weights",
    [
        DEFAULT,
        {"never_run_first": 1, "most_overdue_first": 1, "highest_priority_first": 1},
        {"least_recently_run_first": 3, "highest_priority_first": 7},
        {"most_overdue_first": 1},
    ],
)
def test_allocate__shares_always_sum_to_the_room(room: int, weights: dict[str, int]) -> None:
    allocated = allocate(room, weights)
    total = sum(weights.values())

    assert sum(share for _, share in allocated) == room
    for policy, share in allocated:
        # Largest remainder: each share is its exact share rounded down or up.
        exact = room * weights[policy.name] / total
        assert int(exact) <= share <= int(exact) + 1


def test_allocate__in_policy_order_narrow_ones_first() -> None:
    weights = dict.fromkeys(ORDER, 1)

    assert [policy.name for policy, _ in allocate(8, weights)] == list(ORDER)
    assert ORDER[0] == "never_run_first"
    assert ORDER[-1] == "most_overdue_first"


def test_allocate__zero_weights_are_skipped() -> None:
    allocated = allocate(10, {"never_run_first": 0, "highest_priority_first": 5})

    assert [(policy.name, share) for policy, share in allocated] == [("highest_priority_first", 10)]


@pytest.mark.parametrize("room", [0, -3])
def test_allocate__no_room_allocates_nothing(room: int) -> None:
    assert allocate(room, DEFAULT) == []


def test_allocate__all_zero_or_no_weights_allocate_nothing() -> None:
    assert allocate(10, {"never_run_first": 0}) == []
    assert allocate(10, {}) == []
