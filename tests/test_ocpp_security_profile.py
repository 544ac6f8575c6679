"""Security profile changes, the AuthorizationKey's encoding and the TLS rules
(Security Whitepaper ed. 3; docs/security.md), against real servers on loopback.

The charge point (``ocpp16.chargepoint.ChargePoint``, its real Configuration and
queue on a SQLite file) connects to a trio-websocket central system over real
sockets, with real TLS (certificates from trustme); the TLS servers that must
refuse us with an alert are stdlib servers in a thread (trio's SSLStream drops
a refused handshake without sending the alert). Real time, small timeouts:
MockClock would jump over real I/O. No duration is asserted but lower bounds
that trio's clock guarantees (a fallback never comes before its time).

Integration tests are named after the OCA compliance cases they cover
(OCTT for OCPP 1.6, TC_073..TC_087).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import ssl
import urllib.parse
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from evse.store import Store
from ocpp16 import transport
from ocpp16.chargepoint import RECONFIGURATION_OF_SECURITY_PARAMETERS, ChargePoint
from ocpp16.config import (
    AUTHORIZATION_KEY_FORMS,
    TRIAL_KEY,
    Configuration,
    InstalledCredentials,
    ProfileTrial,
    tls_address,
)
from ocpp16.metering import format_time
from ocpp16.queue import TransactionQueue
from ocpp16.transport import (
    FAILED_TO_AUTHENTICATE_AT_CENTRAL_SYSTEM,
    INVALID_CENTRAL_SYSTEM_CERTIFICATE,
    INVALID_TLS_CIPHER_SUITE,
    INVALID_TLS_VERSION,
    ConnectionSettings,
    basic_auth_password,
)
from tests.chargepoint_rig import IDENTITY, FakeStation
from tests.test_transport import alerting_tls_server

CP = "CP-1"
#: 20 bytes with the ones a text password cannot hold: NUL, LF, CR, ':', 0xff.
BINARY_KEY = "00ff0a0d3a7f80c3a9deadbeef0102030405fe41"
#: OCTT TC_073 step 1: "OCA_OCTT_admin_test" hex encoded (19 bytes).
OCTT_KEY = "4F43415F4F4354545F61646D696E5F74657374"
#: 16 bytes, the shortest AuthorizationKey (32 hex digits).
SHORT_KEY = "0123456789abcdef0123456789ABCDEF"
LIMIT = 20.0  # a hung step fails the test after this many (real) seconds


# --------------------------------------------------------------------------- waiting


async def until(predicate: Callable[[], object], what: str, limit: float = LIMIT) -> None:
    """Poll ``predicate`` (real time) until it holds; fail naming ``what``."""
    try:
        with trio.fail_after(limit):
            # Polled: the states watched are set by servers, threads and the station
            # alike, with no one event to wait on.
            while not predicate():  # noqa: ASYNC110
                await trio.sleep(0.01)
    except trio.TooSlowError:
        raise AssertionError(f"not reached within {limit} s: {what}") from None


# --------------------------------------------------------------------------- certificates


@dataclass
class Pki:
    """The central system's CA and server certificates, the charge point's identity."""

    tmp: Path
    ca: trustme.CA = field(default_factory=trustme.CA)

    def __post_init__(self) -> None:
        self.ca_file = self.tmp / "cs-root.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        leaf = self.ca.issue_cert(common_name=IDENTITY.serial)
        self.client_cert = self.tmp / "cp-cert.pem"
        self.client_cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        self.client_key = self.tmp / "cp-key.pem"
        leaf.private_key_pem.write_to_path(str(self.client_key))

    def server_context(
        self, *hosts: str, client_auth: bool = False, rsa_cipher: str | None = None
    ) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if rsa_cipher is not None:
            # An RSA server offering one TLS 1.2 suite with RSA key exchange.
            rsa = trustme.CA(key_type=trustme.KeyType.RSA)
            rsa.issue_cert(*hosts, key_type=trustme.KeyType.RSA).configure_cert(context)
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.set_ciphers(rsa_cipher)
            self.rsa_ca_file = self.tmp / "rsa-root.pem"
            rsa.cert_pem.write_to_path(str(self.rsa_ca_file))
        else:
            self.ca.issue_cert(*(hosts or ("127.0.0.1",))).configure_cert(context)
        if client_auth:
            context.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(context)
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


# --------------------------------------------------------------------------- central system


def now_text() -> str:
    return format_time(datetime.now(UTC))


class Peer:
    """One accepted WebSocket: answers the charge point's CALLs, makes our own."""

    def __init__(self, ws: WebSocketConnection, request: WebSocketRequest) -> None:
        self.ws = ws
        self.request = request
        self.received: list[list[Any]] = []
        self.closed = False
        self._ids = itertools.count(1)
        self._waiting: dict[str, trio.MemorySendChannel[list[Any]]] = {}

    async def run(self) -> None:
        try:
            while True:
                frame = json.loads(await self.ws.get_message())
                self.received.append(frame)
                if frame[0] == 2:
                    await self.ws.send_message(json.dumps([3, frame[1], self.answer(frame)]))
                elif frame[1] in self._waiting:
                    self._waiting.pop(frame[1]).send_nowait(frame)
        except ConnectionClosed:
            self.closed = True

    @staticmethod
    def answer(frame: list[Any]) -> dict[str, Any]:
        action = frame[2]
        if action == "BootNotification":
            return {"status": "Accepted", "currentTime": now_text(), "interval": 3600}
        if action == "Heartbeat":
            return {"currentTime": now_text()}
        return {}

    async def call(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        unique_id = f"cs-{next(self._ids)}"
        send, receive = trio.open_memory_channel[list[Any]](1)
        self._waiting[unique_id] = send
        await self.ws.send_message(json.dumps([2, unique_id, action, payload]))
        with trio.fail_after(LIMIT):
            frame = await receive.receive()
        assert frame[0] == 3, frame
        answer: dict[str, Any] = frame[2]
        return answer

    def actions(self) -> list[str]:
        return [f[2] for f in self.received if f[0] == 2]


class CentralSystem:
    """A trio-websocket central system: records every upgrade request and checks
    HTTP Basic auth against ``password`` (bytes, as a conformant one compares)."""

    def __init__(self, password: bytes | None = None) -> None:
        self.password = password
        self.requests: list[WebSocketRequest] = []
        self.refused: list[bytes | None] = []
        self.peers: list[Peer] = []

    def credentials(self, request: WebSocketRequest) -> tuple[bytes, bytes] | None:
        header = dict(request.headers).get(b"authorization")
        if header is None or not header.startswith(b"Basic "):
            return None
        try:
            decoded = base64.b64decode(header.removeprefix(b"Basic "), validate=True)
        except binascii.Error:
            return None
        user, sep, password = decoded.partition(b":")  # RFC 7617: the first colon
        return (user, password) if sep else None

    async def handler(self, request: WebSocketRequest) -> None:
        self.requests.append(request)
        if self.password is not None:
            got = self.credentials(request)
            cp_id = urllib.parse.unquote(request.path.rsplit("/", 1)[1]).encode()
            if got != (cp_id, self.password):
                self.refused.append(got[1] if got else None)
                await request.reject(401, body=b"who are you?")
                return
        ws = await request.accept(subprotocol="ocpp1.6")
        peer = Peer(ws, request)
        self.peers.append(peer)
        await peer.run()

    @property
    def peer(self) -> Peer:
        return self.peers[-1]

    def basic_header(self, index: int = -1) -> bytes:
        header: bytes = dict(self.requests[index].headers)[b"authorization"]
        return header


@asynccontextmanager
async def serving(
    cs: CentralSystem, context: ssl.SSLContext | None = None, port: int = 0
) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                serve_websocket,
                cs.handler,
                "127.0.0.1",
                port,
                context,
                connect_timeout=2,
                disconnect_timeout=1,
            )
        )
        yield server.port
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- the station


