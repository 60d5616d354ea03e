"""Every error of the tablet API as a :class:`Problem`: a code, what is wrong, what to do.

Refusals keep the registry's own sentences (the ones the audit log records);
HTTP errors raised by FastAPI itself and request validation failures are
rewritten into the same shape, so a tablet handles one kind of error body.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from controller.safety.gate import RefusalReason, Refused

from .models import Problem

#: Registry refusals that are not "the state does not allow it" (409).
_STATUS_FOR: dict[RefusalReason, int] = {
    RefusalReason.UNKNOWN_SESSION: 404,
    RefusalReason.UNKNOWN_PEN: 404,
    RefusalReason.ROLE_NOT_PERMITTED: 403,
    RefusalReason.NOT_SESSION_OWNER: 403,
    RefusalReason.TAKE_OVER_NEEDS_REASON: 422,
    RefusalReason.BAD_REQUEST: 422,
    RefusalReason.UNKNOWN_PLAN: 422,
    RefusalReason.UNKNOWN_ZONE: 422,
    RefusalReason.ZONE_NOT_IN_PLAN: 422,
    RefusalReason.OVERRIDE_NEEDS_REASON: 422,
}
_PROBLEM = {"model": Problem}
#: Documented for every operation of the OpenAPI document.
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _PROBLEM,
    403: _PROBLEM,
    404: _PROBLEM,
    409: _PROBLEM,
    422: _PROBLEM,
}


class ApiError(StarletteHTTPException):
    """An HTTP error whose body is a :class:`Problem`."""

    def __init__(
        self, status: int, code: str, message: str, remediation: str, **headers: str
    ) -> None:
        super().__init__(status, message, headers or None)
        self.problem = Problem(code=code, message=message, remediation=remediation)


def refusal_error(refusal: Refused) -> ApiError:
    """The registry's refusal as an API error (404, 403, 422, or 409 for the state)."""
    return ApiError(
        _STATUS_FOR.get(refusal.code, 409), str(refusal.code), refusal.message, refusal.remediation
    )


def unknown_session(session_id: str) -> ApiError:
    """404 for a session id the controller does not know."""
    return ApiError(
        404,
        str(RefusalReason.UNKNOWN_SESSION),
        f"There is no session {session_id}.",
        "Check the session id, or start a new session.",
    )


def _problem_response(
    status: int, problem: Problem, headers: Mapping[str, str] | None = None
) -> Response:
    return JSONResponse(problem.model_dump(exclude_none=True), status, headers=headers)


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Handler for every HTTP error: ours carry a Problem, FastAPI's get one."""
    if isinstance(exc, ApiError):
        return _problem_response(exc.status_code, exc.problem, exc.headers)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    problem = Problem(code=code, message=str(exc.detail), remediation="Check the request.")
    return _problem_response(exc.status_code, problem, exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> Response:
    """Handler for a request that fails validation: 422 naming every bad field."""
    errors = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        errors.append({"field": ".".join(loc), "message": str(err.get("msg", "invalid"))})
    first = errors[0] if errors else {"field": "request", "message": "invalid"}
    problem = Problem(
        code="bad_request",
        message=f"{first['field']}: {first['message']}",
        remediation="Correct the named field and send the request again.",
        errors=errors,
    )
    return _problem_response(422, problem)


def core_unavailable(error: Exception) -> ApiError:
    """The safety core could not take the request now (busy, restarting): try again."""
    return ApiError(
        503,
        "controller_unavailable",
        "The controller could not take this request right now.",
        "Try again in a moment; if it repeats, check that the controller is running.",
        **{"Retry-After": "1"},
    )
