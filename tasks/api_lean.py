"""Lean views for the API's hottest endpoints (issue 12): pop, push (one or a batch), the
PATCH report and the batch report, served without DRF's per-request machinery for the
request every runner sends: a JSON body with a token, nothing to negotiate.

A profile of a gunicorn worker (README, "Benchmarks") put DRF's dispatch (the Request
wrapper, negotiation, per-request instances of authenticators, permissions and throttles,
the exception wrapper) at about as much CPU as the pop itself. What these views do is the DRF
view's own code, not a copy of its rules:

- the same token check (scheduler_site.permissions.TokenAuthentication), the viewset's own
  permission classes and throttles, called as DRF calls them, in DRF's order;
- the same body parser (depth limit) and the same work (tasks.api's `*_answer` functions,
  which the DRF actions call too), errors through the same exception handler, the answer
  rendered by DRF's Response with the same headers (Allow, Vary).

Any request that is not the common case (another method, content type or Accept header, a
query string, no token, a session) goes to the DRF view untouched, and so does any request
that the token check or a permission refuses, before anything was done or counted: DRF then
gives its own answer (401 with its header, 403). A throttle's refusal is answered here, as DRF
answers it (429 with Retry-After): the throttles have counted the request by then, and DRF
would count it again.
The OpenAPI schema is the DRF views' (they stay routed, behind these).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.views.decorators.csrf import csrf_exempt
from rest_framework.exceptions import APIException, Throttled
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from scheduler_site.api_errors import exception_handler
from scheduler_site.api_input import JSONParser
from scheduler_site.permissions import TokenAuthentication
from tasks.api import with_notes
from tasks.exceptions import QueueError

JSON = "application/json"
Answer = Callable[[Any, dict[str, Any], Any], tuple[int, Any]]
DrfView = Callable[..., HttpResponseBase]
_renderer = JSONRenderer()
_parser = JSONParser()


def _common_case(request: HttpRequest, method: str) -> bool:
    meta = request.META
    try:
        length = int(meta.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return False
    return (
        request.method == method
        and meta.get("CONTENT_TYPE") == JSON
        and meta.get("HTTP_ACCEPT", "*/*") in ("*/*", JSON)
        and not meta.get("QUERY_STRING")
        and meta.get("HTTP_AUTHORIZATION", "").startswith("Token ")
        and length <= settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    )


def _authenticate(request: HttpRequest) -> bool:
    """knox's header parsing and our token check; sets request.user as DRF's Request does."""
    parts = request.META["HTTP_AUTHORIZATION"].encode("iso-8859-1").split()
    if len(parts) != 2 or parts[0].lower() != b"token":
        return False
    try:
        user, _token = TokenAuthentication().authenticate_credentials(parts[1])
    except APIException:
        return False
    request.user = user
    return True


def _permitted(request: HttpRequest, cls: Any, view: Any) -> bool:
    """The viewset's permission classes (DRF's check_permissions); False on any refusal."""
    try:
        return all(p().has_permission(request, view) for p in cls.permission_classes)
    except (APIException, QueueError):
        return False


def _throttled(request: HttpRequest, cls: Any, view: Any) -> Throttled | None:
    """DRF's check_throttles: every throttle counts the request, and a refusal waits the
    longest wait of those that refused. Answered here, not handed to the DRF view: its own
    check would count the request a second time in each throttle that let it through."""
    throttles = [throttle() for throttle in cls.throttle_classes]
    waits = [t.wait() for t in throttles if not t.allow_request(request, view)]
    if not waits:
        return None
    return Throttled(wait=max((w for w in waits if w is not None), default=None))


def _error(request: HttpRequest, exc: Exception, view: Any, kwargs: dict[str, Any]) -> Any:
    context = {"view": view, "args": (), "kwargs": kwargs, "request": request}
    response = exception_handler(exc, context)
    if response is None:
        raise exc
    return response


def _answer(
    request: HttpRequest, answer: Answer, view: Any, kwargs: dict[str, Any]
) -> HttpResponseBase:
    """The answer, rendered as DRF's Response with our JSON renderer would be (the same bytes
    and Content-Type; its payload kept as `.data`, as on a DRF response), without building the
    template response DRF renders through; an error through the exception handler."""
    try:
        data: Any = {}
        if request.body:
            stream = io.BytesIO(request.body)
            data = _parser.parse(stream, JSON, {"encoding": settings.DEFAULT_CHARSET})
        code, payload = answer(request, kwargs, data)
    except Exception as exc:
        return with_notes(request, _rendered(_error(request, exc, view, kwargs)))
    response = HttpResponse(_renderer.render(payload, JSON, {}), status=code, content_type=JSON)
    response.data = payload  # type: ignore[attr-defined]
    return with_notes(request, response)


def _rendered(response: Response) -> Response:
    """What DRF's finalize_response sets for the renderer (an error answer's own headers,
    Retry-After, stay)."""
    response.accepted_renderer = _renderer
    response.accepted_media_type = JSON
    response.renderer_context = {}
    return response


def _finish(response: HttpResponseBase, headers: dict[str, str]) -> HttpResponseBase:
    """What else DRF's finalize_response adds: the Allow and Vary headers."""
    for name, value in headers.items():
        response[name] = value
    return response


def lean(drf_view: DrfView, answer: Answer, *, method: str) -> DrfView:
    """A view for one of the router's routes (`drf_view`, the router's own callback): the
    common case through `answer`, everything else through `drf_view`."""
    cls, actions = drf_view.cls, drf_view.actions  # type: ignore[attr-defined]
    action = actions[method.lower()]
    mapped = {*actions, *(("head",) if "get" in actions else ())}  # DRF maps HEAD to GET
    allowed = [m.upper() for m in cls.http_method_names if m in mapped or hasattr(cls, m)]
    headers = {"Allow": ", ".join(allowed)}
    if len(cls.renderer_classes) > 1:
        headers["Vary"] = "Accept"

    @csrf_exempt
    def view(request: HttpRequest, **kwargs: Any) -> HttpResponseBase:
        if not _common_case(request, method) or not _authenticate(request):
            return drf_view(request, **kwargs)
        standin = SimpleNamespace(
            action=action, kwargs=kwargs, action_permissions=cls.action_permissions
        )
        if not _permitted(request, cls, standin):
            vars(request).pop("_queue_scope", None)  # DRF's own check reads it afresh
            return drf_view(request, **kwargs)
        if (throttled := _throttled(request, cls, standin)) is not None:
            return _finish(_rendered(_error(request, throttled, standin, kwargs)), headers)
        return _finish(_answer(request, answer, standin, kwargs), headers)

    # No `cls` on it: drf-spectacular documents the DRF route behind it, not this one.
    return view
