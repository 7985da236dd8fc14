"""The product's URLs plus the comparison point of the HTTP targets (issue 12): a plain
Django view doing the same service call as `POST /api/schedulers/{id}/pop/`, with no DRF, no
authentication and no permission check. Bench only."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from scheduler_site.urls import urlpatterns as product_urls
from tasks import services


@csrf_exempt
def plain_pop(request: HttpRequest, pk: str) -> JsonResponse:
    tasks = services.task_pop(scheduler_id=pk, limit=1, worker="plain")
    results = [
        {
            "id": str(task.id),
            "status": task.status,
            "attempts": task.attempts,
            "lease_token": task.lease_token,
            "data": task.data,
        }
        for task in tasks
    ]
    return JsonResponse({"results": results})


urlpatterns = [path("perf/plain-pop/<str:pk>/", plain_pop), *product_urls]
