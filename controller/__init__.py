"""The session controller: serial link, safety gate, sessions, telemetry, tablet API."""
