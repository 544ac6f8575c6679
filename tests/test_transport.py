"""The WebSocket link against real servers: trio-websocket's, and raw ones speaking wsproto.

Real sockets, real TLS (certificates from trustme), real time with small
timeouts: trio's MockClock would jump over real I/O waits.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import logging
import random
import socket
import ssl
import threading
import urllib.parse
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trustme
import wsproto
import wsproto.events
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from ocpp16.errors import (
    AuthenticationFailed,
    ConnectFailed,
    ConnectionLost,
    SubprotocolRefused,
    TlsError,
    TransportError,
)
from ocpp16.status import LinkState, LinkStatus
from ocpp16.transport import (
    FAILED_TO_AUTHENTICATE_AT_CENTRAL_SYSTEM,
    INVALID_CENTRAL_SYSTEM_CERTIFICATE,
    INVALID_TLS_VERSION,
    Connection,
    ConnectionSettings,
    Link,
    backoff_delay,
    open_connection,
    security_event_for,
)

KEY = "0123456789abcdef0123456789abcdef"  # 32 characters, the shortest AuthorizationKey
CONNECT_TIMEOUT = 5.0
AT_ONCE = 1.0  # "reported at once": far below CONNECT_TIMEOUT, with room for a loaded machine
Handler = Callable[[WebSocketRequest], Awaitable[None]]


# --------------------------------------------------------------------------- certificates


@pytest.fixture(scope="module")
def server_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def client_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def other_ca() -> trustme.CA:
    return trustme.CA()


def server_context(
    ca: trustme.CA,
    *,
    client_ca: trustme.CA | None = None,
    tls_max: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
    host: str = "127.0.0.1",
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.maximum_version = tls_max
    ca.issue_cert(host).configure_cert(context)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        client_ca.configure_trust(context)
    return context


def client_pems(ca: trustme.CA) -> dict[str, str]:
    cert = ca.issue_cert("CP-1")
    return {
        "client_certificate": "".join(blob.bytes().decode() for blob in cert.cert_chain_pems),
        "client_key": cert.private_key_pem.bytes().decode(),
    }


def ca_pem(ca: trustme.CA) -> str:
    return ca.cert_pem.bytes().decode()


# --------------------------------------------------------------------------- servers


class Changes:
    """Something tests wait on: ``notify()`` on every change, ``until()`` a condition holds."""

    def __init__(self) -> None:
        self._changed = trio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, predicate: Callable[[], bool], limit: float = 3.0) -> None:
        with trio.fail_after(limit):
            while not predicate():
                await self._changed.wait()


class CentralSystem(Changes):
    """A trio-websocket server that records what it was asked and echoes messages."""

    def __init__(self, *, subprotocol: str | None = "ocpp1.6", key: str | None = None) -> None:
        super().__init__()
        self.subprotocol = subprotocol
        self.key = key
        self.requests: list[WebSocketRequest] = []
        self.connections: list[WebSocketConnection] = []
        self.close_codes: list[int] = []  # as the connections ended
        self.reject_status: int | None = None

    async def handler(self, request: WebSocketRequest) -> None:
        self.requests.append(request)
        if self.reject_status is not None:
            await request.reject(self.reject_status)
            return
        if self.key is not None:
            cp_id = urllib.parse.unquote(request.path.rsplit("/", 1)[1])
            expected = b"Basic " + base64.b64encode(f"{cp_id}:{self.key}".encode())
            if dict(request.headers).get(b"authorization") != expected:
                await request.reject(401, body=b"who are you?")
                return
        ws = await request.accept(subprotocol=self.subprotocol)
        self.connections.append(ws)
        try:
            while True:
                message = await ws.get_message()
                await ws.send_message(f"echo {message!s}")
        except ConnectionClosed as closed:
            self.close_codes.append(closed.reason.code if closed.reason else 0)
            self.notify()


@asynccontextmanager
async def websocket_server(
    handler: Handler, ssl_context: ssl.SSLContext | None = None, port: int = 0
) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                serve_websocket,
                handler,
                "127.0.0.1",
                port,
                ssl_context,
                connect_timeout=1,
                disconnect_timeout=1,
            )
        )
        yield server.port
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def tcp_server(handler: Callable[[trio.SocketStream], Awaitable[None]]) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def never_upgrade(stream: trio.SocketStream) -> None:
    """Accepts TCP, reads the upgrade request, never answers."""
    async with stream:
        while await stream.receive_some():
            pass
        await trio.sleep_forever()


class DeafServer:
    """Completes the upgrade with wsproto, then never reads again: pings go unanswered."""

    def __init__(self) -> None:
        self.accepted = 0

    async def handler(self, stream: trio.SocketStream) -> None:
        ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        async with stream:
            while True:
                data = await stream.receive_some()
                if not data:
                    return
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, wsproto.events.Request):
                        accept = wsproto.events.AcceptConnection(subprotocol="ocpp1.6")
                        await stream.send_all(ws.send(accept))
                        self.accepted += 1
                        await trio.sleep_forever()


def raw_upgrade_answer(extra: str) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A server answering the upgrade by hand, with ``extra`` header lines (wsproto won't)."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive_some()
            key = next(
                line.split(b":", 1)[1].strip()
                for line in request.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            digest = hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
            accept = base64.b64encode(digest).decode()
            await stream.send_all(
                (
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{extra}\r\n"
                ).encode()
            )
            await trio.sleep_forever()

    return handler


@asynccontextmanager
async def alerting_tls_server(context: ssl.SSLContext) -> AsyncIterator[tuple[int, list[str]]]:
    """A blocking stdlib TLS server in a thread, yielding (port, handshake outcomes).

    Unlike trio's SSLStream (which drops the connection without a word), it
    sends the TLS alert when it refuses our certificate, as real servers do.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.05)
    outcomes: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    with context.wrap_socket(conn, server_side=True):
                        outcomes.append("ok")
                except (ssl.SSLError, OSError) as exc:
                    outcomes.append(str(exc))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], outcomes
    finally:
        stop.set()
        await trio.to_thread.run_sync(thread.join)
        listener.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def settings_for(port: int, **overrides: Any) -> ConnectionSettings:
    fields: dict[str, Any] = {
        "central_system_url": f"ws://127.0.0.1:{port}/ocpp/",
        "charge_point_id": "CP-1",
        "connect_timeout": CONNECT_TIMEOUT,
    }
    fields.update(overrides)
    return ConnectionSettings(**fields)


