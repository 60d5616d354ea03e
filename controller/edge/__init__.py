"""The edge process: the tablet API, the MQTT publisher and reports, apart from the safety core."""
