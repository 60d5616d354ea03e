"""The manager's charts, from InfluxDB: what the page draws instead of opening Grafana.

The API asks InfluxDB (through ``controller.influx.InfluxClient``, InfluxQL on the
v1 ``/query``) and hands the page plain rows; the browser never talks to the
database. The measurements and their tags are those of docs/INFLUX_SCHEMA.md,
and the queries are the Grafana dashboards' own (dashboards/json/), over the
last ``days`` days.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from controller.influx import InfluxClient, InfluxSettings

#: Safety event kinds the chart shows, in its order (the ``kind`` tag of ``safety``).
SAFETY_KINDS = ("refused", "stop_sent", "fault", "override_applied")


def _since(days: int) -> str:
    return f"time > now() - {int(days)}d"


def queries(days: int) -> dict[str, str]:
    """Every InfluxQL statement the charts run, by name."""
    since = _since(days)
    return {
        "sessions": (
            'SELECT COUNT("session") FROM "sessions" WHERE "kind" = \'session_created\' '
            f"AND {since} GROUP BY time(1d) fill(0)"
        ),
        "passes": (
            'SELECT COUNT("seq") FROM "zones" WHERE "kind" = \'pass_ended\' '
            f'AND {since} GROUP BY "zone"'
        ),
        "peak": (
            'SELECT MAX("peak_depth_um") FROM "zones" WHERE "kind" = \'pass_ended\' '
            f'AND {since} GROUP BY "zone"'
        ),
        "setting": (
            'SELECT MAX("depth_um") FROM "zones" WHERE "kind" = \'depth_set\' '
            f'AND {since} GROUP BY "zone"'
        ),
        "limit": (
            'SELECT MAX("max_depth_um") FROM "zones" WHERE "kind" = \'zone_selected\' '
            f'AND {since} GROUP BY "zone"'
        ),
        "safety": (
            f'SELECT COUNT("seq") FROM "safety" WHERE {since} GROUP BY time(1d), "kind" fill(0)'
        ),
    }


def _by_tag(series: list[dict[str, Any]], tag: str) -> dict[str, float]:
    """``{tag value: the single value}`` of a query grouped by ``tag`` only."""
    out: dict[str, float] = {}
    for s in series:
        values = s.get("values") or []
        if values and values[0][1] is not None:
            out[str(s.get("tags", {}).get(tag, ""))] = float(values[0][1])
    return out


async def charts(settings: InfluxSettings, days: int) -> dict[str, Any]:
    """Sessions per day, passes per zone, depth used against each zone's limit and
    safety events per day, over the last ``days`` days. InfluxError if the database
    cannot answer."""
    q = queries(days)
    # Building the HTTP client loads a TLS trust store: tens of milliseconds of disk and
    # CPU that must not stall the pens' event loop, so it is built on a worker thread.
    client = await asyncio.to_thread(InfluxClient, settings)
    async with client:
        names = list(q)
        answers = await asyncio.gather(*(client.query(q[n], epoch="s") for n in names))
    result = dict(zip(names, answers, strict=True))
    sessions = [
        {"t": int(t), "sessions": int(v or 0)}
        for s in result["sessions"]
        for t, v in s.get("values") or []
    ]
    passes = _by_tag(result["passes"], "zone")
    peak, setting, limit = (_by_tag(result[n], "zone") for n in ("peak", "setting", "limit"))
    zones = sorted(set(passes) | set(peak) | set(setting) | set(limit))
    safety: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(SAFETY_KINDS, 0))
    for s in result["safety"]:
        kind = str(s.get("tags", {}).get("kind", ""))
        for t, v in s.get("values") or []:
            row = safety[int(t)]
            if kind in row:
                row[kind] = int(v or 0)
    return {
        "days": days,
        "sessions_per_day": sessions,
        "passes_per_zone": [{"zone": z, "passes": int(passes.get(z, 0))} for z in zones],
        "depth_per_zone": [
            {
                "zone": z,
                "deepest_pass_um": _int_or_none(peak.get(z)),
                "deepest_setting_um": _int_or_none(setting.get(z)),
                "limit_um": _int_or_none(limit.get(z)),
            }
            for z in zones
        ],
        "safety_events": [{"t": t, **safety[t]} for t in sorted(safety)],
    }


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)
