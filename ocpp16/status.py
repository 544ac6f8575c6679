"""The link's state, for operators and the fallback limit.

Kept apart from transport.py so that code which only reports the state (the
charge point, the status view) does not load the WebSocket and TLS stack
before a central system is configured.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class LinkState(StrEnum):
    DISABLED = "disabled"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"


@dataclass(frozen=True)
class LinkStatus:
    """What the link is doing, for the settings page and the fallback limit.

    ``since`` is trio's clock; ``attempt`` counts connection attempts since
    the last connection that stayed up (1 = the first), 0 when disabled.
    """

    state: LinkState
    reason: str = ""
    since: float = 0.0
    attempt: int = 0
