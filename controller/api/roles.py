"""Who may call what: the tablet API's whole role matrix, in one table.

Keys are the endpoints' OpenAPI ``operationId``s (and ``live`` for the WebSocket).
Every route that needs a signed-in user names its key through
``controller.api.deps.require``; a test walks every rule of this table. The role
is the first check; the registry then checks that the session is the user's own
(only its owner treats in it; anyone may stop or disarm its pen).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from controller.sessions import Role

_T, _M, _A = Role.THERAPIST, Role.MANAGER, Role.ADMIN
EVERYONE: Final = frozenset({_T, _M, _A})
#: Treating a client: therapists, and managers who also treat. Admins configure, never treat.
TREATING: Final = frozenset({_T, _M})

#: Operations without a signed-in user: signing in, and a tablet's stop keys (what a
#: signed-out tablet may still do: see whether its pens are armed, and stop them;
#: controller/api/stopkeys.py says why that is safe).
PUBLIC: Final = frozenset({"login", "stop_keys_status", "stop_by_key"})

ROLE_MATRIX: Final[Mapping[str, frozenset[Role]]] = {
    "me": EVERYONE,
    "logout": EVERYONE,
    "renew_token": EVERYONE,
    "list_devices": EVERYONE,
    "get_device": EVERYONE,
    "get_device_link": EVERYONE,
    "list_plans": EVERYONE,
    "list_zones": EVERYONE,
    "list_sessions": TREATING,
    "get_session": TREATING,
    "create_session": TREATING,
    "start_session": TREATING,
    "select_zone": TREATING,
    "set_depth": TREATING,
    "set_stroke_rate": TREATING,
    "arm_pen": TREATING,
    "pause_session": TREATING,
    "resume_session": TREATING,
    "acknowledge_fault": TREATING,
    "end_session": TREATING,
    "session_report": TREATING,
    "session_report_csv": TREATING,
    "live": TREATING,
    # Stopping the needle is never refused to anyone signed in (product.md §4).
    "disarm_pen": EVERYONE,
    "stop_pen": EVERYONE,
    # Raising a zone's limit for one session, with a reason (product.md §4.4).
    "override_zone": frozenset({_M}),
    "audit_log": frozenset({_M, _A}),
    # A manager takes a session over from its therapist, with a reason (issue 15.1).
    "take_over_session": frozenset({_M}),
    # The tablet page (routers/tablet.py, stopkeys.py, charts.py).
    "overview": EVERYONE,
    "session_controls": TREATING,
    "issue_stop_key": TREATING,
    "charts": frozenset({_M, _A}),
    "list_users": frozenset({_A}),
}
