from __future__ import annotations

from datetime import datetime
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError, CommandParser
from django.utils import timezone

from tasks import accounts
from tasks.management.commands._base import SubcommandCommand, table


class Command(SubcommandCommand):
    help = (
        "API tokens: create (the key is printed once; only its digest is stored), list (ids, "
        "never keys), revoke. A token is named by its id, as `list` shows it. "
        "`manage.py api_token ACTION --help` for each."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = self.subcommands(parser)
        create = self.action(sub, "create", "Issue a new token to an existing account.")
        create.add_argument("username", metavar="USERNAME", help="The account.")
        create.add_argument(
            "--expires-in",
            metavar="DURATION",
            help="Refused after this long (90d, 12h, 30m, 45s, 2w); default: never.",
        )
        listing = self.action(sub, "list", "Tokens with their account, creation and expiry.")
        listing.add_argument("--user", metavar="USERNAME", help="Only this account's tokens.")
        revoke = self.action(sub, "revoke", "Revoke tokens: refused (401) from then on.")
        revoke.add_argument(
            "token_ids", nargs="*", metavar="TOKEN_ID", help="Ids as `api_token list` shows them."
        )
        revoke.add_argument("--user", metavar="USERNAME", help="Every token of this account.")

    def _create(self, *, username: str, expires_in: str | None, **_: Any) -> None:
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No account {username!r}; `manage.py create_api_user` makes one.")
        lifetime = accounts.parse_expires_in(expires_in) if expires_in else None
        token, key = accounts.token_create(user=user, expires_in=lifetime)
        expiry = f"expires {token.expiry:%Y-%m-%d %H:%M:%SZ}" if token.expiry else "no expiry"
        record = {"id": accounts.token_id(token), "user": username, "expiry": token.expiry}
        self.result(
            {**record, "token": key},
            f"token {record['id']} for {username} ({expiry})\n  API token:   {key}   (shown once)",
        )

    def _list(self, *, user: str | None, **_: Any) -> None:
        now = timezone.now()
        rows = [
            {
                "id": accounts.token_id(token),
                "user": token.user.get_username(),
                "created": token.created,
                "expiry": token.expiry,
                "state": "expired" if token.expiry and token.expiry <= now else "active",
            }
            for token in accounts.token_list(username=user)
        ]
        columns = ["id", "user", "created", "expiry", "state"]
        self.result(
            rows,
            lambda: table(
                columns,
                (
                    [_time(r[c]) if c in {"created", "expiry"} else r[c] for c in columns]
                    for r in rows
                ),
            ),
        )

    def _revoke(self, *, token_ids: list[str], user: str | None, **_: Any) -> None:
        if not token_ids and user is None:
            raise CommandError("Name token ids (see `api_token list`) or --user USERNAME.")
        revoked = accounts.token_revoke(token_ids=token_ids, username=user)
        self.result({"revoked": revoked}, f"revoked {revoked} token{'' if revoked == 1 else 's'}")


def _time(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M:%SZ}" if value else "never"