def tls_settings_for(port: int, ca: trustme.CA, **overrides: Any) -> ConnectionSettings:
    fields: dict[str, Any] = {
        "central_system_url": f"wss://127.0.0.1:{port}/ocpp/",
        "security_profile": 2,
        "authorization_key": KEY,
        "ca_certificates": ca_pem(ca),
    }
    fields.update(overrides)
    return settings_for(port, **fields)


async def connect(settings: ConnectionSettings) -> tuple[float, BaseException | None]:
    """Open and close one connection: (seconds taken, the error or None)."""
    start = trio.current_time()
    error: BaseException | None = None
    try:
        with trio.fail_after(settings.connect_timeout + 2):  # a hang fails the test
            async with trio.open_nursery() as nursery:
                ws = await open_connection(settings, nursery)
                conn = Connection(ws)
                await conn.send("hello")
                assert await conn.receive() == "echo hello"
                await conn.close()
    except* TransportError as group:  # raised in the nursery's body: grouped
        (error,) = group.exceptions
    return trio.current_time() - start, error


class Recorder(Changes):
    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[LinkStatus] = []
        self.events: list[tuple[str, str]] = []

    def status(self, status: LinkStatus) -> None:
        self.statuses.append(status)
        self.notify()

    def event(self, kind: str, detail: str) -> None:
        self.events.append((kind, detail))

    def states(self) -> list[LinkState]:
        return [s.state for s in self.statuses]

    def count(self, state: LinkState) -> int:
        return self.states().count(state)

    def link(self, settings: ConnectionSettings, seed: int = 1) -> Link:
        return Link(
            settings,
            on_status=self.status,
            on_security_event=self.event,
            random=random.Random(seed),
        )


async def echo_session(conn: Connection) -> None:
    while True:
        await conn.receive()


# --------------------------------------------------------------------------- settings


