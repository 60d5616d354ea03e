"""The local channel between the safety core and the edge process (issue 12)."""
