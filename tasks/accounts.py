"""API accounts and their credentials: the two roles, the queues a runner account is limited
to (DESIGN 9.1), and API tokens.

Tokens are django-rest-knox's: the database keeps a SHA-512 digest, never the key, so a key is
shown once, when it is made. A token is named by its id, the first characters of its digest:
safe to show, log and paste into `revoke`, and no help to anyone guessing the key.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractUser, Group
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone
from knox.crypto import hash_token
from knox.models import AuthToken

from tasks.exceptions import InvalidRequest
from tasks.models import RunnerGrant, Scheduler
from tasks.roles import OPERATORS, RUNNERS

TOKEN_ID_LENGTH = 12
_DURATION = re.compile(r"([1-9][0-9]*)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Account:
    user: AbstractUser
    created: bool
    password: str | None  # the generated admin password, only when just created
    token: str | None  # the API key, only when just created


def parse_expires_in(text: str) -> timedelta:
    """`90d`, `12h`, `30m`, `45s`, `2w`: a token's lifetime from now."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise InvalidRequest("expires_in", f"{text!r} is not a duration like 90d, 12h or 30m.")
    return timedelta(seconds=int(match[1]) * _UNIT_SECONDS[match[2]])


def token_id(token: AuthToken) -> str:
    return token.digest[:TOKEN_ID_LENGTH]


@transaction.atomic
def token_create(
    *, user: AbstractUser, expires_in: timedelta | None = None
) -> tuple[AuthToken, str]:
    """A new token for `user`; returns it and its key, which nothing can show again."""
    return AuthToken.objects.create(user=user, expiry=expires_in)


def token_list(*, username: str | None = None) -> QuerySet[AuthToken]:
    tokens = AuthToken.objects.select_related("user").order_by("user__username", "created")
    return tokens if username is None else tokens.filter(user__username=username)


def token_matches(*, user: AbstractUser, key: str) -> bool:
    """Whether `key` is a live (not revoked, not expired) token of `user`."""
    live = Q(expiry__isnull=True) | Q(expiry__gt=timezone.now())
    return AuthToken.objects.filter(live, user=user, digest=hash_token(key)).exists()


@transaction.atomic
def token_revoke(*, token_ids: Sequence[str] = (), username: str | None = None) -> int:
    """Delete the tokens named by id (each must name exactly one), or all of `username`'s.
    Returns how many were revoked; a revoked token is refused (401) at its next use."""
    doomed = AuthToken.objects.none()
    for wanted in token_ids:
        matches = AuthToken.objects.filter(digest__startswith=wanted.strip().lower())
        if len(wanted.strip()) < 8 or matches.count() != 1:
            raise InvalidRequest("token_id", f"{wanted!r} names no single token (see `list`).")
        doomed |= matches
    if username is not None:
        doomed |= AuthToken.objects.filter(user__username=username)
    revoked, _ = AuthToken.objects.filter(digest__in=doomed.values("digest")).delete()
    return revoked


def runner_grants_set(*, user: AbstractUser, scheduler_ids: Sequence[str]) -> None:
    """Limit a runner account to exactly these queues; an empty list lifts every limit."""
    unknown = sorted(set(scheduler_ids) - set(Scheduler.objects.values_list("id", flat=True)))
    if unknown:
        raise InvalidRequest("scheduler", f"no such scheduler: {', '.join(unknown)}.")
    with transaction.atomic():
        RunnerGrant.objects.filter(user=user).exclude(scheduler_id__in=scheduler_ids).delete()
        for scheduler_id in scheduler_ids:
            RunnerGrant.objects.get_or_create(user=user, scheduler_id=scheduler_id)


@transaction.atomic
def account_set_up(
    *,
    username: str,
    role: str,
    scheduler_ids: Sequence[str] = (),
    operator_login: bool = False,
    expires_in: timedelta | None = None,
) -> Account:
    """Create or update an account in a role. A new account gets a token (and, with
    `operator_login`, an admin password), both returned here only. The queues of a runner are
    set to `scheduler_ids` each time (none: every queue); operators are never limited."""
    if role == "operator" and scheduler_ids:
        raise InvalidRequest("scheduler", "operators are never limited to queues.")
    user, created = get_user_model().objects.get_or_create(username=username)
    if scheduler_ids and (user.is_superuser or user.groups.filter(name=OPERATORS).exists()):
        # Grants would be silently ignored (selectors.runner_queues): say so instead.
        raise InvalidRequest("scheduler", f"{username!r} is an operator: never limited to queues.")
    user.groups.add(Group.objects.get(name=OPERATORS if role == "operator" else RUNNERS))
    runner_grants_set(user=user, scheduler_ids=list(scheduler_ids))
    if not created:
        return Account(user=user, created=False, password=None, token=None)
    password = secrets.token_urlsafe(15) if operator_login else None
    if password:
        user.set_password(password)
        user.is_staff = user.is_superuser = True
    else:
        user.set_unusable_password()
    user.save()
    _token, key = token_create(user=user, expires_in=expires_in)
    return Account(user=user, created=True, password=password, token=key)