def test_url_appends_the_percent_encoded_id(server_ca: trustme.CA) -> None:
    settings = settings_for(9000, charge_point_id="CP 1/ä#?")
    assert settings.url == "ws://127.0.0.1:9000/ocpp/CP%201%2F%C3%A4%23%3F"
    assert settings.resource == "/ocpp/CP%201%2F%C3%A4%23%3F"
    assert settings.host_header == "127.0.0.1:9000"
    pems = client_pems(server_ca)
    tls = ConnectionSettings(
        "wss://cs.example/",
        "CP",
        3,
        ca_certificates=ca_pem(server_ca),
        client_certificate=pems["client_certificate"],
        client_key=pems["client_key"],
    )
    assert (tls.host, tls.port, tls.host_header) == ("cs.example", 443, "cs.example")
    assert ConnectionSettings("ws://[::1]:8080/", "CP").host_header == "[::1]:8080"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"central_system_url": "ws://127.0.0.1:9000/ocpp"}, "must end with '/'"),
        ({"central_system_url": "http://127.0.0.1/"}, "ws:// or wss://"),
        ({"central_system_url": "ws://127.0.0.1/?a=1/"}, "no query"),
        ({"central_system_url": "ws://u:p@127.0.0.1/"}, "no credentials"),
        ({"central_system_url": "ws:///path/"}, "no host"),
        ({"central_system_url": "wss://127.0.0.1/"}, "needs a ws://"),
        ({"security_profile": 2, "authorization_key": KEY}, "needs a wss://"),
        ({"security_profile": 4}, "must be 0, 1, 2 or 3"),
        ({"security_profile": 1}, "needs an authorization_key"),
        ({"security_profile": 1, "authorization_key": "short"}, "32..40"),
        ({"security_profile": 1, "authorization_key": KEY, "charge_point_id": "a:b"}, "no ':'"),
        ({"charge_point_id": ""}, "empty"),
        ({"reconnect_min": 2.0, "reconnect_max": 1.0}, "at least reconnect_min"),
        ({"connect_timeout": 0}, "positive"),
    ],
)
def test_settings_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings_for(9000, **fields)


def test_tls_settings_refused(server_ca: trustme.CA) -> None:
    url = "wss://127.0.0.1:9000/"
    with pytest.raises(ValueError, match="needs ca_certificates"):
        ConnectionSettings(url, "CP", 2, authorization_key=KEY)
    with pytest.raises(ValueError, match="no usable PEM"):
        ConnectionSettings(url, "CP", 2, authorization_key=KEY, ca_certificates="garbage")
    with pytest.raises(ValueError, match="needs client_certificate"):
        ConnectionSettings(url, "CP", 3, ca_certificates=ca_pem(server_ca))
    mismatched = client_pems(server_ca)["client_key"]  # not the certificate's key
    with pytest.raises(ValueError, match="matching unencrypted key"):
        ConnectionSettings(
            url,
            "CP",
            3,
            ca_certificates=ca_pem(server_ca),
            client_certificate=client_pems(server_ca)["client_certificate"],
            client_key=mismatched,
        )


def test_secrets_stay_out_of_repr() -> None:
    settings = settings_for(9000, security_profile=1, authorization_key=KEY)
    assert KEY not in repr(settings)
    assert "CP-1" in repr(settings)


def test_backoff_grows_doubles_and_caps_with_equal_jitter() -> None:
    rng = random.Random(7)
    for _ in range(200):
        assert 1.0 <= backoff_delay(1, 1.0, 30.0, rng) <= 2.0
        assert 2.0 <= backoff_delay(2, 1.0, 30.0, rng) <= 4.0
        assert 8.0 <= backoff_delay(4, 1.0, 30.0, rng) <= 16.0
        assert 15.0 <= backoff_delay(5, 1.0, 30.0, rng) <= 30.0
        assert 15.0 <= backoff_delay(10_000, 1.0, 30.0, rng) <= 30.0
        assert backoff_delay(3, 1.0, 1.0, rng) == 1.0  # the floor holds when min == max
    draws = {round(backoff_delay(5, 1.0, 30.0, rng), 6) for _ in range(50)}
    assert len(draws) > 40  # jittered, not a fixed schedule


# --------------------------------------------------------------------------- profile 0


async def test_profile0_negotiates_ocpp16_and_appends_the_id() -> None:
    cs = CentralSystem()
    async with websocket_server(cs.handler) as port, trio.open_nursery() as nursery:
        ws = await open_connection(settings_for(port), nursery)
        assert ws.subprotocol == "ocpp1.6"
        conn = Connection(ws)
        await conn.send('[2,"1","Heartbeat",{}]')
        assert await conn.receive() == 'echo [2,"1","Heartbeat",{}]'
        await conn.close()
    (request,) = cs.requests
    assert request.path == "/ocpp/CP-1"
    assert request.proposed_subprotocols == ("ocpp1.6",)
    assert b"authorization" not in dict(request.headers)


