"""The safety core: a pure gate for every pen command and a pure telemetry monitor.

* :func:`check_command` ``(GateContext, Message) -> Allowed | Refused``
* :func:`check_telemetry` ``(GateContext, Telemetry) -> StopDecision | None``

Neither reads a clock, a file or a socket; both decide from their arguments only.
"""

from .context import (
    USABLE_CARTRIDGES,
    CartridgeStatus,
    GateContext,
    LinkStatus,
    SafetyLimits,
    SessionState,
    ZoneContext,
)
from .gate import (
    ALLOWED,
    GATE_REASONS,
    Allowed,
    GateDecision,
    RefusalReason,
    Refused,
    arming_refusal,
    check_command,
    format_mm,
)
from .monitor import StopDecision, check_telemetry

__all__ = [
    "ALLOWED",
    "GATE_REASONS",
    "USABLE_CARTRIDGES",
    "Allowed",
    "CartridgeStatus",
    "GateContext",
    "GateDecision",
    "LinkStatus",
    "RefusalReason",
    "Refused",
    "SafetyLimits",
    "SessionState",
    "StopDecision",
    "ZoneContext",
    "arming_refusal",
    "check_command",
    "check_telemetry",
    "format_mm",
]
