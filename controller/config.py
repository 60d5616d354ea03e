"""Service configuration: a TOML file plus environment variables, validated at start.

Precedence, highest first: environment (``PENCTL_`` prefix, ``__`` between
levels, e.g. ``PENCTL_MQTT__HOST``), then the TOML file, then defaults. Unknown
keys are errors, so a typo fails the start instead of silently using a default,
and every error message names the key (``mqtt.port: ...``).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .tls import TlsError, client_context, server_context

#: The shortest clinic secret accepted for pseudonyms (telemetry.events.Pseudonymizer).
PSEUDONYM_KEY_MIN_CHARS = 32


class ConfigError(ValueError):
    """The configuration cannot be used; the message names every bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PenEndpoint(_Section):
    url: str = Field(min_length=1, description="device path or socket://host:port")
    name: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9_.:-]{0,64}$",
        description="a room or station label (letters, digits, '.', '_', ':', '-'); the pen's "
        "name in the API and the registry",
    )
    expected_serial: str | None = Field(
        default=None, description="refuse any other pen on this port"
    )


class LinkSettings(_Section):
    baudrate: int = Field(default=1_000_000, gt=0)
    lease_ms: int = Field(default=250, ge=50, le=2000)
    reconnect_max_s: float = Field(default=5.0, gt=0)


class TlsClientSettings(_Section):
    """TLS to a server we connect to (the MQTT broker, InfluxDB): verified by default.

    ``ca_file``: the CA that signed the server's certificate (None: the system's
    CAs). ``certfile``/``keyfile``: our client certificate, for a server that asks
    for one. ``verify = false`` is for a laboratory only: anyone on the path could
    then read and change the traffic.
    """

    ca_file: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    verify: bool = True

    @model_validator(mode="after")
    def _usable(self) -> TlsClientSettings:
        try:
            client_context(
                self.ca_file, certfile=self.certfile, keyfile=self.keyfile, verify=self.verify
            )
        except TlsError as exc:
            raise ValueError(str(exc)) from exc
        return self


class MqttSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    tls: TlsClientSettings | None = Field(
        default=None,
        description="connect over TLS (port 8883 by convention); per-clinic credentials in "
        "username/password or a client certificate",
    )
    topic_root: str = Field(default="pen/v1", min_length=1)
    batch_interval_s: float = Field(
        default=0.05, gt=0, le=5, description="telemetry committed and bundled this often"
    )
    status_interval_s: float = Field(
        default=10.0, gt=0, le=3600, description="pen statuses republished this often"
    )
    ack_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="publish again what ingest has not acknowledged after this long "
        "(doubling up to ack_timeout_max_s while nothing is acknowledged)",
    )
    ack_timeout_max_s: float = Field(default=60.0, gt=0, le=86_400)
    reorder_s: float = Field(
        default=2.0,
        gt=0,
        le=600,
        description="a message still unacknowledged this long after a later one was "
        "acknowledged is published again",
    )
    max_in_flight: int = Field(
        default=5_000, ge=1, le=1_000_000, description="outbox messages unacknowledged at once"
    )

    @model_validator(mode="after")
    def _timeouts_ordered(self) -> MqttSettings:
        if self.ack_timeout_max_s < self.ack_timeout_s:
            raise ValueError("ack_timeout_max_s must be at least ack_timeout_s")
        return self


class InfluxSection(_Section):
    url: str = Field(default="http://127.0.0.1:8086", pattern=r"^https?://")
    database: str = Field(default="pen", min_length=1)
    username: str | None = None
    password: str | None = None
    token: str | None = None
    tls: TlsClientSettings | None = Field(
        default=None, description="how to verify an https:// url (default: the system's CAs)"
    )

    @model_validator(mode="after")
    def _tls_needs_https(self) -> InfluxSection:
        if self.tls is not None and not self.url.startswith("https://"):
            raise ValueError("tls is set but url is not https://: use an https:// url")
        return self