def connection_settings(config: Configuration) -> ConnectionSettings | None:
    """What evse/ocpp_port.py builds from the registry, with the key's form and
    short back-off times (real time in these tests)."""
    address = config.get_str("CentralSystemAddress")
    if not address:
        return None
    try:
        ca, cert, key = config.connection_files()
        return ConnectionSettings(
            central_system_url=address,
            charge_point_id=CP,
            security_profile=config.get_int("SecurityProfile"),
            authorization_key=config.get_str("AuthorizationKey") or None,
            authorization_key_form=config.get_str("BasicAuthPasswordForm"),
            ca_certificates=ca,
            client_certificate=cert,
            client_key=key,
            connect_timeout=5.0,
            ping_interval=0,
            reconnect_min=0.05,
            reconnect_max=0.2,
        )
    except ValueError:
        return None


@contextmanager
def reopened(path: Path, **credentials: Callable[[], bool]) -> Iterator[Configuration]:
    """The registry in the store at ``path``, read afresh (as after a restart)."""
    store = Store.open(path)
    try:
        yield Configuration(store, credentials=InstalledCredentials(**credentials))
    finally:
        store.close()


@dataclass
class Station:
    cp: ChargePoint
    config: Configuration
    store: Store
    events: list[tuple[str, str | None, float]]

    def event_types(self) -> list[str]:
        return [kind for kind, _, _ in self.events]

    def events_of(self, kind: str) -> list[str | None]:
        return [info for k, info, _ in self.events if k == kind]


