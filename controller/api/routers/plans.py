"""Treatment plans and zones with the policy's limits: ``/api/plans``, ``/api/zones``."""

# No `from __future__ import annotations`: FastAPI evaluates the endpoints' annotations.

from typing import Annotated

from fastapi import APIRouter, Depends

from controller.policy import ZoneLimits

from ..auth import User
from ..deps import Service, require
from ..models import PlanInfo, ZoneInfo

router = APIRouter(tags=["plans"])


def _zone_info(z: ZoneLimits) -> ZoneInfo:
    return ZoneInfo(
        zone_id=z.zone_id,
        label=z.label,
        max_depth_um=z.max_depth_um,
        max_passes=z.max_passes,
        puncture_budget=z.puncture_budget,
    )


@router.get("/api/plans", operation_id="list_plans")
async def list_plans(
    user: Annotated[User, Depends(require("list_plans"))], service: Service
) -> list[PlanInfo]:
    """Treatment plans and their zones with the policy's limits."""
    zones = service.zones()
    return [
        PlanInfo(plan_id=p.plan_id, label=p.label, zones=[_zone_info(zones[z]) for z in p.zone_ids])
        for p in service.plans()
    ]


@router.get("/api/zones", operation_id="list_zones")
async def list_zones(
    user: Annotated[User, Depends(require("list_zones"))], service: Service
) -> list[ZoneInfo]:
    return [_zone_info(z) for z in service.zones().values()]
