"""The Firmware Management profile (OCPP 1.6 section 3.1) and the whitepaper's
signed firmware and logs.

UpdateFirmware (5.19) with FirmwareStatusNotification (4.5), GetDiagnostics
(5.9) with DiagnosticsStatusNotification (4.4); from the Security Whitepaper
ed. 3: SignedUpdateFirmware with SignedFirmwareStatusNotification (use case
L01) and GetLog with LogStatusNotification (N01). What happens when is
decided by the sans-I/O machines of ``ocpp16.firmware`` (read its docstring
first); this module answers the calls and carries out their effects on trio,
with the collaborators the integrator plugs in (the Protocols there).

Rules (where the texts leave room, the decision and why):

* **Plain UpdateFirmware is refused once a ManufacturerRootCertificate is
  installed**: CALLERROR NotSupported. UpdateFirmware.conf has no status, so
  a CALL can only be refused by a CALLERROR; the whitepaper suggests exactly
  this answer for a charge point doing signed updates, and it tells the
  central system at once, in the answer, to use SignedUpdateFirmware.
  Accepting it and then reporting InstallationFailed would report an
  installation that was never attempted, and say nothing of why. Before a
  manufacturer root is installed, plain updates are answered as the
  reference station does (it supports both). Once one is installed the
  station trusts only images signed under it: an unsigned path would bypass
  the check the root is there for. The image's manifest (sha256 of every
  member) is checked by the ``Installer`` for both kinds.
* **The answer goes first.** A request changes its machine when it is
  answered (a second request sees it running), its job starts at once, but
  its notifications are held until the answer has been written
  (``CallChannel.after_answer``), so the central system never sees
  Downloading before UpdateFirmware.conf.
* **A second request while one runs.** SignedUpdateFirmware and GetLog:
  the running one is cancelled and the answer is AcceptedCanceled (L01.FR.24,
  N01); an update that is already installing cannot be stopped: Rejected
  (L01.FR.27). The cancelled one sends nothing more (``ocpp16.firmware``).
  UpdateFirmware and GetDiagnostics have no status to answer with: the
  newest request wins the same way, and an UpdateFirmware that arrives while
  an installation runs is answered and ignored (logged).
* **Nothing to send.** GetDiagnostics without fileName, GetLog Accepted
  without filename (GetDiagnostics.conf: "not present when no diagnostic
  information is available"; the whitepaper's GetLog.conf the same): no
  upload, no notification. A GetLog whose remoteLocation is not HTTP, HTTPS
  or FTP (SupportedFileTransferProtocols) is Rejected; an UpdateFirmware or
  GetDiagnostics location has no status to refuse it with: its transfer
  fails (DownloadFailed / UploadFailed, not retried).
* **Certificates first** (L01.FR.02 / L01.FR.03): SignedUpdateFirmware's
  signing certificate is checked against the installed
  ManufacturerRootCertificates before answering; otherwise
  InvalidCertificate and the security event
  InvalidFirmwareSigningCertificate, and a running update goes on.
  RevokedCertificate is never answered: no revocation list is kept.
* **Time.** retrieveDate and installDateTime are compared with the charge
  point's clock (``ChargePoint.now()``, the central system's time), and
  recomputed whenever it is set (``ChargePoint.timing``); retryInterval is
  waited on trio's clock.
* **Notifications** go through one outbox, in order, sent by the connection
  task "firmware notifications": one that meets a lost connection is sent on
  the next one; a CALLERROR or no answer is logged and not repeated. Only
  the pending installation is kept across a restart (``state_file``, JSON,
  written atomically before the switch), so Installed /
  InstallationFailed comes after the restart, on the first registration;
  there the new release is confirmed (``Installer.confirm``: BootNotification
  Accepted is the trial's goal) and FirmwareUpdated raised.
* **Files** live under ``work_dir``: downloads in ``firmware/`` (at most
  ``max_image_bytes``), the files to upload in ``uploads/<kind>-<n>/``; each
  is removed when its transfer is over, and both directories are emptied
  when the profile is created (a transfer does not survive a restart).

Tasks: "firmware notifications" (CONNECTION). The transfers and the
installation run beyond a connection, as the charge point's background work
("firmware update", "GetDiagnostics upload", "GetLog upload").
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import trio

from ocpp16.channel import CallFailed
from ocpp16.errors import CallError, CertificateError, TransferError
from ocpp16.firmware import (
    FIRMWARE_ROLLED_BACK,
    INVALID_SIGNING_CERTIFICATE,
    AwaitDelay,
    AwaitIdle,
    AwaitTime,
    Cancelled,
    CheckSignature,
    ClearPending,
    DiagnosticsSource,
    Download,
    Downloader,
    DownloadFailed,
    DownloadSucceeded,
    Effect,
    Emit,
    Event,
    FirmwareRequest,
    FirmwareUpdate,
    FwState,
    Install,
    Installer,
    InstallFailed,
    InstallSucceeded,
    Kind,
    LogSource,
    LogType,
    MakeUnavailable,
    Notify,
    PendingInstall,
    ProgressCallback,
    ProgressSink,
    RemoveFile,
    Requested,
    Restart,
    Restarted,
    RestoreAvailability,
    Retry,
    SavePending,
    SecurityEvent,
    SignatureCheck,
    SignatureChecked,
    StartReport,
    StationHooks,
    StationIdle,
    Switch,
    Switched,
    SwitchFailed,
    TransferProgress,
    TransferReport,
    Upload,
    Uploader,
    UploadFailed,
    UploadKind,
    UploadMachine,
    UploadRequest,
    UploadRequested,
    UploadSucceeded,
)
from ocpp16.profiles import Handler, Lifetime, Task
from ocpp16.schemas import parse_date_time

if TYPE_CHECKING:
    from ocpp16.chargepoint import ChargePoint

log = logging.getLogger(__name__)

#: How long the install waits for the connectors' Unavailable to be reported.
UNAVAILABLE_REPORT_WAIT = 10.0

#: The largest firmware image downloaded (a release with every pinned wheel is
#: tens of megabytes).
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024
#: Seconds the notifications get to go out (InstallRebooting) before the restart.
RESTART_GRACE = 10.0
#: Seconds between looks at the running transactions while an installation waits
#: (it is also woken when a transaction begins or ends).
IDLE_POLL = 30.0
#: Seconds a cancelled transfer's clean-up may take.
CLEANUP_TIMEOUT = 10.0
#: SupportedFileTransferProtocols (station-spec section 2), as URL schemes.
SCHEMES = frozenset({"http", "https", "ftp"})
#: SecurityEventNotification's techInfo is at most this long (whitepaper schema).
TECH_INFO_LENGTH = 255


def _no_event(event_type: str, tech_info: str | None) -> None:
    """The default ``emit``: no security events are wired."""


def redact(url: str) -> str:
    """``url`` without its password, for the log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TransferError | CertificateError):
        return exc.reason
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- the outbox of notifications ----------------------------------------------------------------


