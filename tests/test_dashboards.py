"""Every panel query of every dashboard runs against a real InfluxDB holding a clinic day.

The clinic day is real: the demo's scripted therapists drive simulated pens through
the controller, a real broker and an ingest worker into a real influxd (sessions
that end, a refusal, a depth-overshoot fault, a manager override). Then each query
of each dashboard JSON, with Grafana's macros and variables substituted, must
answer without error and with data.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from controller.influx import InfluxClient, InfluxError, InfluxSettings
from devtools.demo import Demo
from devtools.stack.processes import ServerProcess

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
DATASOURCE_UID = "pen-influx"
EXPECTED = {"clinic_overview.json", "session_detail.json", "pen_health.json", "safety_events.json"}


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    query: str


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted((DASHBOARDS / "json").glob("*.json"))}


def panel_queries() -> list[PanelQuery]:
    out = []
    for name, board in dashboards().items():
        panels = list(board["panels"])
        while panels:
            panel = panels.pop()
            panels += panel.get("panels", [])  # panels inside collapsed rows
            for target in panel.get("targets", []):
                out.append(PanelQuery(name, panel["title"], target["refId"], target["query"]))
    return out


def substitute(query: str, variables: dict[str, str]) -> str:
    """Grafana's macros as Grafana would expand them for the last day."""
    query = query.replace("$timeFilter", "time > now() - 1d").replace("$__interval", "10s")
    for name, value in variables.items():
        query = query.replace(f"${name}", value)
    assert not re.search(r"\$(?!tag_)\w", query), f"unsubstituted macro in {query}"
    return query


def has_data(series: list[dict[str, Any]]) -> bool:
    return any(any(v is not None for v in row[1:]) for s in series for row in s.get("values", []))


def test_provisioning_files_fit_together() -> None:
    datasource = yaml.safe_load(
        (DASHBOARDS / "provisioning" / "datasources" / "influxdb.yaml").read_text()
    )["datasources"][0]
    assert datasource["uid"] == DATASOURCE_UID
    assert datasource["type"] == "influxdb" and datasource["jsonData"]["dbName"] == "pen"
    provider = yaml.safe_load(
        (DASHBOARDS / "provisioning" / "dashboards" / "provider.yaml").read_text()
    )["providers"][0]
    assert provider["type"] == "file"
    boards = dashboards()
    assert set(boards) == EXPECTED
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    for name, board in boards.items():
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == DATASOURCE_UID, (name, panel["title"])
            assert panel["targets"], (name, panel["title"])
            for target in panel["targets"]:
                assert target["rawQuery"] is True and target["query"].strip()
                assert target["datasource"]["uid"] == DATASOURCE_UID


async def test_every_panel_query_returns_data(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{influxd.port}"
    demo = Demo(
        state_dir=tmp_path / "demo",
        pens=3,
        seed="dashboards",
        plan="stretch_marks",  # one zone per session: several sessions end within a minute
        external_servers=(mosquitto.port, url),
    )
    queries = panel_queries()
    assert len(queries) >= 20
    run = asyncio.create_task(demo.run())
    started = time.monotonic()
    problems: dict[PanelQuery, str] = {}
    try:
        async with InfluxClient(InfluxSettings(url=url, timeout=5)) as client:
            deadline = started + 150
            while True:
                assert not run.done(), "the demo stopped early"
                problems = await check_all(client, queries)
                if not problems or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)
    finally:
        demo.stop()
        assert await asyncio.wait_for(run, 60) == 0
    assert not problems, "\n".join(
        f"{q.dashboard} / {q.panel} / {q.ref}: {why}\n    {q.query}" for q, why in problems.items()
    )
    print(
        f"all {len(queries)} panel queries answered with data after "
        f"{time.monotonic() - started:.1f} s of clinic day"
    )


async def check_all(client: InfluxClient, queries: list[PanelQuery]) -> dict[PanelQuery, str]:
    """Run every query; what is wrong with each that failed (empty: all good)."""
    problems: dict[PanelQuery, str] = {}
    variables: dict[str, str] = {}
    try:
        variables = await variable_values(client)
    except (InfluxError, LookupError) as exc:
        return {q: f"template variables: {exc!r}" for q in queries}
    for q in queries:
        try:
            series = await client.query(substitute(q.query, variables))
        except InfluxError as exc:
            problems[q] = f"error: {exc}"
            continue
        if not has_data(series):
            problems[q] = "no data"
    return problems


async def variable_values(client: InfluxClient) -> dict[str, str]:
    """Run each dashboard's variable query and pick a value the way a manager would."""
    values: dict[str, str] = {}
    for board in dashboards().values():
        for var in board.get("templating", {}).get("list", []):
            query = substitute(var["query"], {})
            series = await client.query(query)
            found = [row[-1] for s in series for row in s.get("values", []) if row[-1]]
            if not found:
                raise LookupError(f"variable {var['name']} has no values: {query}")
            if var.get("multi"):
                # Grafana expands a multi-value variable in a regex as (a|b|...).
                values[var["name"]] = "(" + "|".join(re.escape(v) for v in found) + ")"
            else:
                values[var["name"]] = found[0]  # the first session of the day
    return values


async def test_gap_panels_see_a_lost_stream_start_and_lost_events(
    influxd: ServerProcess,
) -> None:
    """Batches 0-2 of a pen's telemetry never arrived (the start of its stream), and
    event 2 is missing: the pen-health panels must show both."""
    t0 = (time.time_ns() // 10**9 - 600) * 10**9
    lines = [
        f"telemetry_batches,clinic=c,device=PEN-G seq={seq}i,samples=10i {t0 + seq * 10**8}"
        for seq in range(3, 10)
    ] + [
        f'events,clinic=c,device=PEN-G,kind=pass_ended seq={seq}i,zone="x" {t0 + seq}'
        for seq in (0, 1, 3, 4)
    ]
    queries = {
        q.panel + "/" + q.ref: substitute(q.query, {"device": "PEN-G"})
        for q in panel_queries()
        if q.dashboard == "pen_health.json" and ("missing" in q.panel or "jumps" in q.panel)
    }
    async with InfluxClient(InfluxSettings(url=f"http://127.0.0.1:{influxd.port}")) as client:
        await client.create_database()
        await client.write(lines)
        answers = {name: await client.query(query) for name, query in queries.items()}
    missing = {
        name: dict(zip(s["columns"], s["values"][0], strict=True))
        for name, series in answers.items()
        if "missing" in name
        for s in series
    }
    assert missing["Messages missing since each stream began/A"]["telemetry missing"] == 3
    assert missing["Messages missing since each stream began/A"]["telemetry first seq kept"] == 3
    assert missing["Messages missing since each stream began/B"]["events missing"] == 1
    jumps = {
        name: max(v[1] for s in series for v in s["values"] if v[1] is not None)
        for name, series in answers.items()
        if "jumps" in name
    }
    assert jumps == {
        "Sequence jumps: telemetry and events (1 = no gap)/A": 1,
        "Sequence jumps: telemetry and events (1 = no gap)/B": 2,
    }