async def test_an_id_that_needs_percent_encoding_reaches_the_server_encoded() -> None:
    cs = CentralSystem()
    async with websocket_server(cs.handler) as port:
        _, error = await connect(settings_for(port, charge_point_id="Ladepunkt 7/ä"))
    assert error is None
    assert cs.requests[0].path == "/ocpp/Ladepunkt%207%2F%C3%A4"


# --------------------------------------------------------------------------- profile 1


async def test_profile1_sends_the_exact_basic_header() -> None:
    cs = CentralSystem(key=KEY)
    async with websocket_server(cs.handler) as port:
        _, error = await connect(settings_for(port, security_profile=1, authorization_key=KEY))
    assert error is None
    header = dict(cs.requests[0].headers)[b"authorization"]
    assert header == b"Basic " + base64.b64encode(b"CP-1:" + KEY.encode())


async def test_profile1_basic_user_is_the_id_itself_not_its_url_encoding() -> None:
    cs = CentralSystem(key=KEY)
    async with websocket_server(cs.handler) as port:
        settings = settings_for(
            port, charge_point_id="Säule 1", security_profile=1, authorization_key=KEY
        )
        _, error = await connect(settings)
    assert error is None
    assert cs.requests[0].path == "/ocpp/S%C3%A4ule%201"
    header = dict(cs.requests[0].headers)[b"authorization"]
    assert base64.b64decode(header.removeprefix(b"Basic ")) == f"Säule 1:{KEY}".encode()


async def test_profile1_wrong_key_fails_at_once_as_authentication() -> None:
    cs = CentralSystem(key=KEY)
    async with websocket_server(cs.handler) as port:
        wrong = settings_for(port, security_profile=1, authorization_key="x" * 40)
        elapsed, error = await connect(wrong)
    assert isinstance(error, AuthenticationFailed)
    assert "HTTP 401" in error.reason
    assert elapsed < AT_ONCE


async def test_other_http_status_is_a_connect_failure() -> None:
    cs = CentralSystem()
    cs.reject_status = 404
    async with websocket_server(cs.handler) as port:
        _, error = await connect(settings_for(port))
    assert isinstance(error, ConnectFailed)
    assert "HTTP 404" in error.reason


async def test_link_reports_refused_credentials_once_as_a_security_event() -> None:
    cs = CentralSystem(key=KEY)
    rec = Recorder()
    async with websocket_server(cs.handler) as port, trio.open_nursery() as nursery:
        settings = settings_for(
            port,
            security_profile=1,
            authorization_key="y" * 32,
            reconnect_min=0.02,
            reconnect_max=0.05,
        )
        nursery.start_soon(rec.link(settings).run, echo_session)
        await rec.until(lambda: rec.count(LinkState.DISCONNECTED) >= 3)
        nursery.cancel_scope.cancel()
    reason = "central system refused our credentials (HTTP 401)"
    assert rec.events == [(FAILED_TO_AUTHENTICATE_AT_CENTRAL_SYSTEM, reason)]
    failed = [s for s in rec.statuses if s.state is LinkState.DISCONNECTED]
    assert all("HTTP 401" in s.reason for s in failed)
    assert LinkState.CONNECTED not in rec.states()


# --------------------------------------------------------------------------- profiles 2 and 3


async def test_profile2_connects_with_the_right_ca(server_ca: trustme.CA) -> None:
    cs = CentralSystem(key=KEY)
    async with websocket_server(cs.handler, server_context(server_ca)) as port:
        _, error = await connect(tls_settings_for(port, server_ca))
    assert error is None
    assert cs.requests[0].path == "/ocpp/CP-1"


async def test_profile2_wrong_ca_fails_at_once_with_the_ssl_reason(
    server_ca: trustme.CA, other_ca: trustme.CA
) -> None:
    cs = CentralSystem(key=KEY)
    async with websocket_server(cs.handler, server_context(server_ca)) as port:
        elapsed, error = await connect(tls_settings_for(port, other_ca))
    assert isinstance(error, TlsError)
    assert "unable to get local issuer certificate" in error.reason
    assert elapsed < AT_ONCE  # not trio-websocket's connect timeout
    assert cs.requests == []


