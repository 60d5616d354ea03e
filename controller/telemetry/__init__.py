"""Telemetry out of the controller: durable outbox, MQTT publisher, topic scheme."""
