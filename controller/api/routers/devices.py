"""The configured pens: ``/api/devices``."""

# No `from __future__ import annotations`: FastAPI evaluates the endpoints' annotations.

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam

from ..auth import User
from ..deps import ControllerApi, Service, require
from ..errors import ApiError
from ..models import PORT_PATTERN, DeviceInfo

router = APIRouter(tags=["devices"])

Port = Annotated[str, PathParam(pattern=PORT_PATTERN, description="pen name (see /api/devices)")]


@router.get("/api/devices", operation_id="list_devices")
async def list_devices(
    user: Annotated[User, Depends(require("list_devices"))], service: Service
) -> list[DeviceInfo]:
    """Every configured pen: identity, link, arming, cartridge, session, link statistics."""
    return [DeviceInfo(**d) for d in service.devices()]


def _device(service: ControllerApi, port: str) -> DeviceInfo:
    for d in service.devices():
        if d["port"] == port:
            return DeviceInfo(**d)
    names = ", ".join(sorted(d["port"] for d in service.devices()))
    todo = f"Pick one of the clinic's pens: {names}."
    raise ApiError(404, "unknown_device", f"There is no pen {port}.", todo)


@router.get("/api/devices/{port}", operation_id="get_device")
async def get_device(
    port: Port, user: Annotated[User, Depends(require("get_device"))], service: Service
) -> DeviceInfo:
    return _device(service, port)


@router.get("/api/devices/{port}/link", operation_id="get_device_link")
async def get_device_link(
    port: Port, user: Annotated[User, Depends(require("get_device_link"))], service: Service
) -> dict[str, Any]:
    """Link statistics: frames, CRC errors, retransmits, round-trip time."""
    return _device(service, port).link_stats
