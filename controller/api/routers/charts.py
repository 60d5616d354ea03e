"""The manager's charts from InfluxDB: ``/api/charts`` (queries: ``controller/api/charts.py``)."""

# No `from __future__ import annotations`: FastAPI evaluates the endpoints' annotations.

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from starlette.requests import HTTPConnection

from controller.influx import InfluxError, InfluxSettings

from ..auth import User
from ..charts import charts as read_charts
from ..deps import require
from ..models import Problem
from ..views import Charts

router = APIRouter(tags=["charts"])


def get_influx(connection: HTTPConnection) -> InfluxSettings | None:
    """Where the charts' data lives (None: the API was started without InfluxDB)."""
    settings: InfluxSettings | None = connection.app.state.influx
    return settings


@router.get("/api/charts", operation_id="charts")
async def charts(
    user: Annotated[User, Depends(require("charts"))],
    influx: Annotated[InfluxSettings | None, Depends(get_influx)],
    days: Annotated[int, Query(ge=1, le=366, description="how many days back")] = 7,
) -> Charts:
    """Sessions per day, passes per zone, depth used against each zone's limit and safety
    events per day, from InfluxDB (the Grafana dashboards' own queries).

    Without an InfluxDB, or when it does not answer, the lists are empty and
    ``unavailable`` says why (the database is not the request's fault: never a 5xx).
    """
    if influx is None:
        return Charts(
            days=days,
            unavailable=Problem(
                code="charts_unavailable",
                message="This controller has no InfluxDB to draw the charts from.",
                remediation="Ask an administrator to configure [influx] for the controller.",
            ),
        )
    try:
        data = await read_charts(influx, days)
    except InfluxError as exc:
        return Charts(
            days=days,
            unavailable=Problem(
                code="charts_unavailable",
                message=f"InfluxDB did not answer: {exc}",
                remediation="Try again in a minute; if it repeats, ask an administrator "
                "to check InfluxDB.",
            ),
        )
    return Charts(**data)
