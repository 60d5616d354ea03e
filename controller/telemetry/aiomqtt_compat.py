"""Every workaround for what aiomqtt does not offer, in one place, pinned to its version.

aiomqtt 2.5 wraps paho-mqtt 2.x and exposes neither manual acknowledgements nor
anything else that needs the wrapped paho client. The workarounds below reach
into aiomqtt's private ``Client._client`` (the paho client); nothing else in the
project may. They were written and tested against :data:`WRITTEN_FOR`; a test
(tests/test_aiomqtt_compat.py) fails as soon as another aiomqtt version is
installed, so that an upgrade re-examines them (the upstream issue may be fixed,
or the private attribute renamed) instead of breaking silently. pyproject.toml
pins the same version.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version

import aiomqtt

#: The aiomqtt release these workarounds were written for (and pyproject.toml pins).
WRITTEN_FOR = "2.5.1"


def installed_version() -> str:
    """The aiomqtt version installed now."""
    return version("aiomqtt")


def manual_acks(client: aiomqtt.Client) -> Callable[[aiomqtt.Message], None]:
    """Switch ``client`` to manual acknowledgements; returns the function that acks a message.

    aiomqtt 2.5 has no manual-ack API yet; this is the workaround documented in its
    issue empicano/aiomqtt#345, using paho-mqtt's own (paho >= 2.0) ``manual_ack_set``
    and ``ack`` on the wrapped client. Call it *before* connecting: a durable
    session's queued messages arrive right after CONNACK, and paho would already have
    acknowledged them by the time code inside ``async with client`` runs.
    QoS 1 acks must be sent in the order the messages arrived (MQTT 5 §4.6).
    """
    paho = client._client
    paho.manual_ack_set(True)

    def ack(message: aiomqtt.Message) -> None:
        # Without a connection paho returns an error code and sends nothing; the
        # broker then redelivers the message to our session, which is harmless.
        paho.ack(message.mid, message.qos)

    return ack
