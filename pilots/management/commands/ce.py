from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from pilots import selectors, services
from pilots.models import CEStatus, ComputeElement
from pilots.serializers import (
    ComputeElementSerializer,
    ComputeElementUpdateSerializer,
    PilotSerializer,
)
from tasks.management.commands._base import SubcommandCommand, fields_table, table
from tasks.management.commands._fields import (
    add_field_options,
    field_values,
    require_some,
    validated,
    writable,
)

NAME = {"name": "NAME"}
CE_NAME = "The compute element's name."
LIST_COLUMNS = ["name", "status", "capacity", "active_pilots", "free_slots", "vos", "backend"]
STATUS_ACTIONS = {
    "drain": (CEStatus.DRAINING, "No new pilots; running ones finish."),
    "ban": (CEStatus.BANNED, "No new pilots; SUBMITTED ones are failed."),
    "activate": (CEStatus.ACTIVE, "Take new pilots again."),
}


def _fields() -> list[str]:
    return writable(ComputeElementSerializer, exclude=["name"])


class Command(SubcommandCommand):
    help = (
        "Compute elements (where pilots run): list, show, create, update, delete, drain, ban, "
        "activate, submit one pilot now. Options of create and update are the API's fields "
        "(/api/compute-elements/). `manage.py ce ACTION --help` for each."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = self.subcommands(parser)
        self.action(sub, "list", "CEs with status, capacity, active and free slots, VOs.")
        self._named(sub, "show", "One CE.")
        create = self._named(sub, "create", "Create a CE (ACTIVE).")
        add_field_options(create, ComputeElementSerializer, _fields(), updating=False)
        update = self._named(sub, "update", "Change a CE (its status moves by drain/ban/activate).")
        add_field_options(update, ComputeElementUpdateSerializer, _fields(), updating=True)
        self._named(sub, "delete", "Delete a CE with no pilots on record (else drain or ban it).")
        for name, (_, text) in STATUS_ACTIONS.items():
            self._named(sub, name, text)
        submit = self._named(sub, "submit", "Submit one pilot now (refused without a free slot).")
        submit.add_argument("--vo", required=True, metavar="NAME", help="The pilot's VO.")

    def _named(self, sub: Any, name: str, text: str) -> CommandParser:
        cmd = self.action(sub, name, text)
        cmd.add_argument("name", metavar="NAME", help=CE_NAME)
        return cmd

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        if action in STATUS_ACTIONS:
            self._set_status(options["name"], STATUS_ACTIONS[action][0])
        else:
            super().handle(*args, action=action, **options)

    def _get(self, name: str) -> ComputeElement:
        ce = ComputeElement.objects.prefetch_related("vos").filter(name=name).first()
        if ce is None:
            raise CommandError(f"Compute element {name!r} does not exist.")
        return ce

    def _data(self, ces: Any, *, many: bool = False) -> Any:
        context = {"active": selectors.active_pilots_by_ce()}
        return ComputeElementSerializer(ces, many=many, context=context).data

    def _list(self, **_: Any) -> None:
        rows = self._data(
            ComputeElement.objects.prefetch_related("vos").order_by("name"), many=True
        )
        self.result(rows, lambda: table(LIST_COLUMNS, ([r[c] for c in LIST_COLUMNS] for r in rows)))

    def _show(self, *, name: str, **_: Any) -> None:
        record = self._data(self._get(name))
        self.result(record, lambda: fields_table(record))

    def _create(self, *, name: str, **options: Any) -> None:
        body = {"name": name, **field_values(options, ComputeElementSerializer, _fields())}
        fields = validated(ComputeElementSerializer, body, context={"active": {}}, labels=NAME)
        ce = services.ce_create(**fields)
        self.result(self._data(ce), f"created CE {ce.name}")

    def _update(self, *, name: str, **options: Any) -> None:
        ce = self._get(name)
        body = field_values(options, ComputeElementUpdateSerializer, _fields())
        require_some(body, _fields())
        changes = validated(
            ComputeElementUpdateSerializer, body, instance=ce, context={"active": {}}, labels=NAME
        )
        ce = services.ce_update(ce=ce, **changes)
        self.result(self._data(ce), f"updated CE {ce.name}")

    def _delete(self, *, name: str, **_: Any) -> None:
        services.ce_delete(name=name)
        self.result({"name": name, "deleted": True}, f"deleted CE {name}")

    def _set_status(self, name: str, to_status: str) -> None:
        ce = services.ce_set_status(name=name, to_status=to_status, actor="cli")
        self.result(self._data(ce), f"{ce.name}: {ce.status}")

    def _submit(self, *, name: str, vo: str, **_: Any) -> None:
        pilot = services.pilot_submit(ce_name=name, vo_name=vo, actor="cli")
        self.result(
            PilotSerializer(pilot).data,
            f"pilot {pilot.id}: {pilot.status} {pilot.external_id or pilot.failure_reason}",
        )
