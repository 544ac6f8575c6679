"""The ocpp16 package's one family of errors.

Every failure inside ocpp16/ -- a peer's bad frame, our own bad payload, the
websocket, the configuration keys, the message queue -- is one of these, so a
caller catches ``OcppError`` and never a library's own exception (jsonschema,
trio-websocket, ssl, json are translated where they enter).

``CallError`` is the only one that travels on the wire: it is the OCPP-J
CALLERROR a CALL is answered with, and its ``code`` is one of the ten codes of
OCPP-J 1.6 §4.2.3, with that edition's spellings.
"""

from __future__ import annotations

from typing import Any

# OCPP-J 1.6 §4.2.3, table "Valid Error Codes". "FormationViolation" and
# "OccurenceConstraintViolation" are the 1.6 spellings: the OCPP-J 1.6 errata
# (§5, "known issues that will not be fixed") keeps them, and a strict 1.6
# peer does not know the 2.0 spelling "FormatViolation" the ocpp package uses.
CALL_ERROR_CODES: tuple[str, ...] = (
    "NotImplemented",  # the Action is not known by the receiver
    "NotSupported",  # the Action is known but not supported by the receiver
    "InternalError",  # the receiver failed while handling the Action
    "ProtocolError",  # the payload is incomplete / the frame breaks the RPC rules
    "SecurityError",  # a security issue prevented the receiver from completing it
    "FormationViolation",  # syntactically incorrect, or not the PDU structure of the Action
    "PropertyConstraintViolation",  # a field has a value outside its constraints
    "OccurenceConstraintViolation",  # a field breaks its occurrence constraints
    "TypeConstraintViolation",  # a field has the wrong data type
    "GenericError",  # anything not covered by the above
)


class OcppError(Exception):
    """Base of every error raised by ocpp16/."""


class CallError(OcppError):
    """A CALL cannot be served: the OCPP-J CALLERROR it is answered with.

    ``code`` is one of ``CALL_ERROR_CODES``; anything else is refused at once
    with ``ValueError`` (a bug: a CALLERROR with an unknown code would itself
    be a protocol violation). ``description`` is for humans (it names the
    field where there is one), ``details`` is the free-form errorDetails object.
    """

    def __init__(
        self, code: str, description: str = "", details: dict[str, Any] | None = None
    ) -> None:
        if code not in CALL_ERROR_CODES:
            raise ValueError(f"{code!r} is not an OCPP-J 1.6 CALLERROR code")
        self.code = code
        self.description = description
        self.details: dict[str, Any] = {} if details is None else details
        super().__init__(f"{code}: {description}" if description else code)


class OutgoingPayloadInvalid(OcppError):
    """A payload we built fails its schema (or is not plain JSON).

    This is a bug on our side and the frame is never sent. For a reply to an
    incoming CALL the caller then answers ``InternalError`` instead.
    """

    def __init__(self, action: str, reason: str) -> None:
        self.action = action
        self.reason = reason
        super().__init__(f"{action}: {reason}")


class CallInProgress(OcppError):
    """A CALL was sent while an earlier one is unanswered (OCPP-J 1.6 §4.1.1).

    ``unique_id`` and ``action`` name the outstanding CALL.
    """

    def __init__(self, unique_id: str, action: str) -> None:
        self.unique_id = unique_id
        self.action = action
        super().__init__(f"CALL {action} ({unique_id}) is still unanswered")


class TransportError(OcppError):
    """The websocket to the central system failed; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class TlsError(TransportError):
    """The TLS handshake failed (certificate not trusted, expired, wrong host)."""


class AuthenticationFailed(TransportError):
    """The central system refused our credentials (HTTP 401/403 on the upgrade)."""


class SubprotocolRefused(TransportError):
    """The server did not select the "ocpp1.6" websocket subprotocol."""


class ConnectFailed(TransportError):
    """No websocket could be opened: DNS, TCP, refused, upgrade timeout, bad status."""


class PongTimeout(TransportError):
    """A websocket ping was not answered in time; the link is presumed dead."""


class ConnectionLost(TransportError):
    """An open websocket closed or broke."""


class ConfigRejected(OcppError):
    """A configuration key cannot be set; ``key`` names it, ``reason`` says why."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


class QueueError(OcppError):
    """The persistent message queue at ``path`` failed; ``reason`` says how."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class TransferError(OcppError):
    """A firmware download or a diagnostics/log upload failed (``ocpp16.transfer``).

    ``url`` is the location with any password removed; ``reason`` says how it
    failed (refused, timed out, HTTP status, FTP reply, size cap, checksum).
    ``retryable`` is False where another attempt cannot help (a malformed URL,
    an unsupported scheme, a file over the size cap).
    """

    def __init__(self, url: str, reason: str, *, retryable: bool = True) -> None:
        self.url = url
        self.reason = reason
        self.retryable = retryable
        super().__init__(f"{url}: {reason}")


class CertificateError(OcppError):
    """A certificate, key, CSR or signature is refused (``ocpp16.certificates``):
    ``reason`` says why (not PEM, expired, not yet valid, no chain to a root,
    key mismatch, bad signature)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class IllegalTransition(OcppError):
    """A sans-I/O state machine of ocpp16 (``ocpp16.firmware``) got an event its
    state does not accept: a bug in whoever drives it. ``machine``, ``state``
    and ``event`` name the missing row of its transition table."""

    def __init__(self, machine: str, state: str, event: str) -> None:
        self.machine = machine
        self.state = state
        self.event = event
        super().__init__(f"{machine}: {event} is not accepted in state {state}")