@asynccontextmanager
async def station(tmp_path: Path, settings: dict[str, str]) -> AsyncIterator[Station]:
    """The charge point running on the registry in ``tmp_path`` (kept between
    two ``station`` blocks: a restart), with ``settings`` set by the installer."""
    path = tmp_path / "station.db"
    store = Store.open(path)
    queue = TransactionQueue.open(path)
    try:
        config = Configuration(store, credentials=InstalledCredentials())
        if settings:
            result = config.change_many(settings, source="installer")
            assert result.ok, result
        events: list[tuple[str, str | None, float]] = []
        cp = ChargePoint(
            config=config,
            queue=queue,
            station=FakeStation(),
            identity=IDENTITY,
            connection_settings=lambda: connection_settings(config),
            emit=lambda kind, info: events.append((kind, info, trio.current_time())),
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cp.run)
            yield Station(cp, config, store, events)
            nursery.cancel_scope.cancel()
    finally:
        queue.close()
        store.close()


def profile_1(port: int, key: str = BINARY_KEY) -> dict[str, str]:
    return {
        "CentralSystemAddress": f"ws://127.0.0.1:{port}/ocpp/",
        "AuthorizationKey": key,
        "SecurityProfile": "1",
    }


def profile_2(port: int, pki: Pki, key: str = BINARY_KEY) -> dict[str, str]:
    return {
        "CentralSystemAddress": f"wss://127.0.0.1:{port}/ocpp/",
        "CentralSystemRootCertificate": str(pki.ca_file),
        "AuthorizationKey": key,
        "SecurityProfile": "2",
    }


def basic(password: bytes, user: str = CP) -> bytes:
    return b"Basic " + base64.b64encode(user.encode() + b":" + password)


# --------------------------------------------------------------------------- the key's form


def test_the_password_is_the_bytes_the_hex_key_encodes() -> None:
    assert basic_auth_password(BINARY_KEY) == bytes.fromhex(BINARY_KEY)
    assert basic_auth_password(OCTT_KEY) == b"OCA_OCTT_admin_test"
    assert basic_auth_password(SHORT_KEY.lower()) == basic_auth_password(SHORT_KEY)
    # literal: the text itself, for a central system that compares that
    assert basic_auth_password(OCTT_KEY, "literal") == OCTT_KEY.encode()
    # not an even number of hex digits: it can only be meant literally
    assert basic_auth_password("k" * 32) == b"k" * 32
    assert basic_auth_password("0" * 33) == b"0" * 33
    with pytest.raises(ValueError, match="authorization_key_form"):
        basic_auth_password(OCTT_KEY, "base64")
    assert AUTHORIZATION_KEY_FORMS == transport.AUTHORIZATION_KEY_FORMS


def test_the_header_is_built_from_bytes() -> None:
    settings = ConnectionSettings(
        "ws://127.0.0.1:9/",
        "Säule 1",
        1,
        authorization_key=BINARY_KEY,
        authorization_key_form="hex",
    )
    ((name, value),) = settings.handshake_headers()
    assert name == b"authorization"
    assert value == b"Basic " + base64.b64encode(
        "Säule 1".encode() + b":" + bytes.fromhex(BINARY_KEY)
    )
    with pytest.raises(ValueError, match="authorization_key_form"):
        ConnectionSettings("ws://h/", CP, 1, authorization_key=OCTT_KEY, authorization_key_form="x")


async def test_tc_085_basic_authentication_valid_username_password_combination(
    tmp_path: Path,
) -> None:
    """TC_085: AUTHORIZATION: Basic base64(<ChargePointId>:<the non hex representation
    of the key>): here bytes no text password could hold (NUL, LF, CR, ':', 0xff)."""
    cs = CentralSystem(password=bytes.fromhex(BINARY_KEY))
    async with serving(cs) as port, station(tmp_path, profile_1(port)):
        await until(lambda: cs.peers, "connected")
        await until(lambda: "BootNotification" in cs.peer.actions(), "booted")
    assert cs.basic_header(0) == basic(bytes.fromhex(BINARY_KEY))
    assert cs.refused == []


