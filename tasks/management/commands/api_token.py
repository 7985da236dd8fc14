from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError, CommandParser
from django.utils import timezone

from tasks import accounts
from tasks.management.commands._base import SubcommandCommand


class Command(SubcommandCommand):
    help = (
        "API tokens: create (the key is printed once; only its digest is stored), list (ids, "
        "never keys), revoke. A token is named by its id, as `list` shows it. "
        "`manage.py api_token <action> --help` for each."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        create = sub.add_parser("create", help="Issue a new token to an existing account.")
        create.add_argument("username")
        create.add_argument(
            "--expires-in",
            metavar="DURATION",
            help="Refused after this long (90d, 12h, 30m, 45s, 2w); default: never.",
        )
        listing = sub.add_parser("list", help="Tokens with their account, creation and expiry.")
        listing.add_argument("--user", metavar="USERNAME", help="Only this account's tokens.")
        revoke = sub.add_parser("revoke", help="Revoke tokens: refused (401) from then on.")
        revoke.add_argument("token_ids", nargs="*", metavar="TOKEN_ID")
        revoke.add_argument("--user", metavar="USERNAME", help="Every token of this account.")

    def _create(self, *, username: str, expires_in: str | None, **_: Any) -> None:
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No account {username!r}; `manage.py create_api_user` makes one.")
        lifetime = accounts.parse_expires_in(expires_in) if expires_in else None
        token, key = accounts.token_create(user=user, expires_in=lifetime)
        expiry = f"expires {token.expiry:%Y-%m-%d %H:%M:%SZ}" if token.expiry else "no expiry"
        self.stdout.write(f"token {accounts.token_id(token)} for {username} ({expiry})")
        self.stdout.write(f"  API token:   {key}   (shown once)")

    def _list(self, *, user: str | None, **_: Any) -> None:
        now = timezone.now()
        self.stdout.write(f"{'id':14} {'account':24} {'created':20} {'expires':20} state")
        for token in accounts.token_list(username=user):
            expires = f"{token.expiry:%Y-%m-%d %H:%M:%SZ}" if token.expiry else "never"
            state = "expired" if token.expiry and token.expiry <= now else "active"
            self.stdout.write(
                f"{accounts.token_id(token):14} {token.user.get_username():24} "
                f"{token.created:%Y-%m-%d %H:%M:%SZ}  {expires:20} {state}"
            )

    def _revoke(self, *, token_ids: list[str], user: str | None, **_: Any) -> None:
        if not token_ids and user is None:
            raise CommandError("Name token ids (see `api_token list`) or --user USERNAME.")
        revoked = accounts.token_revoke(token_ids=token_ids, username=user)
        self.stdout.write(f"revoked {revoked} token{'' if revoked == 1 else 's'}")
