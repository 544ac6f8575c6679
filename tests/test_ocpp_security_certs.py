"""The certificate messages of the Security Whitepaper (ocpp16/profiles/security.py)
in the charge point's session: InstallCertificate, GetInstalledCertificateIds,
DeleteCertificate (TC_075_1, TC_075_2, TC_076, TC_078), the CSR flow from an
ExtendedTriggerMessage to CertificateSigned (TC_074, TC_077), renewal a month
before expiry (A03), a certificate used from its notBefore, and
AdditionalRootCertificateCheck (M05.FR.08..13).

tests/chargepoint_rig.py: a real RpcSession/CallChannel on a FakeConnection, the
central system a second RpcSession that checks every frame against the OCPP
1.6 schemas; virtual time, the wall clock following it from EPOCH
(WallClockChargePoint), a real CertificateStore in tmp_path. The certificate
authority is the test: it signs the charge point's CSR with cryptography. The
certificate the flow produced is then used in a real TLS handshake on loopback
with client authentication (what security profile 3 does with it). The
ExtendedTriggerMessage handler is another profile's (Remote Trigger); a small
stand-in here calls ``sign_charge_point_certificate`` as that handler does.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ocpp16.certificates import CertificateStore, CertificateUse, HashData, hash_data
from ocpp16.profiles import Handler, Task
from ocpp16.profiles import security as security_module
from ocpp16.profiles.security import CertificateManagementProfile
from tests.chargepoint_rig import (
    EPOCH,
    IDENTITY,
    CentralSystem,
    FakeConnection,
    Rig,
    WallClockChargePoint,
    open_rig,
    settle,
)
from tests.test_certificates import (
    Issued,
    chain_pem,
    csr_of,
    issue,
    needs_openssl,
    openssl_cert_id,
    sign_csr,
)

CPO = "Example CPO"
HOUR = 3600.0


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock()


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> list[list[Any]]:
    """Every frame the charge point writes to its connection, in order."""
    frames: list[list[Any]] = []
    original = FakeConnection.send

    async def send(self: FakeConnection, text: str) -> None:
        await original(self, text)
        frames.append(json.loads(text))

    monkeypatch.setattr(FakeConnection, "send", send)
    return frames


@dataclass
class Events:
    """The ``emit`` callable: every security event raised, with its virtual time."""

    raised: list[tuple[float, str, str | None]] = field(default_factory=list)

    def __call__(self, event_type: str, tech_info: str | None) -> None:
        self.raised.append((trio.current_time(), event_type, tech_info))

    def types(self) -> list[str]:
        return [t for _, t, _ in self.raised]


class TriggerStandIn:
    """ExtendedTriggerMessage as the Remote Trigger profile answers it for
    SignChargePointCertificate (the rest of that message is not this file's)."""

    name = "ExtendedTriggerStandIn"

    def __init__(self, security: CertificateManagementProfile) -> None:
        self.security = security
        self.handlers: Mapping[str, Handler] = {"ExtendedTriggerMessage": self.extended_trigger}

    def tasks(self) -> tuple[Task, ...]:
        return ()

    async def extended_trigger(self, p: dict[str, Any]) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        assert p["requestedMessage"] == "SignChargePointCertificate"
        return {"status": self.security.sign_charge_point_certificate()}


@dataclass
class Setup:
    rig: Rig
    cs: CentralSystem
    store: CertificateStore
    security: CertificateManagementProfile
    events: Events
    switches: list[float]


async def up(
    rig: Rig, tmp_path: Path, store: CertificateStore | None = None, **kwargs: Any
) -> Setup:
    store = store or CertificateStore(tmp_path / "certs")
    events = Events()
    switches: list[float] = []
    security = CertificateManagementProfile(
        rig.cp,
        store,
        emit=events,
        on_client_certificate=lambda: switches.append(trio.current_time()),
        **kwargs,
    )
    rig.cp.register(security)
    rig.cp.register(TriggerStandIn(security))
    cs = await rig.connect()
    await settle(lambda: rig.cp.online, "registered")
    return Setup(rig, cs, store, security, events, switches)


def rig_for(tmp_path: Path, clock: trio.testing.MockClock, **kwargs: Any) -> Any:
    settings = kwargs.pop("settings", {"CpoName": CPO})
    return open_rig(tmp_path, clock, cp_class=WallClockChargePoint, settings=settings, **kwargs)


def ids(answer: dict[str, Any]) -> list[HashData]:
    return [HashData.from_ocpp(h) for h in answer.get("certificateHashData", [])]


async def install(cs: CentralSystem, use: str, pem: str) -> str:
    answer = await cs.result("InstallCertificate", {"certificateType": use, "certificate": pem})
    status: str = answer["status"]
    return status


# ------------------------------------------------------------------ M05, M03, M04


@needs_openssl
@pytest.mark.parametrize(
    "use",
    ["ManufacturerRootCertificate", "CentralSystemRootCertificate"],
    ids=["TC_075_1", "TC_075_2"],
)
async def test_TC_075_install_a_certificate_and_find_it_by_openssls_hash_data(
    tmp_path: Path, clock: trio.testing.MockClock, use: str
) -> None:
    async with rig_for(tmp_path, clock) as rig:
        s = await up(rig, tmp_path)
        assert await s.cs.result("GetInstalledCertificateIds", {"certificateType": use}) == {
            "status": "NotFound"
        }
        root = issue("Test Root")
        path = root.write(tmp_path / "root.pem")
        assert await install(s.cs, use, root.pem) == "Accepted"
        answer = await s.cs.result("GetInstalledCertificateIds", {"certificateType": use})
        assert answer["status"] == "Accepted"
        (reported,) = ids(answer)
        assert reported.hash_algorithm == "SHA256"
        assert reported.matches(openssl_cert_id(path, path))  # the tool's own calculation
        other = (
            "ManufacturerRootCertificate"
            if use.startswith("Central")
            else ("CentralSystemRootCertificate")
        )
        assert await s.cs.result("GetInstalledCertificateIds", {"certificateType": other}) == {
            "status": "NotFound"
        }
        assert s.events.types() == ["ReconfigurationOfSecurityParameters"]


async def test_TC_076_delete_a_specific_certificate(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with rig_for(tmp_path, clock) as rig:
        s = await up(rig, tmp_path)
        root = issue("CPO Root")
        assert await install(s.cs, "CentralSystemRootCertificate", root.pem) == "Accepted"
        got = await s.cs.result(
            "GetInstalledCertificateIds", {"certificateType": "CentralSystemRootCertificate"}
        )
        (hashes,) = got["certificateHashData"]
        # The central system may write the hex in lower case (CiString).
        hashes = {k: v.lower() if k != "hashAlgorithm" else v for k, v in hashes.items()}
        answer = await s.cs.result("DeleteCertificate", {"certificateHashData": hashes})
        assert answer == {"status": "Accepted"}
        assert await s.cs.result(
            "GetInstalledCertificateIds", {"certificateType": "CentralSystemRootCertificate"}
        ) == {"status": "NotFound"}
        assert await s.cs.result("DeleteCertificate", {"certificateHashData": hashes}) == {
            "status": "NotFound"
        }
        assert s.events.types() == ["ReconfigurationOfSecurityParameters"] * 2


async def test_deleting_the_root_in_use_fails_and_the_store_limit_is_per_type(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with rig_for(tmp_path, clock) as rig:
        s = await up(rig, tmp_path)
        root = issue("CPO Root")
        await install(s.cs, "CentralSystemRootCertificate", root.pem)
        # CertificateStoreMaxLength = 1: a second CentralSystemRootCertificate does
        # not fit (no event: it is not invalid), a ManufacturerRootCertificate does.
        assert await install(s.cs, "CentralSystemRootCertificate", issue("Other").pem) == "Rejected"
        assert await install(s.cs, "ManufacturerRootCertificate", issue("Maker").pem) == "Accepted"
        # The transport verified the central system's server certificate with it.
        server = issue("central.example", issuer=root, ca=False)
        s.store.note_connection([server.cert.public_bytes(serialization.Encoding.DER)])
        hashes = hash_data(root.cert).to_ocpp()
        assert await s.cs.result("DeleteCertificate", {"certificateHashData": hashes}) == {
            "status": "Failed"
        }
        assert len(s.store.installed(CertificateUse.CENTRAL_SYSTEM_ROOT)) == 1
        assert s.events.types() == ["ReconfigurationOfSecurityParameters"] * 2


@pytest.mark.parametrize(
    "pem",
    [
        issue("Expired Root", valid_from=EPOCH - timedelta(days=400)).pem,
        issue("not a CA", ca=False).pem,
        "-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n",
    ],
    ids=["expired", "leaf", "garbage"],
)
async def test_TC_078_an_invalid_central_system_root_is_rejected_with_an_event(
    tmp_path: Path, clock: trio.testing.MockClock, pem: str
) -> None:
    async with rig_for(tmp_path, clock) as rig:
        s = await up(rig, tmp_path)
        assert await install(s.cs, "CentralSystemRootCertificate", pem) == "Rejected"
        ((_, event, info),) = s.events.raised
        assert event == "InvalidCentralSystemCertificate" and info
        assert len(info) <= 255
        # The same for a manufacturer root: Rejected, logged, no event of that name.
        assert await install(s.cs, "ManufacturerRootCertificate", pem) == "Rejected"
        assert len(s.events.raised) == 1


async def test_additional_root_certificate_check_replaces_the_root(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with rig_for(tmp_path, clock) as rig:
        s = await up(rig, tmp_path, additional_root_check=lambda: True)
        old = issue("CPO Root 2026")
        assert await install(s.cs, "CentralSystemRootCertificate", old.pem) == "Accepted"
        # Not signed by the installed root (M05.FR.10).
        assert await install(s.cs, "CentralSystemRootCertificate", issue("Rogue").pem) == (
            "Rejected"
        )
        assert s.events.types()[-1] == "InvalidCentralSystemCertificate"
        new = issue("CPO Root 2027", issuer=old)
        assert await install(s.cs, "CentralSystemRootCertificate", new.pem) == "Accepted"
        answer = await s.cs.result(
            "GetInstalledCertificateIds", {"certificateType": "CentralSystemRootCertificate"}
        )
        assert ids(answer) == [hash_data(new.cert, old.cert)]
        assert s.store.fallback_root() == old.pem.encode()  # until the transport confirms


# ------------------------------------------------------------------ A02, A03


def authority() -> tuple[trustme.CA, Issued]:
    """The CPO's CA (trustme: it also makes the central system's server certificate)."""
    ca = trustme.CA(organization_name=CPO)
    cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    return ca, Issued(cert, key)


def tls_handshake(ca: trustme.CA, client: tuple[Path, Path]) -> dict[str, Any]:
    """A real TLS handshake on loopback, the server requiring a client certificate
    from the CA: the server's view of the client certificate. Blocking."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server_context)
    server_context.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(server_context)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.minimum_version = ssl.TLSVersion.TLSv1_2
    ca.configure_trust(client_context)
    client_context.load_cert_chain(*client)
    seen: dict[str, Any] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with server_context.wrap_socket(conn, server_side=True) as tls:
                seen["peer"] = tls.getpeercert()
                tls.sendall(b"ok")

        server = threading.Thread(target=serve)
        server.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.recv(2) == b"ok"
        server.join(10)
    return seen["peer"]  # type: ignore[no-any-return]


def position(frames: list[list[Any]], unique_id: str) -> int:
    return next(i for i, f in enumerate(frames) if f[0] in (3, 4) and f[1] == unique_id)


async def test_TC_074_update_charge_point_certificate_by_request_of_central_system(
    tmp_path: Path, clock: trio.testing.MockClock, wire: list[list[Any]]
) -> None:
    ca, cpo = authority()
    async with rig_for(tmp_path, clock) as rig:
        s = await up(rig, tmp_path)
        assert await install(
            s.cs, "CentralSystemRootCertificate", ca.cert_pem.bytes().decode()
        ) == ("Accepted")
        uid = s.cs.send_call(
            "ExtendedTriggerMessage", {"requestedMessage": "SignChargePointCertificate"}
        )
        sign = await s.cs.expect("SignCertificate")
        answered = position(wire, uid)
        assert wire[answered][2] == {"status": "Accepted"}
        # The CSR comes after the answer (A02.FR.02).
        assert next(i for i, f in enumerate(wire) if f[0] == 2 and f[2] == "SignCertificate") > (
            answered
        )
        csr = csr_of(sign.payload["csr"])
        assert csr.is_signature_valid
        assert csr.subject.rfc4514_string() == f"O={CPO},CN={IDENTITY.serial}"
        s.cs.answer(sign, {"status": "Accepted"})
        on_the_wire: list[int] = []
        s.security.on_client_certificate = lambda: on_the_wire.append(len(wire))
        # The CA signs (valid in real time too: the handshake below checks dates).
        leaf = sign_csr(
            csr, cpo, valid_from=datetime(2020, 1, 1, tzinfo=UTC), valid_for=timedelta(days=7300)
        )
        signed_uid = s.cs.send_call("CertificateSigned", {"certificateChain": leaf.pem})
        await settle(lambda: on_the_wire, "the new certificate in force")
        answered = position(wire, signed_uid)
        assert wire[answered][2] == {"status": "Accepted"}
        # Its reconnect (TC_074 step 7) follows the answer, not before it.
        assert on_the_wire == [answered + 1]
        paths = s.store.client_certificate(rig.cp.now())
        assert paths is not None
        assert s.events.types() == ["ReconfigurationOfSecurityParameters"] * 2
        # The certificate and its key do what profile 3 needs: TLS client authentication.
        peer = await trio.to_thread.run_sync(tls_handshake, ca, paths)
        assert dict(x[0] for x in peer["subject"])["commonName"] == IDENTITY.serial
        assert dict(x[0] for x in peer["subject"])["organizationName"] == CPO


async def test_the_trigger_is_rejected_without_a_cpo_name(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with rig_for(tmp_path, clock, settings={}) as rig:
        s = await up(rig, tmp_path)
        answer = await s.cs.result(
            "ExtendedTriggerMessage", {"requestedMessage": "SignChargePointCertificate"}
        )
        assert answer == {"status": "Rejected"}
        await trio.sleep(60)
        assert s.cs.payloads("SignCertificate") == [] and not s.store.pending


async def test_TC_077_an_invalid_charge_point_certificate_is_rejected_with_an_event(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    _, cpo = authority()
    async with rig_for(tmp_path, clock) as rig:
        s = await up(rig, tmp_path)
        await install(s.cs, "CentralSystemRootCertificate", cpo.pem)
        await s.cs.result(
            "ExtendedTriggerMessage", {"requestedMessage": "SignChargePointCertificate"}
        )
        sign = await s.cs.expect("SignCertificate")
        s.cs.answer(sign, {"status": "Accepted"})
        # Signed by the CA, but for another key than the CSR's.
        wrong = issue(IDENTITY.serial, organization=CPO, issuer=cpo, ca=False)
        answer = await s.cs.result("CertificateSigned", {"certificateChain": wrong.pem})
        assert answer == {"status": "Rejected"}
        (_, event, info) = s.events.raised[-1]
        assert event == "InvalidChargePointCertificate" and info is not None and "key" in info
        assert s.store.client_certificates() == [] and s.switches == []
        # The right one is still welcome afterwards.
        right = sign_csr(csr_of(sign.payload["csr"]), cpo)
        assert await s.cs.result("CertificateSigned", {"certificateChain": right.pem}) == {
            "status": "Accepted"
        }


async def test_a_refused_csr_leaves_no_pending_key(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with rig_for(tmp_path, clock) as rig:
        s = await up(rig, tmp_path)
        await s.cs.result(
            "ExtendedTriggerMessage", {"requestedMessage": "SignChargePointCertificate"}
        )
        sign = await s.cs.expect("SignCertificate")
        assert s.store.pending
        s.cs.answer(sign, {"status": "Rejected"})
        await settle(lambda: not s.store.pending, "the pending key discarded")
        assert not (s.store.directory / "pending.key").exists()


async def test_a_certificate_valid_later_is_used_from_its_not_before(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    _, cpo = authority()
    async with rig_for(tmp_path, clock) as rig:
        s = await up(rig, tmp_path)
        await install(s.cs, "CentralSystemRootCertificate", cpo.pem)
        await s.cs.result(
            "ExtendedTriggerMessage", {"requestedMessage": "SignChargePointCertificate"}
        )
        sign = await s.cs.expect("SignCertificate")
        s.cs.answer(sign, {"status": "Accepted"})
        start = trio.current_time()
        later = rig.cp.now() + timedelta(hours=2)
        leaf = sign_csr(csr_of(sign.payload["csr"]), cpo, valid_from=later)
        assert await s.cs.result("CertificateSigned", {"certificateChain": leaf.pem}) == {
            "status": "Accepted"
        }
        assert s.store.client_certificate(rig.cp.now()) is None
        await trio.sleep(4 * HOUR)
        # At notBefore (virtual time; the wall clock follows it), once (A02.FR.08).
        (switched,) = s.switches
        assert switched == pytest.approx(start + 2 * HOUR, abs=1.0)
        assert s.store.client_certificate(rig.cp.now()) is not None


async def test_renewal_a_month_before_expiry_once_per_certificate(
    tmp_path: Path, clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Virtual hours cost real seconds in the rig (the channel's timer ticks every
    # 0.5 s): a refused renewal is asked again after an hour here, not a day.
    monkeypatch.setattr(security_module, "RENEWAL_RETRY", HOUR)
    _, cpo = authority()
    store = CertificateStore(tmp_path / "certs")
    store.install(CertificateUse.CENTRAL_SYSTEM_ROOT, cpo.pem, EPOCH)
    # In force now, expiring in 30 days and 2 hours: renewed 2 hours from now
    # (A03.FR.02: "will expire in one month").
    current = sign_csr(
        csr_of(store.new_csr(IDENTITY.serial, CPO)),
        cpo,
        valid_from=EPOCH - timedelta(days=60),
        valid_for=timedelta(days=90, hours=2),
    )
    store.accept_signed(current.pem, EPOCH)
    async with rig_for(tmp_path, clock) as rig:
        s = await up(rig, tmp_path, store=store)
        first = await s.cs.expect("SignCertificate")
        assert trio.current_time() == pytest.approx(2 * HOUR, abs=1.0)
        assert csr_of(first.payload["csr"]).subject.rfc4514_string() == (
            f"O={CPO},CN={IDENTITY.serial}"
        )
        # Refused: asked again after RENEWAL_RETRY.
        s.cs.answer(first, {"status": "Rejected"})
        second = await s.cs.expect("SignCertificate")
        assert trio.current_time() == pytest.approx(3 * HOUR, abs=1.0)
        s.cs.answer(second, {"status": "Accepted"})
        # Accepted: not asked again for this certificate, even when no
        # CertificateSigned comes (A03 error handling: no automatic retries).
        await trio.sleep(4 * HOUR)
        assert len(s.cs.payloads("SignCertificate")) == 2
        assert s.switches == []
        renewed = sign_csr(csr_of(second.payload["csr"]), cpo, valid_from=rig.cp.now())
        assert await s.cs.result("CertificateSigned", {"certificateChain": renewed.pem}) == {
            "status": "Accepted"
        }
        await settle(lambda: s.switches, "the renewed certificate in force")
        in_force = s.store.client_in_force(rig.cp.now())
        assert in_force is not None and in_force.serial == hash_data(renewed.cert).serial_number
        await trio.sleep(2 * HOUR)
        assert len(s.cs.payloads("SignCertificate")) == 2


async def test_a_certificate_chain_through_a_sub_ca_and_a_restart(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    _, cpo = authority()
    sub = issue("CPO Sub CA", issuer=cpo)
    async with rig_for(tmp_path, clock) as rig:
        s = await up(rig, tmp_path)
        await install(s.cs, "CentralSystemRootCertificate", cpo.pem)
        await s.cs.result(
            "ExtendedTriggerMessage", {"requestedMessage": "SignChargePointCertificate"}
        )
        sign = await s.cs.expect("SignCertificate")
        s.cs.answer(sign, {"status": "Accepted"})
        leaf = sign_csr(csr_of(sign.payload["csr"]), sub)
        # Without the sub CA the chain cannot reach the root: Rejected.
        assert await s.cs.result("CertificateSigned", {"certificateChain": leaf.pem}) == {
            "status": "Rejected"
        }
        answer = await s.cs.result("CertificateSigned", {"certificateChain": chain_pem(leaf, sub)})
        assert answer == {"status": "Accepted"}
        now = rig.cp.now()
    reopened = CertificateStore(tmp_path / "certs")
    paths = reopened.client_certificate(now)
    assert paths is not None
    assert x509.load_pem_x509_certificates(paths[0].read_bytes()) == [leaf.cert, sub.cert]
