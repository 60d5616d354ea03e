"""The audit log for managers and admins: ``/api/audit``.

A record's ``details.client_ref`` (the client's code, recorded when a session is
opened) is shown only to the session's owner, as everywhere else in the API.
"""

# No `from __future__ import annotations`: FastAPI evaluates the endpoints' annotations.

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from ..auth import User
from ..deps import Service, require
from ..models import ID_PATTERN

router = APIRouter(tags=["audit"])


@router.get("/api/audit", operation_id="audit_log")
async def audit_log(
    user: Annotated[User, Depends(require("audit_log"))],
    service: Service,
    session_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
) -> list[dict[str, Any]]:
    """The newest audit records (hash-chained; verify with `penctl audit verify`)."""
    records = await service.audit_records(session_id, limit)
    owners = {s.session_id: s.therapist_id for s in service.sessions()}
    out = []
    for record in records:
        data = record.as_dict()
        details = data["details"]
        if "client_ref" in details and owners.get(record.session_id or "") != user.actor_id:
            data["details"] = {**details, "client_ref": None}
        out.append(data)
    return out
