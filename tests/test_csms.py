"""The bench central system (ops/csms.py), from outside: its process, its control
interface, and a minimal OCPP client on websockets' sync client (no event loop
in the test process)."""

from __future__ import annotations

import base64
import json
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from tests.csms_peer import (
    Csms,
    CsmsError,
    call,
    call_result,
    chargepoints,
    configure,
    disconnect,
    health,
    messages,
    running_csms,
    transactions,
    wait_connected,
    wait_for,
)

pytestmark = pytest.mark.slow

OCPP16 = [Subprotocol("ocpp1.6")]
BOOT = {"chargePointVendor": "Bench", "chargePointModel": "CSMS-test"}


# -- a minimal charge point -----------------------------------------------------------


class Client:
    """Just enough of a charge point: send CALLs, read frames, answer CALLs."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = 0

    def send_call(self, action: str, payload: dict[str, Any], unique_id: str | None = None) -> str:
        if unique_id is None:
            self._ids += 1
            unique_id = f"c{self._ids}"
        self.ws.send(json.dumps([2, unique_id, action, payload]))
        return unique_id

    def recv(self, timeout: float = 5.0) -> list[Any]:
        frame = json.loads(self.ws.recv(timeout=timeout))
        assert isinstance(frame, list)
        return frame

    def call(self, action: str, payload: dict[str, Any], unique_id: str | None = None) -> Any:
        """A CALL and its CALLRESULT payload (fails on a CALLERROR)."""
        unique_id = self.send_call(action, payload, unique_id)
        frame = self.recv()
        assert frame[:2] == [3, unique_id], frame
        return frame[2]


@contextmanager
def client(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    auth: tuple[str, str] | None = None,
) -> Iterator[Client]:
    headers = {}
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    with connect(
        url,
        subprotocols=OCPP16,
        ssl=ssl_context,
        additional_headers=headers,
        proxy=None,
        open_timeout=5,
        close_timeout=2,
    ) as ws:
        assert ws.subprotocol == "ocpp1.6"
        yield Client(ws)


def status_of(error: InvalidStatus) -> int:
    return error.response.status_code


@pytest.fixture
def csms() -> Iterator[Csms]:
    with running_csms("--boot-interval", "42") as running:
        yield running


# -- tests -------------------------------------------------------------------------------


def test_ready_line_and_health(csms: Csms) -> None:
    assert csms.ws.startswith("ws://127.0.0.1:") and csms.ws.endswith("/ocpp/")
    assert csms.control.startswith("http://127.0.0.1:")
    assert health(csms)["ok"] is True
    assert chargepoints(csms) == {"connected": [], "chargepoints": {}}


def test_boot_answer_follows_config(csms: Csms) -> None:
    with client(csms.url("CP-1")) as cp:
        boot = cp.call("BootNotification", BOOT)
        assert boot["status"] == "Accepted" and boot["interval"] == 42
        configure(csms, boot_status="Pending", boot_interval=7)
        boot = cp.call("BootNotification", BOOT)
        assert boot["status"] == "Pending" and boot["interval"] == 7
        now = cp.call("Heartbeat", {})["currentTime"]
        assert now.endswith("Z")
        datetime.fromisoformat(now)
        view = chargepoints(csms)
        assert view["connected"] == ["CP-1"]
        state = view["chargepoints"]["CP-1"]
        assert state["registration"] == "Pending"
        assert state["last_boot"]["payload"] == BOOT
        assert state["transport"]["subprotocol"] == "ocpp1.6"
        assert state["transport"]["tls"] is False
    with pytest.raises(CsmsError) as bad:
        configure(csms, boot_status="Maybe")
    assert bad.value.status == 400


def test_authorize_and_transactions(csms: Csms) -> None:
    with client(csms.url("CP-2")) as cp:

        def auth(tag: str) -> str:
            return str(cp.call("Authorize", {"idTag": tag})["idTagInfo"]["status"])

        assert [auth(t) for t in ("04A1B2", "BLOCKED-1", "expired9", "INVALID")] == [
            "Accepted",
            "Blocked",
            "Expired",
            "Invalid",
        ]
        start = {"connectorId": 1, "meterStart": 0, "timestamp": "2025-01-01T00:00:00Z"}
        first = cp.call("StartTransaction", {**start, "idTag": "04A1B2"})
        second = cp.call("StartTransaction", {**start, "idTag": "BLOCKED-2"})
        assert first == {"transactionId": 1, "idTagInfo": {"status": "Accepted"}}
        assert second == {"transactionId": 2, "idTagInfo": {"status": "Blocked"}}
        stop = {"transactionId": 1, "meterStop": 1200, "timestamp": "2025-01-01T01:00:00Z"}
        assert cp.call("StopTransaction", stop) == {}
        configure(csms, authorize={"accepted": ["A"], "tags": {"C": "ConcurrentTx"}})
        assert [auth(t) for t in ("A", "B", "C")] == ["Accepted", "Invalid", "ConcurrentTx"]
        assert cp.call("DataTransfer", {"vendorId": "x"}) == {"status": "UnknownVendorId"}
        bad = cp.send_call("StatusNotification", {"connectorId": 1, "status": "Available"})
        error = cp.recv()
        assert error[:3] == [4, bad, "ProtocolError"]  # errorCode missing
        bad = cp.send_call("Heartbeat", {"extra": 1})
        assert cp.recv()[:3] == [4, bad, "FormationViolation"]  # the 1.6 spelling
    txs = transactions(csms)
    assert [t["transactionId"] for t in txs] == [1, 2]
    assert txs[0]["stop"]["meterStop"] == 1200 and txs[1]["stop"] is None


def test_duplicate_unique_id_is_marked_and_answered_alike(csms: Csms) -> None:
    start = {"connectorId": 1, "idTag": "T", "meterStart": 5, "timestamp": "2025-01-01T00:00:00Z"}
    with client(csms.url("CP-3")) as cp:
        first = cp.call("StartTransaction", start, unique_id="q-17")
    # The queue resends after a crash: a new connection, the same uniqueId.
    with client(csms.url("CP-3")) as cp:
        again = cp.call("StartTransaction", start, unique_id="q-17")
        cp.call("Heartbeat", {}, unique_id="q-18")
        # A reused id on another message is marked, but not a resend: answered anew.
        other = cp.call("StartTransaction", {**start, "meterStart": 9}, unique_id="q-17")
    assert again == first
    assert other["transactionId"] == first["transactionId"] + 1
    received = messages(csms, "CP-3")
    assert [(m["uniqueId"], m["duplicate"], m["connection"]) for m in received] == [
        ("q-17", False, 1),
        ("q-17", True, 2),
        ("q-18", False, 2),
        ("q-17", True, 2),
    ]
    assert received[1]["duplicateOf"] == received[3]["duplicateOf"] == received[0]["seq"]
    assert received[1]["identical"] is True and received[1]["replayed"] is True
    assert received[3]["identical"] is False and "replayed" not in received[3]
    assert len(transactions(csms)) == 2
    assert chargepoints(csms)["chargepoints"]["CP-3"]["connections"] == 2


def test_call_answered_by_the_client(csms: Csms) -> None:
    profile = {
        "connectorId": 1,
        "csChargingProfiles": {
            "chargingProfileId": 3,
            "stackLevel": 0,
            "chargingProfilePurpose": "TxDefaultProfile",
            "chargingProfileKind": "Absolute",
            "chargingSchedule": {
                "chargingRateUnit": "A",
                "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16.0}],
            },
        },
    }
    with client(csms.url("CP-4")) as cp, ThreadPoolExecutor(1) as pool:
        cp.call("BootNotification", BOOT)

        def answered(action: str, payload: dict[str, Any], reply: list[Any], **kw: Any) -> Any:
            pending: Future[dict[str, Any]] = pool.submit(call, csms, "CP-4", action, payload, **kw)
            frame = cp.recv()
            assert frame[0] == 2 and frame[2] == action
            assert frame[3] == payload  # camelCase on the wire, nothing added
            if reply:
                cp.ws.send(json.dumps([reply[0], frame[1], *reply[1:]]))
            return pending.result(timeout=10)

        start = {"connectorId": 1, "idTag": "REMOTE1"}
        outcome = answered("RemoteStartTransaction", start, [3, {"status": "Accepted"}])
        assert outcome["kind"] == "result" and outcome["result"] == {"status": "Accepted"}
        outcome = answered("SetChargingProfile", profile, [3, {"status": "Accepted"}])
        assert outcome["result"] == {"status": "Accepted"}
        outcome = answered("Reset", {"type": "Soft"}, [4, "NotSupported", "no", {}])
        assert outcome["kind"] == "error"
        assert outcome["error"] == {"code": "NotSupported", "description": "no", "details": {}}
        outcome = answered("ClearCache", {}, [3, {"status": "Maybe"}])
        assert outcome["kind"] == "invalid_response" and outcome["result"] == {"status": "Maybe"}
        outcome = answered("UnlockConnector", {"connectorId": 1}, [], timeout=0.3)
        assert outcome["kind"] == "timeout"
        # A late answer to the timed-out call does not confuse the next one.
        cp.ws.send(json.dumps([3, outcome["uniqueId"], {"status": "Unlocked"}]))
        outcome = answered("GetConfiguration", {"key": ["X"]}, [3, {"unknownKey": ["X"]}])
        assert outcome["result"] == {"unknownKey": ["X"]}
        with pytest.raises(CsmsError) as invalid:
            call(csms, "CP-4", "Reset", {"type": "Warm"})
        assert invalid.value.status == 400 and invalid.value.body["kind"] == "invalid_request"
        with pytest.raises(CsmsError):
            call(csms, "CP-4", "NoSuchAction", {})
        # Without validation a payload goes out exactly as given (negative tests).
        outcome = answered("Reset", {"type": "Warm"}, [3, {"status": "Rejected"}], validate=False)
        assert outcome["result"] == {"status": "Rejected"}
        results = [m for m in messages(csms, "CP-4") if m["type"] in ("CALLRESULT", "CALLERROR")]
        assert results[0]["action"] == "RemoteStartTransaction"
    with pytest.raises(CsmsError) as gone:
        call_result(csms, "CP-4", "ClearCache")
    assert gone.value.status == 404


def test_basic_auth(tmp_path: Path) -> None:
    # The password as text (literal form); the whitepaper's hex form is checked
    # against the station in tests/test_ocpp_security.py.
    key = "0123456789abcdef0123456789abcdef"
    with running_csms("--basic-auth", key, "--basic-auth-form", "literal") as csms:
        url = csms.url("CP-5")
        with client(url, auth=("CP-5", "0123456789abcdef0123456789abcdef")) as cp:
            assert cp.call("Heartbeat", {})["currentTime"]
            transport = chargepoints(csms)["chargepoints"]["CP-5"]["transport"]
            assert transport["auth_user"] == "CP-5"
        for auth in (("CP-5", "wrong"), ("CP-6", "0123456789abcdef0123456789abcdef"), None):
            with pytest.raises(InvalidStatus) as refused, client(url, auth=auth):
                pass
            assert status_of(refused.value) == 401
            assert refused.value.response.headers["WWW-Authenticate"].startswith("Basic")
        state = chargepoints(csms)["chargepoints"]["CP-5"]
        assert [u["username"] for u in state["unauthorized"]] == ["CP-5", "CP-6", None]
        assert state["connections"] == 1


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ca = trustme.CA()
    directory = tmp_path_factory.mktemp("pki")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
    return {"ca": ca, "dir": directory}


def _trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(context)
    return context


def test_wss_with_a_trusted_certificate(pki: dict[str, Any]) -> None:
    with running_csms("--tls-cert", str(pki["dir"] / "server.pem")) as csms:
        assert csms.ws.startswith("wss://")
        with client(csms.url("CP-7"), ssl_context=_trusting(pki["ca"])) as cp:
            assert cp.call("BootNotification", BOOT)["status"] == "Accepted"
            transport = chargepoints(csms)["chargepoints"]["CP-7"]["transport"]
            assert transport["tls"] is True and transport["client_cert_subject"] is None
        with (
            pytest.raises(ssl.SSLCertVerificationError),
            client(csms.url("CP-7"), ssl_context=_trusting(trustme.CA())),
        ):
            pass


def test_mutual_tls(pki: dict[str, Any]) -> None:
    args = ("--tls-cert", str(pki["dir"] / "server.pem"), "--client-ca", str(pki["dir"] / "ca.pem"))
    with running_csms(*args) as csms:
        context = _trusting(pki["ca"])
        pki["ca"].issue_cert("cp8.example", common_name="CP-8").configure_cert(context)
        with client(csms.url("CP-8"), ssl_context=context) as cp:
            assert cp.call("Heartbeat", {})["currentTime"]
            transport = chargepoints(csms)["chargepoints"]["CP-8"]["transport"]
            assert "CN=CP-8" in transport["client_cert_subject"].split(",")
        # TLS 1.3 reports a missing client certificate after the client's side of
        # the handshake: as an ssl error or as a connection that ends at once.
        with (
            pytest.raises((OSError, WebSocketException)),
            client(csms.url("CP-8"), ssl_context=_trusting(pki["ca"])) as cp,
        ):
            cp.call("Heartbeat", {})
        assert chargepoints(csms)["chargepoints"]["CP-8"]["connections"] == 1


def test_refuse_for_then_accept() -> None:
    with running_csms("--refuse-for", "1.0") as csms:
        began = time.monotonic()
        with pytest.raises(InvalidStatus) as refused, client(csms.url("CP-9")):
            pass
        assert status_of(refused.value) == 503
        assert len(chargepoints(csms)["chargepoints"]["CP-9"]["refused"]) == 1
        time.sleep(max(0.0, 1.05 - (time.monotonic() - began)))
        with client(csms.url("CP-9")) as cp:
            assert cp.call("Heartbeat", {})
        # ... and at runtime, for a reconnect test.
        configure(csms, refuse_for=5)
        with pytest.raises(InvalidStatus), client(csms.url("CP-9")):
            pass
        configure(csms, refuse_for=0)
        with client(csms.url("CP-9")):
            pass


def test_refuse_for_at_tcp_level() -> None:
    with running_csms("--refuse-for", "0.8", "--refuse-mode", "tcp") as csms:
        began = time.monotonic()
        with pytest.raises(ConnectionRefusedError), client(csms.url("CP-10")):
            pass
        while True:  # the listener opens 0.8 s after the ready line
            try:
                with client(csms.url("CP-10")) as cp:
                    assert cp.call("Heartbeat", {})
                break
            except ConnectionRefusedError:
                assert time.monotonic() - began < 5
                time.sleep(0.05)
        assert time.monotonic() - began >= 0.8


def test_rtt_delays_every_callresult() -> None:
    with running_csms("--rtt-ms", "250") as csms, client(csms.url("CP-11")) as cp:
        began = time.monotonic()
        cp.call("Heartbeat", {})
        cp.call("Heartbeat", {})
        assert time.monotonic() - began >= 0.5
        record = messages(csms, "CP-11")[0]
        assert record["responded_t"] - record["t"] >= 0.25
        configure(csms, rtt_ms=0)
        began = time.monotonic()
        cp.call("Heartbeat", {})
        assert time.monotonic() - began < 0.25


def test_disconnect_and_reconnect(csms: Csms) -> None:
    with client(csms.url("CP-12")) as cp, ThreadPoolExecutor(1) as pool:
        cp.call("BootNotification", BOOT)
        pending = pool.submit(call, csms, "CP-12", "Reset", {"type": "Hard"})
        assert cp.recv()[2] == "Reset"
        disconnect(csms, "CP-12")
        with pytest.raises(ConnectionClosed) as closed:
            cp.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        # The unanswered call ends with the connection, not after its timeout.
        assert pending.result(timeout=5)["kind"] == "disconnected"
    with client(csms.url("CP-12")) as cp:
        wait_connected(csms, "CP-12", connections=2)
        disconnect(csms, "CP-12", abort=True)
        with pytest.raises(ConnectionClosed) as dropped:
            cp.recv()
        assert dropped.value.rcvd is None  # no close frame: the TCP connection just ended
    state = chargepoints(csms)["chargepoints"]["CP-12"]
    assert state["connected"] is False and len(state["disconnects"]) == 2
    with pytest.raises(CsmsError) as missing:
        disconnect(csms, "CP-12")
    assert missing.value.status == 404


async def test_helpers_from_trio(csms: Csms) -> None:
    status = {"connectorId": 1, "errorCode": "NoError", "status": "Preparing"}
    found: list[dict[str, Any]] = []

    async def waiter() -> None:
        wait = partial(wait_for, csms, "CP-13", "StatusNotification", within=5)
        found.append(await trio.to_thread.run_sync(wait))

    def charge_point() -> None:
        with client(csms.url("CP-13")) as cp:
            cp.call("StatusNotification", status)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.to_thread.run_sync(charge_point)
    assert found[0]["payload"] == status and found[0]["response"]["payload"] == {}
    view = await trio.to_thread.run_sync(chargepoints, csms)
    assert view["chargepoints"]["CP-13"]["connectors"]["1"]["status"] == "Preparing"


def test_handshake_rules_and_log(tmp_path: Path) -> None:
    log = tmp_path / "csms.jsonl"
    with running_csms("--log", str(log)) as csms:
        with pytest.raises(InvalidStatus) as wrong_path, client(csms.ws + "a/b"):
            pass
        assert status_of(wrong_path.value) == 404
        with (
            pytest.raises(InvalidStatus) as no_protocol,
            connect(csms.url("CP-14"), proxy=None, open_timeout=5),
        ):
            pass
        assert status_of(no_protocol.value) == 400
        with client(csms.url("CP-14")) as cp:
            cp.call("Heartbeat", {})
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    frames = [line for line in lines if line["dir"] in ("in", "out")]
    assert [f["message"][0] for f in frames] == [2, 3]
    assert all(isinstance(line["t"], float) for line in lines)