@dataclass(eq=False)
class _Item:
    #: None: ``work`` is run when the items before it are delivered.
    action: str | None
    payload: dict[str, Any] = field(default_factory=dict)
    work: Callable[[], Awaitable[None]] | None = None


class _Outbox:
    """The status notifications in order; held while an answer is not yet written."""

    def __init__(self) -> None:
        self._items: deque[_Item] = deque()
        self._holds: set[object] = set()
        self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def put(self, item: _Item) -> None:
        self._items.append(item)
        self._wake()

    def hold(self) -> object:
        token = object()
        self._holds.add(token)
        return token

    def release(self, token: object) -> None:
        self._holds.discard(token)
        self._wake()

    def release_all(self) -> None:
        """The connection ended: its answers went out or never will."""
        self._holds.clear()
        self._wake()

    async def head(self) -> _Item:
        while not self._items or self._holds:
            await self._changed.wait()
        return self._items[0]

    def pop(self) -> None:
        self._items.popleft()
        self._wake()

    async def drained(self) -> None:
        while self._items:
            await self._changed.wait()


@dataclass(eq=False)
class _Job:
    """A request's effects being carried out; a cancel leaves ``cleanup`` to it."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    cleanup: list[Effect] = field(default_factory=list)


# -- progress into ops.progress ----------------------------------------------------------------


class _TransferLike(Protocol):
    done: int
    total: int | None

    def advance(self, nbytes: int) -> None: ...

    def finish(self) -> None: ...

    def fail(self, reason: str) -> None: ...


class _TransfersLike(Protocol):
    def start(self, name: str, total: int | None) -> _TransferLike: ...


class TransfersProgress:
    """A ``ProgressSink`` on ``ops.progress.Transfers`` (what ``evse status`` shows)."""

    def __init__(self, transfers: _TransfersLike) -> None:
        self._transfers = transfers

    def begin(self, name: str) -> TransferReport:
        return _TransfersReport(self._transfers, name)


class _TransfersReport:
    """One attempt: started there at its first report, when the total is known; one
    that ended without any still shows its outcome."""

    def __init__(self, transfers: _TransfersLike, name: str) -> None:
        self._transfers = transfers
        self._name = name
        self._transfer: _TransferLike | None = None

    def _started(self, total: int | None) -> _TransferLike:
        if self._transfer is None:
            self._transfer = self._transfers.start(self._name, total)
        return self._transfer

    def advance(self, done: int, total: int | None) -> None:
        transfer = self._started(total)
        step = done - transfer.done
        if transfer.total is not None:
            step = min(step, transfer.total - transfer.done)
        if step > 0:
            transfer.advance(step)

    def end(self, failure: str | None) -> None:
        transfer = self._started(None)
        if failure is not None:
            transfer.fail(failure)
            return
        if transfer.total is not None and transfer.done < transfer.total:
            # Complete: a resumed download reported only what it fetched itself.
            transfer.advance(transfer.total - transfer.done)
        transfer.finish()


# -- the profile ------------------------------------------------------------------------------


class FirmwareProfile:
    name = "FirmwareManagement"

    def __init__(
        self,
        cp: ChargePoint,
        *,
        work_dir: Path,
        state_file: Path,
        downloader: Downloader,
        uploader: Uploader,
        installer: Installer,
        hooks: StationHooks,
        diagnostics: DiagnosticsSource,
        logs: LogSource | None = None,
        signatures: SignatureCheck | None = None,
        emit: Emit = _no_event,
        start_report: StartReport | None = None,
        restart_reported: Callable[[], None] | None = None,
        progress: ProgressSink | None = None,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        restart_grace: float = RESTART_GRACE,
        idle_poll: float = IDLE_POLL,
    ) -> None:
        self.cp = cp
        self.downloader = downloader
        self.uploader = uploader
        self.installer = installer
        self.hooks = hooks
        self.diagnostics = diagnostics
        self.logs = logs
        self.signatures = signatures
        self.emit = emit
        self.start_report = start_report
        #: Called (blocking, in a worker thread) once what ``start_report`` had to
        #: say has been reported, after the notification it caused was delivered:
        #: the integrator then clears it at its source (``Releases.report_delivered``),
        #: so that a rollback is reported once, and again after a restart until then.
        self.restart_reported = restart_reported
        self.progress = progress
        self.max_image_bytes = max_image_bytes
        self.restart_grace = restart_grace
        self.idle_poll = idle_poll
        self.state_file = state_file
        self._firmware_dir = work_dir / "firmware"
        self._uploads_dir = work_dir / "uploads"
        for directory in (self._firmware_dir, self._uploads_dir):
            # What a previous process left (a transfer does not survive a restart).
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True, exist_ok=True)
        pending = self._load_pending()
        self.firmware = FirmwareUpdate(pending)
        self.uploads = {kind: UploadMachine(kind) for kind in UploadKind}
        self._report_due = pending is not None or (
            start_report is not None and start_report.rolled_back is not None
        )
        self._outbox = _Outbox()
        self._jobs: dict[str, _Job] = {}
        self._seq = 0
        #: Why the pending installation could not be saved (then no switch).
        self._unsaved: str | None = None
        self.handlers: dict[str, Handler] = {
            "UpdateFirmware": self.update_firmware,
            "GetDiagnostics": self.get_diagnostics,
        }
        if signatures is not None:
            self.handlers["SignedUpdateFirmware"] = self.signed_update_firmware
        if logs is not None:
            self.handlers["GetLog"] = self.get_log

    def tasks(self) -> Sequence[Task]:
        return (Task("firmware notifications", self._notifications, Lifetime.CONNECTION),)

    # -- what a trigger reports (ocpp16.profiles.remote_trigger) --------------------------------

    def firmware_status(self) -> str:
        """FirmwareStatus of the update in progress (1.6 vocabulary), Idle for none."""
        return self.firmware.plain_status

    def signed_firmware_status(self) -> tuple[str, int | None]:
        """The whitepaper's status and requestId of the update in progress."""
        return self.firmware.signed_status

    def diagnostics_status(self) -> str:
        return self.uploads[UploadKind.DIAGNOSTICS].status

    def log_status(self) -> tuple[str, int | None]:
        machine = self.uploads[UploadKind.LOG]
        return machine.status, machine.request_id

    # -- the central system's calls --------------------------------------------------------------

    async def update_firmware(self, p: dict[str, Any]) -> dict[str, Any]:
        """UpdateFirmware (5.19): an empty answer; refused once a manufacturer root
        is installed (module docstring)."""
        signatures = self.signatures
        if signatures is not None and await trio.to_thread.run_sync(
            signatures.manufacturer_root_installed
        ):
            log.warning("UpdateFirmware refused: a ManufacturerRootCertificate is installed")
            raise CallError(
                "NotSupported",
                "a ManufacturerRootCertificate is installed: use SignedUpdateFirmware",
            )
        location = p["location"]
        request = FirmwareRequest(
            Kind.PLAIN,
            location,
            self._time(p, "retrieveDate"),
            self._image_path(location),
            self._retry(p),
        )
        if not self.firmware.idle:
            if not self.firmware.cancellable:
                log.warning(
                    "UpdateFirmware from %s ignored: %s, it cannot be stopped",
                    redact(location),
                    self.firmware.state.value,
                )
                return {}
            self._cancel("firmware", self.firmware, "a new UpdateFirmware")
        log.info("UpdateFirmware from %s, not before %s", redact(location), p["retrieveDate"])
        self._start_firmware(request)
        return {}

    async def signed_update_firmware(self, p: dict[str, Any]) -> dict[str, Any]:
        """SignedUpdateFirmware (whitepaper L01)."""
        signatures = self.signatures
        assert signatures is not None  # registered only with a SignatureCheck
        firmware = p["firmware"]
        request_id = p["requestId"]
        certificate = firmware["signingCertificate"]
        try:
            await trio.to_thread.run_sync(signatures.check_certificate, certificate)
        except Exception as exc:  # CertificateError, or any refusal: fail closed
            reason = _reason(exc)
            log.warning(
                "SignedUpdateFirmware %d: signing certificate refused: %s", request_id, reason
            )
            self.emit(INVALID_SIGNING_CERTIFICATE, reason[:TECH_INFO_LENGTH])
            return {"status": "InvalidCertificate"}
        location = firmware["location"]
        install = firmware.get("installDateTime")
        request = FirmwareRequest(
            Kind.SIGNED,
            location,
            self._time(firmware, "retrieveDateTime"),
            self._image_path(location),
            self._retry(p),
            request_id=request_id,
            install_at=self._time(firmware, "installDateTime") if install is not None else None,
            signature=firmware["signature"],
            signing_certificate=certificate,
        )
        status = "Accepted"
        if not self.firmware.idle:
            if not self.firmware.cancellable:
                log.warning(
                    "SignedUpdateFirmware %d rejected: %s, it cannot be stopped",
                    request_id,
                    self.firmware.state.value,
                )
                return {"status": "Rejected"}
            self._cancel("firmware", self.firmware, f"SignedUpdateFirmware {request_id}")
            status = "AcceptedCanceled"
        log.info("SignedUpdateFirmware %d from %s: %s", request_id, redact(location), status)
        self._start_firmware(request)
        return {"status": status}

    async def get_diagnostics(self, p: dict[str, Any]) -> dict[str, Any]:
        """GetDiagnostics (5.9): the fileName, none when there is nothing to send."""
        retry = self._retry(p)
        start, stop = self._optional_time(p, "startTime"), self._optional_time(p, "stopTime")
        diagnostics = self.diagnostics
        built = await self._build(
            UploadKind.DIAGNOSTICS, lambda out: diagnostics(out, start=start, stop=stop)
        )
        if built is None:
            log.info("GetDiagnostics: nothing to send")
            return {}
        file, scratch = built
        self._replace_upload(
            UploadRequest(UploadKind.DIAGNOSTICS, p["location"], file, retry, scratch=scratch)
        )
        return {"fileName": file.name[:255]}

    async def get_log(self, p: dict[str, Any]) -> dict[str, Any]:
        """GetLog (whitepaper N01): DiagnosticsLog or SecurityLog."""
        logs = self.logs
        assert logs is not None  # registered only with a LogSource
        log_type: LogType = p["logType"]
        request_id = p["requestId"]
        params = p["log"]
        location = params["remoteLocation"]
        if urlsplit(location).scheme.lower() not in SCHEMES:
            log.info("GetLog %d: %s is not HTTP, HTTPS or FTP", request_id, redact(location))
            return {"status": "Rejected"}
        retry = self._retry(p)
        oldest = self._optional_time(params, "oldestTimestamp")
        latest = self._optional_time(params, "latestTimestamp")
        built = await self._build(UploadKind.LOG, lambda out: logs(out, log_type, oldest, latest))
        if built is None:
            log.info("GetLog %d %s: nothing to send", request_id, log_type)
            return {"status": "Accepted"}
        file, scratch = built
        cancelled = self._replace_upload(
            UploadRequest(UploadKind.LOG, location, file, retry, request_id, scratch)
        )
        status = "AcceptedCanceled" if cancelled else "Accepted"
        return {"status": status, "filename": file.name[:255]}

    # -- requests into jobs -----------------------------------------------------------------------

    def _retry(self, p: dict[str, Any]) -> Retry:
        try:
            return Retry.from_payload(p)
        except ValueError as exc:
            raise CallError("PropertyConstraintViolation", str(exc)) from None

    @staticmethod
    def _time(p: dict[str, Any], key: str) -> datetime:
        try:
            return parse_date_time(p[key])
        except ValueError as exc:  # pragma: no cover - the schema checked the format
            raise CallError("PropertyConstraintViolation", f"{key}: {exc}") from None

    def _optional_time(self, p: dict[str, Any], key: str) -> datetime | None:
        return self._time(p, key) if p.get(key) is not None else None

    def _image_path(self, location: str) -> Path:
        self._seq += 1
        base = Path(urlsplit(location).path).name
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", base)[-64:].lstrip(".") or "image"
        return self._firmware_dir / f"update-{self._seq}-{safe}"

    async def _build(
        self, kind: UploadKind, source: Callable[[Path], Path | None]
    ) -> tuple[Path, Path] | None:
        """The file to upload, built in a fresh directory (its scratch); None when
        there is nothing to send (or building failed: logged)."""
        self._seq += 1
        scratch = self._uploads_dir / f"{kind.value}-{self._seq}"

        def build() -> Path | None:
            scratch.mkdir(parents=True, exist_ok=True)
            try:
                file = source(scratch)
            except BaseException:
                shutil.rmtree(scratch, ignore_errors=True)
                raise
            if file is None:
                shutil.rmtree(scratch, ignore_errors=True)
            return file

        try:
            file = await trio.to_thread.run_sync(build)
        except Exception:
            log.exception("%s: building the file failed", kind.value)
            return None
        return (file, scratch) if file is not None else None

    def _hold_until_answered(self) -> None:
        """The notifications wait until the answer being given is on the wire."""
        token = self._outbox.hold()

        async def release() -> None:
            self._outbox.release(token)
            await trio.lowlevel.checkpoint()

        self.cp.channel.after_answer("firmware management answer written", release)

    def _start_firmware(self, request: FirmwareRequest) -> None:
        effects = self.firmware.handle(Requested(request), self.cp.now())
        self._hold_until_answered()
        self._start("firmware", self.firmware, effects, name="firmware update")

    def _replace_upload(self, request: UploadRequest) -> bool:
        """Start ``request``'s upload; True when it cancelled a running one."""
        machine = self.uploads[request.kind]
        slot = request.kind.value
        cancelled = not machine.idle
        if cancelled:
            self._cancel(slot, machine, f"a new {request.kind.value}")
        effects = machine.handle(UploadRequested(request), self.cp.now())
        log.info("%s: uploading %s to %s", slot, request.file.name, redact(request.location))
        self._hold_until_answered()
        self._start(slot, machine, effects, name=f"{slot} upload")
        return cancelled

    def _start(
        self,
        slot: str,
        machine: FirmwareUpdate | UploadMachine,
        effects: list[Effect],
        *,
        name: str,
    ) -> None:
        job = _Job()
        self._jobs[slot] = job
        if not self.cp.start_background(partial(self._run, slot, machine, effects, job), name=name):
            # ChargePoint.run is not running (calls are answered only inside it).
            del self._jobs[slot]
            machine.handle(Cancelled("the charge point is not running"), self.cp.now())
            raise CallError("InternalError", "the charge point is not running")

    def _cancel(self, slot: str, machine: FirmwareUpdate | UploadMachine, reason: str) -> None:
        effects = machine.handle(Cancelled(reason), self.cp.now())
        log.info("%s cancelled: %s", machine.machine, reason)
        job = self._jobs.pop(slot, None)
        if job is not None:
            job.cleanup = effects
            job.scope.cancel(reason=reason)
        else:  # pragma: no cover - a busy machine always has its job
            self.cp.start_background(partial(self._carry_all, effects), name=f"{slot} clean-up")

    async def _run(
        self,
        slot: str,
        machine: FirmwareUpdate | UploadMachine,
        effects: list[Effect],
        job: _Job,
    ) -> None:
        todo = deque(effects)
        with job.scope:
            while todo and not job.scope.cancel_called:
                event = await self._carry_out(todo.popleft())
                if event is None:
                    continue
                if self._jobs.get(slot) is not job:
                    break  # cancelled meanwhile: the machine belongs to a newer request
                todo.extend(machine.handle(event, self.cp.now()))
        if self._jobs.get(slot) is job:
            del self._jobs[slot]
        if job.cleanup:
            with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                await self._carry_all(job.cleanup)

    async def _carry_all(self, effects: list[Effect]) -> None:
        for effect in effects:
            await self._carry_out(effect)

    # -- the effects --------------------------------------------------------------------------

    async def _unavailable_reported(self) -> None:
        """OCA TC_044_1: the idle connectors' StatusNotification Unavailable goes out
        before FirmwareStatusNotification Installing. The two leave by two senders
        (the status task, this profile's outbox), so wait, online and for at most
        ``UNAVAILABLE_REPORT_WAIT`` s, until every connector now Unavailable is
        reported; a connector still charging turns Unavailable after its
        transaction and is not waited for here."""
        cp = self.cp
        with trio.move_on_after(UNAVAILABLE_REPORT_WAIT):
            while cp.online:
                waiting = [
                    cid
                    for cid in cp.station.connector_ids
                    if (current := cp.station.status_of(cid))[0] == "Unavailable"
                    and not cp.core.status.is_reported(cid, current)
                ]
                if not waiting:
                    return
                await cp.core.status_reported()

    async def _carry_out(self, effect: Effect) -> Event | None:
        """One effect; the event it produces (commands only)."""
        if isinstance(effect, Notify):
            log.info("%s %s", effect.action, effect.payload["status"])
            self._outbox.put(_Item(effect.action, dict(effect.payload)))
        elif isinstance(effect, AwaitTime):
            await self._until(effect.when)
            return effect.then
        elif isinstance(effect, AwaitDelay):
            await trio.sleep(effect.seconds)
            return effect.then
        elif isinstance(effect, Download):
            return await self._download(effect)
        elif isinstance(effect, CheckSignature):
            return await self._check_signature(effect)
        elif isinstance(effect, MakeUnavailable):
            await self._hook("make the connectors unavailable", self.hooks.make_unavailable)
            await self._unavailable_reported()
        elif isinstance(effect, AwaitIdle):
            while self.hooks.transactions_running():
                with trio.move_on_after(self.idle_poll):
                    await self.cp.timing.park()  # woken when a transaction ends
            return StationIdle()
        elif isinstance(effect, Install):
            return await self._install(effect.image)
        elif isinstance(effect, SavePending):
            await self._save_pending(effect.pending)
        elif isinstance(effect, Switch):
            return await self._switch(effect.version)
        elif isinstance(effect, ClearPending):
            # Once what precedes it (Installed) is delivered: until then a restart
            # reports again.
            self._outbox.put(_Item(None, work=self._clear_pending))
        elif isinstance(effect, RestoreAvailability):
            await self._hook("restore the connectors", self.hooks.restore_availability)
        elif isinstance(effect, RemoveFile):
            await trio.to_thread.run_sync(_remove, effect.path)
        elif isinstance(effect, SecurityEvent):
            info = effect.tech_info[:TECH_INFO_LENGTH] if effect.tech_info else None
            self.emit(effect.type, info)
        elif isinstance(effect, Restart):
            with trio.move_on_after(self.restart_grace):
                await self._outbox.drained()
            log.warning("restarting into the new release")
            await self._hook("restart", self.hooks.restart)
        elif isinstance(effect, Upload):
            return await self._upload(effect)
        else:  # pragma: no cover - Effect is a closed union
            raise AssertionError(f"unknown effect {effect!r}")
        return None

    async def _hook(self, what: str, hook: Callable[[], Awaitable[None]]) -> None:
        try:
            await hook()
        except Exception:
            log.exception("firmware update: could not %s", what)

    async def _until(self, when: datetime) -> None:
        """Until the charge point's clock shows ``when`` (recomputed when it is set)."""
        while True:
            left = (when - self.cp.now()).total_seconds()
            if left <= 0:
                return
            with trio.move_on_after(left):
                await self.cp.timing.park()

    def _begin(self, name: str) -> TransferReport | None:
        if self.progress is None:
            return None
        try:
            return self.progress.begin(name)
        except Exception:
            log.exception("%s: progress not shown", name)
            return None

    @staticmethod
    def _callback(report: TransferReport | None) -> ProgressCallback | None:
        if report is None:
            return None

        def advance(progress: TransferProgress) -> None:
            try:
                report.advance(progress.done, progress.total)
            except Exception as exc:  # the display must never fail the transfer
                log.debug("progress not shown: %s", exc)

        return advance

    @staticmethod
    def _end(report: TransferReport | None, failure: str | None) -> None:
        if report is None:
            return
        try:
            report.end(failure)
        except Exception as exc:
            log.debug("progress not shown: %s", exc)

    async def _download(self, effect: Download) -> Event:
        where = redact(effect.url)
        report = self._begin("firmware download")
        failure: str | None = "cancelled"
        try:
            size = await self.downloader(
                effect.url,
                effect.dest,
                max_bytes=self.max_image_bytes,
                progress=self._callback(report),
            )
        except (TransferError, OSError) as exc:
            failure = _reason(exc)
            retryable = exc.retryable if isinstance(exc, TransferError) else True
            log.warning(
                "firmware download %d of %d from %s failed: %s",
                effect.attempt,
                effect.attempts,
                where,
                failure,
            )
            return DownloadFailed(failure, retryable)
        except Exception as exc:  # a plugged-in downloader's bug: no use retrying
            failure = _reason(exc)
            log.exception("firmware download from %s failed", where)
            return DownloadFailed(failure, retryable=False)
        else:
            failure = None
            log.info("firmware downloaded from %s: %d bytes", where, size)
            return DownloadSucceeded()
        finally:
            self._end(report, failure)

    async def _upload(self, effect: Upload) -> Event:
        where = redact(effect.url)
        report = self._begin(f"{effect.source.name} upload")
        failure: str | None = "cancelled"
        try:
            await self.uploader(effect.url, effect.source, progress=self._callback(report))
        except (TransferError, OSError) as exc:
            failure = _reason(exc)
            retryable = exc.retryable if isinstance(exc, TransferError) else True
            log.warning(
                "upload %d of %d to %s failed: %s", effect.attempt, effect.attempts, where, failure
            )
            return UploadFailed(failure, retryable)
        except Exception as exc:
            failure = _reason(exc)
            log.exception("upload to %s failed", where)
            return UploadFailed(failure, retryable=False)
        else:
            failure = None
            log.info("%s uploaded to %s", effect.source.name, where)
            return UploadSucceeded()
        finally:
            self._end(report, failure)

    async def _check_signature(self, effect: CheckSignature) -> Event:
        signatures = self.signatures
        assert signatures is not None
        try:
            # Read-only: a cancel (a newer request) need not wait for it.
            await trio.to_thread.run_sync(
                partial(
                    signatures.check_signature,
                    effect.image,
                    effect.signature,
                    effect.signing_certificate,
                ),
                abandon_on_cancel=True,
            )
        except Exception as exc:  # CertificateError, or any refusal: fail closed
            reason = _reason(exc)
            log.warning("firmware signature refused: %s", reason)
            return SignatureChecked(valid=False, reason=reason)
        return SignatureChecked(valid=True)

    async def _install(self, image: Path) -> Event:
        running = self.cp.identity.firmware_version
        installer = self.installer
        try:
            version = await trio.to_thread.run_sync(installer.verify, image)
        except Exception as exc:
            log.error("firmware image refused: %s", _reason(exc))
            return InstallFailed(_reason(exc), verification=True)
        try:
            # Abandoned if the station stops meanwhile: a release is built aside
            # and only the switch makes it count (Releases.install).
            version = await trio.to_thread.run_sync(
                installer.install, image, abandon_on_cancel=True
            )
        except Exception as exc:
            log.error("installing release %s failed: %s", version, _reason(exc))
            return InstallFailed(_reason(exc))
        log.info("release %s installed beside %s", version, running)
        return InstallSucceeded(version, running)

    async def _switch(self, version: str) -> Event:
        if self._unsaved is not None:
            reason, self._unsaved = self._unsaved, None
            return SwitchFailed(f"the pending installation was not saved: {reason}")
        try:
            await trio.to_thread.run_sync(self.installer.switch, version)
        except Exception as exc:
            log.error("switching to release %s failed: %s", version, _reason(exc))
            return SwitchFailed(_reason(exc))
        return Switched()

    # -- the pending installation -------------------------------------------------------------

    def _load_pending(self) -> PendingInstall | None:
        try:
            text = self.state_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("pending firmware installation %s unreadable: %s", self.state_file, exc)
            return None
        try:
            return PendingInstall.from_json(text)
        except ValueError as exc:
            log.error("pending firmware installation %s ignored: %s", self.state_file, exc)
            self.state_file.unlink(missing_ok=True)
            return None

    async def _save_pending(self, pending: PendingInstall) -> None:
        try:
            await trio.to_thread.run_sync(_write_atomically, self.state_file, pending.to_json())
        except OSError as exc:
            log.error("pending firmware installation not saved: %s", exc)
            self._unsaved = str(exc)

    async def _clear_pending(self) -> None:
        try:
            await trio.to_thread.run_sync(partial(self.state_file.unlink, missing_ok=True))
        except OSError as exc:
            log.error("pending firmware installation %s not removed: %s", self.state_file, exc)

    # -- the notifications (CONNECTION task) -----------------------------------------------------

    async def _notifications(self) -> None:
        """The outbox, oldest first; first, after a restart, the installation's outcome."""
        try:
            if self._report_due:
                await self._report_restart()
                # Only now: a connection lost meanwhile leaves it to the next one.
                self._report_due = False
            while True:
                item = await self._outbox.head()
                if item.action is None:
                    assert item.work is not None
                    await item.work()
                    self._outbox.pop()
                    continue
                try:
                    await self.cp.call(item.action, item.payload)
                except CallFailed as exc:
                    if not exc.counts:
                        log.info("%s kept for the next connection: %s", item.action, exc.reason)
                        await trio.sleep_forever()  # until the session ends
                    log.warning("%s %s not delivered: %s", item.action, item.payload, exc.reason)
                self._outbox.pop()
        finally:
            # The connection is over: an answer it did not write never will be,
            # so nothing waits for one (a hold of the next connection is its own:
            # sessions follow each other).
            self._outbox.release_all()

    async def _report_restart(self) -> None:
        """Registered after the restart an update asked for: what came of it."""
        report = self.start_report
        rolled_back = None
        if report is not None and report.rolled_back is not None:
            src, dst, why = report.rolled_back
            rolled_back = f"rolled back from {src} to {dst}: {why}"
            log.error("firmware update: %s", rolled_back)
        pending = self.firmware.pending if self.firmware.state is FwState.REBOOTING else None
        if pending is None:
            if rolled_back is not None:  # no request of ours pending: the event only
                self.emit(FIRMWARE_ROLLED_BACK, rolled_back[:TECH_INFO_LENGTH])
                self._start_report_done()
            return
        running = self.cp.identity.firmware_version
        if rolled_back is not None:
            event = Restarted(installed=False, reason=rolled_back, rolled_back=True)
        elif running == pending.version or (
            report is not None and report.installed == pending.version
        ):
            try:
                await trio.to_thread.run_sync(self.installer.confirm)
            except Exception:
                log.exception("confirming release %s failed", pending.version)
            event = Restarted(installed=True)
        else:
            event = Restarted(installed=False, reason=f"running {running}, not {pending.version}")
        log.info("firmware update to %s: %s", pending.version, event)
        await self._carry_all(self.firmware.handle(event, self.cp.now()))
        self._start_report_done()

    def _start_report_done(self) -> None:
        """``restart_reported``, once the outbox has delivered what precedes it."""
        done = self.restart_reported
        if done is None:
            return

        async def work() -> None:
            try:
                await trio.to_thread.run_sync(done)
            except Exception:
                log.exception("the report of this start was sent, but not marked as sent")

        self._outbox.put(_Item(None, work=work))


def _remove(path: Path) -> None:
    """A download with its partial file, or an upload's scratch directory."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
        return
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".part").unlink(missing_ok=True)
    # ocpp16.transfer's resume record beside the part.
    path.with_name(path.name + ".part.json").unlink(missing_ok=True)


def _write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path``: all of it or nothing, durable before it returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