async def test_the_literal_form_sends_the_key_text(tmp_path: Path) -> None:
    cs = CentralSystem(password=OCTT_KEY.encode())
    settings = profile_1(0, OCTT_KEY) | {"BasicAuthPasswordForm": "literal"}
    async with serving(cs) as port:
        settings["CentralSystemAddress"] = f"ws://127.0.0.1:{port}/ocpp/"
        async with station(tmp_path, settings):
            await until(lambda: cs.peers, "connected")
    assert cs.basic_header(0) == basic(OCTT_KEY.encode())


async def test_refused_credentials_are_a_security_event(tmp_path: Path) -> None:
    cs = CentralSystem(password=b"something else entirely")
    async with serving(cs) as port, station(tmp_path, profile_1(port)) as st:
        await until(lambda: len(cs.refused) >= 2, "refused twice")
    assert st.events_of(FAILED_TO_AUTHENTICATE_AT_CENTRAL_SYSTEM) == [
        "central system refused our credentials (HTTP 401)"
    ]  # once per failure streak, not once per attempt
    assert cs.refused[0] == bytes.fromhex(BINARY_KEY)


async def test_tc_073_update_charge_point_password_for_http_basic_authentication(
    tmp_path: Path,
) -> None:
    """TC_073: ChangeConfiguration AuthorizationKey, twice: each Accepted, then the
    station reconnects with the new password (the answer goes out first)."""
    cs = CentralSystem(password=bytes.fromhex(BINARY_KEY))
    async with serving(cs) as port, station(tmp_path, profile_1(port)) as st:
        await until(lambda: cs.peers, "connected")
        for count, key in ((2, OCTT_KEY), (3, SHORT_KEY)):
            first = cs.peer
            cs.password = bytes.fromhex(key)
            answer = await first.call(
                "ChangeConfiguration", {"key": "AuthorizationKey", "value": key}
            )
            assert answer == {"status": "Accepted"}
            await until(partial(lambda peer: peer.closed, first), "the old connection closed")
            await until(partial(lambda n: len(cs.peers) == n, count), "reconnected")
            assert cs.basic_header() == basic(bytes.fromhex(key))
    assert cs.refused == []
    assert st.events_of(RECONFIGURATION_OF_SECURITY_PARAMETERS) == [
        "AuthorizationKey changed",
        "AuthorizationKey changed",
    ]
    assert OCTT_KEY not in json.dumps(st.events) and SHORT_KEY not in json.dumps(st.events)


# --------------------------------------------------------------------------- TLS


async def test_tc_086_tls_server_side_certificate_valid_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    """TC_086 (with TC_085 over TLS): profile 2, the server verified against the
    CentralSystemRootCertificate, TLS 1.2 or above, the binary key's Basic header."""
    cs = CentralSystem(password=bytes.fromhex(BINARY_KEY))
    async with (
        serving(cs, pki.server_context("127.0.0.1")) as port,
        station(tmp_path, profile_2(port, pki)),
    ):
        await until(lambda: cs.peers, "connected over TLS")
        stream = cs.peer.ws._stream  # the server's view of TLS
        assert isinstance(stream, trio.SSLStream)
        assert stream.version() in ("TLSv1.2", "TLSv1.3")
    assert cs.basic_header(0) == basic(bytes.fromhex(BINARY_KEY))


async def test_tc_086_an_rsa_server_with_the_whitepapers_rsa_suite(
    tmp_path: Path, pki: Pki
) -> None:
    """The whitepaper's TLS_RSA_WITH_AES_128_GCM_SHA256, which Python's default
    client list leaves out, is offered: an RSA server offering only it is reached."""
    cs = CentralSystem(password=bytes.fromhex(BINARY_KEY))
    context = pki.server_context("127.0.0.1", rsa_cipher="AES128-GCM-SHA256")
    async with serving(cs, context) as port:
        settings = profile_2(port, pki) | {"CentralSystemRootCertificate": str(pki.rsa_ca_file)}
        async with station(tmp_path, settings):
            await until(lambda: cs.peers, "connected over TLS 1.2 with RSA key exchange")
            stream = cs.peer.ws._stream
            assert isinstance(stream, trio.SSLStream)
            cipher = stream.cipher()
            assert cipher is not None and cipher[0] == "AES128-GCM-SHA256"