class ApiSettings(_Section):
    """The tablet API: address, users, sign-in, tokens, TLS and the limits at its edge.

    The defaults and why are in docs/SECURITY.md.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    users_file: Path | None = Field(
        default=None, description="TOML/JSON users with Argon2 hashes (controller.api.auth)"
    )
    demo_users: bool = Field(
        default=False, description="also accept the documented demo users (never in a clinic)"
    )
    # -- tokens: short, renewable, with an absolute maximum (a working day) --
    token_lifetime_s: float = Field(default=3600.0, gt=0, le=7 * 86400)
    token_max_age_s: float = Field(default=12 * 3600.0, gt=0, le=30 * 86400)
    # -- sign-in limits (controller/api/signin.py) --
    login_attempts_per_minute: int = Field(
        default=5, ge=1, le=1000, description="failures per minute for one name from one address"
    )
    login_failures_per_source_per_minute: int = Field(default=10, ge=1, le=10_000)
    login_account_ceiling: int = Field(
        default=20, ge=1, le=100_000, description="failures in 15 min before delays start"
    )
    login_delay_cap_s: float = Field(default=60.0, gt=0, le=3600)
    # -- who may say who the client is (X-Forwarded-For / Forwarded) --
    trusted_proxies: list[IPvAnyNetwork] = Field(
        default_factory=list, description="proxy addresses whose forwarded headers are believed"
    )
    # -- HTTPS: both or neither; `penctl tls` makes a clinic CA and a server certificate --
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    # -- what the API shows --
    docs_enabled: bool = Field(
        default=False, description="serve /docs (Swagger UI, no CDN) and /openapi.json"
    )
    # -- limits at the edge (issue 12.3) --
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_header_bytes: int = Field(default=8 * 1024, ge=1024, le=1024 * 1024)
    ws_max_message_bytes: int = Field(default=4 * 1024, ge=256, le=1024 * 1024)
    request_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="to receive a request's headers and body"
    )
    ws_auth_timeout_s: float = Field(default=1.0, gt=0, le=30)
    max_unauthenticated_ws: int = Field(default=16, ge=1, le=10_000)
    max_connections: int = Field(default=256, ge=8, le=100_000)

    @model_validator(mode="after")
    def _tls_pair(self) -> ApiSettings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            missing = "tls_keyfile" if self.tls_keyfile is None else "tls_certfile"
            raise ValueError(f"{missing} is missing: give api.tls_certfile and api.tls_keyfile")
        if self.tls_certfile is not None and self.tls_keyfile is not None:
            try:
                server_context(self.tls_certfile, self.tls_keyfile)
            except TlsError as exc:
                raise ValueError(str(exc)) from exc
        return self


class PenctlSettings(BaseSettings):
    """Base of every penctl command's settings: ``PENCTL_`` environment over TOML file."""

    model_config = SettingsConfigDict(
        env_prefix="PENCTL_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file (passed as init values by load_toml_settings).
        return (env_settings, init_settings)


SettingsT = TypeVar("SettingsT", bound=PenctlSettings)


def load_toml_settings(
    cls: type[SettingsT], path: Path | None = None, **overrides: Any
) -> SettingsT:
    """Read the TOML file (if any), apply overrides and the environment, validate.

    ``overrides`` are top-level keys (``state_dir=...``) or whole sections given as
    dicts, merged into the file's section (``mqtt={"port": 1884}``).
    Raises ConfigError naming every bad key.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    try:
        return cls(**data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source=str(path or "settings"))) from exc


class ServiceSettings(PenctlSettings):
    """Everything `penctl serve` needs; see the module docstring for sources."""

    clinic_id: str = Field(default="clinic-0001", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    controller_id: str = Field(
        default="controller-1",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="this controller among the clinic's (MQTT topics, acknowledgements)",
    )
    pseudonym_key: SecretStr | None = Field(
        default=None,
        description="the clinic's secret for pseudonymising client references before MQTT "
        "(HMAC-SHA256); the same on every controller of the clinic, e.g. "
        "`openssl rand -hex 32`. Unset: a key generated once in state_dir/pseudonym.key",
    )
    state_dir: Path = Path("var/controller")
    policy_file: Path | None = None
    pens: list[PenEndpoint] = Field(default_factory=list)
    core_cpus: list[int] = Field(
        default_factory=list,
        description="CPUs the safety core runs on alone (empty: anywhere); the edge "
        "process it starts runs on the others",
    )
    link: LinkSettings = Field(default_factory=LinkSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    influx: InfluxSection = Field(default_factory=InfluxSection)
    api: ApiSettings = Field(default_factory=ApiSettings)

    @property
    def runs_edge(self) -> bool:
        """Whether the core starts the edge process: the tablet API or MQTT is on."""
        return self.api.enabled or self.mqtt.enabled

    @field_validator("core_cpus")
    @classmethod
    def _cpus_exist(cls, cpus: list[int]) -> list[int]:
        # The machine's CPUs, not this process's: the edge reads these settings too,
        # running on the CPUs the core left it.
        usable = list(range(os.cpu_count() or 1))
        missing = sorted(set(cpus) - set(usable))
        if missing:
            raise ValueError(f"CPU(s) {missing} are not available here: choose among {usable}")
        return sorted(set(cpus))

    @field_validator("pseudonym_key")
    @classmethod
    def _key_strong_enough(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and len(key.get_secret_value()) < PSEUDONYM_KEY_MIN_CHARS:
            raise ValueError(
                f"the clinic's secret needs at least {PSEUDONYM_KEY_MIN_CHARS} characters "
                f"(e.g. `openssl rand -hex 32`), this one has {len(key.get_secret_value())}"
            )
        return key


def load_settings(path: Path | None = None, **overrides: Any) -> ServiceSettings:
    """The controller's settings (see load_toml_settings). ConfigError if bad."""
    return load_toml_settings(ServiceSettings, path, **overrides)


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem, each naming the dotted key, for humans."""
    lines = [f"{source}: {exc.error_count()} configuration error(s)"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling)"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)
