"""The therapist's web page: ``/`` and its files under ``/static``."""

# No `from __future__ import annotations`: FastAPI evaluates the endpoints' annotations.

from importlib import resources

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = resources.files("controller.api") / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(str(STATIC / "index.html"), media_type="text/html")


def mount_static(app: FastAPI) -> None:
    """Serve the page's scripts and styles (a mount, which a router cannot carry)."""
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
