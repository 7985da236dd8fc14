"""scheduler_site/middleware.py: Django's messages everywhere but under /api/."""

from __future__ import annotations

import pytest
from django.test import Client
from rest_framework.test import APIClient

from scheduler_site import middleware
from tasks import services


@pytest.mark.django_db
def test_message_middleware__not_set_up_for_the_api(
    operator_client: APIClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    original = middleware.MessageMiddleware.process_response

    def record(self: middleware.MessageMiddleware, request: object, response: object) -> object:
        seen.append(hasattr(request, "_messages"))
        return original(self, request, response)

    monkeypatch.setattr(middleware.MessageMiddleware, "process_response", record)
    assert operator_client.get("/api/schedulers/").status_code == 200
    assert operator_client.get("/healthz").status_code in {200, 503}
    assert seen == [False, True]


@pytest.mark.django_db
def test_message_middleware__the_admins_notices_still_show(admin_client: Client) -> None:
    """An admin action's notice reaches the next page (the messages framework still works)."""
    services.scheduler_create(id="q1")
    response = admin_client.post(
        "/admin/tasks/scheduler/",
        {"action": "pause_queues", "_selected_action": ["q1"]},
        follow=True,
    )
    assert "Paused 1." in [str(message) for message in response.context["messages"]]