async def test_tc_087_tls_client_side_certificate_valid_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    """TC_087: profile 3, the server requires and verifies our client certificate."""
    cs = CentralSystem()
    context = pki.server_context("127.0.0.1", client_auth=True)
    async with serving(cs, context) as port:
        settings = {
            "CentralSystemAddress": f"wss://127.0.0.1:{port}/ocpp/",
            "CentralSystemRootCertificate": str(pki.ca_file),
            "ChargePointCertificate": str(pki.client_cert),
            "ChargePointPrivateKey": str(pki.client_key),
            "SecurityProfile": "3",
        }
        async with station(tmp_path, settings):
            await until(lambda: cs.peers, "connected with mutual TLS")
            stream = cs.peer.ws._stream
            assert isinstance(stream, trio.SSLStream)
            peer_cert = stream.getpeercert()
            assert peer_cert is not None
            subject = dict(item for rdn in peer_cert["subject"] for item in rdn)
            assert subject["commonName"] == IDENTITY.serial
    assert b"authorization" not in dict(cs.requests[0].headers)  # no Basic auth in profile 3


async def test_a_server_certificate_for_another_name_is_refused(tmp_path: Path, pki: Pki) -> None:
    cs = CentralSystem(password=bytes.fromhex(BINARY_KEY))
    async with (
        serving(cs, pki.server_context("cs.example")) as port,
        station(tmp_path, profile_2(port, pki)) as st,
    ):
        await until(lambda: st.events, "a security event")
    assert cs.requests == []  # refused in the handshake, before any HTTP
    ((kind, info, _),) = st.events
    assert kind == INVALID_CENTRAL_SYSTEM_CERTIFICATE
    assert info is not None and "mismatch" in info


async def test_a_tls_11_only_server_is_refused_as_invalid_tls_version(
    tmp_path: Path, pki: Pki
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    pki.ca.issue_cert("127.0.0.1").configure_cert(context)
    async with (
        alerting_tls_server(context) as (port, outcomes),
        station(tmp_path, profile_2(port, pki)) as st,
    ):
        await until(lambda: st.events, "a security event")
    ((kind, info, _),) = st.events
    assert kind == INVALID_TLS_VERSION
    assert info is not None and "PROTOCOL_VERSION" in info
    assert outcomes and "ok" not in outcomes


async def test_a_server_without_an_acceptable_cipher_suite_is_invalid_tls_cipher_suite(
    tmp_path: Path, pki: Pki
) -> None:
    # AES128-SHA: CBC with SHA-1 MACs, which we never offer.
    context = pki.server_context("127.0.0.1", rsa_cipher="AES128-SHA")
    async with alerting_tls_server(context) as (port, outcomes):
        settings = profile_2(port, pki) | {"CentralSystemRootCertificate": str(pki.rsa_ca_file)}
        async with station(tmp_path, settings) as st:
            await until(lambda: st.events, "a security event")
    ((kind, info, _),) = st.events
    assert kind == INVALID_TLS_CIPHER_SUITE
    assert info is not None and "HANDSHAKE_FAILURE" in info
    assert any("NO_SHARED_CIPHER" in outcome for outcome in outcomes)


def test_the_tls_context_asks_for_tls12_and_the_servers_name(pki: Pki) -> None:
    settings = ConnectionSettings(
        "wss://cs.example/",
        CP,
        2,
        authorization_key=BINARY_KEY,
        ca_certificates=pki.ca.cert_pem.bytes().decode(),
    )
    context = settings.ssl_context
    assert context is not None
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.check_hostname is True
    assert context.verify_mode is ssl.CERT_REQUIRED
    names = {c["name"] for c in context.get_ciphers()}
    # The Security Whitepaper's list: the suites a charge point must support.
    assert {
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "AES128-GCM-SHA256",
        "AES256-GCM-SHA384",
    } <= names
    assert not any(name.endswith("-SHA") or "RC4" in name or "NULL" in name for name in names)


# --------------------------------------------------------------------------- the address


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("ws://cs.example/ocpp/", "wss://cs.example/ocpp/"),
        ("ws://cs.example:80/ocpp/", "wss://cs.example/ocpp/"),  # ws's default written out
        ("ws://cs.example:8887/ocpp/v16/", "wss://cs.example:8887/ocpp/v16/"),
        ("ws://127.0.0.1:9000/", "wss://127.0.0.1:9000/"),
        ("ws://[::1]:9000/a/", "wss://[::1]:9000/a/"),
        ("ws://[::1]/a/", "wss://[::1]/a/"),
        ("ws://CS.Example/Path%20X/", "wss://CS.Example/Path%20X/"),  # host and path as written
        ("wss://cs.example:8443/ocpp/", "wss://cs.example:8443/ocpp/"),
        ("", ""),
    ],
)
def test_tls_address_keeps_host_path_and_an_explicit_port(address: str, expected: str) -> None:
    assert tls_address(address) == expected


