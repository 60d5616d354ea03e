"""Ingest worker configuration: a TOML file plus ``PENCTL_`` environment variables.

Same conventions as :mod:`controller.config`: environment beats the file
(``PENCTL_INGEST__GROUP``, ``PENCTL_MQTT__HOST``, ``PENCTL_INFLUX__URL`` ...),
unknown keys are errors, and every error names its dotted key. The ``mqtt`` and
``influx`` sections are the very models the controller uses, so one set of
broker and database settings serves both services.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import InfluxSection, MqttSettings, PenctlSettings, load_toml_settings
from ..influx import InfluxSettings
from ..tls import settings_context

Stream = Literal["telemetry", "events", "status"]

_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


def default_worker_id() -> str:
    """The host name, made topic-safe: stable across restarts of the same host.

    Stability matters: the broker keeps a durable session (and the messages routed
    to it) under this id, and only a worker reconnecting with the same id gets
    them back. Run several workers on one host with explicit ids.
    """
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64]
    return name or "ingest"


class IngestSection(BaseModel):
    """The ``[ingest]`` section: the worker's own knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    worker_id: str = Field(default_factory=default_worker_id, pattern=_ID_PATTERN)
    group: str = Field(default="ingest", pattern=_ID_PATTERN, description="$share group")
    clinic: str | None = Field(
        default=None,
        pattern=_ID_PATTERN,
        description="only this clinic's devices (default: all clinics)",
    )
    streams: tuple[Stream, ...] = Field(default=("telemetry", "events", "status"), min_length=1)
    batch_messages: int = Field(default=500, ge=1, le=50_000)
    # 20k lines per /write measured ~20% faster than 5k through ingest (penctl bench ingest)
    batch_points: int = Field(default=20_000, ge=1, le=1_000_000)
    batch_seconds: float = Field(
        default=0.1, gt=0, le=60, description="the longest a batch waits for more messages"
    )
    writers: int = Field(
        # 3 measured best on the 2-core machine: 1 writer ~70 k samples/s, 2 writers
        # 90-160 k (spread by what InfluxDB does between writes), 3 writers ~184 k.
        default=3,
        ge=1,
        le=16,
        description="batches written to InfluxDB at once (InfluxDB takes more in parallel)",
    )
    receive_maximum: int = Field(
        default=2_000,
        ge=1,
        le=65_535,
        description="unacknowledged messages the broker may have in flight to us",
    )
    max_buffered: int = Field(
        default=20_000,
        ge=1,
        description="received messages held in memory before the worker drops and resyncs",
    )
    session_expiry_s: int = Field(default=86_400, ge=0, le=4_294_967_295)
    keepalive_s: int = Field(default=30, ge=5, le=3_600)
    backoff_initial_s: float = Field(default=0.1, gt=0)
    backoff_max_s: float = Field(default=5.0, gt=0)
    stats_interval_s: float = Field(default=10.0, gt=0)
    influx_timeout_s: float = Field(default=10.0, gt=0)
    retention_policy: str | None = None
    create_database: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> IngestSection:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be at least backoff_initial_s")
        if self.batch_messages > self.receive_maximum:
            # The broker stops at receive_maximum unacknowledged messages, so a larger
            # batch could never fill and every batch would wait for batch_seconds.
            raise ValueError("batch_messages must not exceed receive_maximum")
        if self.max_buffered < self.receive_maximum:
            # A broker that honours Receive Maximum must never overrun the buffer.
            raise ValueError("max_buffered must be at least receive_maximum")
        return self


class IngestSettings(PenctlSettings):
    """Everything ``penctl ingest`` needs; see the module docstring for sources."""

    state_dir: Path = Path("var/ingest")
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    influx: InfluxSection = Field(default_factory=InfluxSection)
    ingest: IngestSection = Field(default_factory=IngestSection)

    def influx_settings(self) -> InfluxSettings:
        """The client settings of :mod:`controller.influx` for this worker."""
        return InfluxSettings(
            url=self.influx.url,
            database=self.influx.database,
            username=self.influx.username,
            password=self.influx.password,
            token=self.influx.token,
            retention_policy=self.ingest.retention_policy,
            timeout=self.ingest.influx_timeout_s,
            verify=settings_context(self.influx.tls) or True,
        )


def load_ingest_settings(path: Path | None = None, **overrides: Any) -> IngestSettings:
    """The worker's settings (see controller.config.load_toml_settings)."""
    return load_toml_settings(IngestSettings, path, **overrides)
