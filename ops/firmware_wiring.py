"""Issue 10's parts wired into ``evse run``: firmware updates, diagnostics, certificates.

The Firmware Management profile (``ocpp16.profiles.firmware``) and the
certificate profile (``ocpp16.profiles.security``) speak to their
collaborators through Protocols; this module holds the small adapters that
plug the real ones in, and the builder ``ops/run.py`` hands the OCPP port:

* ``ReleaseInstaller`` (``ocpp16.firmware.Installer``) on ``ops.release``:
  the image's manifest checked, a release installed beside the running one in
  a worker thread, the switch on trial (``firmware.trial``), the confirm;
* ``StoreSignatures`` (``SignatureCheck``) on ``ocpp16.certificates``: the
  ManufacturerRootCertificates of the store, the signing certificate and the
  firmware signature (Security Whitepaper ed. 3 L01);
* ``DiagnosticsSources``: GetDiagnostics' archive and GetLog's files from
  ``ops.diagnostics`` (secrets redacted there);
* ``extensions(...)``: the builder of both profiles, run in a worker thread
  when the first connection is about to be made (``ChargePoint``'s
  ``extensions``). Importing this module costs nothing: cryptography (the
  store) and httpx (the transfers) load in there, only on a station with a
  central system.

The station hooks (availability held for this run only, the restart) are
``evse.ocpp_port.OcppPort``'s own methods: they need the station.

Releases (``ReleaseContext``): the station knows it runs from a releases
root when its interpreter is one of ``<firmware.releases>/releases/*``
(the unit's ``/opt/evse/current/bin/evse``). Only then does a start count
against a trial (``Releases.at_start``), and only then is a release
confirmed. An update installs only into a root ``evse install`` laid out
(one with a ``current`` link); ``evse run --sim`` has none at all
(``firmware.releases`` None): an update there ends InstallationFailed, after
a real download and a real manifest check.

Who reports what after a restart: the firmware profile reports an update it
ran itself (its ``state_file`` survives the restart) and the rollback that
``at_start`` found (InstallationFailed with the FirmwareRolledBack security
event); once that is delivered, ``Releases.report_delivered`` clears the
releases' own record (``restart_reported``), so a rollback is reported once.
A confirmed install needs no record there (the profile's state has it), so
``confirm_release`` clears it at once.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ops import release
from ops.errors import ReleaseError
from ops.release import Releases, StartReport

if TYPE_CHECKING:
    from evse.ocpp_port import Extensions, ExtensionsBuilder, OcppPort
    from evse.store import Store
    from ocpp16.certificates import CertificateStore
    from ocpp16.config import Configuration
    from ocpp16.firmware import LogType
    from ocpp16.queue import SecurityEventQueue, TransactionQueue
    from ocpp16.security_events import SecurityEvents
    from ops.config import Config
    from ops.progress import Transfers

log = logging.getLogger(__name__)

#: The pending installation across the restart (the firmware profile's ``state_file``).
STATE_FILE = "firmware-update.json"
#: Where the charge point's certificates live, under the data directory.
CERTIFICATES_DIR = "certificates"


# -- releases -----------------------------------------------------------------------------------


def runs_from(root: Path, prefix: str | None = None) -> bool:
    """This interpreter is one of ``root``'s releases (``<root>/releases/<version>``)."""
    here = Path(prefix if prefix is not None else sys.prefix)
    try:
        return here.resolve().parent == (root / "releases").resolve()
    except OSError:
        return False


@dataclass(frozen=True)
class ReleaseContext:
    """The releases of this run (see the module docstring)."""

    #: None: no releases (``evse run --sim``).
    releases: Releases | None = None
    #: The station runs from one of them: its starts count, it confirms.
    running: bool = False
    #: What ``at_start`` found at this start (empty when not ``running``).
    report: StartReport = field(default_factory=StartReport)
    #: Seconds a new release has to reach its goal (``firmware.trial``).
    trial: float = 600.0


def release_context(config: Config) -> ReleaseContext:
    """The releases the configuration names, before ``at_start``."""
    root = config.firmware.releases
    if root is None:
        return ReleaseContext(trial=config.firmware.trial)
    return ReleaseContext(Releases(root), runs_from(root), trial=config.firmware.trial)


def confirm_release(releases: Releases) -> None:
    """The release on trial reached its goal: the trial ends. Blocking.

    ``Releases.confirm`` leaves "installed" to report; the firmware profile
    reports an update from its own state, so that record is cleared now
    (a rollback's record is kept until the profile has reported it).
    """
    releases.confirm()
    if releases.pending_report().rolled_back is None:
        releases.report_delivered()


class ReleaseInstaller:
    """``ocpp16.firmware.Installer`` on ``ops.release.Releases``. Blocking methods
    (the profile runs each in a worker thread); any exception is the failure."""

    def __init__(
        self, releases: Releases | None, *, trial: float, running: bool, max_starts: int = 3
    ) -> None:
        self.releases = releases
        self.trial = trial
        self.running = running
        self.max_starts = max_starts

    def _root(self) -> Releases:
        releases = self.releases
        if releases is None:
            raise ReleaseError("firmware", "this station installs no releases (firmware.releases)")
        if releases.current() is None:
            raise ReleaseError(
                str(releases.root), "not a releases root: no current link (evse install makes it)"
            )
        return releases

    def verify(self, image: Path) -> str:
        """Every member's sha256 against the image's manifest: its version."""
        return release.verify(image).version

    def install(self, image: Path) -> str:
        return self._root().install(image)

    def switch(self, version: str) -> None:
        self._root().switch(version, trial=self.trial, max_starts=self.max_starts)

    def confirm(self) -> None:
        # A station run from a checkout confirms nothing: it is not the release.
        if self.releases is not None and self.running:
            confirm_release(self.releases)