# --------------------------------------------------------------------------- the registry's rules


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "station.db")
    yield s
    s.close()


def strict(store: Store, **credentials: Callable[[], bool]) -> Configuration:
    return Configuration(store, credentials=InstalledCredentials(**credentials))


def test_tls_profiles_need_a_root_certificate(store: Store, pki: Pki) -> None:
    config = strict(store)
    assert config.change_many(profile_1(9000), source="installer").ok
    before = store.settings()
    result = config.central_system_change("SecurityProfile", "2")
    assert result.status == "Rejected" and "CentralSystemRootCertificate" in result.reason
    assert store.settings() == before
    assert config.profile_trial() is None
    # the installer's file counts, and so does one the certificate store holds
    assert config.change("CentralSystemRootCertificate", str(pki.ca_file), source="ui").ok
    assert config.central_system_change("SecurityProfile", "2").status == "Accepted"
    with reopened(pki.tmp / "other.db", central_system_root=lambda: True) as installed:
        assert installed.change_many(profile_1(9000), source="installer").ok
        assert installed.central_system_change("SecurityProfile", "2").status == "Accepted"


def test_a_root_certificate_in_use_cannot_be_removed(store: Store, pki: Pki) -> None:
    config = strict(store)
    assert config.change_many(profile_2(9000, pki), source="installer").ok
    result = config.change("CentralSystemRootCertificate", "", source="ui")
    assert (result.status, result.key) == ("Rejected", "CentralSystemRootCertificate")
    assert config.get_str("CentralSystemRootCertificate") == str(pki.ca_file)


def test_profile_3_needs_a_client_certificate_and_key(store: Store, pki: Pki) -> None:
    config = strict(store)
    assert config.change_many(profile_2(9000, pki), source="installer").ok
    result = config.central_system_change("SecurityProfile", "3")
    assert result.status == "Rejected" and "client certificate" in result.reason
    assert config.get_int("SecurityProfile") == 2
    assert config.change_many(
        {
            "ChargePointCertificate": str(pki.client_cert),
            "ChargePointPrivateKey": str(pki.client_key),
        },
        source="ui",
    ).ok
    assert config.central_system_change("SecurityProfile", "3").status == "Accepted"
    # one the CSR flow installed in the certificate store counts as well
    with reopened(pki.tmp / "csr.db", client_certificate=lambda: True) as other:
        assert other.change_many(profile_2(9000, pki), source="installer").ok
        assert other.central_system_change("SecurityProfile", "3").status == "Accepted"


def test_basic_auth_profiles_still_need_the_key(store: Store) -> None:
    config = strict(store)
    assert config.change("CentralSystemAddress", "ws://cs/ocpp/", source="ui").ok
    result = config.central_system_change("SecurityProfile", "1")
    assert result.status == "Rejected" and "AuthorizationKey" in result.reason
    assert config.profile_trial() is None


def test_a_raise_to_tls_switches_the_address_and_is_put_on_trial(store: Store, pki: Pki) -> None:
    config = strict(store)
    assert config.change_many(
        profile_1(8887) | {"CentralSystemRootCertificate": str(pki.ca_file)}, source="ui"
    ).ok
    # the installer's own change does not guess the address: it gives it
    result = config.change("SecurityProfile", "2", source="ui")
    assert result.status == "Rejected" and "wss://" in result.reason
    assert config.central_system_change("securityprofile", "2").status == "Accepted"
    assert config.get_int("SecurityProfile") == 2
    assert config.get_str("CentralSystemAddress") == "wss://127.0.0.1:8887/ocpp/"
    trial = ProfileTrial(1, "ws://127.0.0.1:8887/ocpp/", 2, "wss://127.0.0.1:8887/ocpp/")
    assert config.profile_trial() == trial
    # written with the raise, in the store: a restart keeps the way back
    assert ProfileTrial.parse(store.get_setting(TRIAL_KEY)) == trial
    assert Configuration(store).profile_trial() == trial
    # the way back: the only way the profile ever goes down
    assert config.end_profile_trial(restore=True) == trial
    again = Configuration(store)
    assert again.get_int("SecurityProfile") == 1
    assert again.get_str("CentralSystemAddress") == "ws://127.0.0.1:8887/ocpp/"
    assert again.profile_trial() is None
    assert store.get_setting(TRIAL_KEY) == ""