async def test_profile2_certificate_for_another_host_is_refused(server_ca: trustme.CA) -> None:
    context = server_context(server_ca, host="cs.example")
    async with websocket_server(CentralSystem().handler, context) as port:
        _, error = await connect(tls_settings_for(port, server_ca))
    assert isinstance(error, TlsError)
    assert "mismatch" in error.reason


async def test_link_reports_an_untrusted_certificate_as_a_security_event(
    server_ca: trustme.CA, other_ca: trustme.CA
) -> None:
    rec = Recorder()
    async with websocket_server(CentralSystem().handler, server_context(server_ca)) as port:
        settings = tls_settings_for(port, other_ca, reconnect_min=0.02, reconnect_max=0.05)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rec.link(settings).run, echo_session)
            await rec.until(lambda: rec.count(LinkState.DISCONNECTED) >= 2)
            nursery.cancel_scope.cancel()
    ((kind, detail),) = rec.events
    assert kind == INVALID_CENTRAL_SYSTEM_CERTIFICATE
    assert "unable to get local issuer certificate" in detail
    assert rec.statuses[2].reason == rec.statuses[1].reason  # CONNECTING shows the last failure


async def test_a_server_below_tls12_is_refused_as_invalid_tls_version(
    server_ca: trustme.CA,
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 is deprecated
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    server_ca.issue_cert("127.0.0.1").configure_cert(context)
    async with alerting_tls_server(context) as (port, outcomes):
        elapsed, error = await connect(tls_settings_for(port, server_ca))
    assert isinstance(error, TlsError), error
    assert "PROTOCOL_VERSION" in error.reason
    assert security_event_for(error) == INVALID_TLS_VERSION
    assert elapsed < AT_ONCE
    assert outcomes != ["ok"]


TLS_VERSIONS = pytest.mark.parametrize(
    "tls_max", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)


def profile3_settings(
    port: int, server_ca: trustme.CA, client_ca: trustme.CA, **overrides: Any
) -> ConnectionSettings:
    return tls_settings_for(
        port,
        server_ca,
        security_profile=3,
        authorization_key=None,
        **client_pems(client_ca),
        **overrides,
    )


@TLS_VERSIONS
async def test_profile3_mutual_tls_connects(
    server_ca: trustme.CA, client_ca: trustme.CA, tls_max: ssl.TLSVersion
) -> None:
    cs = CentralSystem()
    context = server_context(server_ca, client_ca=client_ca, tls_max=tls_max)
    async with websocket_server(cs.handler, context) as port:
        _, error = await connect(profile3_settings(port, server_ca, client_ca))
    assert error is None
    assert b"authorization" not in dict(cs.requests[0].headers)  # no Basic auth in profile 3


@TLS_VERSIONS
async def test_profile3_refused_client_certificate_is_an_authentication_failure(
    server_ca: trustme.CA,
    client_ca: trustme.CA,
    other_ca: trustme.CA,
    tls_max: ssl.TLSVersion,
) -> None:
    # In TLS 1.3 the server judges our certificate after our side of the
    # handshake is done: its alert arrives while we wait for the upgrade, and
    # must still be reported at once, as what it is.
    context = server_context(server_ca, client_ca=client_ca, tls_max=tls_max)
    async with alerting_tls_server(context) as (port, outcomes):
        elapsed, error = await connect(profile3_settings(port, server_ca, other_ca))
        assert isinstance(error, AuthenticationFailed), error
        assert "rejected our client certificate" in error.reason
        assert "UNKNOWN_CA" in error.reason
        assert elapsed < AT_ONCE
        # No client certificate at all (profile 2 settings against this server).
        elapsed, error = await connect(tls_settings_for(port, server_ca))
        assert isinstance(error, TlsError), error
        assert elapsed < AT_ONCE
    assert len(outcomes) == 2
    assert "ok" not in outcomes


async def test_link_reports_a_refused_client_certificate_as_a_security_event(
    server_ca: trustme.CA, client_ca: trustme.CA, other_ca: trustme.CA
) -> None:
    rec = Recorder()
    context = server_context(server_ca, client_ca=client_ca)
    async with alerting_tls_server(context) as (port, _), trio.open_nursery() as nursery:
        settings = profile3_settings(port, server_ca, other_ca, reconnect_min=0.02)
        nursery.start_soon(rec.link(settings).run, echo_session)
        await rec.until(lambda: rec.count(LinkState.DISCONNECTED) >= 2)
        nursery.cancel_scope.cancel()
    ((kind, detail),) = rec.events
    assert kind == FAILED_TO_AUTHENTICATE_AT_CENTRAL_SYSTEM
    assert "client certificate" in detail


# --------------------------------------------------------------------------- failures


async def test_refused_connection_is_a_connect_failure_with_the_os_reason() -> None:
    elapsed, error = await connect(settings_for(free_port()))
    assert isinstance(error, ConnectFailed)
    assert "Connection refused" in error.reason
    assert elapsed < AT_ONCE


async def test_server_that_never_answers_the_upgrade_times_out() -> None:
    async with tcp_server(never_upgrade) as port:
        elapsed, error = await connect(settings_for(port, connect_timeout=0.3))
    assert isinstance(error, ConnectFailed)
    assert "timed out after 0.3 s waiting for the WebSocket upgrade" in error.reason
    assert 0.3 <= elapsed < 0.9


async def test_server_choosing_no_subprotocol_is_refused() -> None:
    cs = CentralSystem(subprotocol=None)
    async with websocket_server(cs.handler) as port:
        elapsed, error = await connect(settings_for(port))
        await cs.until(lambda: bool(cs.close_codes))
    assert isinstance(error, SubprotocolRefused), error
    assert "no subprotocol" in error.reason
    assert elapsed < AT_ONCE
    assert cs.close_codes == [1002]  # we close it, as a protocol error


async def test_server_choosing_another_subprotocol_is_refused() -> None:
    async with tcp_server(raw_upgrade_answer("Sec-WebSocket-Protocol: ocpp2.0.1\r\n")) as port:
        elapsed, error = await connect(settings_for(port))
    assert isinstance(error, SubprotocolRefused), error
    assert "'ocpp2.0.1'" in error.reason
    assert elapsed < AT_ONCE


async def test_an_invalid_upgrade_answer_fails_at_once() -> None:
    async with tcp_server(raw_upgrade_answer("Sec-WebSocket-Extensions: bogus\r\n")) as port:
        elapsed, error = await connect(settings_for(port))
    assert isinstance(error, ConnectFailed), error
    assert "invalid WebSocket upgrade answer" in error.reason
    assert "101 Switching Protocols" in error.reason
    assert elapsed < AT_ONCE


async def test_connection_maps_closes_to_connection_lost() -> None:
    async def close_with_reason(request: WebSocketRequest) -> None:
        ws = await request.accept(subprotocol="ocpp1.6")
        await ws.send_message("last words")
        await ws.aclose(4000, "bye")

    async with websocket_server(close_with_reason) as port, trio.open_nursery() as nursery:
        conn = Connection(await open_connection(settings_for(port), nursery))
        assert await conn.receive() == "last words"
        with pytest.raises(ConnectionLost, match=r"closed by the central system \(4000.*bye\)"):
            await conn.receive()
        with pytest.raises(ConnectionLost):
            await conn.send("too late")


# --------------------------------------------------------------------------- Link


async def test_link_status_sequence_and_session_io() -> None:
    cs = CentralSystem()
    rec = Recorder()
    replies: list[str] = []

    async def session(conn: Connection) -> None:
        await conn.send("one")
        replies.append(await conn.receive())

    async with websocket_server(cs.handler) as port:
        link = rec.link(settings_for(port, reconnect_min=0.05, reconnect_max=0.1))
        assert link.status.state is LinkState.DISABLED
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.run, session)
            await rec.until(lambda: rec.count(LinkState.DISCONNECTED) == 2)
            nursery.cancel_scope.cancel()
    assert replies == ["echo one", "echo one"]
    assert rec.states()[:6] == [
        LinkState.CONNECTING,
        LinkState.CONNECTED,
        LinkState.DISCONNECTED,
        LinkState.CONNECTING,
        LinkState.CONNECTED,
        LinkState.DISCONNECTED,
    ]
    assert rec.statuses[1].reason == f"ws://127.0.0.1:{port}/ocpp/CP-1"
    assert rec.statuses[2].reason == "session ended"
    assert rec.statuses[-1].state is LinkState.DISABLED
    assert link.status.state is LinkState.DISABLED
    times = [s.since for s in rec.statuses]
    assert times == sorted(times)
    assert rec.statuses[3].since - rec.statuses[2].since >= 0.05  # back-off, not a loop


