"""The Firmware Management profile (ocpp16/profiles/firmware.py) in the charge
point's session, named after the OCA compliance cases it covers: TC_044_1..3
(firmware update), TC_045_1/2 (diagnostics), and from the security cases
TC_079 (GetLog SecurityLog), TC_080 (signed update), TC_081 (invalid
signature); the triggers of the three status notifications too.

The session is real (tests/chargepoint_rig.py: the charge point's RpcSession
and CallChannel against a second RpcSession, every frame checked against the
schemas), time virtual (MockClock; ``WallClockChargePoint``'s clock follows
it, so retrieveDate waits are exact). The parts are small but real: images
are tar archives with a manifest of sha256 hashes, verified and unpacked by
``TarInstaller`` into a releases directory; signatures are ECDSA P-256 under
a certificate chain made with ``cryptography`` and checked by
``CryptoSignatures``; the downloader writes the served file as
``ocpp16.transfer.download`` does (``.part``, then moved) and the uploader
copies the file into the server's inbox. The integrator swaps in
ocpp16.transfer, ops.release, ocpp16.certificates and ops.diagnostics.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import tarfile
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ocpp16.errors import CertificateError, TransferError
from ocpp16.firmware import (
    FIRMWARE_ROLLED_BACK,
    Kind,
    PendingInstall,
    ProgressSink,
    TransferReport,
)
from ocpp16.profiles.firmware import FirmwareProfile, TransfersProgress, redact
from ocpp16.profiles.remote_trigger import RemoteTriggerProfile
from ocpp16.rpc import CallErrorReceived, CallResultReceived
from ops.progress import Transfers
from tests.chargepoint_rig import (
    IDENTITY,
    CentralSystem,
    FakeConnection,
    Rig,
    WallClockChargePoint,
    open_rig,
    settle,
    wall,
)

URL = "https://firmware.example/releases/evse-1.3.0.tar"
UPLOAD = "ftp://user:secret@logs.example:2121/incoming/"


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock()


# -- images and releases -----------------------------------------------------------------------


def build_image(path: Path, version: str, *, tamper: bool = False) -> Path:
    """A release image: wheels and a manifest with each member's sha256."""
    members = {
        f"evse_firmware-{version}-py3-none-any.whl": f"the firmware {version}".encode(),
        "trio-0.35.0-py3-none-any.whl": b"trio wheel",
    }
    manifest = {
        "version": version,
        "python": "3.11",
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()},
    }
    if tamper:
        members["trio-0.35.0-py3-none-any.whl"] = b"trio wheel, with a present"
    with tarfile.open(path, "w") as tar:
        for name, data in {**members, "manifest.json": json.dumps(manifest).encode()}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class TarInstaller:
    """Releases side by side under ``root``: verify, unpack, switch ``current``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[str] = []
        self.fail_install: str | None = None
        #: install waits for it (a slow venv build).
        self.gate: threading.Event | None = None

    @property
    def current(self) -> str | None:
        path = self.root / "current"
        return path.read_text() if path.exists() else None

    def verify(self, image: Path) -> str:
        self.calls.append("verify")
        with tarfile.open(image) as tar:
            manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
            for name, digest in manifest["sha256"].items():
                data = tar.extractfile(name).read()  # type: ignore[union-attr]
                if hashlib.sha256(data).hexdigest() != digest:
                    raise ValueError(f"{name}: sha256 does not match the manifest")
        version: str = manifest["version"]
        return version

    def install(self, image: Path) -> str:
        self.calls.append("install")
        if self.gate is not None:
            assert self.gate.wait(20)
        if self.fail_install is not None:
            raise RuntimeError(self.fail_install)
        version = self.verify(image)
        target = self.root / "releases" / version
        target.mkdir(parents=True)
        with tarfile.open(image) as tar:
            tar.extractall(target, filter="data")
        return version

    def switch(self, version: str) -> None:
        self.calls.append(f"switch {version}")
        (self.root / "current").write_text(version)

    def confirm(self) -> None:
        self.calls.append("confirm")


# -- signatures ---------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def certificate(
    subject: str, issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A key and its certificate: self-signed (a root) or issued by ``issuer``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    signer_key, issuer_name = (
        (key, _name(subject)) if issuer is None else (issuer[0], issuer[1].subject)
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .sign(signer_key, hashes.SHA256())
    )
    return key, cert


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def sign(key: ec.EllipticCurvePrivateKey, image: Path) -> str:
    """Base64 ECDSA signature, SHA-256 over the whole file (whitepaper L01)."""
    return base64.b64encode(key.sign(image.read_bytes(), ec.ECDSA(hashes.SHA256()))).decode()


class CryptoSignatures:
    """``SignatureCheck`` on the installed ManufacturerRootCertificates."""

    def __init__(self, roots: list[x509.Certificate]) -> None:
        self.roots = roots
        self.checked: list[str] = []

    def manufacturer_root_installed(self) -> bool:
        return bool(self.roots)

    def _load(self, text: str) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(text.encode())
        except ValueError as exc:
            raise CertificateError(f"not a PEM certificate: {exc}") from None

    def check_certificate(self, signing_certificate: str) -> None:
        self.checked.append("certificate")
        cert = self._load(signing_certificate)
        now = datetime.now(UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CertificateError("the signing certificate is not valid now")
        for root in self.roots:
            if root.subject == cert.issuer:
                try:
                    cert.verify_directly_issued_by(root)
                except (ValueError, TypeError, InvalidSignature):
                    continue
                return
        raise CertificateError("no chain to an installed ManufacturerRootCertificate")

    def check_signature(self, image: Path, signature: str, signing_certificate: str) -> None:
        self.checked.append("signature")
        key = self._load(signing_certificate).public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        try:
            key.verify(base64.b64decode(signature), image.read_bytes(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise CertificateError("the signature does not match the image") from None


# -- transfers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    done: int
    total: int | None


@dataclass
class Downloader:
    """Serves files by URL the way ocpp16.transfer.download stores them."""

    served: dict[str, Path] = field(default_factory=dict)
    #: Per attempt, in order: a failure to raise, or None to serve the file.
    failures: list[TransferError | None] = field(default_factory=list)
    duration: float = 0.0
    attempts: list[float] = field(default_factory=list)
    wall: list[datetime] = field(default_factory=list)

    async def __call__(
        self,
        url: str,
        dest: Path,
        *,
        max_bytes: int,
        progress: Callable[[Progress], None] | None = None,
    ) -> int:
        self.attempts.append(trio.current_time())
        await trio.sleep(self.duration)
        if self.failures and (failure := self.failures.pop(0)) is not None:
            raise failure
        data = await trio.Path(self.served[url]).read_bytes()
        if len(data) > max_bytes:
            raise TransferError(url, f"{len(data)} bytes is over the cap", retryable=False)
        half = len(data) // 2
        part = trio.Path(dest.with_name(dest.name + ".part"))
        await part.write_bytes(data[:half])
        if progress is not None:
            progress(Progress(half, len(data)))
        await part.write_bytes(data)
        if progress is not None:
            progress(Progress(len(data), len(data)))
        await part.replace(dest)
        return len(data)


@dataclass
class Uploader:
    """Copies what it is given into the server's inbox."""

    inbox: Path
    failures: list[TransferError | None] = field(default_factory=list)
    duration: float = 0.0
    attempts: list[float] = field(default_factory=list)
    received: list[tuple[str, str]] = field(default_factory=list)

    async def __call__(
        self, url: str, source: Path, *, progress: Callable[[Progress], None] | None = None
    ) -> None:
        self.attempts.append(trio.current_time())
        await trio.sleep(self.duration)
        if self.failures and (failure := self.failures.pop(0)) is not None:
            raise failure
        data = await trio.Path(source).read_bytes()
        await trio.Path(self.inbox / source.name).write_bytes(data)
        if progress is not None:
            progress(Progress(len(data), len(data)))
        self.received.append((url, source.name))