def test_tc_084_downgrade_security_profile_rejected(store: Store, pki: Pki) -> None:
    config = strict(store)
    assert config.change_many(profile_2(9000, pki), source="installer").ok
    before = store.settings()
    for lower in ("1", "0"):
        result = config.central_system_change("SecurityProfile", lower)
        assert result.status == "Rejected" and "raised" in result.reason
    assert store.settings() == before
    assert config.central_system_change("SecurityProfile", "2").status == "Accepted"  # same
    assert config.profile_trial() is None  # not a raise: nothing to try


def test_a_raise_during_a_trial_goes_back_to_the_profile_that_worked(
    store: Store, pki: Pki
) -> None:
    config = strict(store, client_certificate=lambda: True)
    assert config.change_many(
        profile_1(9000) | {"CentralSystemRootCertificate": str(pki.ca_file)}, source="ui"
    ).ok
    assert config.central_system_change("SecurityProfile", "2").status == "Accepted"
    assert config.central_system_change("SecurityProfile", "3").status == "Accepted"
    assert config.profile_trial() == ProfileTrial(
        1, "ws://127.0.0.1:9000/ocpp/", 3, "wss://127.0.0.1:9000/ocpp/"
    )


# --------------------------------------------------------------------------- profile changes


async def test_tc_083_upgrade_security_profile_1_to_2_reconnects_over_wss(
    tmp_path: Path, pki: Pki
) -> None:
    """TC_083: ChangeConfiguration SecurityProfile 2 while on 1: Accepted (the answer
    first), the station reconnects over wss:// to the same host, port and path, the
    central system now serving TLS there; the raise then stands and persists."""
    password = bytes.fromhex(BINARY_KEY)
    plain = CentralSystem(password=password)
    tls = CentralSystem(password=password)
    settings = profile_1(0) | {
        "CentralSystemRootCertificate": str(pki.ca_file),
        "SecurityProfileFallbackTime": "30",
    }
    async with trio.open_nursery() as servers:
        plain_scope = trio.CancelScope()

        async def serve_plain(task_status: trio.TaskStatus[int]) -> None:
            with plain_scope:
                async with serving(plain) as port:
                    task_status.started(port)
                    await trio.sleep_forever()

        port = await servers.start(serve_plain)
        settings["CentralSystemAddress"] = f"ws://127.0.0.1:{port}/ocpp/"
        async with station(tmp_path, settings) as st:
            await until(lambda: plain.peers, "connected with profile 1")
            peer = plain.peer
            answer = await peer.call(
                "ChangeConfiguration", {"key": "SecurityProfile", "value": "2"}
            )
            assert answer == {"status": "Accepted"}
            await until(lambda: peer.closed, "the profile 1 connection closed")
            # The central system restarts its server with TLS on the same port (the
            # OCTT does so); the station retries meanwhile.
            plain_scope.cancel()

            async def serve_tls() -> None:
                async with serving(tls, pki.server_context("127.0.0.1"), port=port):
                    await trio.sleep_forever()

            servers.start_soon(serve_tls)
            await until(lambda: tls.peers, "reconnected over wss://")
            await until(lambda: st.config.profile_trial() is None, "the raise stands")
            assert st.config.get_int("SecurityProfile") == 2
            assert st.config.get_str("CentralSystemAddress") == f"wss://127.0.0.1:{port}/ocpp/"
            assert tls.requests[-1].path == "/ocpp/CP-1"
            assert tls.basic_header() == basic(password)  # profile 2: Basic auth over TLS
            assert st.events_of(RECONFIGURATION_OF_SECURITY_PARAMETERS) == [
                "SecurityProfile set to 2"
            ]
            servers.cancel_scope.cancel()
    with reopened(tmp_path / "station.db") as config:
        assert config.get_int("SecurityProfile") == 2
        assert config.profile_trial() is None


