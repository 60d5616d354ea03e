"""Ingest: MQTT telemetry and events -> InfluxDB, through a shared subscription.

Public interface: :class:`IngestWorker` (with :class:`IngestCounters`),
:class:`IngestSettings` and :func:`load_ingest_settings`; the InfluxDB schema is
in :mod:`controller.ingest.points` and docs/INFLUX_SCHEMA.md.
"""

from __future__ import annotations

from .settings import IngestSection, IngestSettings, load_ingest_settings
from .worker import IngestCounters, IngestError, IngestWorker

__all__ = [
    "IngestCounters",
    "IngestError",
    "IngestSection",
    "IngestSettings",
    "IngestWorker",
    "load_ingest_settings",
]