@dataclass
class Sources:
    """GetDiagnostics and GetLog files, built into the directory given."""

    empty: bool = False
    asked: list[tuple[str, datetime | None, datetime | None]] = field(default_factory=list)

    def diagnostics(
        self, out: Path, *, start: datetime | None, stop: datetime | None
    ) -> Path | None:
        self.asked.append(("diagnostics", start, stop))
        if self.empty:
            return None
        file = out / "diagnostics-SN-0001.tar.gz"
        file.write_bytes(b"log lines, configuration (redacted), queue summary")
        return file

    def log(
        self, out: Path, kind: str, start: datetime | None, stop: datetime | None
    ) -> Path | None:
        self.asked.append((kind, start, stop))
        if self.empty:
            return None
        file = out / f"{kind}-SN-0001.log"
        file.write_bytes(f"{kind} entries".encode())
        return file


@dataclass
class Hooks:
    """The station's side of an installation, on the rig's FakeStation."""

    rig: Rig | None = None
    running: bool = False
    calls: list[tuple[float, str]] = field(default_factory=list)
    restarted: trio.Event = field(default_factory=trio.Event)

    def transactions_running(self) -> bool:
        return self.running

    async def make_unavailable(self) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append((trio.current_time(), "unavailable"))
        if not self.running and self.rig is not None:
            self.rig.set_status(1, "Unavailable")

    async def restore_availability(self) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append((trio.current_time(), "restore"))
        if self.rig is not None:
            self.rig.set_status(1, "Available")

    async def restart(self) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append((trio.current_time(), "restart"))
        self.restarted.set()


@dataclass(frozen=True)
class Report:
    """``StartReport``."""

    installed: str | None = None
    rolled_back: tuple[str, str, str] | None = None