async def test_tc_083_a_profile_that_does_not_connect_falls_back_and_persists(
    tmp_path: Path, pki: Pki
) -> None:
    """The central system raises the profile to 2 but serves no TLS: after
    SecurityProfileFallbackTime the station restores profile 1 and its ws://
    address, persists them, raises a security event and reconnects with them."""
    password = bytes.fromhex(BINARY_KEY)
    cs = CentralSystem(password=password)
    fallback = 2
    async with serving(cs) as port:
        settings = profile_1(port) | {
            "CentralSystemRootCertificate": str(pki.ca_file),
            "SecurityProfileFallbackTime": str(fallback),
        }
        async with station(tmp_path, settings) as st:
            await until(lambda: cs.peers, "connected with profile 1")
            first = cs.peer
            asked_at = trio.current_time()  # the trial begins after this
            answer = await first.call(
                "ChangeConfiguration", {"key": "SecurityProfile", "value": "2"}
            )
            assert answer == {"status": "Accepted"}
            assert st.config.get_str("CentralSystemAddress").startswith("wss://")
            await until(lambda: len(cs.peers) == 2, "reconnected with profile 1")
            assert cs.basic_header() == basic(password)
            info = "SecurityProfile 2 did not connect within 2 s: back to 1"
            # the raise, then the fallback (the restore itself is not reported as
            # a second change); no TLS event: a plain server is no TLS failure
            assert st.events_of(RECONFIGURATION_OF_SECURITY_PARAMETERS) == [
                "SecurityProfile set to 2",
                info,
            ]
            assert st.event_types() == [RECONFIGURATION_OF_SECURITY_PARAMETERS] * 2
            back_at = next(t for _, i, t in st.events if i == info)
            assert back_at - asked_at >= fallback  # never before its time
            # the attempts in between failed in the TLS handshake with a plain server
            assert len(cs.requests) == 2
            assert st.config.get_int("SecurityProfile") == 1
            assert st.config.profile_trial() is None
    with reopened(tmp_path / "station.db") as config:
        assert config.get_int("SecurityProfile") == 1
        assert config.get_str("CentralSystemAddress") == f"ws://127.0.0.1:{port}/ocpp/"
        assert config.profile_trial() is None


async def test_a_restart_during_the_trial_still_falls_back(tmp_path: Path, pki: Pki) -> None:
    """The OCTT resets the station after the change: the trial is in the store, and
    the restarted station waits the fallback time again before it takes the raise back."""
    cs = CentralSystem(password=bytes.fromhex(BINARY_KEY))
    async with serving(cs) as port:
        settings = profile_1(port) | {
            "CentralSystemRootCertificate": str(pki.ca_file),
            "SecurityProfileFallbackTime": "3600",
        }
        async with station(tmp_path, settings) as st:
            await until(lambda: cs.peers, "connected")
            answer = await cs.peer.call(
                "ChangeConfiguration", {"key": "SecurityProfile", "value": "2"}
            )
            assert answer == {"status": "Accepted"}
            await until(lambda: cs.peer.closed, "closed for the reconnect")
            # the station stops (a Reset) long before 3600 s
            assert st.config.profile_trial() is not None
        with reopened(tmp_path / "station.db") as config:
            config.change("SecurityProfileFallbackTime", "1", source="installer").raise_for_status()
        async with station(tmp_path, {}) as st:
            started = trio.current_time()
            await until(lambda: len(cs.peers) == 2, "reconnected with profile 1 after the restart")
            (back_at,) = [t for _, i, t in st.events if i and "did not connect" in i]
            assert back_at - started >= 1.0
            assert st.config.get_int("SecurityProfile") == 1


async def test_tc_084_a_lowering_is_rejected_and_keeps_the_connection(
    tmp_path: Path, pki: Pki
) -> None:
    cs = CentralSystem(password=bytes.fromhex(BINARY_KEY))
    async with (
        serving(cs, pki.server_context("127.0.0.1")) as port,
        station(tmp_path, profile_2(port, pki)) as st,
    ):
        await until(lambda: st.cp.online, "registered with profile 2")
        # The BootNotification's interval is stored by a worker thread after the
        # registration: the snapshot is taken once it is there.
        await until(
            lambda: "ocpp.HeartbeatInterval" in st.store.settings(), "the boot's interval stored"
        )
        before = st.store.settings()
        for lower in ("1", "0"):
            answer = await cs.peer.call(
                "ChangeConfiguration", {"key": "SecurityProfile", "value": lower}
            )
            assert answer == {"status": "Rejected"}
        # the same connection goes on serving
        answer = await cs.peer.call("GetConfiguration", {"key": ["SecurityProfile"]})
        assert answer["configurationKey"] == [
            {"key": "SecurityProfile", "readonly": False, "value": "2"}
        ]
        assert len(cs.peers) == 1 and not cs.peer.closed
        assert st.store.settings() == before
        assert st.events == []
