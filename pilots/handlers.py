"""The pilot workload on the execution engine (DiracX's task graph). Periodic jobs hold a
(class, vo) mutex when VO-aware, a class-level one otherwise; submit_pilot holds
MutexLock("pilot", ce). None retries and none is dead-letter eligible: the next cycle redoes."""

from __future__ import annotations

from typing import Any

from pilots import services
from tasks.locks import MutexLock
from tasks.registry import TaskContext, register
from tasks.retry import RetrySpec

ONE_SHOT = RetrySpec(policy="none", dead_letter=False)


@register(
    "pilots.submit_pilots",
    retry=ONE_SHOT,
    locks=lambda data: [MutexLock("pilots.submit_pilots", data["vo"])],
)
def submit_pilots(ctx: TaskContext) -> dict[str, Any]:
    return {
        "vo": ctx.data["vo"],
        "submit_tasks": services.submit_pilots_for_vo(vo_name=ctx.data["vo"]),
    }


@register(
    "pilots.submit_pilot", retry=ONE_SHOT, locks=lambda data: [MutexLock("pilot", data["ce"])]
)
def submit_pilot(ctx: TaskContext) -> dict[str, Any]:
    try:
        pilot = services.pilot_submit(
            ce_name=ctx.data["ce"], vo_name=ctx.data["vo"], actor="submit_pilot"
        )
    except services.NoFreeSlot as exc:
        # Not a failure: the slot was taken since the cycle counted it.
        return {"skipped": exc.message}
    return {"pilot": str(pilot.id), "status": pilot.status, "external_id": pilot.external_id}


@register(
    "pilots.check_pilots",
    retry=ONE_SHOT,
    locks=lambda data: [MutexLock("pilots.check_pilots", data["vo"])],
)
def check_pilots(ctx: TaskContext) -> dict[str, Any]:
    return {"vo": ctx.data["vo"], "moved": services.check_pilots_for_vo(vo_name=ctx.data["vo"])}


@register(
    "pilots.pilot_report", retry=ONE_SHOT, locks=lambda data: [MutexLock("pilots.pilot_report")]
)
def pilot_report(ctx: TaskContext) -> dict[str, Any]:
    report = services.pilot_report_create()
    return {"report": report.id, "by_status": report.by_status}