async def test_session_errors_never_escape_run(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    calls = 0

    async def session(conn: Connection) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug in the session")
        async with trio.open_nursery() as nursery:  # ConnectionLost inside a group
            nursery.start_soon(conn.receive)
            await conn.close()

    async with websocket_server(CentralSystem().handler) as port, trio.open_nursery() as nursery:
        link = rec.link(settings_for(port, reconnect_min=0.02, reconnect_max=0.04))
        with caplog.at_level(logging.ERROR, logger="ocpp16.transport"):
            nursery.start_soon(link.run, session)
            await rec.until(lambda: rec.count(LinkState.DISCONNECTED) >= 2)
            nursery.cancel_scope.cancel()
    reasons = [s.reason for s in rec.statuses if s.state is LinkState.DISCONNECTED]
    assert reasons[0] == "session failed: RuntimeError('bug in the session')"
    assert reasons[1] == "closed by the charge point"
    assert "OCPP session failed" in caplog.text


async def test_unanswered_pings_drop_the_connection_and_the_link_reconnects() -> None:
    deaf = DeafServer()
    rec = Recorder()
    async with tcp_server(deaf.handler) as port, trio.open_nursery() as nursery:
        settings = settings_for(
            port, ping_interval=0.1, pong_timeout=0.15, reconnect_min=0.02, reconnect_max=0.04
        )
        nursery.start_soon(rec.link(settings).run, echo_session)
        await rec.until(lambda: rec.count(LinkState.CONNECTED) >= 2)
        nursery.cancel_scope.cancel()
    first_up, first_down = rec.statuses[1], rec.statuses[2]
    assert (first_up.state, first_down.state) == (LinkState.CONNECTED, LinkState.DISCONNECTED)
    assert first_down.reason == "no pong within 0.15 s"
    # One ping interval plus the pong timeout; the close does not wait for the dead peer.
    assert 0.25 <= first_down.since - first_up.since < 0.7
    assert deaf.accepted >= 2


async def test_answered_pings_keep_the_connection() -> None:
    rec = Recorder()
    async with websocket_server(CentralSystem().handler) as port, trio.open_nursery() as nursery:
        settings = settings_for(port, ping_interval=0.05, pong_timeout=0.1)
        nursery.start_soon(rec.link(settings).run, echo_session)
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert rec.states()[:2] == [LinkState.CONNECTING, LinkState.CONNECTED]
    assert rec.count(LinkState.DISCONNECTED) == 0


async def test_backoff_on_a_refusing_server_grows_caps_and_then_connects() -> None:
    port = free_port()
    rec = Recorder()
    low, high = 0.05, 0.4
    settings = settings_for(port, reconnect_min=low, reconnect_max=high)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rec.link(settings, seed=3).run, echo_session)
        await trio.sleep(2.0)
        async with websocket_server(CentralSystem().handler, port=port):
            await rec.until(lambda: LinkState.CONNECTED in rec.states())
            nursery.cancel_scope.cancel()
    attempts = [s for s in rec.statuses if s.state is LinkState.CONNECTING]
    starts = [s.since for s in attempts]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # The delays are exactly those of the seeded jitter, give or take a refused
    # connect and the scheduling of a loaded machine (wall clock, real sockets:
    # it failed once with 0.1 s of slack while the quick lane filled both cores).
    slack = 0.25
    replica = random.Random(3)
    expected = [backoff_delay(n, low, high, replica) for n in range(1, len(gaps) + 1)]
    for gap, want in zip(gaps, expected, strict=True):
        assert want <= gap < want + slack
    assert gaps[0] <= 2 * low + slack  # starts small
    assert all(high / 2 <= gap < high + slack for gap in gaps[3:])  # then capped
    assert 5 <= len(attempts) <= 12  # ~2 s of refusals: no storm
    assert [s.attempt for s in attempts] == list(range(1, len(attempts) + 1))
    assert rec.statuses[-2].state is LinkState.CONNECTED
    disconnected = [s for s in rec.statuses if s.state is LinkState.DISCONNECTED]
    assert all("Connection refused" in s.reason for s in disconnected)


