"""Who may call the API, which queues a runner account may use, and the throttling of those
who may not call it at all.

DRF checks throttles after authentication and permissions, so a request with no or a bad token
would get its 401 before the anonymous rate could apply: token guessing would never be slowed.
Here such a request counts against the anonymous rate first (429 with Retry-After beyond it).
"""

from __future__ import annotations

import binascii
from hmac import compare_digest
from typing import Any

from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from knox.auth import TokenAuthentication as KnoxTokenAuthentication
from knox.crypto import hash_token
from knox.settings import CONSTANTS
from knox.signals import token_expired
from rest_framework.exceptions import AuthenticationFailed, PermissionDenied, Throttled
from rest_framework.permissions import BasePermission, DjangoModelPermissions, IsAuthenticated
from rest_framework.request import Request
from rest_framework.throttling import AnonRateThrottle

from tasks import selectors
from tasks.exceptions import TaskNotFound


def throttle_anonymous(request: Request) -> None:
    """Count a request without valid credentials against the anonymous rate."""
    throttle = AnonRateThrottle()
    # The Django request: its user is the session's (anonymous here), and DRF's request.user
    # may be what is being worked out.
    if not throttle.allow_request(request._request, None):
        raise Throttled(wait=throttle.wait())


class TokenAuthentication(KnoxTokenAuthentication):
    """knox's hashed, revocable, optionally expiring tokens under the header runners have
    always sent (`Authorization: Token <key>`). An unknown, revoked or expired token, or an
    inactive account, is throttled as anonymous."""

    def authenticate(self, request: Request) -> Any:
        try:
            return super().authenticate(request)
        except AuthenticationFailed:
            throttle_anonymous(request)
            raise

    def authenticate_credentials(self, token: bytes) -> Any:
        """knox's check (key prefix, then SHA-512 digest, constant-time compare; an expired
        token is deleted and refused), in one query that also reads the account's permissions
        and queue grants (selectors.token_candidates). knox's own version also read every other
        token of the account on every request, to delete the expired ones: a second query per
        request for housekeeping; an expired token is refused either way, and deleted when it
        is next presented."""
        try:
            # knox decodes the key as UTF-8 unguarded: a header byte that is not would be a 500.
            key = token.decode("utf-8")
            digest = hash_token(key)
        except (UnicodeDecodeError, TypeError, binascii.Error):
            raise AuthenticationFailed("Invalid token.") from None
        for auth_token in selectors.token_candidates(key[: CONSTANTS.TOKEN_KEY_LENGTH]):
            if not compare_digest(digest, auth_token.digest):
                continue
            if auth_token.expiry is not None and auth_token.expiry < timezone.now():
                self._expire(auth_token)
                break
            selectors.prime_user(auth_token)
            return self.validate_user(auth_token)
        raise AuthenticationFailed("Invalid token.")

    def _expire(self, auth_token: Any) -> None:
        username = auth_token.user.get_username()
        auth_token.delete()
        token_expired.send(sender=self.__class__, username=username, source="auth_token")


class TokenAuthenticationScheme(OpenApiAuthenticationExtension):
    """The OpenAPI security scheme of the token header (the name it had before knox)."""

    target_class = TokenAuthentication
    name = "tokenAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return build_bearer_security_scheme_object(
            header_name="Authorization", token_prefix=self.target.authenticate_header(None)
        )


class Authenticated(IsAuthenticated):
    """Any account (metrics, schema, docs); anonymous requests are throttled, then refused."""

    def has_permission(self, request: Request, view: Any) -> bool:
        if super().has_permission(request, view):
            return True
        throttle_anonymous(request)
        return False


class ModelActionPermissions(DjangoModelPermissions):
    """Django model permissions, reads included (view_*), plus per-action permissions that a
    view declares in `action_permissions` (e.g. pop needs tasks.pop_task)."""

    perms_map = {
        "GET": ["%(app_label)s.view_%(model_name)s"],
        "OPTIONS": ["%(app_label)s.view_%(model_name)s"],
        "HEAD": ["%(app_label)s.view_%(model_name)s"],
        "POST": ["%(app_label)s.add_%(model_name)s"],
        "PUT": ["%(app_label)s.change_%(model_name)s"],
        "PATCH": ["%(app_label)s.change_%(model_name)s"],
        "DELETE": ["%(app_label)s.delete_%(model_name)s"],
    }

    def has_permission(self, request: Request, view: Any) -> bool:
        if not request.user or not request.user.is_authenticated:
            throttle_anonymous(request)
            return False
        required = getattr(view, "action_permissions", {}).get(getattr(view, "action", None))
        if required is not None:
            return request.user.has_perms(required)
        return super().has_permission(request, view)


def queue_scope(request: Request) -> selectors.QueueScope:
    """The queues the caller may use (None: every queue), read once per request."""
    if not hasattr(request, "_queue_scope"):
        request._queue_scope = selectors.runner_queues(request.user)
    return request._queue_scope


class QueueScopePermission(BasePermission):
    """After the model permissions, on the schedulers API: a limited runner (DESIGN 9.1) may
    pop from and push to its own queues only (403 elsewhere). Single queues and lists are
    filtered by the view's queryset (404 / left out)."""

    def has_permission(self, request: Request, view: Any) -> bool:
        scope = queue_scope(request)
        if scope is not None and view.action in {"pop", "push"}:
            scheduler_id = view.kwargs["pk"]
            if scheduler_id not in scope:
                raise PermissionDenied(f"This account may not use queue {scheduler_id!r}.")
        return True


class TaskScopePermission(BasePermission):
    """After the model permissions, on the tasks API: a task of a queue outside a limited
    runner's answers as one that does not exist (404), before its body is even read, so its
    reports, heartbeats and hand-backs cannot learn that it does."""

    def has_permission(self, request: Request, view: Any) -> bool:
        scope = queue_scope(request)
        task_id = view.kwargs.get("pk")
        if scope is None or task_id is None or selectors.task_in_queues(task_id, scope):
            return True
        raise TaskNotFound(f"Task {task_id} does not exist.")
