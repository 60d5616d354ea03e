"""Errors that cross the controller's stages, each carrying what its caller needs."""

from __future__ import annotations

from controller.safety.gate import Refused


class ActionRefused(Exception):  # noqa: N818 - it is an answer, not a bug
    """The registry refused an action; ``refusal`` says why in the therapist's words."""

    def __init__(self, refusal: Refused) -> None:
        super().__init__(f"{refusal.message} {refusal.remediation}")
        self.refusal = refusal


class CoreUnavailableError(Exception):
    """The safety core cannot be reached from the edge now (restarting, not connected)."""


class CoreBusyError(Exception):
    """The safety core answered "busy": too many requests at once; try again shortly."""