@pytest.mark.parametrize(("reset_after", "expected"), [(60.0, [1, 2, 3]), (0.0, [1, 1, 1])])
async def test_backoff_resets_only_after_a_connection_that_stayed_up(
    reset_after: float, expected: list[int]
) -> None:
    async def hang_up(request: WebSocketRequest) -> None:
        ws = await request.accept(subprotocol="ocpp1.6")
        await ws.aclose()

    rec = Recorder()
    async with websocket_server(hang_up) as port, trio.open_nursery() as nursery:
        settings = settings_for(
            port, reconnect_min=0.02, reconnect_max=0.08, reconnect_reset_after=reset_after
        )
        nursery.start_soon(rec.link(settings).run, echo_session)
        await rec.until(lambda: rec.count(LinkState.CONNECTED) >= 3)
        nursery.cancel_scope.cancel()
    connected = [s.attempt for s in rec.statuses if s.state is LinkState.CONNECTED]
    assert connected[:3] == expected


async def test_reconnect_applies_new_settings_at_once() -> None:
    first, second = CentralSystem(), CentralSystem()
    rec = Recorder()
    async with (
        websocket_server(first.handler) as port1,
        websocket_server(second.handler) as port2,
        trio.open_nursery() as nursery,
    ):
        link = rec.link(settings_for(port1, reconnect_min=5.0, reconnect_max=10.0))
        nursery.start_soon(link.run, echo_session)
        await rec.until(lambda: rec.count(LinkState.CONNECTED) == 1)
        link.update_settings(settings_for(port2, charge_point_id="CP-2"))
        await trio.sleep(0.05)
        assert len(second.requests) == 0  # only at the next connect
        start = trio.current_time()
        link.reconnect("central system address changed")
        await rec.until(lambda: rec.count(LinkState.CONNECTED) == 2)
        assert trio.current_time() - start < AT_ONCE  # no back-off (reconnect_min is 5 s)
        await first.until(lambda: bool(first.close_codes))
        nursery.cancel_scope.cancel()
    assert first.close_codes == [1000]  # a proper close, not a dropped socket
    assert second.requests[0].path == "/ocpp/CP-2"
    assert rec.statuses[2].reason == "reconnect: central system address changed"
    assert rec.statuses[3].attempt == 1


