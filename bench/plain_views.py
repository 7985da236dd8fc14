"""The pop bench's reference: plain Django views (no DRF, no authentication, no permission
check) doing the same service calls as the API's pop, push and report, rendering the tasks
with JsonResponse. What the HTTP path costs beyond this is DRF's and our API's share.
`plain-auth/…/pop/` adds the API's own token check and permission test (the same function,
without DRF): what the token check itself costs, apart from DRF's machinery.
Served by bench/plain_wsgi.py; never part of the product."""

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
from tasks import services
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


@csrf_exempt
@require_POST
def pop(request: HttpRequest, scheduler_id: str) -> JsonResponse:
    body = json.loads(request.body or b"{}")
    tasks = services.task_pop(
        scheduler_id=scheduler_id, limit=int(body.get("limit", 1)), worker="plain"
    )
    return JsonResponse({"results": [_task(task) for task in tasks]})


@csrf_exempt
@require_POST
def pop_authenticated(request: HttpRequest, scheduler_id: str) -> JsonResponse:
    _prefix, _, key = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    try:
        user, _token = TokenAuthentication().authenticate_credentials(key.encode())
    except AuthenticationFailed:
        return JsonResponse({"detail": "Invalid token."}, status=401)
    if not user.has_perm("tasks.pop_task"):
        return JsonResponse({"detail": "Forbidden."}, status=403)
    return pop(request, scheduler_id)


@csrf_exempt
@require_POST
def push(request: HttpRequest, scheduler_id: str) -> JsonResponse:
    body = json.loads(request.body or b"{}")
    task = services.task_push(scheduler_id=scheduler_id, data=body.get("data"), actor="plain")
    return JsonResponse(_task(task), status=201)


@csrf_exempt
@require_POST
def report(request: HttpRequest, task_id: uuid.UUID) -> JsonResponse:
    body = json.loads(request.body or b"{}")
    task = services.task_report(
        task_id=task_id,
        status=body["status"],
        result=body.get("result"),
        actor="plain",
        proof=LeaseProof(token=body.get("lease_token")),
    )
    return JsonResponse(_task(task))


plain = [
    path("schedulers/<str:scheduler_id>/pop/", pop),
    path("schedulers/<str:scheduler_id>/push/", push),
    path("tasks/<uuid:task_id>/", report),
]
# The product's URLs (for /healthz) and the plain views beside them.
urlpatterns = [
    path("plain/", include(plain)),
    path("plain-auth/schedulers/<str:scheduler_id>/pop/", pop_authenticated),
    path("", include("scheduler_site.urls")),
]