@dataclass
class Bench:
    """Everything outside the charge point, on real files under ``root``."""

    root: Path
    downloader: Downloader = field(default_factory=Downloader)
    uploader: Uploader = field(init=False)
    installer: TarInstaller = field(init=False)
    hooks: Hooks = field(default_factory=Hooks)
    sources: Sources = field(default_factory=Sources)
    signatures: CryptoSignatures | None = None
    events: list[tuple[str, str | None]] = field(default_factory=list)
    transfers: Transfers = field(default_factory=Transfers)

    def __post_init__(self) -> None:
        for d in ("data", "served", "inbox", "opt"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.uploader = Uploader(self.root / "inbox")
        self.installer = TarInstaller(self.root / "opt")

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def state_file(self) -> Path:
        return self.data / "firmware-update.json"

    def serve(self, version: str = "1.3.0", *, url: str = URL, tamper: bool = False) -> Path:
        image = build_image(self.root / "served" / f"evse-{version}.tar", version, tamper=tamper)
        self.downloader.served[url] = image
        return image

    def leftovers(self) -> list[str]:
        """Files the profile left in its work directory."""
        return sorted(
            str(p.relative_to(self.data))
            for p in self.data.rglob("*")
            if p.is_file() and p != self.state_file
        )

    def emit(self, event_type: str, tech_info: str | None) -> None:
        self.events.append((event_type, tech_info))


NOTIFICATIONS = (
    "FirmwareStatusNotification",
    "SignedFirmwareStatusNotification",
    "DiagnosticsStatusNotification",
    "LogStatusNotification",
)


@asynccontextmanager
async def station(
    tmp_path: Path,
    clock: trio.testing.MockClock,
    bench: Bench,
    *,
    version: str = "1.2.3",
    start_report: Report | None = None,
    db: str = "first",
    progress: ProgressSink | None = None,
    state_file: Path | None = None,
    **profile_kw: Any,
) -> AsyncIterator[tuple[Rig, FirmwareProfile, CentralSystem]]:
    """The charge point with the profile (and Remote Trigger on it), registered."""
    (tmp_path / db).mkdir(exist_ok=True)
    async with open_rig(tmp_path / db, clock, cp_class=WallClockChargePoint) as rig:
        rig.cp.identity = dataclasses.replace(IDENTITY, firmware_version=version)
        bench.hooks.rig = rig
        profile = FirmwareProfile(
            rig.cp,
            work_dir=bench.data,
            state_file=state_file or bench.state_file,
            downloader=bench.downloader,
            uploader=bench.uploader,
            installer=bench.installer,
            hooks=bench.hooks,
            diagnostics=bench.sources.diagnostics,
            logs=bench.sources.log,
            signatures=bench.signatures,
            emit=bench.emit,
            start_report=start_report,
            progress=progress or TransfersProgress(bench.transfers),
            **profile_kw,
        )
        rig.cp.register(profile)
        rig.cp.register(RemoteTriggerProfile(rig.cp, transfers=profile))
        cs = await rig.connect(**{action: (lambda call: {}) for action in NOTIFICATIONS})
        await settle(lambda: rig.cp.online, "registered")
        yield rig, profile, cs


def statuses(cs: CentralSystem, action: str) -> list[Any]:
    """The statuses received (with the requestId, when there is one)."""
    return [
        (p["status"], p["requestId"]) if "requestId" in p else p["status"]
        for p in cs.payloads(action)
    ]


async def until(
    predicate: Callable[[], object], what: str, *, limit: float = 50_000, step: float = 5.0
) -> None:
    """Let virtual time pass until ``predicate()`` holds."""
    give_up = trio.current_time() + limit
    while not predicate():
        if trio.current_time() > give_up:
            raise AssertionError(f"not reached within {limit} s of virtual time: {what}")
        await trio.sleep(step)


def connector_statuses(cs: CentralSystem, cid: int = 1) -> list[str]:
    return [p["status"] for p in cs.payloads("StatusNotification") if p["connectorId"] == cid]


async def update(cs: CentralSystem, at: float = 0.0, **extra: Any) -> dict[str, Any]:
    return await cs.result("UpdateFirmware", {"location": URL, "retrieveDate": wall(at), **extra})


# -- UpdateFirmware ------------------------------------------------------------------------------


async def test_tc_044_1_download_install_restart_and_installed(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    bench.serve("1.3.0")
    async with station(tmp_path, clock, bench) as (_, _, cs):
        assert await update(cs) == {}
        await until(bench.hooks.restarted.is_set, "the restart")
        assert statuses(cs, "FirmwareStatusNotification") == [
            "Downloading",
            "Downloaded",
            "Installing",
        ]
        assert "Unavailable" in connector_statuses(cs)
        assert bench.installer.calls == ["verify", "install", "verify", "switch 1.3.0"]
        assert bench.installer.current == "1.3.0"
        assert (bench.installer.root / "releases" / "1.3.0" / "manifest.json").exists()
        # Pending across the restart; the image removed after the install.
        assert PendingInstall.from_json(bench.state_file.read_text()) == PendingInstall(
            Kind.PLAIN, "1.3.0", "1.2.3"
        )
        assert bench.leftovers() == []
        snapshot = bench.transfers.snapshot()
        assert [(t["name"], t["state"], t["bytes"]) for t in snapshot] == [
            ("firmware download", "done", bench.downloader.served[URL].stat().st_size)
        ]

    # The next process runs the new release: Installed once registered.
    bench.hooks = Hooks()
    async with station(tmp_path, clock, bench, version="1.3.0", db="second") as (_, _, cs):
        await until(lambda: statuses(cs, "FirmwareStatusNotification"), "the report")
        assert cs.payloads("BootNotification")[0]["firmwareVersion"] == "1.3.0"
        assert statuses(cs, "FirmwareStatusNotification") == ["Installed"]
        assert connector_statuses(cs) == ["Available"]
        assert bench.events == [("FirmwareUpdated", "1.2.3 -> 1.3.0")]
        assert bench.installer.calls[-1] == "confirm"
        await settle(lambda: not bench.state_file.exists(), "the pending installation cleared")
        # A trigger now finds nothing in progress.
        await cs.result("TriggerMessage", {"requestedMessage": "FirmwareStatusNotification"})
        await until(lambda: len(cs.payloads("FirmwareStatusNotification")) == 2, "triggered")
        assert statuses(cs, "FirmwareStatusNotification")[-1] == "Idle"


async def test_tc_044_2_download_failed_after_every_retry(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    bench.serve()
    refused = TransferError(URL, "connection refused")
    bench.downloader.failures = [refused, refused]
    async with station(tmp_path, clock, bench) as (_, _, cs):
        start = trio.current_time()
        await update(cs, retries=1, retryInterval=30)
        await until(lambda: len(cs.payloads("FirmwareStatusNotification")) == 2, "the end")
        await trio.sleep(300)
        assert statuses(cs, "FirmwareStatusNotification") == ["Downloading", "DownloadFailed"]
        assert [t - start for t in bench.downloader.attempts] == [0.0, 30.0]
        assert bench.installer.calls == [] and bench.hooks.calls == []
        assert bench.leftovers() == []


async def test_tc_044_3_installation_failed_the_running_release_untouched(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    bench.serve()
    bench.installer.fail_install = "self-check: evse --version printed nothing"
    async with station(tmp_path, clock, bench) as (_, _, cs):
        await update(cs)
        await until(lambda: len(cs.payloads("FirmwareStatusNotification")) == 4, "the end")
        assert statuses(cs, "FirmwareStatusNotification") == [
            "Downloading",
            "Downloaded",
            "Installing",
            "InstallationFailed",
        ]
        assert bench.installer.current is None  # never switched
        assert [what for _, what in bench.hooks.calls] == ["unavailable", "restore"]
        await until(lambda: connector_statuses(cs)[-1] == "Available", "available again")
        assert not bench.state_file.exists() and bench.leftovers() == []


async def test_tc_044_3_a_release_that_rolled_back_is_installation_failed_after_the_restart(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    bench.serve("1.3.0")
    async with station(tmp_path, clock, bench) as (_, _, cs):
        await update(cs)
        await until(bench.hooks.restarted.is_set, "the restart")
    # 1.3.0 crashed at every start; at_start() went back to 1.2.3.
    report = Report(rolled_back=("1.3.0", "1.2.3", "3 starts without registering"))
    async with station(tmp_path, clock, bench, start_report=report, db="second") as (_, _, cs):
        await until(lambda: statuses(cs, "FirmwareStatusNotification"), "the report")
        assert statuses(cs, "FirmwareStatusNotification") == ["InstallationFailed"]
        assert bench.events == [
            (FIRMWARE_ROLLED_BACK, "rolled back from 1.3.0 to 1.2.3: 3 starts without registering")
        ]
        assert "confirm" not in bench.installer.calls
        await settle(lambda: not bench.state_file.exists(), "cleared")


async def test_the_old_release_after_the_restart_is_installation_failed(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    bench.state_file.write_text(PendingInstall(Kind.PLAIN, "1.3.0", "1.2.3").to_json())
    # The power failed between saving and switching: the station runs 1.2.3.
    async with station(tmp_path, clock, bench) as (_, _, cs):
        await until(lambda: statuses(cs, "FirmwareStatusNotification"), "the report")
        assert statuses(cs, "FirmwareStatusNotification") == ["InstallationFailed"]
        assert bench.events == []


async def test_a_failed_switch_or_an_unsaved_pending_installation_is_installation_failed(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    bench.serve()

    def read_only(version: str) -> None:
        raise OSError(30, "Read-only file system")

    bench.installer.switch = read_only  # type: ignore[method-assign]
    async with station(tmp_path, clock, bench) as (_, _, cs):
        await update(cs)
        await until(lambda: "InstallationFailed" in statuses(cs, "FirmwareStatusNotification"), "x")
        await settle(lambda: not bench.state_file.exists(), "the pending installation cleared")
        assert [what for _, what in bench.hooks.calls] == ["unavailable", "restore"]
    # The pending installation cannot be written (its directory is a file): no switch.
    blocked = Bench(tmp_path / "blocked")
    blocked.serve()
    (blocked.data / "state").write_text("not a directory")
    async with station(
        tmp_path, clock, blocked, db="blocked-db", state_file=blocked.data / "state" / "fw.json"
    ) as (_, _, cs):
        await update(cs)
        await until(lambda: "InstallationFailed" in statuses(cs, "FirmwareStatusNotification"), "x")
        assert blocked.installer.current is None
        assert "switch 1.3.0" not in blocked.installer.calls


async def test_a_corrupt_pending_installation_is_ignored_and_removed(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    bench.state_file.write_text('{"format": 1, "kind": "UpdateFirmware"')
    async with station(tmp_path, clock, bench) as (_, profile, cs):
        assert not bench.state_file.exists()
        await trio.sleep(100)
        assert cs.payloads("FirmwareStatusNotification") == []
        assert profile.firmware.idle


async def test_a_rollback_with_no_update_of_ours_pending_raises_the_event_only(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    report = Report(rolled_back=("1.3.0", "1.2.3", "trial deadline passed"))
    async with station(tmp_path, clock, bench, start_report=report) as (_, profile, cs):
        await until(lambda: bench.events, "the event")
        await trio.sleep(100)
        assert bench.events == [
            (FIRMWARE_ROLLED_BACK, "rolled back from 1.3.0 to 1.2.3: trial deadline passed")
        ]
        assert cs.payloads("FirmwareStatusNotification") == []
        assert profile.firmware_status() == "Idle"


async def test_no_download_before_the_retrieve_date_then_retries_at_the_interval(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    bench.serve()
    refused = TransferError(URL, "HTTP 503")
    bench.downloader.failures = [refused, refused]
    async with station(tmp_path, clock, bench) as (rig, profile, cs):
        await update(cs, at=300, retries=2, retryInterval=120)
        await trio.sleep(299)
        assert bench.downloader.attempts == []
        assert statuses(cs, "FirmwareStatusNotification") == []  # no DownloadScheduled in 1.6
        assert profile.firmware_status() == "Idle"
        assert profile.signed_firmware_status() == ("DownloadScheduled", None)
        await until(lambda: "Downloaded" in statuses(cs, "FirmwareStatusNotification"), "done")
        assert bench.downloader.attempts == pytest.approx([300.0, 420.0, 540.0], abs=1e-3)
        assert statuses(cs, "FirmwareStatusNotification")[:2] == ["Downloading", "Downloaded"]
        assert rig.cp.now() >= datetime.fromisoformat(wall(300))


async def test_a_clock_set_meanwhile_moves_the_retrieve_date(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    bench.serve()
    async with station(tmp_path, clock, bench) as (rig, _, cs):
        await update(cs, at=3600)
        await trio.sleep(100)
        # The central system's clock turns out to be 3500 s ahead: it is time.
        assert isinstance(rig.cp, WallClockChargePoint)
        rig.cp.wall_step = timedelta(seconds=3500)
        rig.cp.timing.unpark_all()
        await until(lambda: bench.downloader.attempts, "the download")
        assert bench.downloader.attempts == [pytest.approx(100.0)]


async def test_retries_zero_makes_one_attempt_and_absent_retries_three(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    bench.serve()
    refused = TransferError(URL, "refused")
    bench.downloader.failures = [refused] * 10
    async with station(tmp_path, clock, bench) as (_, _, cs):
        await update(cs, retries=0, retryInterval=5)
        await until(lambda: "DownloadFailed" in statuses(cs, "FirmwareStatusNotification"), "end")
        assert len(bench.downloader.attempts) == 1
        start = trio.current_time()
        await update(cs)  # retries absent: 2 retries, 60 s apart (ocpp16.firmware)
        await until(
            lambda: statuses(cs, "FirmwareStatusNotification").count("DownloadFailed") == 2, "end"
        )
        assert [t - start for t in bench.downloader.attempts[1:]] == pytest.approx([0, 60, 120])


async def test_the_size_cap_fails_at_once(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    bench = Bench(tmp_path)
    image = bench.serve()
    async with station(tmp_path, clock, bench, max_image_bytes=image.stat().st_size - 1) as (
        _,
        _,
        cs,
    ):
        await update(cs, retries=5, retryInterval=10)
        await until(lambda: "DownloadFailed" in statuses(cs, "FirmwareStatusNotification"), "end")
        assert len(bench.downloader.attempts) == 1  # another attempt cannot help
        assert [(t["state"], t["reason"]) for t in bench.transfers.snapshot()] == [
            ("failed", f"{image.stat().st_size} bytes is over the cap")
        ]


async def test_the_install_waits_for_the_transaction_connectors_unavailable_meanwhile(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    bench.serve()
    bench.hooks.running = True
    async with station(tmp_path, clock, bench, idle_poll=30.0) as (rig, profile, cs):
        await update(cs)
        await until(lambda: "Downloaded" in statuses(cs, "FirmwareStatusNotification"), "dl")
        await trio.sleep(300)
        assert "Installing" not in statuses(cs, "FirmwareStatusNotification")
        assert [what for _, what in bench.hooks.calls] == ["unavailable"]
        assert profile.firmware_status() == "Downloaded"
        # The transaction ends: the connector goes Unavailable and the install starts.
        bench.hooks.running = False
        rig.set_status(1, "Unavailable")
        ended = trio.current_time()
        rig.cp.timing.unpark_all()  # what the end of a transaction does
        await until(bench.hooks.restarted.is_set, "the restart")
        assert statuses(cs, "FirmwareStatusNotification")[-1] == "Installing"
        assert bench.installer.calls[0] == "verify"
        assert bench.hooks.calls[-1][0] - ended < 1.0
        assert "Unavailable" in connector_statuses(cs)


async def test_the_notifications_follow_the_answer_on_the_wire(
    tmp_path: Path, clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames: list[list[Any]] = []
    original = FakeConnection.send

    async def send(self: FakeConnection, text: str) -> None:
        frame = json.loads(text)
        if frame[0] == 3:
            # A slow write of the answer (a real websocket's send has several
            # awaits): the download's notification must still not overtake it.
            await trio.sleep(1)
        await original(self, text)
        frames.append(frame)

    monkeypatch.setattr(FakeConnection, "send", send)
    bench = Bench(tmp_path)
    bench.serve()
    async with station(tmp_path, clock, bench) as (_, _, cs):
        uid = cs.send_call("UpdateFirmware", {"location": URL, "retrieveDate": wall(0)})
        await until(lambda: statuses(cs, "FirmwareStatusNotification"), "Downloading")
        answer = next(i for i, f in enumerate(frames) if f[0] == 3 and f[1] == uid)
        first = next(
            i for i, f in enumerate(frames) if f[0] == 2 and f[2] == "FirmwareStatusNotification"
        )
        assert answer < first, [(f[0], f[2] if f[0] == 2 else f[1]) for f in frames]


async def test_a_notification_that_meets_a_lost_connection_goes_on_the_next(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    bench.serve()
    bench.downloader.duration = 100
    async with station(tmp_path, clock, bench) as (rig, _, cs):
        await update(cs)
        await until(lambda: statuses(cs, "FirmwareStatusNotification"), "Downloading")
        cs.conn.drop()
        bench.hooks.running = True  # stop before the install
        await trio.sleep(200)  # Downloaded while offline
        cs2 = await rig.connect(**{action: (lambda call: {}) for action in NOTIFICATIONS})
        await until(lambda: statuses(cs2, "FirmwareStatusNotification"), "Downloaded")
        assert statuses(cs, "FirmwareStatusNotification") == ["Downloading"]
        assert statuses(cs2, "FirmwareStatusNotification") == ["Downloaded"]


async def test_a_second_update_replaces_a_scheduled_one_and_one_installing_is_ignored(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    bench.serve()
    other = "https://firmware.example/releases/evse-1.4.0.tar"
    bench.serve("1.4.0", url=other)
    bench.installer.gate = threading.Event()
    async with station(tmp_path, clock, bench) as (_, profile, cs):
        await update(cs, at=500)
        await cs.result("UpdateFirmware", {"location": other, "retrieveDate": wall(0)})
        # Nothing here needs virtual time, and while the install blocks in its
        # worker thread none passes: wait without it.
        await settle(lambda: "Installing" in statuses(cs, "FirmwareStatusNotification"), "inst")
        # Installing: a third request cannot stop it; answered and ignored.
        assert await update(cs) == {}
        bench.installer.gate.set()
        await until(bench.hooks.restarted.is_set, "the restart")
        assert bench.installer.current == "1.4.0"
        await trio.sleep(600)  # the first request's date passed: nothing
        assert len(bench.downloader.attempts) == 1
        assert profile.firmware.pending is not None


async def test_negative_retries_are_a_property_constraint_violation(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    async with station(tmp_path, clock, bench) as (_, _, cs):
        answer = await cs.call(
            "UpdateFirmware", {"location": URL, "retrieveDate": wall(0), "retries": -1}
        )
        assert isinstance(answer, CallErrorReceived)
        assert answer.code == "PropertyConstraintViolation" and "retries" in answer.description


# -- GetDiagnostics ----------------------------------------------------------------------------


async def test_tc_045_1_get_diagnostics_uploaded(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    async with station(tmp_path, clock, bench) as (_, _, cs):
        answer = await cs.result(
            "GetDiagnostics",
            {"location": UPLOAD, "startTime": wall(-3600), "stopTime": wall(0)},
        )
        assert answer == {"fileName": "diagnostics-SN-0001.tar.gz"}
        await until(lambda: len(cs.payloads("DiagnosticsStatusNotification")) == 2, "the end")
        assert statuses(cs, "DiagnosticsStatusNotification") == ["Uploading", "Uploaded"]
        assert bench.uploader.received == [(UPLOAD, "diagnostics-SN-0001.tar.gz")]
        assert (
            (bench.uploader.inbox / "diagnostics-SN-0001.tar.gz")
            .read_bytes()
            .startswith(b"log lines")
        )
        (_, start, stop) = bench.sources.asked[0]
        assert (start, stop) == (
            datetime.fromisoformat(wall(-3600)),
            datetime.fromisoformat(wall(0)),
        )
        assert bench.leftovers() == []
        assert [(t["name"], t["state"]) for t in bench.transfers.snapshot()] == [
            ("diagnostics-SN-0001.tar.gz upload", "done")
        ]


class BrokenSink:
    """A progress display that fails at everything."""

    def begin(self, name: str) -> TransferReport:
        return self

    def advance(self, done: int, total: int | None) -> None:
        raise RuntimeError("display broken")

    def end(self, failure: str | None) -> None:
        raise RuntimeError("display broken")


async def test_a_broken_progress_display_never_fails_a_transfer(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    bench.serve()
    bench.hooks.running = True  # stop after the download
    async with station(tmp_path, clock, bench, progress=BrokenSink()) as (_, _, cs):
        await update(cs)
        await cs.result("GetDiagnostics", {"location": UPLOAD})
        await until(lambda: "Downloaded" in statuses(cs, "FirmwareStatusNotification"), "dl")
        await until(lambda: "Uploaded" in statuses(cs, "DiagnosticsStatusNotification"), "up")


async def test_tc_045_2_upload_failed_after_the_retries(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    failure = TransferError(redact(UPLOAD), "530 Login incorrect")
    bench.uploader.failures = [failure, failure, failure]
    async with station(tmp_path, clock, bench) as (_, _, cs):
        start = trio.current_time()
        await cs.result("GetDiagnostics", {"location": UPLOAD, "retries": 2, "retryInterval": 15})
        await until(lambda: len(cs.payloads("DiagnosticsStatusNotification")) == 2, "the end")
        assert statuses(cs, "DiagnosticsStatusNotification") == ["Uploading", "UploadFailed"]
        assert [t - start for t in bench.uploader.attempts] == pytest.approx([0, 15, 30])
        assert bench.leftovers() == []


async def test_get_diagnostics_with_nothing_to_send_omits_the_file_name(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    bench.sources.empty = True
    async with station(tmp_path, clock, bench) as (_, _, cs):
        assert await cs.result("GetDiagnostics", {"location": UPLOAD}) == {}
        assert await cs.result(
            "GetLog",
            {"logType": "DiagnosticsLog", "requestId": 1, "log": {"remoteLocation": UPLOAD}},
        ) == {"status": "Accepted"}
        await trio.sleep(100)
        assert cs.payloads("DiagnosticsStatusNotification") == []
        assert cs.payloads("LogStatusNotification") == []
        assert bench.uploader.attempts == [] and bench.leftovers() == []


# -- GetLog -------------------------------------------------------------------------------------


def get_log(request_id: int, kind: str = "SecurityLog", **extra: Any) -> dict[str, Any]:
    return {"logType": kind, "requestId": request_id, "log": {"remoteLocation": UPLOAD}, **extra}


async def test_tc_079_get_security_log(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    bench = Bench(tmp_path)
    async with station(tmp_path, clock, bench) as (_, _, cs):
        answer = await cs.result("GetLog", get_log(3))
        assert answer == {"status": "Accepted", "filename": "SecurityLog-SN-0001.log"}
        await until(lambda: len(cs.payloads("LogStatusNotification")) == 2, "the end")
        assert statuses(cs, "LogStatusNotification") == [("Uploading", 3), ("Uploaded", 3)]
        assert (
            bench.uploader.inbox / "SecurityLog-SN-0001.log"
        ).read_text() == "SecurityLog entries"


async def test_get_log_upload_failure_with_the_schema_spelling(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    bench.uploader.failures = [TransferError(UPLOAD, "no route to host")]
    async with station(tmp_path, clock, bench) as (_, _, cs):
        await cs.result("GetLog", get_log(4, "DiagnosticsLog", retries=0))
        await until(lambda: len(cs.payloads("LogStatusNotification")) == 2, "the end")
        assert statuses(cs, "LogStatusNotification") == [("Uploading", 4), ("UploadFailure", 4)]


async def test_a_second_get_log_during_an_upload_is_accepted_canceled(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    bench.uploader.duration = 100
    async with station(tmp_path, clock, bench) as (_, profile, cs):
        await cs.result("GetLog", get_log(5))
        await until(lambda: statuses(cs, "LogStatusNotification") == [("Uploading", 5)], "up")
        assert profile.log_status() == ("Uploading", 5)
        answer = await cs.result("GetLog", get_log(6, "DiagnosticsLog"))
        assert answer == {"status": "AcceptedCanceled", "filename": "DiagnosticsLog-SN-0001.log"}
        await until(lambda: len(cs.payloads("LogStatusNotification")) == 3, "the end")
        await trio.sleep(500)
        # The cancelled upload sends nothing more; the new one carries its own requestId.
        assert statuses(cs, "LogStatusNotification") == [
            ("Uploading", 5),
            ("Uploading", 6),
            ("Uploaded", 6),
        ]
        assert bench.uploader.received == [(UPLOAD, "DiagnosticsLog-SN-0001.log")]
        assert bench.leftovers() == []
        assert profile.log_status() == ("Idle", None)


async def test_get_log_to_a_location_that_is_not_http_or_ftp_is_rejected(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench = Bench(tmp_path)
    async with station(tmp_path, clock, bench) as (_, _, cs):
        payload = get_log(7)
        payload["log"]["remoteLocation"] = "scp://logs.example/in/"
        assert await cs.result("GetLog", payload) == {"status": "Rejected"}
        assert bench.sources.asked == []


# -- SignedUpdateFirmware ------------------------------------------------------------------------


@dataclass
class Signer:
    root: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def signed_bench(tmp_path: Path) -> tuple[Bench, Signer]:
    root_key, root = certificate("Example Manufacturer Root")
    key, cert = certificate("Example Firmware Signing", (root_key, root))
    bench = Bench(tmp_path, signatures=CryptoSignatures([root]))
    return bench, Signer(root, key, cert)


def signed_update(
    signer: Signer,
    image: Path,
    request_id: int,
    *,
    at: float = 0.0,
    install_at: float | None = None,
    signature: str | None = None,
    certificate_pem: str | None = None,
) -> dict[str, Any]:
    firmware: dict[str, Any] = {
        "location": URL,
        "retrieveDateTime": wall(at),
        "signingCertificate": certificate_pem or pem(signer.cert),
        "signature": signature or sign(signer.key, image),
    }
    if install_at is not None:
        firmware["installDateTime"] = wall(install_at)
    return {"requestId": request_id, "firmware": firmware}


async def test_tc_080_signed_update(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    bench, signer = signed_bench(tmp_path)
    image = bench.serve("1.3.0")
    async with station(tmp_path, clock, bench) as (_, _, cs):
        answer = await cs.result("SignedUpdateFirmware", signed_update(signer, image, 11))
        assert answer == {"status": "Accepted"}
        await until(bench.hooks.restarted.is_set, "the restart")
        assert statuses(cs, "SignedFirmwareStatusNotification") == [
            ("Downloading", 11),
            ("Downloaded", 11),
            ("SignatureVerified", 11),
            ("Installing", 11),
            ("InstallRebooting", 11),
        ]
        assert cs.payloads("FirmwareStatusNotification") == []
        assert bench.signatures is not None
        assert bench.signatures.checked == ["certificate", "signature"]
    bench.hooks = Hooks()
    async with station(tmp_path, clock, bench, version="1.3.0", db="second") as (_, _, cs):
        await until(lambda: cs.payloads("SignedFirmwareStatusNotification"), "the report")
        assert statuses(cs, "SignedFirmwareStatusNotification") == [("Installed", 11)]
        assert bench.events == [("FirmwareUpdated", "1.2.3 -> 1.3.0")]


async def test_tc_081_an_invalid_signature_installs_nothing(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench, signer = signed_bench(tmp_path)
    image = bench.serve("1.3.0")
    forged = sign(ec.generate_private_key(ec.SECP256R1()), image)
    async with station(tmp_path, clock, bench) as (_, _, cs):
        payload = signed_update(signer, image, 12, signature=forged)
        assert await cs.result("SignedUpdateFirmware", payload) == {"status": "Accepted"}
        await until(lambda: len(cs.payloads("SignedFirmwareStatusNotification")) == 3, "end")
        assert statuses(cs, "SignedFirmwareStatusNotification") == [
            ("Downloading", 12),
            ("Downloaded", 12),
            ("InvalidSignature", 12),
        ]
        assert bench.events == [
            ("InvalidFirmwareSignature", "the signature does not match the image")
        ]
        assert bench.installer.calls == [] and bench.installer.current is None
        assert bench.hooks.calls == [] and bench.leftovers() == []


async def test_a_signing_certificate_without_a_chain_is_invalid_certificate(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench, signer = signed_bench(tmp_path)
    image = bench.serve()
    stranger_key, stranger_root = certificate("Someone Else's Root")
    key, cert = certificate("Someone Else's Signing", (stranger_key, stranger_root))
    async with station(tmp_path, clock, bench) as (_, _, cs):
        payload = signed_update(
            signer, image, 13, signature=sign(key, image), certificate_pem=pem(cert)
        )
        answer = await cs.result("SignedUpdateFirmware", payload)
        assert answer == {"status": "InvalidCertificate"}
        assert bench.events == [
            (
                "InvalidFirmwareSigningCertificate",
                "no chain to an installed ManufacturerRootCertificate",
            )
        ]
        await trio.sleep(100)
        assert bench.downloader.attempts == []
        assert cs.payloads("SignedFirmwareStatusNotification") == []


async def test_a_new_signed_request_cancels_a_scheduled_one_accepted_canceled(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench, signer = signed_bench(tmp_path)
    image = bench.serve("1.3.0")
    async with station(tmp_path, clock, bench) as (_, profile, cs):
        first = signed_update(signer, image, 20, at=500)
        assert await cs.result("SignedUpdateFirmware", first) == {"status": "Accepted"}
        await until(lambda: cs.payloads("SignedFirmwareStatusNotification"), "scheduled")
        assert profile.signed_firmware_status() == ("DownloadScheduled", 20)
        second = signed_update(signer, image, 21)
        assert await cs.result("SignedUpdateFirmware", second) == {"status": "AcceptedCanceled"}
        await until(bench.hooks.restarted.is_set, "the restart")
        await trio.sleep(600)
        assert statuses(cs, "SignedFirmwareStatusNotification") == [
            ("DownloadScheduled", 20),
            ("Downloading", 21),
            ("Downloaded", 21),
            ("SignatureVerified", 21),
            ("Installing", 21),
            ("InstallRebooting", 21),
        ]
        assert len(bench.downloader.attempts) == 1


async def test_a_new_signed_request_while_installing_is_rejected(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench, signer = signed_bench(tmp_path)
    image = bench.serve("1.3.0")
    bench.installer.gate = threading.Event()
    async with station(tmp_path, clock, bench) as (_, profile, cs):
        await cs.result("SignedUpdateFirmware", signed_update(signer, image, 30))
        # Nothing here needs virtual time, and while the install blocks in its
        # worker thread none passes: wait without it.
        await settle(
            lambda: ("Installing", 30) in statuses(cs, "SignedFirmwareStatusNotification"), "i"
        )
        answer = await cs.result("SignedUpdateFirmware", signed_update(signer, image, 31))
        assert answer == {"status": "Rejected"}
        assert profile.signed_firmware_status() == ("Installing", 30)
        bench.installer.gate.set()
        await until(bench.hooks.restarted.is_set, "the restart")
        assert all(rid == 30 for _, rid in statuses(cs, "SignedFirmwareStatusNotification"))


async def test_plain_update_firmware_is_refused_once_a_manufacturer_root_is_installed(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench, _ = signed_bench(tmp_path)
    bench.serve()
    async with station(tmp_path, clock, bench) as (_, _, cs):
        answer = await cs.call("UpdateFirmware", {"location": URL, "retrieveDate": wall(0)})
        assert isinstance(answer, CallErrorReceived) and answer.code == "NotSupported"
        await trio.sleep(100)
        assert bench.downloader.attempts == []
        # Without a root, plain updates are answered (the reference station's way).
        assert bench.signatures is not None
        bench.signatures.roots.clear()
        assert isinstance(
            await cs.call("UpdateFirmware", {"location": URL, "retrieveDate": wall(0)}),
            CallResultReceived,
        )


async def test_install_date_time_ahead_is_install_scheduled(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench, signer = signed_bench(tmp_path)
    image = bench.serve("1.3.0")
    async with station(tmp_path, clock, bench) as (_, _, cs):
        await cs.result("SignedUpdateFirmware", signed_update(signer, image, 40, install_at=720))
        await until(bench.hooks.restarted.is_set, "the restart")
        sent = statuses(cs, "SignedFirmwareStatusNotification")
        assert sent[:4] == [
            ("Downloading", 40),
            ("Downloaded", 40),
            ("SignatureVerified", 40),
            ("InstallScheduled", 40),
        ]
        at, what = bench.hooks.calls[0]
        assert what == "unavailable" and at == pytest.approx(720.0, abs=1e-3)


async def test_a_tampered_image_fails_verification_after_a_valid_signature(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench, signer = signed_bench(tmp_path)
    image = bench.serve("1.3.0", tamper=True)  # signed after the tampering
    async with station(tmp_path, clock, bench) as (_, _, cs):
        await cs.result("SignedUpdateFirmware", signed_update(signer, image, 50))
        await until(
            lambda: (
                ("InstallVerificationFailed", 50)
                in statuses(cs, "SignedFirmwareStatusNotification")
            ),
            "the end",
        )
        assert bench.installer.calls == ["verify"] and bench.installer.current is None
    plain = Bench(tmp_path / "plain")
    plain.serve("1.3.0", tamper=True)
    async with station(tmp_path, clock, plain, db="plain-db") as (_, _, cs):
        await update(cs)
        await until(
            lambda: "InstallationFailed" in statuses(cs, "FirmwareStatusNotification"), "end"
        )
        assert plain.installer.current is None


# -- the triggers --------------------------------------------------------------------------------


async def test_triggers_report_the_transfer_in_progress_or_idle(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    bench, signer = signed_bench(tmp_path)
    image = bench.serve("1.3.0")
    bench.downloader.duration = 1000
    bench.uploader.duration = 1000
    async with station(tmp_path, clock, bench) as (_, _, cs):

        async def trigger(action: str, message: str, sent: str) -> dict[str, Any]:
            before = len(cs.payloads(sent))
            answer = await cs.result(action, {"requestedMessage": message})
            assert answer == {"status": "Accepted"}
            await until(lambda: len(cs.payloads(sent)) > before, sent)
            payload: dict[str, Any] = cs.payloads(sent)[-1]
            return payload

        idle = await trigger(
            "ExtendedTriggerMessage",
            "FirmwareStatusNotification",
            "SignedFirmwareStatusNotification",
        )
        assert idle == {"status": "Idle"}
        assert await trigger(
            "ExtendedTriggerMessage", "LogStatusNotification", "LogStatusNotification"
        ) == {"status": "Idle"}
        await cs.result("SignedUpdateFirmware", signed_update(signer, image, 60))
        await cs.result("GetLog", get_log(61))
        await cs.result("GetDiagnostics", {"location": UPLOAD})
        await trio.sleep(10)
        assert await trigger(
            "ExtendedTriggerMessage",
            "FirmwareStatusNotification",
            "SignedFirmwareStatusNotification",
        ) == {"status": "Downloading", "requestId": 60}
        assert await trigger(
            "TriggerMessage", "FirmwareStatusNotification", "FirmwareStatusNotification"
        ) == {"status": "Downloading"}
        assert await trigger(
            "ExtendedTriggerMessage", "LogStatusNotification", "LogStatusNotification"
        ) == {"status": "Uploading", "requestId": 61}
        assert await trigger(
            "TriggerMessage", "DiagnosticsStatusNotification", "DiagnosticsStatusNotification"
        ) == {"status": "Uploading"}
        # The ones both triggers share work the same way.
        before = len(cs.payloads("StatusNotification"))
        answer = await cs.result(
            "ExtendedTriggerMessage", {"requestedMessage": "StatusNotification", "connectorId": 1}
        )
        assert answer == {"status": "Accepted"}
        await until(lambda: len(cs.payloads("StatusNotification")) == before + 1, "status")
        assert await cs.result(
            "ExtendedTriggerMessage", {"requestedMessage": "MeterValues", "connectorId": 2}
        ) == {"status": "Rejected"}
        assert await cs.result(
            "ExtendedTriggerMessage", {"requestedMessage": "BootNotification"}
        ) == {"status": "Rejected"}  # registered already
        await until(bench.hooks.restarted.is_set, "the restart")
        await until(lambda: len(bench.uploader.received) == 2, "both uploads")
        await trio.sleep(100)
        assert await trigger(
            "TriggerMessage", "DiagnosticsStatusNotification", "DiagnosticsStatusNotification"
        ) == {"status": "Idle"}


async def test_sign_charge_point_certificate_is_delegated_rejected_when_none_is_wired(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        sent: list[float] = []

        async def request_certificate() -> None:
            sent.append(trio.current_time())
            await rig.cp.call("SignCertificate", {"csr": "-----BEGIN CERTIFICATE REQUEST-----"})

        def sign_certificate() -> str:
            # ocpp16.profiles.security's shape: decide, and send after the answer.
            if not rig.cp.config.text("CpoName"):
                return "Rejected"
            rig.cp.channel.after_answer("triggered SignCertificate", request_certificate)
            return "Accepted"

        rig.cp.register(RemoteTriggerProfile(rig.cp, sign_certificate=sign_certificate))
        cs = await rig.connect(SignCertificate=lambda call: {"status": "Accepted"})
        await settle(lambda: rig.cp.online, "registered")
        request = {"requestedMessage": "SignChargePointCertificate"}
        assert await cs.result("ExtendedTriggerMessage", request) == {"status": "Rejected"}
        result = await rig.config.change_async("CpoName", "Example CPO", source="central system")
        assert result.ok
        assert await cs.result("ExtendedTriggerMessage", request) == {"status": "Accepted"}
        await until(lambda: cs.payloads("SignCertificate"), "SignCertificate")
        assert len(sent) == 1

    (tmp_path / "none").mkdir()
    async with open_rig(tmp_path / "none", clock) as rig:
        rig.cp.register(RemoteTriggerProfile(rig.cp))
        cs = await rig.connect()
        await settle(lambda: rig.cp.online, "registered")
        request = {"requestedMessage": "SignChargePointCertificate"}
        assert await cs.result("ExtendedTriggerMessage", request) == {"status": "Rejected"}


def test_redact_removes_the_password() -> None:
    assert redact(UPLOAD) == "ftp://user:***@logs.example:2121/incoming/"
    assert redact(URL) == URL
