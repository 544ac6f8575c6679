"""The WebSocket link to the central system: OCPP-J 1.6 over trio-websocket.

Theory of operation
-------------------
``open_connection`` makes one connection: TCP, then (profiles 2 and 3) a TLS
handshake we drive ourselves, then the WebSocket upgrade asking for the
"ocpp1.6" subprotocol (OCPP-J 1.6 §3.1.2), all under one deadline
(``connect_timeout``). Every failure leaves it as one of ``ocpp16.errors``'
``TransportError`` family, with a one-line ``reason`` an installer can act on:

* refused, unreachable, DNS, the deadline, a bad HTTP status -> ConnectFailed
* the server certificate does not verify against ``ca_certificates``, or any
  other TLS failure -> TlsError (at once, not as a timeout: trio-websocket's
  own connect would hide it behind its connect timeout)
* HTTP 401/403 on the upgrade, or (profile 3) a TLS alert rejecting our
  client certificate -> AuthenticationFailed
* a server that does not select "ocpp1.6" -> SubprotocolRefused

``Link`` keeps one connection up forever: connect, hand a ``Connection`` to
the caller's session, ping, and after any failure wait an exponential,
jittered back-off before connecting again. It reports each state change
(``LinkStatus``) and the security events the OCPP 1.6 Security Whitepaper
(edition 3, §"Security events") asks for, for SecurityEventNotification.

Security profiles (Security Whitepaper §2; profile 0 is our own name for
"no security", the whitepaper starts at 1):

====  ======  ====================================================
0     ws://   no authentication
1     ws://   HTTP Basic auth: user = charge point id, password = AuthorizationKey
2     wss://  Basic auth + server certificate verified against
              CentralSystemRootCertificate (our only trust anchors)
3     wss://  TLS client certificate, server verified as in profile 2
====  ======  ====================================================

TLS (the whitepaper's TLS requirements): TLS 1.2 is the minimum
(``minimum_version``); the server's certificate must chain to our
CentralSystemRootCertificate and name the host we connect to
(``check_hostname``); the cipher suites are Python's default list (forward
secrecy, AEAD first) plus the two RSA suites the whitepaper requires a charge
point to support (TLS_RSA_WITH_AES_128_GCM_SHA256,
TLS_RSA_WITH_AES_256_GCM_SHA384), offered last.

The Basic auth password (the whitepaper's HTTP Basic authentication; OCTT
TC_085): the AuthorizationKey is the hex form of the password (32..40 hex
digits = 16..20 bytes of random binary), so the password on the wire is the
bytes it encodes, which may be non-printable. The header is built from bytes:
``base64(b"<id>:" + bytes.fromhex(key))``. ``authorization_key_form="literal"``
sends the key's text itself, for a central system that compares that (and a
key that is not an even number of hex digits can only be meant literally).
docs/security.md has the rules for operators.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import os
import random as _random
import select
import ssl
import sys
import tempfile
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

import trio
import trio_websocket

from ocpp16.errors import (
    AuthenticationFailed,
    ConnectFailed,
    ConnectionLost,
    PongTimeout,
    SubprotocolRefused,
    TlsError,
    TransportError,
)
from ocpp16.status import LinkState, LinkStatus

log = logging.getLogger(__name__)

SUBPROTOCOL: Final = "ocpp1.6"
#: Messages buffered between trio-websocket's reader and ``Connection.receive``.
#: The reader also handles pongs: if this queue is full, pongs wait too, so the
#: session must keep a task in ``receive()`` (a small buffer absorbs bursts).
MESSAGE_QUEUE_SIZE: Final = 16
#: Larger frames close the connection with 1009 (trio-websocket's default).
MAX_MESSAGE_SIZE: Final = 2**20
#: How long a graceful close waits for the peer's close frame.
CLOSE_TIMEOUT: Final = 2.0
#: TLS 1.3: how long to read what the server sent before our upgrade request
#: (see _WatchedStream._read_verdict); only data already there is read.
_EARLY_READ: Final = 0.02
#: Bytes of the server's upgrade response kept to explain a failed upgrade.
_UPGRADE_HEAD_LIMIT: Final = 8192

# Security events (OCPP 1.6 Security Whitepaper ed. 3, appendix "Security events").
INVALID_CENTRAL_SYSTEM_CERTIFICATE: Final = "InvalidCentralSystemCertificate"
FAILED_TO_AUTHENTICATE_AT_CENTRAL_SYSTEM: Final = "FailedToAuthenticateAtCentralSystem"
INVALID_TLS_VERSION: Final = "InvalidTLSVersion"
INVALID_TLS_CIPHER_SUITE: Final = "InvalidTLSCipherSuite"

# OpenSSL reasons for an alert the server sent about *our* certificate (a
# certificate we fail to verify raises SSLCertVerificationError instead).
_CLIENT_CERT_ALERTS: Final = (
    "ALERT_BAD_CERTIFICATE",
    "ALERT_UNSUPPORTED_CERTIFICATE",
    "ALERT_CERTIFICATE_REVOKED",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_UNKNOWN_CA",
    "ALERT_CERTIFICATE_REQUIRED",
    "ALERT_ACCESS_DENIED",
)
_TLS_VERSION_ERRORS: Final = (
    "UNSUPPORTED_PROTOCOL",
    "ALERT_PROTOCOL_VERSION",
    "NO_PROTOCOLS_AVAILABLE",
)
# A handshake_failure alert is the server's "unable to negotiate an acceptable
# set of security parameters" (RFC 5246 §7.2.2, RFC 8446 §6.2): with our
# certificate judged by other alerts (above), that is the cipher suites.
_TLS_CIPHER_ERRORS: Final = (
    "NO_SHARED_CIPHER",
    "NO_CIPHERS_AVAILABLE",
    "WRONG_CIPHER_RETURNED",
    "ALERT_HANDSHAKE_FAILURE",
)

#: Python's default client cipher list (3.10+, forward secrecy and AEAD
#: first), then the two suites with RSA key exchange that the whitepaper
#: requires a charge point to support, so that a central system with
#: an RSA certificate offering only those is reached. TLS 1.3 suites are not
#: affected by this string (OpenSSL configures them apart).
TLS_CIPHERS: Final = (
    "@SECLEVEL=2:ECDH+AESGCM:ECDH+CHACHA20:ECDH+AES:DHE+AES:"
    "!aNULL:!eNULL:!aDSS:!SHA1:!AESCCM:"
    "AES128-GCM-SHA256:AES256-GCM-SHA384"
)

_AUTHORIZATION_KEY_LENGTH: Final = (32, 40)  # station-spec §2, AuthorizationKey
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")

#: How the AuthorizationKey becomes the Basic auth password (see the module
#: docstring): "hex" decodes it, "literal" sends its text.
AUTHORIZATION_KEY_FORMS: Final = ("hex", "literal")


def is_hex_key(key: str) -> bool:
    """The key is an even number of hex digits: the hex form of a password."""
    return bool(key) and len(key) % 2 == 0 and all(c in _HEX_DIGITS for c in key)


def basic_auth_password(key: str, form: str = "hex") -> bytes:
    """The HTTP Basic password the AuthorizationKey stands for (Security Whitepaper, Basic auth).

    "hex": the bytes the hex digits encode (OCTT TC_085: "the non hex
    representation"); a key that is not an even number of hex digits cannot be
    that, and is sent as its text. "literal": the key's text (ASCII) itself.
    """
    if form not in AUTHORIZATION_KEY_FORMS:
        raise ValueError(f"authorization_key_form {form!r}: one of {AUTHORIZATION_KEY_FORMS}")
    if form == "hex" and is_hex_key(key):
        return bytes.fromhex(key)
    return key.encode("ascii")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ConnectionSettings:
    """Where and how to connect; validated on construction (``ValueError``).

    ``authorization_key`` and ``client_key`` are secrets: they never appear
    in ``repr()``.
    """

    central_system_url: str
    charge_point_id: str
    security_profile: int = 0
    authorization_key: str | None = field(default=None, repr=False)
    #: "hex" (the whitepaper's form: the key's bytes are the password) or
    #: "literal" (its text). The station passes its BasicAuthPasswordForm
    #: setting (default "hex"); "literal" here keeps this class's callers
    #: that predate the setting sending what they always sent.
    authorization_key_form: str = "literal"
    ca_certificates: str | None = field(default=None, repr=False)
    client_certificate: str | None = field(default=None, repr=False)
    client_key: str | None = field(default=None, repr=False)
    connect_timeout: float = 10.0
    ping_interval: float = 10.0
    pong_timeout: float = 5.0
    reconnect_min: float = 1.0
    reconnect_max: float = 30.0
    #: A connection that stayed up this long resets the back-off to ``reconnect_min``.
    reconnect_reset_after: float = 60.0
    _ssl_context: ssl.SSLContext | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        url = self.central_system_url
        if any(c.isspace() or not 0x21 <= ord(c) <= 0x7E for c in url):
            raise ValueError(
                f"central_system_url {url!r}: only printable ASCII without spaces"
                " (percent-encode anything else)"
            )
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("ws", "wss"):
            raise ValueError(f"central_system_url {url!r}: the scheme must be ws:// or wss://")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError(f"central_system_url {url!r}: bad port") from None
        if not parts.hostname:
            raise ValueError(f"central_system_url {url!r}: no host")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                f"central_system_url {url!r}: no credentials in the URL"
                " (the password is the authorization key)"
            )
        if parts.query or parts.fragment or "?" in url or "#" in url:
            raise ValueError(f"central_system_url {url!r}: no query or fragment")
        if not url.endswith("/"):
            raise ValueError(
                f"central_system_url {url!r} must end with '/': the charge point id is appended"
            )
        cp_id = self.charge_point_id
        if not cp_id or any(not c.isprintable() for c in cp_id):
            raise ValueError(f"charge_point_id {cp_id!r}: empty or not printable")
        if self.security_profile not in (0, 1, 2, 3):
            raise ValueError(f"security_profile {self.security_profile!r}: must be 0, 1, 2 or 3")
        profile = self.security_profile
        if profile >= 2 and scheme != "wss":
            raise ValueError(f"security_profile {profile} needs a wss:// central_system_url")
        if profile <= 1 and scheme != "ws":
            raise ValueError(
                f"security_profile {profile} needs a ws:// central_system_url"
                " (wss:// is profile 2 or 3)"
            )
        if profile in (1, 2):
            # RFC 7617 §2: the user-id of Basic auth cannot contain a colon.
            if ":" in cp_id:
                raise ValueError(
                    f"charge_point_id {cp_id!r}: no ':' with HTTP Basic auth (profiles 1, 2)"
                )
            key = self.authorization_key
            low, high = _AUTHORIZATION_KEY_LENGTH
            if not key:
                raise ValueError(f"security_profile {profile} needs an authorization_key")
            if not (low <= len(key) <= high and all(0x21 <= ord(c) <= 0x7E for c in key)):
                raise ValueError(
                    f"authorization_key: {low}..{high} printable ASCII characters"
                    f" (got {len(key)} characters)"
                )
        if self.authorization_key_form not in AUTHORIZATION_KEY_FORMS:
            raise ValueError(
                f"authorization_key_form {self.authorization_key_form!r}:"
                f" one of {', '.join(AUTHORIZATION_KEY_FORMS)}"
            )
        if profile >= 2:
            object.__setattr__(self, "_ssl_context", self._make_ssl_context())
        for name in ("connect_timeout", "pong_timeout", "reconnect_min"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} {value!r}: must be a positive number of seconds")
        for name in ("ping_interval", "reconnect_reset_after"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} {value!r}: must be 0 or more seconds")
        if not (math.isfinite(self.reconnect_max) and self.reconnect_max >= self.reconnect_min):
            raise ValueError(
                f"reconnect_max {self.reconnect_max!r}: must be at least"
                f" reconnect_min ({self.reconnect_min!r})"
            )

    def _make_ssl_context(self) -> ssl.SSLContext:
        if not self.ca_certificates:
            raise ValueError(
                f"security_profile {self.security_profile} needs ca_certificates"
                " (the CentralSystemRootCertificate, PEM)"
            )
        # PROTOCOL_TLS_CLIENT: CERT_REQUIRED and check_hostname, and no trust
        # anchors at all until we load ours (the system store is never used).
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # Security Whitepaper: TLS 1.2 or above; the server's name checked against
        # its certificate (RFC 6125). Both are PROTOCOL_TLS_CLIENT's defaults
        # today: said here so that no default change can drop them.
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        context.set_ciphers(TLS_CIPHERS)
        try:
            context.load_verify_locations(cadata=self.ca_certificates)
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(f"ca_certificates: no usable PEM certificate ({exc})") from None
        if self.security_profile == 3:
            if not self.client_certificate or not self.client_key:
                raise ValueError("security_profile 3 needs client_certificate and client_key")
            try:
                _load_client_chain(context, self.client_certificate, self.client_key)
            except (ssl.SSLError, ValueError, OSError) as exc:
                raise ValueError(
                    f"client_certificate/client_key: not a usable PEM certificate chain"
                    f" and matching unencrypted key ({exc})"
                ) from None
        return context

    @property
    def url(self) -> str:
        """The central system URL with the percent-encoded charge point id appended."""
        # OCPP-J 1.6 §3.1.1; RFC 3986 §3.3: we encode everything but the
        # unreserved characters, which is valid in a path segment.
        return self.central_system_url + urllib.parse.quote(self.charge_point_id, safe="")

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS client context (profiles 2, 3), None for ws://."""
        return self._ssl_context

    @property
    def host(self) -> str:
        host = urllib.parse.urlsplit(self.central_system_url).hostname
        assert host is not None  # checked in __post_init__
        return host

    @property
    def port(self) -> int:
        parts = urllib.parse.urlsplit(self.central_system_url)
        if parts.port is not None:
            return parts.port
        return 443 if parts.scheme.lower() == "wss" else 80

    @property
    def resource(self) -> str:
        """The request target of the upgrade: the URL's path, id included."""
        return urllib.parse.urlsplit(self.url).path

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.ssl_context is not None else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def basic_password(self) -> bytes | None:
        """The HTTP Basic password (profiles 1 and 2), as bytes; None otherwise."""
        if self.security_profile not in (1, 2) or self.authorization_key is None:
            return None
        return basic_auth_password(self.authorization_key, self.authorization_key_form)

    def handshake_headers(self) -> list[tuple[bytes, bytes]]:
        """Extra upgrade headers: HTTP Basic auth for profiles 1 and 2 (RFC 7617).

        Built from bytes: the user-id is the charge point id in UTF-8 (RFC 7617
        §2.1 charset), the password the AuthorizationKey's bytes, which need
        not be text at all (the whitepaper: random binary).
        """
        password = self.basic_password
        if password is None:
            return []
        credentials = self.charge_point_id.encode("utf-8") + b":" + password
        return [(b"authorization", b"Basic " + base64.b64encode(credentials))]


def _refuse_encrypted_key() -> str:
    # Without a password callback OpenSSL would prompt on the terminal.
    raise ValueError("the client key is encrypted; install it unencrypted")


def _load_client_chain(context: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    # ssl can only load a certificate chain from files: hand it in-memory files
    # where the system has them, so the private key never touches the disk.
    with _pem_file(cert_pem) as cert_path, _pem_file(key_pem) as key_path:
        context.load_cert_chain(cert_path, key_path, password=_refuse_encrypted_key)


@contextlib.contextmanager
def _pem_file(text: str) -> Iterator[str]:
    data = text.encode("ascii", errors="replace")
    if sys.platform == "linux":
        fd = os.memfd_create("pem", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
    else:  # pragma: no cover - the firmware runs on Linux
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "pem")
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
            yield path


# --------------------------------------------------------------------------- one connection


class _WatchedStream(trio.abc.Stream):
    """The transport under the WebSocket, watched.

    trio-websocket's reader swallows a transport that breaks or ends before
    the upgrade completes and leaves the connect waiting for its timeout. We
    see it here instead: ``on_end`` fires at once, ``failure`` keeps the cause
    (an ssl error in TLS 1.3, where the server judges our certificate only
    after the handshake), ``head`` the start of the server's upgrade response.
    ``ended`` stays useful afterwards: it tells the link the transport is gone.
    """

    def __init__(self, inner: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> None:
        self.inner = inner
        self.ended = trio.Event()
        self.failure: BaseException | None = None
        self.closed_locally = False
        self.on_end: Callable[[], object] | None = None
        self.head = bytearray()
        self._pushback = b""
        self._verdict_pending = isinstance(inner, trio.SSLStream) and inner.version() == "TLSv1.3"

    async def _read_verdict(self) -> None:
        """TLS 1.3: read what the server sent before we send the upgrade request.

        Our side of a TLS 1.3 handshake ends before the server has checked our
        client certificate; its verdict follows: session tickets, or an alert
        and a close. If the alert is already here, the server's socket is
        closed and has answered our handshake's last flight with a TCP reset:
        sending now fails with "connection reset", the SSL stream breaks, and
        the alert saying why would never be read. So read it first, if
        anything is there: an alert raises with its reason; session tickets
        are consumed by ssl, which then waits for application data that no
        WebSocket server sends before our request (cut short after _EARLY_READ).
        Nothing there yet: nothing to lose, the reader will see the verdict.
        """
        assert isinstance(self.inner, trio.SSLStream)
        poller = select.poll()
        poller.register(self.inner.transport_stream.socket.fileno(), select.POLLIN)
        if not poller.poll(0):
            return
        with trio.move_on_after(_EARLY_READ):
            data = await self.receive_some()
            if not data:
                raise trio.BrokenResourceError("the central system closed the connection")
            self._pushback += bytes(data)

    def _end(self, failure: BaseException | None) -> None:
        if self.ended.is_set():
            return
        self.failure = failure
        self.ended.set()
        if self.on_end is not None:
            self.on_end()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._verdict_pending:
            self._verdict_pending = False
            await self._read_verdict()
        try:
            await self.inner.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._end(exc)
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._pushback:
            size = len(self._pushback) if max_bytes is None else max_bytes
            early, self._pushback = self._pushback[:size], self._pushback[size:]
            await trio.lowlevel.checkpoint()
            return early
        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._end(exc)
            raise
        if self.on_end is not None and len(self.head) < _UPGRADE_HEAD_LIMIT:
            self.head += data[: _UPGRADE_HEAD_LIMIT - len(self.head)]
        if not data:
            self._end(None)
        return data

    async def aclose(self) -> None:
        self.closed_locally = True
        try:
            await self.inner.aclose()
        finally:
            self._end(None)


@dataclass
class _Progress:
    stage: str = "before connecting"


@dataclass(frozen=True)
class _Opened:
    websocket: trio_websocket.WebSocketConnection
    stream: _WatchedStream


async def open_connection(
    settings: ConnectionSettings, nursery: trio.Nursery
) -> trio_websocket.WebSocketConnection:
    """Open a WebSocket to the central system; its reader task runs in ``nursery``.

    Raises one of ``ConnectFailed``, ``TlsError``, ``AuthenticationFailed``,
    ``SubprotocolRefused`` (never an exception group, never a library's own
    exception). ``connect_timeout`` covers TCP, TLS and the upgrade together.

    The caller closes the connection (``aclose()``, best under a shield and a
    deadline, as ``Connection.close`` does), also when it is being cancelled:
    the reader is shielded from the nursery's cancellation so that the close
    handshake can still complete, and is stopped CLOSE_TIMEOUT + 0.5 s after
    a cancellation only if nobody closes. A reader that ends (peer closed,
    transport broken) releases the socket by itself.
    """
    opened = await _open(settings, nursery)
    return opened.websocket


async def _open(settings: ConnectionSettings, nursery: trio.Nursery) -> _Opened:
    progress = _Progress()
    try:
        with trio.fail_after(settings.connect_timeout):
            opened: _Opened = await nursery.start(_connection_task, settings, progress)
    except trio.TooSlowError:
        raise ConnectFailed(
            f"timed out after {settings.connect_timeout:g} s {progress.stage}"
            f" ({settings.host_header})"
        ) from None
    return opened


async def _connection_task(
    settings: ConnectionSettings,
    progress: _Progress,
    *,
    task_status: trio.TaskStatus[_Opened] = trio.TASK_STATUS_IGNORED,
) -> None:
    # Run through nursery.start(): until started(), an error (even one raised
    # by trio-websocket's reader, such as ConnectionRejected) comes out of
    # open_connection; afterwards the reader lives on in the caller's nursery.
    stream = await _open_stream(settings, progress)
    watched = _WatchedStream(stream)
    started = False
    try:
        async with trio.open_nursery() as guard:
            async with trio.open_nursery() as inner:
                websocket = await _upgrade(inner, watched, settings, progress)
                # The close handshake needs the reader (it receives the peer's
                # close frame): shield it, so a caller being cancelled can still
                # close gracefully; the guard stops it if the caller does not.
                inner.cancel_scope.shield = True
                guard.start_soon(_stop_reader_unless_closed, watched, inner.cancel_scope)
                task_status.started(_Opened(websocket, watched))
                started = True
            await trio.aclose_forcefully(watched)  # the reader ended: release the socket
            guard.cancel_scope.cancel()
    except* trio_websocket.ConnectionRejected as group:
        rejection = _first_leaf(group)
        raise _rejection_error(rejection) from rejection
    except* TransportError as group:
        error = _first_leaf(group)
        raise error from error.__cause__
    except* Exception as group:
        if not started:
            # trio-websocket's reader fails so (h11's LocalProtocolError) when
            # wsproto refuses the server's answer, e.g. a subprotocol we did
            # not offer: the answer itself says what was wrong.
            log.debug("WebSocket upgrade failed", exc_info=group)
            raise _invalid_answer(watched) from _first_leaf(group)
        # The connection is open and owned by the caller: an internal failure
        # of the reader must not tear down the caller's nursery. The reader is
        # gone, so the connection is closed; the caller sees ConnectionLost.
        log.error("websocket reader failed (%s)", settings.host_header, exc_info=group)
    finally:
        await trio.aclose_forcefully(watched)


async def _stop_reader_unless_closed(watched: _WatchedStream, reader: trio.CancelScope) -> None:
    """Once the caller is cancelled, give its close CLOSE_TIMEOUT, then stop the reader."""
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT + 0.5):
            await watched.ended.wait()
        reader.cancel()


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


async def _open_stream(
    settings: ConnectionSettings, progress: _Progress
) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
    where = f"{settings.host_header}"
    progress.stage = "connecting"
    try:
        tcp = await trio.open_tcp_stream(settings.host, settings.port)
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to {where}: {_os_reason(exc)}") from exc
    context = settings.ssl_context
    if context is None:
        return tcp
    progress.stage = "in the TLS handshake"
    tls = trio.SSLStream(tcp, context, server_hostname=settings.host, https_compatible=True)
    try:
        # Handshake now: a certificate problem is reported at once, with its
        # reason (trio-websocket would only report its connect timeout).
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tls)
        raise _tls_error(exc.__cause__, settings) from exc.__cause__
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


def _os_reason(exc: BaseException) -> str:
    # trio.open_tcp_stream raises "all attempts to connect ... failed" with
    # the per-address errors as an exception group in __cause__.
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        exc = _first_leaf(cause)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # trio's own message repeats the address
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _tls_error(cause: BaseException | None, settings: ConnectionSettings) -> TransportError:
    error = _classify_tls_failure(cause, settings)
    error.__cause__ = cause  # security_event_for() reads it
    return error


def _classify_tls_failure(
    cause: BaseException | None, settings: ConnectionSettings
) -> TransportError:
    if isinstance(cause, ssl.SSLCertVerificationError):
        detail = cause.verify_message or cause.reason or str(cause)
        return TlsError(f"central system certificate not accepted: {detail}")
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or str(cause)
        if settings.security_profile == 3 and any(a in reason for a in _CLIENT_CERT_ALERTS):
            return AuthenticationFailed(
                f"central system rejected our client certificate (TLS alert {reason})"
            )
        return TlsError(f"TLS handshake failed: {reason}")
    if isinstance(cause, OSError):
        return TlsError(f"TLS handshake failed: {_os_reason(cause)}")
    return TlsError("TLS handshake failed: the central system closed the connection")


async def _upgrade(
    inner: trio.Nursery,
    watched: _WatchedStream,
    settings: ConnectionSettings,
    progress: _Progress,
) -> trio_websocket.WebSocketConnection:
    progress.stage = "waiting for the WebSocket upgrade"
    websocket: trio_websocket.WebSocketConnection | None = None
    with trio.CancelScope() as upgrade:
        watched.on_end = upgrade.cancel
        websocket = await trio_websocket.wrap_client_stream(
            inner,
            # Typed as socket/SSL stream, but only the trio.abc.Stream methods
            # are used (and .local/.remote, which fall back to repr()).
            watched,  # type: ignore[arg-type]
            settings.host_header,
            settings.resource,
            subprotocols=[SUBPROTOCOL],
            extra_headers=settings.handshake_headers(),
            message_queue_size=MESSAGE_QUEUE_SIZE,
            max_message_size=MAX_MESSAGE_SIZE,
        )
    watched.on_end = None
    if websocket is None or upgrade.cancelled_caught:
        raise _ended_during_upgrade(watched, settings)
    if websocket.subprotocol != SUBPROTOCOL:
        await _close(websocket, 1002, "ocpp1.6 is required", CLOSE_TIMEOUT)
        chosen = websocket.subprotocol
        raise SubprotocolRefused(
            f"central system did not select {SUBPROTOCOL!r}"
            + (f" (it chose {chosen!r})" if chosen else " (no subprotocol in its answer)")
        )
    return websocket


def _ended_during_upgrade(watched: _WatchedStream, settings: ConnectionSettings) -> TransportError:
    failure = watched.failure
    if failure is not None:
        cause = failure.__cause__
        if isinstance(cause, ssl.SSLError):
            return _tls_error(cause, settings)
        return ConnectFailed(
            f"connection broke during the WebSocket upgrade: {_os_reason(cause or failure)}"
        )
    if watched.closed_locally:
        # trio-websocket closes the stream when wsproto refuses the answer.
        return _invalid_answer(watched)
    status_line, _ = _parse_head(bytes(watched.head))
    return ConnectFailed(
        "the central system closed the connection during the WebSocket upgrade"
        + (f" (it answered {status_line!r})" if status_line else "")
    )


def _invalid_answer(watched: _WatchedStream) -> TransportError:
    """The server answered the upgrade in a way wsproto refuses: say how, if we can."""
    status_line, headers = _parse_head(bytes(watched.head))
    chosen = headers.get("sec-websocket-protocol")
    if chosen is not None and chosen.strip() != SUBPROTOCOL:
        return SubprotocolRefused(
            f"central system did not select {SUBPROTOCOL!r} (it chose {chosen.strip()!r})"
        )
    return ConnectFailed(
        f"invalid WebSocket upgrade answer from the central system: {status_line!r}"
    )


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    text = head.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = text.split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value
    return lines[0][:100], headers


def _rejection_error(exc: BaseException) -> TransportError:
    status = getattr(exc, "status_code", 0)
    if status in (401, 403):
        return AuthenticationFailed(f"central system refused our credentials (HTTP {status})")
    return ConnectFailed(f"central system refused the WebSocket upgrade (HTTP {status})")


async def _close(
    websocket: trio_websocket.WebSocketConnection, code: int, reason: str, grace: float
) -> None:
    """Close, waiting at most ``grace`` s for the peer's close frame, even if cancelled."""
    # RFC 6455 §5.5.1: the close reason fits in 123 bytes.
    reason = reason.encode()[:123].decode(errors="ignore")
    with trio.CancelScope(shield=True):
        with trio.move_on_after(grace):
            await websocket.aclose(code, reason)
        if websocket.closed is None:  # pragma: no cover - aclose always marks it
            await trio.aclose_forcefully(websocket)


def security_event_for(error: TransportError) -> str | None:
    """The Security Whitepaper event a connection failure calls for, if any."""
    if isinstance(error, AuthenticationFailed):
        return FAILED_TO_AUTHENTICATE_AT_CENTRAL_SYSTEM
    if isinstance(error, TlsError):
        cause = error.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            return INVALID_CENTRAL_SYSTEM_CERTIFICATE
        if isinstance(cause, ssl.SSLError):
            reason = cause.reason or ""
            if any(r in reason for r in _TLS_VERSION_ERRORS):
                return INVALID_TLS_VERSION
            if any(r in reason for r in _TLS_CIPHER_ERRORS):
                return INVALID_TLS_CIPHER_SUITE
    return None


# --------------------------------------------------------------------------- Connection


class Connection:
    """An open WebSocket, in our errors: OCPP-J text frames in and out.

    Every trio-websocket ``ConnectionClosed`` (also one wrapped in an
    exception group) leaves as ``ConnectionLost`` with a reason.
    """

    def __init__(
        self,
        websocket: trio_websocket.WebSocketConnection,
        *,
        _stream: _WatchedStream | None = None,
        settings: ConnectionSettings | None = None,
    ) -> None:
        self.websocket = websocket
        self._stream = _stream
        self._closing = False
        #: What this connection was made with (``Link`` sets it): the session
        #: tells by it which security profile has just proven to work.
        self.settings = settings

    @property
    def closed(self) -> bool:
        return self.websocket.closed is not None

    def lost_reason(self) -> str:
        """Why the connection is closed (or "" while it is open)."""
        close = self.websocket.closed
        if self._closing:
            return "closed by the charge point"
        failure = self._stream.failure if self._stream is not None else None
        if failure is not None:
            cause = failure.__cause__
            if isinstance(cause, ssl.SSLError):
                return f"connection broken: TLS error {cause.reason or cause}"
            return f"connection broken: {_os_reason(cause or failure)}"
        if close is None:
            return ""
        if close.code == 1006:
            return "connection dropped without a close frame (1006)"
        text = f"closed by the central system ({close.code} {close.name}"
        return text + (f": {close.reason})" if close.reason else ")")

    def _lost(self) -> ConnectionLost:
        return ConnectionLost(self.lost_reason() or "connection closed")

    async def receive(self) -> str:
        """The next text message; binary frames (not OCPP-J) are decoded or skipped."""
        while True:
            try:
                message = await self.websocket.get_message()
            except* trio_websocket.ConnectionClosed:
                raise self._lost() from None
            if isinstance(message, str):
                return message
            try:
                return message.decode("utf-8")
            except UnicodeDecodeError:
                log.warning("skipping a binary frame of %d bytes (OCPP-J uses text)", len(message))

    async def send(self, text: str) -> None:
        try:
            await self.websocket.send_message(text)
        except* trio_websocket.ConnectionClosed:
            raise self._lost() from None

    async def ping(self, pong_timeout: float) -> None:
        """Ping and wait for the pong (``PongTimeout`` after ``pong_timeout`` s).

        trio-websocket's ping() waits for its pong forever: the deadline is ours.
        """
        with trio.move_on_after(pong_timeout) as scope:
            try:
                await self.websocket.ping()
            except* trio_websocket.ConnectionClosed:
                raise self._lost() from None
        if scope.cancelled_caught:
            raise PongTimeout(f"no pong within {pong_timeout:g} s")

    async def wait_lost(self) -> str:
        """Wait until the transport under the WebSocket ends; return why."""
        if self._stream is None:
            await trio.sleep_forever()
        else:
            await self._stream.ended.wait()
        return self.lost_reason() or "connection closed"

    async def close(self, code: int = 1000, reason: str = "", grace: float = CLOSE_TIMEOUT) -> None:
        """Close gracefully, giving up on the peer after ``grace`` s (0: abort)."""
        if self.websocket.closed is None:
            self._closing = True
        await _close(self.websocket, code, reason, grace)


# --------------------------------------------------------------------------- Link


def backoff_delay(attempt: int, low: float, high: float, rng: _random.Random) -> float:
    """The wait before the next attempt after ``attempt`` failed ones (1 = first).

    Exponential with "equal jitter": the ceiling doubles from ``2 * low`` up to
    ``high``, the delay is drawn from [ceiling / 2, ceiling], never below ``low``.
    Equal rather than full jitter: full jitter draws from [0, ceiling] and so
    lets a station retry almost at once, again and again; a charge point
    should never hammer a central system or burn its modem's data, whatever
    the dice say, and ``low`` / ``high`` ("reconnect frequency") should mean
    what the installer set. Half the ceiling is still random, which is enough
    to spread a fleet that lost its central system at the same moment.
    """
    exponent = min(max(attempt - 1, 0), 60)
    ceiling = min(high, 2 * low * 2.0**exponent)
    return max(low, rng.uniform(ceiling / 2, ceiling))


Session = Callable[[Connection], Awaitable[None]]


class Link:
    """Keeps one connection to the central system, for as long as ``run()`` runs.

    Cancel ``run()`` to disable the link (status DISABLED). Callbacks are
    called synchronously from the link's task; an exception in one is logged
    and otherwise ignored.

    Security events are reported once per failure streak: the same
    (kind, detail) is not reported again until a connection succeeds or the
    settings change, so a wrong certificate does not flood the security log
    every back-off period.
    """

    def __init__(
        self,
        settings: ConnectionSettings,
        *,
        on_status: Callable[[LinkStatus], None] | None = None,
        on_security_event: Callable[[str, str], None] | None = None,
        random: _random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._on_status = on_status
        self._on_security_event = on_security_event
        self._rng = random if random is not None else _random.Random()
        self._scope: trio.CancelScope | None = None
        self._reconnect_reason: str | None = None
        self._reported: set[tuple[str, str]] = set()
        try:
            now = trio.current_time()
        except RuntimeError:  # constructed outside trio
            now = 0.0
        self.status = LinkStatus(LinkState.DISABLED, "not started", now)

    @property
    def settings(self) -> ConnectionSettings:
        return self._settings

    def update_settings(self, settings: ConnectionSettings) -> None:
        """Use ``settings`` from the next (re)connect on; ``reconnect()`` forces it."""
        self._settings = settings
        self._reported.clear()

    def reconnect(self, reason: str) -> None:
        """Close the current connection (if any) and connect again at once."""
        self._reconnect_reason = reason
        if self._scope is not None:
            self._scope.cancel()

    def _pending_reconnect(self) -> str | None:
        return self._reconnect_reason

    def _set(self, state: LinkState, reason: str, attempt: int) -> None:
        self.status = LinkStatus(state, reason, trio.current_time(), attempt)
        if state is LinkState.DISCONNECTED:
            log.warning("central system link: %s (attempt %d)", reason, attempt)
        else:
            log.info("central system link %s %s", state.value, reason)
        if self._on_status is not None:
            try:
                self._on_status(self.status)
            except Exception:
                log.exception("on_status callback failed")

    def _security_event(self, kind: str, detail: str) -> None:
        log.error("security event %s: %s", kind, detail)
        if (kind, detail) in self._reported:
            return
        self._reported.add((kind, detail))
        if self._on_security_event is not None:
            try:
                self._on_security_event(kind, detail)
            except Exception:
                log.exception("on_security_event callback failed")

    async def run(self, session: Session) -> None:
        """Connect, serve ``session`` on the connection, repeat; forever.

        Returns only by cancellation. ``session(conn)`` runs while connected;
        when it returns or raises, or the connection drops or stops answering
        pings, the connection is closed and a new one is made after the
        back-off. ``session`` must keep a task in ``conn.receive()``.
        """
        attempt = 0
        reason = ""
        try:
            while True:
                self._reconnect_reason = None  # this attempt serves any earlier request
                settings = self._settings
                attempt += 1
                stable = False
                with trio.CancelScope() as self._scope:
                    reason, stable = await self._attempt(settings, session, attempt, reason)
                requested = self._pending_reconnect()
                if requested is not None:
                    reason = f"reconnect: {requested}"
                    self._reported.clear()
                    self._set(LinkState.DISCONNECTED, reason, attempt)
                    attempt = 0
                    continue
                self._set(LinkState.DISCONNECTED, reason, attempt)
                if stable:
                    attempt = 0
                delay = backoff_delay(
                    max(attempt, 1), settings.reconnect_min, settings.reconnect_max, self._rng
                )
                with trio.CancelScope() as self._scope:
                    if self._pending_reconnect() is None:
                        await trio.sleep(delay)
                requested = self._pending_reconnect()
                if requested is not None:
                    reason = f"reconnect: {requested}"
                    self._reported.clear()
                    attempt = 0
        finally:
            self._scope = None
            self._set(LinkState.DISABLED, "stopped", 0)

    async def _attempt(
        self, settings: ConnectionSettings, session: Session, attempt: int, last: str
    ) -> tuple[str, bool]:
        """One connection: returns (why it ended, whether it stayed up long enough)."""
        self._set(LinkState.CONNECTING, last, attempt)
        async with trio.open_nursery() as nursery:
            try:
                opened = await _open(settings, nursery)
            except TransportError as exc:
                kind = security_event_for(exc)
                if kind is not None:
                    self._security_event(kind, exc.reason)
                return exc.reason, False
            connected_at = trio.current_time()
            self._reported.clear()
            self._set(LinkState.CONNECTED, settings.url, attempt)
            connection = Connection(opened.websocket, _stream=opened.stream, settings=settings)
            try:
                reason = await _serve(connection, settings, session)
            finally:
                nursery.cancel_scope.cancel()  # the reader, if the close left it
        stable = trio.current_time() - connected_at >= settings.reconnect_reset_after
        return reason, stable


async def _serve(connection: Connection, settings: ConnectionSettings, session: Session) -> str:
    """Run the session with pings until something ends the connection; close it."""
    reasons: list[str] = []
    abort = False

    def finish(reason: str, scope: trio.CancelScope) -> None:
        reasons.append(reason)
        scope.cancel()

    async def run_session(scope: trio.CancelScope) -> None:
        try:
            await session(connection)
        except* ConnectionLost as group:
            leaf = _first_leaf(group)
            finish(leaf.reason if isinstance(leaf, TransportError) else str(leaf), scope)
        except* Exception as group:
            log.error("OCPP session failed", exc_info=group)
            finish(f"session failed: {_first_leaf(group)!r}", scope)
        else:
            finish("session ended", scope)

    async def keepalive(scope: trio.CancelScope) -> None:
        nonlocal abort
        if settings.ping_interval <= 0:  # WebSocketPingInterval 0: no pings
            return
        try:
            while True:
                await trio.sleep(settings.ping_interval)
                await connection.ping(settings.pong_timeout)
        except PongTimeout as exc:
            abort = True
            finish(exc.reason, scope)
        except ConnectionLost as exc:
            finish(exc.reason, scope)

    async def watch_transport(scope: trio.CancelScope) -> None:
        finish(await connection.wait_lost(), scope)

    try:
        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            nursery.start_soon(run_session, scope)
            nursery.start_soon(keepalive, scope)
            nursery.start_soon(watch_transport, scope)
    finally:
        # A dead peer will not answer a close frame: don't wait for it.
        await connection.close(1000, "", 0 if abort else CLOSE_TIMEOUT)
    return reasons[0] if reasons else "connection closed"