async def test_disabling_the_link_closes_the_connection_properly() -> None:
    cs = CentralSystem()
    rec = Recorder()
    async with websocket_server(cs.handler) as port:
        link = rec.link(settings_for(port))
        with trio.CancelScope() as scope:  # "connection enabled: off"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.run, echo_session)
                await rec.until(lambda: rec.count(LinkState.CONNECTED) == 1)
                start = trio.current_time()
                scope.cancel()
        assert trio.current_time() - start < AT_ONCE
        await cs.until(lambda: bool(cs.close_codes))
    assert cs.close_codes == [1000]
    assert link.status.state is LinkState.DISABLED
    assert rec.states()[-1] is LinkState.DISABLED


async def test_reconnect_from_the_status_callback_skips_the_backoff() -> None:
    # reconnect() between two phases (here: while DISCONNECTED is reported,
    # before the back-off wait begins) must not be lost.
    rec = Recorder()

    def on_status(status: LinkStatus) -> None:
        rec.status(status)
        if status.state is LinkState.DISCONNECTED and rec.count(LinkState.DISCONNECTED) == 1:
            link.reconnect("installer pressed connect")

    settings = settings_for(free_port(), reconnect_min=10.0, reconnect_max=20.0)
    link = Link(settings, on_status=on_status)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run, echo_session)
        await rec.until(lambda: rec.count(LinkState.CONNECTING) == 2, limit=1.0)
        nursery.cancel_scope.cancel()
    assert rec.statuses[2].reason == "reconnect: installer pressed connect"


async def test_reconnect_cuts_the_backoff_wait_short() -> None:
    port = free_port()
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        link = rec.link(settings_for(port, reconnect_min=10.0, reconnect_max=20.0))
        nursery.start_soon(link.run, echo_session)
        await rec.until(lambda: rec.count(LinkState.DISCONNECTED) == 1)
        link.reconnect("try now")
        await rec.until(lambda: rec.count(LinkState.CONNECTING) == 2, limit=1.0)
        nursery.cancel_scope.cancel()
    assert rec.statuses[2].reason == "reconnect: try now"