# -- signatures ---------------------------------------------------------------------------------


class StoreSignatures:
    """``ocpp16.firmware.SignatureCheck`` on the certificate store: the signing
    certificate and the signature against the installed
    ManufacturerRootCertificates, at the charge point's time. Blocking."""

    def __init__(self, store: CertificateStore, now: Callable[[], datetime]) -> None:
        self.store = store
        self.now = now

    def manufacturer_root_installed(self) -> bool:
        return bool(self.store.manufacturer_roots())

    def check_certificate(self, signing_certificate: str) -> None:
        from ocpp16.certificates import verify_signing_certificate  # noqa: PLC0415

        verify_signing_certificate(
            signing_certificate, self.store.manufacturer_roots(), now=self.now()
        )

    def check_signature(self, image: Path, signature: str, signing_certificate: str) -> None:
        from ocpp16.certificates import verify_firmware_signature  # noqa: PLC0415

        verify_firmware_signature(
            image, signature, signing_certificate, self.store.manufacturer_roots(), now=self.now()
        )


# -- diagnostics and logs -------------------------------------------------------------------------


@dataclass
class DiagnosticsSources:
    """GetDiagnostics' and GetLog's files (``ops.diagnostics``). Blocking."""

    data_dir: Path
    registry: Configuration
    queue: TransactionQueue
    store: Store
    version: str
    serial: str
    security_queue: SecurityEventQueue | None = None
    #: Writes what the log files' thread still holds (``ops.logs.FileLogs.flush``).
    flush_logs: Callable[[], object] | None = None

    def _flush(self) -> None:
        if self.flush_logs is not None:
            self.flush_logs()

    def diagnostics(
        self, out: Path, *, start: datetime | None, stop: datetime | None
    ) -> Path | None:
        from ops.diagnostics import build_diagnostics  # noqa: PLC0415

        self._flush()
        return build_diagnostics(
            out,
            start=start,
            stop=stop,
            data_dir=self.data_dir,
            registry=self.registry,
            queue=self.queue,
            store=self.store,
            version=self.version,
            security_queue=self.security_queue,
            station_id=self.registry.get_str("ChargePointId") or self.serial,
        )

    def log(
        self, out: Path, kind: LogType, start: datetime | None, stop: datetime | None
    ) -> Path | None:
        from ops.diagnostics import build_log, secrets_of  # noqa: PLC0415

        self._flush()
        return build_log(
            out,
            kind,
            start=start,
            stop=stop,
            data_dir=self.data_dir,
            station_id=self.registry.get_str("ChargePointId") or self.serial,
            secrets=secrets_of(self.registry),
        )


# -- the extensions -----------------------------------------------------------------------------


def extensions(
    *,
    config: Config,
    registry: Configuration,
    queue: TransactionQueue,
    settings_store: Store,
    security_queue: SecurityEventQueue,
    events: SecurityEvents,
    context: ReleaseContext,
    transfers: Transfers,
    version: str,
    flush_logs: Callable[[], object] | None = None,
) -> ExtensionsBuilder:
    """The builder of the Firmware Management and certificate profiles for an
    ``OcppPort`` (``OcppPort(extensions=...)``)."""

    def build(port: OcppPort) -> Extensions:
        # Loaded here, in the worker thread, once a central system is configured.
        from evse.ocpp_port import Extensions  # noqa: PLC0415
        from ocpp16 import transfer  # noqa: PLC0415 - httpx
        from ocpp16.certificates import CertificateStore  # noqa: PLC0415 - cryptography
        from ocpp16.profiles.firmware import (  # noqa: PLC0415
            FirmwareProfile,
            TransfersProgress,
        )
        from ocpp16.profiles.security import CertificateManagementProfile  # noqa: PLC0415

        cp = port.chargepoint
        data_dir = config.station.data_dir
        # A corrupt index raises CertificateError: the build fails, said in one line
        # by the charge point, and neither profile runs (plain UpdateFirmware must
        # not be accepted on a store whose ManufacturerRootCertificates are unknown).
        store = CertificateStore(
            data_dir / CERTIFICATES_DIR, max_per_type=registry.get_int("CertificateStoreMaxLength")
        )

        def on_client_certificate() -> None:
            # TC_074: with security profile 3 the new certificate is used at once.
            if registry.get_int("SecurityProfile") == 3:
                cp.reconnect("the charge point certificate in force changed")

        security = CertificateManagementProfile(
            cp, store, emit=events.emit, on_client_certificate=on_client_certificate
        )
        sources = DiagnosticsSources(
            data_dir=data_dir,
            registry=registry,
            queue=queue,
            store=settings_store,
            version=version,
            serial=config.station.serial,
            security_queue=security_queue,
            flush_logs=flush_logs,
        )
        releases = context.releases if context.running else None
        firmware = FirmwareProfile(
            cp,
            work_dir=data_dir,
            state_file=data_dir / STATE_FILE,
            downloader=transfer.download,
            uploader=transfer.upload,
            installer=ReleaseInstaller(
                context.releases, trial=context.trial, running=context.running
            ),
            hooks=port,
            diagnostics=sources.diagnostics,
            logs=sources.log,
            signatures=StoreSignatures(store, cp.now),
            emit=events.emit,
            start_report=context.report if context.running else None,
            restart_reported=releases.report_delivered if releases is not None else None,
            progress=TransfersProgress(transfers),
        )
        return Extensions(
            profiles=(firmware, security),
            certificates=store,
            transfers=firmware,
            sign_certificate=security.sign_charge_point_certificate,
        )

    return build
