"""The pop bench's reference: plain Django views doing the same service calls as the API's
pop, push and report, rendering the tasks with JsonResponse. Under `plain/` they do no
authentication and no permission check; under `plain-auth/` they first do what issue 12's
HTTP target calls the same work, with Django's own API and no DRF: the API's token check (the
same function, so the same one statement: token, account, its permissions and queue grants),
the action's permission (`user.has_perms`, what ModelActionPermissions asks) and the runner's
queue reach (a limited runner: its queue for pop and push, the task's queue for a report, the
same selectors). `plain-auth/` is the anchor of the HTTP targets (README, "Benchmarks"); what
the API costs beyond it is DRF's and our API's share (throttles, strict input, the runner's
liveness note). Served by bench/plain_wsgi.py; never part of the product."""

from __future__ import annotations

import json
import uuid
from typing import Any

from django.http import HttpRequest, JsonResponse
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from rest_framework.exceptions import AuthenticationFailed

from scheduler_site.permissions import TokenAuthentication
from tasks import selectors, services
from tasks.leases import LeaseProof
from tasks.models import Task


def _task(task: Task) -> dict[str, Any]:
    return {
        "id": str(task.id),
        "scheduler": task.scheduler_id,
        "status": task.status,
        "priority": task.priority,
        "data": task.data,
        "attempts": task.attempts,
        "lease_token": task.lease_token,
        "lease_expires_at": task.lease_expires_at.isoformat() if task.lease_expires_at else None,
    }


# The work, undecorated: the authenticated views call it without a second view wrapper.
def _pop(request: HttpRequest, scheduler_id: str) -> JsonResponse:
    body = json.loads(request.body or b"{}")
    tasks = services.task_pop(
        scheduler_id=scheduler_id, limit=int(body.get("limit", 1)), worker="plain"
    )
    return JsonResponse({"results": [_task(task) for task in tasks]})


def _push(request: HttpRequest, scheduler_id: str) -> JsonResponse:
    body = json.loads(request.body or b"{}")
    task = services.task_push(scheduler_id=scheduler_id, data=body.get("data"), actor="plain")
    return JsonResponse(_task(task), status=201)


def _report(request: HttpRequest, task_id: uuid.UUID) -> JsonResponse:
    body = json.loads(request.body or b"{}")
    task = services.task_report(
        task_id=task_id,
        status=body["status"],
        result=body.get("result"),
        actor="plain",
        proof=LeaseProof(token=body.get("lease_token")),
    )
    return JsonResponse(_task(task))


def _refusal(request: HttpRequest, perms: list[str], queue: str = "", task: Any = None) -> Any:
    """None when the token is valid, the account holds `perms` and reaches the queue (or the
    task's queue); else the refusal's answer."""
    _prefix, _, key = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    try:
        user, _token = TokenAuthentication().authenticate_credentials(key.encode())
    except AuthenticationFailed:
        return JsonResponse({"detail": "Invalid token."}, status=401)
    if not user.has_perms(perms):
        return JsonResponse({"detail": "Forbidden."}, status=403)
    scope = selectors.runner_queues(user)
    if scope is not None and queue and queue not in scope:
        return JsonResponse({"detail": "Forbidden."}, status=403)
    if scope is not None and task is not None and not selectors.task_in_queues(task, scope):
        return JsonResponse({"detail": "Not found."}, status=404)
    request.user = user
    return None


@csrf_exempt
@require_POST
def pop_authenticated(request: HttpRequest, scheduler_id: str) -> JsonResponse:
    refused = _refusal(request, ["tasks.pop_task"], queue=scheduler_id)
    return refused or _pop(request, scheduler_id)


@csrf_exempt
@require_POST
def push_authenticated(request: HttpRequest, scheduler_id: str) -> JsonResponse:
    refused = _refusal(request, ["tasks.add_task"], queue=scheduler_id)
    return refused or _push(request, scheduler_id)


@csrf_exempt
@require_POST
def report_authenticated(request: HttpRequest, task_id: uuid.UUID) -> JsonResponse:
    refused = _refusal(request, ["tasks.report_task"], task=task_id)
    return refused or _report(request, task_id)


pop, push, report = (csrf_exempt(require_POST(view)) for view in (_pop, _push, _report))
plain = [
    path("schedulers/<str:scheduler_id>/pop/", pop),
    path("schedulers/<str:scheduler_id>/push/", push),
    path("tasks/<uuid:task_id>/", report),
]
# The product's URLs (for /healthz) and the plain views beside them, under /api/ as the API's
# (its middleware skips the messages' set-up there: the same middleware work for both).
urlpatterns = [
    path("api/plain/", include(plain)),
    path("api/plain-auth/schedulers/<str:scheduler_id>/pop/", pop_authenticated),
    path("api/plain-auth/schedulers/<str:scheduler_id>/push/", push_authenticated),
    path("api/plain-auth/tasks/<uuid:task_id>/", report_authenticated),
    path("", include("scheduler_site.urls")),
]
