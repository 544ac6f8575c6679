"""Firmware Management and the whitepaper's signed firmware and logs, sans-I/O.

Theory of operation
-------------------
Two machines, in the manner of h11: ``FirmwareUpdate`` (UpdateFirmware, OCPP
1.6 section 5.19, and SignedUpdateFirmware, Security Whitepaper ed. 3 use
case L01) and ``Upload`` (GetDiagnostics, section 5.9, and GetLog,
whitepaper N01; one machine each). ``handle(event, now)`` takes one event
and the charge point's time -- the central system's clock
(``ChargePoint.now()``), the one retrieveDate and installDateTime are written
in -- and returns the effects the I/O layer (``ocpp16.profiles.firmware``)
carries out, in order. A machine never sleeps, downloads, installs or
writes: a wait is an effect (``AwaitTime`` for a date, ``AwaitDelay`` for a
retryInterval) naming the event the driver feeds back when it is over.

Every (state, event) pair a machine accepts is a row of its table
(``FIRMWARE_TRANSITIONS``, ``UPLOAD_TRANSITIONS``): the transition and the
states it may lead to. A pair that is not in the table raises
``IllegalTransition`` naming the machine, the state and the event. At most
one effect of a transition produces the next event (a *command*:
``COMMANDS``), and it is the last one.

The firmware update::

    IDLE --Requested--> DOWNLOAD_SCHEDULED --RetrieveTimeReached--> DOWNLOADING
    IDLE --Requested (retrieveDate reached)----------------------> DOWNLOADING
    DOWNLOADING --DownloadFailed, attempts left--> DOWNLOAD_RETRY --RetryTimeReached--> DOWNLOADING
    DOWNLOADING --DownloadFailed, the last--> IDLE                       DownloadFailed
    DOWNLOADING --DownloadSucceeded--> VERIFYING_SIGNATURE (signed)      Downloaded
                                   --> INSTALL_SCHEDULED | WAITING_FOR_IDLE (plain)
    VERIFYING_SIGNATURE --SignatureChecked valid--> INSTALL_SCHEDULED | WAITING_FOR_IDLE
                                                                         SignatureVerified
    VERIFYING_SIGNATURE --SignatureChecked invalid--> IDLE               InvalidSignature + event
    INSTALL_SCHEDULED --InstallTimeReached--> WAITING_FOR_IDLE
    WAITING_FOR_IDLE --StationIdle--> INSTALLING                         Installing
    INSTALLING --InstallFailed--> IDLE                                   InstallationFailed
                                                      (signed, manifest: InstallVerificationFailed)
    INSTALLING --InstallSucceeded--> SWITCHING --Switched--> REBOOTING   InstallRebooting (signed)
    SWITCHING --SwitchFailed--> IDLE                                     InstallationFailed
    REBOOTING --Restarted (next process)--> IDLE                 Installed / InstallationFailed
    DOWNLOAD_SCHEDULED .. WAITING_FOR_IDLE --Cancelled--> IDLE           (nothing)

The upload::

    IDLE --UploadRequested--> UPLOADING                                  Uploading
    UPLOADING --UploadFailed, attempts left--> UPLOAD_RETRY --RetryTimeReached--> UPLOADING
    UPLOADING --UploadFailed, the last--> IDLE                           UploadFailed, UploadFailure
    UPLOADING --UploadSucceeded--> IDLE                                  Uploaded
    UPLOADING, UPLOAD_RETRY --Cancelled--> IDLE                          (nothing)

Rules (where the texts leave room, the decision and why). Requirement ids
(L01.FR.nn, N01) are those of the use cases the whitepaper shares with OCPP
2.0.1 (Secure Firmware Update, Retrieve Log Information).

* **Attempts.** ``retries`` counts the attempts after the first: retries = 0
  still makes one attempt, retries = n makes n + 1 (UpdateFirmware.req and
  GetDiagnostics.req: "how many times the Charge Point must try ... before
  giving up" counts retries, as OCPP 2.0.1 spells out). Absent:
  ``DEFAULT_RETRIES`` (2, three attempts) with ``DEFAULT_RETRY_INTERVAL``
  (60 s) between them, the field tables leaving both to the charge point.
  More than ``MAX_RETRIES`` is capped there (an interval of 0 with a huge
  count would hammer a server); a negative value is refused
  (``Retry.from_payload``: the handler answers PropertyConstraintViolation).
  A failure that another attempt cannot mend (``retryable=False``: an
  unsupported scheme, the size cap) ends at once.
* **Each notification once.** Downloading / Uploading at the first attempt,
  never again for a retry; one final status. L01.FR.01 ("whenever the Charge
  Point enters a new state") is met by the states, not by the attempts.
* **Vocabulary.** A plain update sends FirmwareStatusNotification with the
  1.6 statuses only (section 7.25): the signed-only steps (DownloadScheduled,
  SignatureVerified, InstallScheduled, InstallRebooting) are silent, and a
  manifest that does not verify is InstallationFailed. A signed one sends
  SignedFirmwareStatusNotification with the whitepaper's statuses, each with
  the request's requestId. DownloadPaused is never entered (a download is
  not paused, it fails and is retried).
* **Order of the signed steps** (OCA TC_080 / TC_081): Downloading,
  Downloaded, SignatureVerified (or InvalidSignature and the security event
  InvalidFirmwareSignature, L01.FR.04 / L01.FR.05: nothing installed, the
  running release untouched), InstallScheduled when an installDateTime is
  still ahead, Installing, InstallRebooting; Installed after the restart.
* **Installing waits for the station** (section 5.19: "it is RECOMMENDED to
  wait until Charging Sessions have ended"): ``MakeUnavailable`` (idle
  connectors Unavailable at once, the others when their transaction ends)
  then ``AwaitIdle``; Installing is sent when no transaction runs.
* **Across the restart.** Before the ``current`` link is switched the
  pending installation is saved (``SavePending``: kind, version, previous
  version, requestId); the next process builds its machine from it
  (``FirmwareUpdate(pending)``, state REBOOTING) and reports once registered:
  Installed, or InstallationFailed when it runs the previous release (a
  rollback: plus the security event ``FIRMWARE_ROLLED_BACK``). A power cut
  between the save and the switch is then reported truthfully as
  InstallationFailed, never as Installed. A successful update raises the
  whitepaper's FirmwareUpdated security event (OCA TC_080 step 15).
* **A new request while one runs** (L01.FR.24: "SHOULD cancel the ongoing
  firmware update AND respond with status AcceptedCanceled"): the running
  one is cancelled in any state before INSTALLING (``cancellable``) and
  sends nothing more -- the whitepaper's FirmwareStatusEnumType has no
  cancelled status and the AcceptedCanceled answer is the central system's
  notice -- its file is removed and the connectors restored. From
  INSTALLING on it cannot be stopped (a half-built release is not undone
  mid-way): the profile answers Rejected (L01.FR.27). The same for a second
  GetLog during an upload (N01 AcceptedCanceled; UploadLogStatusEnumType
  has no cancelled status either).
* **What a trigger reports** (TriggerMessage / ExtendedTriggerMessage): the
  status of the step in progress, Idle when none. A plain
  FirmwareStatusNotification during a signed update maps the signed-only
  steps onto the nearest 1.6 status (``as_plain_status``).

The collaborators are Protocols (``Downloader``, ``Uploader``,
``Installer``, ``StartReport``, ``DiagnosticsSource``, ``LogSource``,
``SignatureCheck``, ``StationHooks``, ``ProgressSink``), so the profile
runs on real parts or small fakes; no trio and no I/O here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol

from ocpp16.errors import IllegalTransition

# -- vocabulary ------------------------------------------------------------------------------


class Kind(StrEnum):
    """Which request started a firmware update: its notification follows it."""

    PLAIN = "UpdateFirmware"
    SIGNED = "SignedUpdateFirmware"


class UploadKind(StrEnum):
    DIAGNOSTICS = "GetDiagnostics"
    LOG = "GetLog"


#: FirmwareStatus (OCPP 1.6 section 7.25): what FirmwareStatusNotification carries.
PLAIN_STATUSES = frozenset(
    {
        "Downloaded",
        "DownloadFailed",
        "Downloading",
        "Idle",
        "InstallationFailed",
        "Installing",
        "Installed",
    }
)
#: FirmwareStatusEnumType of SignedFirmwareStatusNotification (whitepaper ed. 3, the
#: schema's enum).
SIGNED_STATUSES = PLAIN_STATUSES | frozenset(
    {
        "DownloadScheduled",
        "DownloadPaused",
        "InstallRebooting",
        "InstallScheduled",
        "InstallVerificationFailed",
        "InvalidSignature",
        "SignatureVerified",
    }
)
#: A whitepaper status as the nearest 1.6 FirmwareStatus, for a plain trigger during a
#: signed update: not yet downloading is Idle, a verified or scheduled image is
#: Downloaded, the restart belongs to Installing, a refused image failed to install.
_AS_PLAIN: Mapping[str, str] = MappingProxyType(
    {
        "DownloadScheduled": "Idle",
        "DownloadPaused": "Downloading",
        "SignatureVerified": "Downloaded",
        "InstallScheduled": "Downloaded",
        "InstallRebooting": "Installing",
        "InstallVerificationFailed": "InstallationFailed",
        "InvalidSignature": "InstallationFailed",
    }
)
#: What a plain update sends instead of a whitepaper status (the others are silent).
_PLAIN_NOTIFIED: Mapping[str, str] = MappingProxyType(
    {"InstallVerificationFailed": "InstallationFailed"}
)

#: DiagnosticsStatus (section 7.24) and UploadLogStatusEnumType (whitepaper; its
#: spelling "UploadFailure"): the final failure of each upload kind.
UPLOAD_FAILED: Mapping[UploadKind, str] = MappingProxyType(
    {UploadKind.DIAGNOSTICS: "UploadFailed", UploadKind.LOG: "UploadFailure"}
)
NOTIFICATION: Mapping[Kind | UploadKind, str] = MappingProxyType(
    {
        Kind.PLAIN: "FirmwareStatusNotification",
        Kind.SIGNED: "SignedFirmwareStatusNotification",
        UploadKind.DIAGNOSTICS: "DiagnosticsStatusNotification",
        UploadKind.LOG: "LogStatusNotification",
    }
)

#: Security events (whitepaper ed. 3, appendix 1) this module raises.
INVALID_SIGNATURE = "InvalidFirmwareSignature"
INVALID_SIGNING_CERTIFICATE = "InvalidFirmwareSigningCertificate"
FIRMWARE_UPDATED = "FirmwareUpdated"
#: Not in the whitepaper's list (which has no event for a failed update): the
#: station went back to the previous release after an update; techInfo says
#: from, to and why.
FIRMWARE_ROLLED_BACK = "FirmwareRolledBack"

#: Retries when the request names none (UpdateFirmware.req leaves it to the charge point).
DEFAULT_RETRIES = 2
#: Seconds between attempts when the request names none.
DEFAULT_RETRY_INTERVAL = 60.0
#: More retries than this are capped here.
MAX_RETRIES = 10

LogType = Literal["DiagnosticsLog", "SecurityLog"]


def as_plain_status(status: str) -> str:
    """A whitepaper FirmwareStatusEnumType value as the nearest 1.6 FirmwareStatus."""
    return status if status in PLAIN_STATUSES else _AS_PLAIN[status]


# -- requests --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Retry:
    """How many attempts, how far apart (UpdateFirmware, GetDiagnostics, GetLog)."""

    retries: int = DEFAULT_RETRIES
    interval: float = DEFAULT_RETRY_INTERVAL

    def __post_init__(self) -> None:
        if self.retries < 0 or self.interval < 0:
            raise ValueError(f"retries {self.retries}, interval {self.interval}: negative")

    @property
    def attempts(self) -> int:
        return 1 + self.retries

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Retry:
        """``retries`` and ``retryInterval`` of a request (defaults when absent);
        ValueError naming the field for a negative one."""
        retries = payload.get("retries", DEFAULT_RETRIES)
        interval = payload.get("retryInterval", DEFAULT_RETRY_INTERVAL)
        if retries < 0:
            raise ValueError(f"retries: {retries} is negative")
        if interval < 0:
            raise ValueError(f"retryInterval: {interval} is negative")
        return cls(min(int(retries), MAX_RETRIES), float(interval))


@dataclass(frozen=True, slots=True)
class FirmwareRequest:
    """One UpdateFirmware or SignedUpdateFirmware, as the machine needs it."""

    kind: Kind
    location: str
    retrieve_at: datetime
    #: Where the download goes (under the data directory).
    image: Path
    retry: Retry = Retry()
    #: SignedUpdateFirmware's requestId, carried by every notification.
    request_id: int | None = None
    #: SignedUpdateFirmware's installDateTime: not installed before.
    install_at: datetime | None = None
    signature: str = ""
    signing_certificate: str = ""

    def __post_init__(self) -> None:
        if self.kind is Kind.SIGNED and self.request_id is None:
            raise ValueError("a signed update needs its requestId")


@dataclass(frozen=True, slots=True)
class UploadRequest:
    """One GetDiagnostics or GetLog whose file is built."""

    kind: UploadKind
    location: str
    file: Path
    retry: Retry = Retry()
    #: GetLog's requestId, carried by every LogStatusNotification.
    request_id: int | None = None
    #: What is removed when the upload is over (the file's own directory), else the file.
    scratch: Path | None = None

    def __post_init__(self) -> None:
        if self.kind is UploadKind.LOG and self.request_id is None:
            raise ValueError("a log upload needs its requestId")


@dataclass(frozen=True, slots=True)
class PendingInstall:
    """An installation switched to and awaiting the restart: saved across it."""

    kind: Kind
    #: The release switched to.
    version: str
    #: The release that ran the update.
    previous: str
    request_id: int | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": 1,
                "kind": self.kind.value,
                "version": self.version,
                "previous": self.previous,
                "requestId": self.request_id,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> PendingInstall:
        """ValueError for anything but what ``to_json`` writes."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != 1:
                raise ValueError("not a pending installation, format 1")
            request_id = data["requestId"]
            if request_id is not None and not isinstance(request_id, int):
                raise ValueError(f"requestId {request_id!r}")
            version, previous = data["version"], data["previous"]
            if not isinstance(version, str) or not isinstance(previous, str):
                raise ValueError("version and previous must be strings")
            return cls(Kind(data["kind"]), version, previous, request_id)
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"pending installation: {exc}") from None


# -- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Requested:
    request: FirmwareRequest


@dataclass(frozen=True, slots=True)
class RetrieveTimeReached:
    pass


@dataclass(frozen=True, slots=True)
class DownloadSucceeded:
    pass


@dataclass(frozen=True, slots=True)
class DownloadFailed:
    reason: str
    retryable: bool = True


@dataclass(frozen=True, slots=True)
class RetryTimeReached:
    pass


@dataclass(frozen=True, slots=True)
class SignatureChecked:
    valid: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class InstallTimeReached:
    pass


@dataclass(frozen=True, slots=True)
class StationIdle:
    pass


@dataclass(frozen=True, slots=True)
class InstallSucceeded:
    #: The release installed beside the running one.
    version: str
    #: The running release.
    previous: str


@dataclass(frozen=True, slots=True)
class InstallFailed:
    reason: str
    #: The image's manifest did not verify (a hash, a member): nothing was installed.
    verification: bool = False


@dataclass(frozen=True, slots=True)
class Switched:
    pass


@dataclass(frozen=True, slots=True)
class SwitchFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class Restarted:
    """The first registration after the restart: what the station runs now."""

    installed: bool
    reason: str = ""
    #: The new release was left for the previous one (trial failed).
    rolled_back: bool = False


@dataclass(frozen=True, slots=True)
class Cancelled:
    reason: str = ""


@dataclass(frozen=True, slots=True)
class UploadRequested:
    request: UploadRequest


@dataclass(frozen=True, slots=True)
class UploadSucceeded:
    pass


@dataclass(frozen=True, slots=True)
class UploadFailed:
    reason: str
    retryable: bool = True


FirmwareEvent = (
    Requested
    | RetrieveTimeReached
    | DownloadSucceeded
    | DownloadFailed
    | RetryTimeReached
    | SignatureChecked
    | InstallTimeReached
    | StationIdle
    | InstallSucceeded
    | InstallFailed
    | Switched
    | SwitchFailed
    | Restarted
    | Cancelled
)
UploadEvent = UploadRequested | UploadSucceeded | UploadFailed | RetryTimeReached | Cancelled
Event = FirmwareEvent | UploadEvent


# -- effects ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Notify:
    """Send this status notification (CALL ``action`` with ``payload``)."""

    action: str
    payload: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AwaitTime:
    """Feed ``then`` once the charge point's clock reaches ``when``."""

    when: datetime
    then: Event


@dataclass(frozen=True, slots=True)
class AwaitDelay:
    """Feed ``then`` after ``seconds`` (trio's clock)."""

    seconds: float
    then: Event


@dataclass(frozen=True, slots=True)
class Download:
    """Attempt ``attempt`` of ``attempts``: feed DownloadSucceeded or DownloadFailed."""

    url: str
    dest: Path
    attempt: int
    attempts: int


@dataclass(frozen=True, slots=True)
class CheckSignature:
    """Feed SignatureChecked."""

    image: Path
    signature: str
    signing_certificate: str


@dataclass(frozen=True, slots=True)
class MakeUnavailable:
    """Idle connectors Unavailable now, the others once their transaction ends."""


@dataclass(frozen=True, slots=True)
class AwaitIdle:
    """Feed StationIdle once no transaction runs."""


@dataclass(frozen=True, slots=True)
class Install:
    """Verify the image's manifest and install it beside the running release: feed
    InstallSucceeded or InstallFailed."""

    image: Path


@dataclass(frozen=True, slots=True)
class SavePending:
    """Persist ``pending`` (before the switch, so the next process knows)."""

    pending: PendingInstall


@dataclass(frozen=True, slots=True)
class Switch:
    """Make ``version`` the release the station starts (on trial): feed Switched or
    SwitchFailed."""

    version: str


@dataclass(frozen=True, slots=True)
class ClearPending:
    """Forget the saved installation (once what precedes is delivered)."""


@dataclass(frozen=True, slots=True)
class RestoreAvailability:
    """Undo MakeUnavailable."""


@dataclass(frozen=True, slots=True)
class RemoveFile:
    """Remove a download (and its partial file) or an upload's scratch."""

    path: Path


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    type: str
    tech_info: str | None = None


@dataclass(frozen=True, slots=True)
class Restart:
    """Restart the station into the switched release."""


@dataclass(frozen=True, slots=True)
class Upload:
    """Attempt ``attempt`` of ``attempts``: feed UploadSucceeded or UploadFailed."""

    url: str
    source: Path
    attempt: int
    attempts: int


Effect = (
    Notify
    | AwaitTime
    | AwaitDelay
    | Download
    | CheckSignature
    | MakeUnavailable
    | AwaitIdle
    | Install
    | SavePending
    | Switch
    | ClearPending
    | RestoreAvailability
    | RemoveFile
    | SecurityEvent
    | Restart
    | Upload
)
#: The effects that produce the next event; at most one per transition, the last.
COMMANDS: tuple[type, ...] = (
    AwaitTime,
    AwaitDelay,
    Download,
    CheckSignature,
    AwaitIdle,
    Install,
    Switch,
    Upload,
)


# -- the firmware update ----------------------------------------------------------------------


class FwState(StrEnum):
    IDLE = "idle"
    DOWNLOAD_SCHEDULED = "download scheduled"
    DOWNLOADING = "downloading"
    DOWNLOAD_RETRY = "waiting to retry the download"
    VERIFYING_SIGNATURE = "verifying the signature"
    INSTALL_SCHEDULED = "install scheduled"
    WAITING_FOR_IDLE = "waiting for transactions to end"
    INSTALLING = "installing"
    SWITCHING = "switching"
    REBOOTING = "rebooting"


#: The states a new request may cancel (nothing installed yet).
CANCELLABLE = frozenset(
    {
        FwState.DOWNLOAD_SCHEDULED,
        FwState.DOWNLOADING,
        FwState.DOWNLOAD_RETRY,
        FwState.VERIFYING_SIGNATURE,
        FwState.INSTALL_SCHEDULED,
        FwState.WAITING_FOR_IDLE,
    }
)


class FirmwareUpdate:
    """One firmware update at a time: the station's machine (module docstring)."""

    machine = "firmware update"

    def __init__(self, pending: PendingInstall | None = None) -> None:
        #: The saved installation this process was started to report on.
        self.pending = pending
        self.state = FwState.IDLE if pending is None else FwState.REBOOTING
        self.request: FirmwareRequest | None = None
        self.attempt = 0
        #: The status of the step in progress (whitepaper vocabulary), None when idle.
        self._status: str | None = None if pending is None else "InstallRebooting"

    # -- what is in progress

    @property
    def kind(self) -> Kind | None:
        if self.request is not None:
            return self.request.kind
        return self.pending.kind if self.pending is not None else None

    @property
    def request_id(self) -> int | None:
        if self.request is not None:
            return self.request.request_id
        return self.pending.request_id if self.pending is not None else None

    @property
    def idle(self) -> bool:
        return self.state is FwState.IDLE

    @property
    def cancellable(self) -> bool:
        return self.state in CANCELLABLE

    @property
    def signed_status(self) -> tuple[str, int | None]:
        """What SignedFirmwareStatusNotification reports now: the status and the
        requestId of the update in progress, Idle (no requestId) when none."""
        if self.idle or self._status is None:
            return "Idle", None
        return self._status, self.request_id

    @property
    def plain_status(self) -> str:
        """What FirmwareStatusNotification reports now (1.6 vocabulary)."""
        return as_plain_status(self.signed_status[0])

    def accepts(self, event: Event) -> bool:
        return type(event) in FIRMWARE_TRANSITIONS.get(self.state, {})

    def handle(self, event: Event, now: datetime) -> list[Effect]:
        """Apply one event at the charge point's time ``now``; the effects, in order."""
        row = FIRMWARE_TRANSITIONS.get(self.state, {}).get(type(event))
        if row is None:
            raise IllegalTransition(self.machine, self.state.value, type(event).__name__)
        transition, targets = row
        effects = transition(self, event, now)
        assert self.state in targets, f"{self.state} not in {targets}"
        return effects

    # -- helpers of the transitions

    def _req(self) -> FirmwareRequest:
        assert self.request is not None
        return self.request

    def _notify(self, status: str) -> list[Effect]:
        """The notification of ``status`` for the kind in progress (none if silent)."""
        kind = self.kind
        assert kind is not None
        if kind is Kind.PLAIN:
            status = _PLAIN_NOTIFIED.get(status, status)
            if status not in PLAIN_STATUSES:
                return []
            return [Notify(NOTIFICATION[kind], {"status": status})]
        return [Notify(NOTIFICATION[kind], {"status": status, "requestId": self.request_id})]

    def _enter(self, state: FwState, status: str) -> list[Effect]:
        self.state, self._status = state, status
        return self._notify(status)

    def _finish(self, status: str, *after: Effect, before: tuple[Effect, ...] = ()) -> list[Effect]:
        effects = [*before, *self._notify(status), *after]
        self.state, self._status = FwState.IDLE, None
        self.request, self.pending, self.attempt = None, None, 0
        return effects

    def _download(self) -> list[Effect]:
        req = self._req()
        self.attempt += 1
        return [Download(req.location, req.image, self.attempt, req.retry.attempts)]

    def _downloaded(self, now: datetime, effects: list[Effect]) -> list[Effect]:
        """The image is here and, if signed, verified: install now or when scheduled."""
        req = self._req()
        if req.install_at is not None and req.install_at > now:
            return [
                *effects,
                *self._enter(FwState.INSTALL_SCHEDULED, "InstallScheduled"),
                AwaitTime(req.install_at, InstallTimeReached()),
            ]
        return [*effects, *self._prepare()]

    def _prepare(self) -> list[Effect]:
        self.state = FwState.WAITING_FOR_IDLE
        return [MakeUnavailable(), AwaitIdle()]


Transition = Callable[[FirmwareUpdate, Any, datetime], list[Effect]]


def _fw_requested(m: FirmwareUpdate, ev: Requested, now: datetime) -> list[Effect]:
    req = ev.request
    m.request, m.pending, m.attempt = req, None, 0
    if req.retrieve_at > now:
        # Section 5.19: "the Charge Point SHALL NOT retrieve it before retrieveDate".
        return [
            *m._enter(FwState.DOWNLOAD_SCHEDULED, "DownloadScheduled"),
            AwaitTime(req.retrieve_at, RetrieveTimeReached()),
        ]
    return [*m._enter(FwState.DOWNLOADING, "Downloading"), *m._download()]


def _fw_retrieve(m: FirmwareUpdate, ev: RetrieveTimeReached, now: datetime) -> list[Effect]:
    return [*m._enter(FwState.DOWNLOADING, "Downloading"), *m._download()]


def _fw_downloaded(m: FirmwareUpdate, ev: DownloadSucceeded, now: datetime) -> list[Effect]:
    req = m._req()
    notify = m._enter(FwState.VERIFYING_SIGNATURE, "Downloaded")
    if req.kind is Kind.SIGNED:
        # L01: the signature is verified before anything is installed.
        return [*notify, CheckSignature(req.image, req.signature, req.signing_certificate)]
    return m._downloaded(now, notify)


def _fw_download_failed(m: FirmwareUpdate, ev: DownloadFailed, now: datetime) -> list[Effect]:
    req = m._req()
    if ev.retryable and m.attempt < req.retry.attempts:
        m.state = FwState.DOWNLOAD_RETRY
        return [AwaitDelay(req.retry.interval, RetryTimeReached())]
    return m._finish("DownloadFailed", RemoveFile(req.image))


def _fw_retry(m: FirmwareUpdate, ev: RetryTimeReached, now: datetime) -> list[Effect]:
    m.state = FwState.DOWNLOADING
    return m._download()


def _fw_signature(m: FirmwareUpdate, ev: SignatureChecked, now: datetime) -> list[Effect]:
    req = m._req()
    if not ev.valid:
        # L01.FR.04 / L01.FR.05: InvalidSignature, the security event, and stop.
        return m._finish(
            "InvalidSignature",
            SecurityEvent(INVALID_SIGNATURE, ev.reason or None),
            RemoveFile(req.image),
        )
    return m._downloaded(now, m._enter(FwState.VERIFYING_SIGNATURE, "SignatureVerified"))


def _fw_install_time(m: FirmwareUpdate, ev: InstallTimeReached, now: datetime) -> list[Effect]:
    return m._prepare()


def _fw_station_idle(m: FirmwareUpdate, ev: StationIdle, now: datetime) -> list[Effect]:
    return [*m._enter(FwState.INSTALLING, "Installing"), Install(m._req().image)]


def _fw_installed(m: FirmwareUpdate, ev: InstallSucceeded, now: datetime) -> list[Effect]:
    req = m._req()
    m.state = FwState.SWITCHING
    pending = PendingInstall(req.kind, ev.version, ev.previous, req.request_id)
    m.pending = pending
    # The release is built from the image's wheels: the image is no longer needed.
    # Saved before the switch: a power cut in between is reported, never lost.
    return [RemoveFile(req.image), SavePending(pending), Switch(ev.version)]


def _fw_install_failed(m: FirmwareUpdate, ev: InstallFailed, now: datetime) -> list[Effect]:
    req = m._req()
    status = "InstallVerificationFailed" if ev.verification else "InstallationFailed"
    return m._finish(status, RestoreAvailability(), RemoveFile(req.image))


def _fw_switched(m: FirmwareUpdate, ev: Switched, now: datetime) -> list[Effect]:
    return [*m._enter(FwState.REBOOTING, "InstallRebooting"), Restart()]


def _fw_switch_failed(m: FirmwareUpdate, ev: SwitchFailed, now: datetime) -> list[Effect]:
    return m._finish("InstallationFailed", RestoreAvailability(), before=(ClearPending(),))


def _fw_restarted(m: FirmwareUpdate, ev: Restarted, now: datetime) -> list[Effect]:
    pending = m.pending
    assert pending is not None
    if ev.installed:
        event = SecurityEvent(FIRMWARE_UPDATED, f"{pending.previous} -> {pending.version}")
        return m._finish("Installed", ClearPending(), before=(event,))
    before: tuple[Effect, ...] = ()
    if ev.rolled_back:
        before = (SecurityEvent(FIRMWARE_ROLLED_BACK, ev.reason or None),)
    return m._finish("InstallationFailed", ClearPending(), before=before)


def _fw_cancelled(m: FirmwareUpdate, ev: Cancelled, now: datetime) -> list[Effect]:
    req = m._req()
    restore: list[Effect] = [RestoreAvailability()] if m.state is FwState.WAITING_FOR_IDLE else []
    m.state, m._status = FwState.IDLE, None
    m.request, m.attempt = None, 0
    return [*restore, RemoveFile(req.image)]


S = FwState
_INSTALL_NEXT = frozenset({S.INSTALL_SCHEDULED, S.WAITING_FOR_IDLE})

#: state -> event type -> (transition, the states it may lead to).
FIRMWARE_TRANSITIONS: Mapping[FwState, Mapping[type, tuple[Transition, frozenset[FwState]]]] = (
    MappingProxyType(
        {
            S.IDLE: {
                Requested: (_fw_requested, frozenset({S.DOWNLOAD_SCHEDULED, S.DOWNLOADING})),
            },
            S.DOWNLOAD_SCHEDULED: {
                RetrieveTimeReached: (_fw_retrieve, frozenset({S.DOWNLOADING})),
                Cancelled: (_fw_cancelled, frozenset({S.IDLE})),
            },
            S.DOWNLOADING: {
                DownloadSucceeded: (_fw_downloaded, _INSTALL_NEXT | {S.VERIFYING_SIGNATURE}),
                DownloadFailed: (_fw_download_failed, frozenset({S.DOWNLOAD_RETRY, S.IDLE})),
                Cancelled: (_fw_cancelled, frozenset({S.IDLE})),
            },
            S.DOWNLOAD_RETRY: {
                RetryTimeReached: (_fw_retry, frozenset({S.DOWNLOADING})),
                Cancelled: (_fw_cancelled, frozenset({S.IDLE})),
            },
            S.VERIFYING_SIGNATURE: {
                SignatureChecked: (_fw_signature, _INSTALL_NEXT | {S.IDLE}),
                Cancelled: (_fw_cancelled, frozenset({S.IDLE})),
            },
            S.INSTALL_SCHEDULED: {
                InstallTimeReached: (_fw_install_time, frozenset({S.WAITING_FOR_IDLE})),
                Cancelled: (_fw_cancelled, frozenset({S.IDLE})),
            },
            S.WAITING_FOR_IDLE: {
                StationIdle: (_fw_station_idle, frozenset({S.INSTALLING})),
                Cancelled: (_fw_cancelled, frozenset({S.IDLE})),
            },
            S.INSTALLING: {
                InstallSucceeded: (_fw_installed, frozenset({S.SWITCHING})),
                InstallFailed: (_fw_install_failed, frozenset({S.IDLE})),
            },
            S.SWITCHING: {
                Switched: (_fw_switched, frozenset({S.REBOOTING})),
                SwitchFailed: (_fw_switch_failed, frozenset({S.IDLE})),
            },
            S.REBOOTING: {
                Restarted: (_fw_restarted, frozenset({S.IDLE})),
            },
        }
    )
)


# -- the upload -------------------------------------------------------------------------------


class UpState(StrEnum):
    IDLE = "idle"
    UPLOADING = "uploading"
    UPLOAD_RETRY = "waiting to retry the upload"


class UploadMachine:
    """One upload of ``kind`` at a time (module docstring)."""

    def __init__(self, kind: UploadKind) -> None:
        self.kind = kind
        self.machine = f"{kind.value} upload"
        self.state = UpState.IDLE
        self.request: UploadRequest | None = None
        self.attempt = 0

    @property
    def idle(self) -> bool:
        return self.state is UpState.IDLE

    @property
    def status(self) -> str:
        """Uploading while an upload is in progress, Idle otherwise."""
        return "Idle" if self.idle else "Uploading"

    @property
    def request_id(self) -> int | None:
        return self.request.request_id if self.request is not None else None

    def accepts(self, event: Event) -> bool:
        return type(event) in UPLOAD_TRANSITIONS.get(self.state, {})

    def handle(self, event: Event, now: datetime) -> list[Effect]:
        row = UPLOAD_TRANSITIONS.get(self.state, {}).get(type(event))
        if row is None:
            raise IllegalTransition(self.machine, self.state.value, type(event).__name__)
        transition, targets = row
        effects = transition(self, event, now)
        assert self.state in targets, f"{self.state} not in {targets}"
        return effects

    def _req(self) -> UploadRequest:
        assert self.request is not None
        return self.request

    def _notify(self, status: str) -> Notify:
        req = self._req()
        payload: dict[str, Any] = {"status": status}
        if req.kind is UploadKind.LOG:
            payload["requestId"] = req.request_id
        return Notify(NOTIFICATION[req.kind], payload)

    def _upload(self) -> Upload:
        req = self._req()
        self.attempt += 1
        return Upload(req.location, req.file, self.attempt, req.retry.attempts)

    def _finish(self, status: str | None) -> list[Effect]:
        req = self._req()
        effects: list[Effect] = [self._notify(status)] if status is not None else []
        effects.append(RemoveFile(req.scratch or req.file))
        self.state, self.request, self.attempt = UpState.IDLE, None, 0
        return effects


UploadTransition = Callable[[UploadMachine, Any, datetime], list[Effect]]


def _up_requested(m: UploadMachine, ev: UploadRequested, now: datetime) -> list[Effect]:
    if ev.request.kind is not m.kind:
        raise ValueError(f"a {ev.request.kind.value} request for the {m.machine}")
    m.request, m.attempt, m.state = ev.request, 0, UpState.UPLOADING
    return [m._notify("Uploading"), m._upload()]


def _up_succeeded(m: UploadMachine, ev: UploadSucceeded, now: datetime) -> list[Effect]:
    return m._finish("Uploaded")


def _up_failed(m: UploadMachine, ev: UploadFailed, now: datetime) -> list[Effect]:
    req = m._req()
    if ev.retryable and m.attempt < req.retry.attempts:
        m.state = UpState.UPLOAD_RETRY
        return [AwaitDelay(req.retry.interval, RetryTimeReached())]
    return m._finish(UPLOAD_FAILED[m.kind])


def _up_retry(m: UploadMachine, ev: RetryTimeReached, now: datetime) -> list[Effect]:
    m.state = UpState.UPLOADING
    return [m._upload()]


def _up_cancelled(m: UploadMachine, ev: Cancelled, now: datetime) -> list[Effect]:
    return m._finish(None)


U = UpState
UPLOAD_TRANSITIONS: Mapping[UpState, Mapping[type, tuple[UploadTransition, frozenset[UpState]]]] = (
    MappingProxyType(
        {
            U.IDLE: {UploadRequested: (_up_requested, frozenset({U.UPLOADING}))},
            U.UPLOADING: {
                UploadSucceeded: (_up_succeeded, frozenset({U.IDLE})),
                UploadFailed: (_up_failed, frozenset({U.UPLOAD_RETRY, U.IDLE})),
                Cancelled: (_up_cancelled, frozenset({U.IDLE})),
            },
            U.UPLOAD_RETRY: {
                RetryTimeReached: (_up_retry, frozenset({U.UPLOADING})),
                Cancelled: (_up_cancelled, frozenset({U.IDLE})),
            },
        }
    )
)


# -- the collaborators ------------------------------------------------------------------------


class TransferProgress(Protocol):
    """How far a transfer is (``ocpp16.transfer.Progress`` has this shape)."""

    @property
    def done(self) -> int: ...

    @property
    def total(self) -> int | None: ...


ProgressCallback = Callable[[TransferProgress], None]


class Downloader(Protocol):
    """Fetch ``url`` into ``dest`` (``ocpp16.transfer.download`` fits): at most
    ``max_bytes``; returns the bytes; ``TransferError`` otherwise (its
    ``retryable`` says whether another attempt can help)."""

    async def __call__(
        self, url: str, dest: Path, *, max_bytes: int, progress: ProgressCallback | None = None
    ) -> int: ...


class Uploader(Protocol):
    """Send ``source`` to ``url`` (``ocpp16.transfer.upload`` fits); ``TransferError``
    otherwise."""

    async def __call__(
        self, url: str, source: Path, *, progress: ProgressCallback | None = None
    ) -> None: ...


class Installer(Protocol):
    """The A/B releases (``ops.release``). Blocking: the profile calls each in a
    worker thread. Any exception is a failure; its text is the reason."""

    def verify(self, image: Path) -> str:
        """The image's manifest checked (every member's sha256): its version."""
        ...

    def install(self, image: Path) -> str:
        """A release built beside the running one, not switched to: its version
        (``Releases.install``)."""
        ...

    def switch(self, version: str) -> None:
        """``version`` becomes the release the station starts, on trial
        (``Releases.switch(version, trial=...)``)."""
        ...

    def confirm(self) -> None:
        """The new release reached its goal (registered): its trial is over
        (``Releases.confirm``)."""
        ...


class StartReport(Protocol):
    """What ``Releases.at_start()`` found at this start (``ops.release.StartReport``)."""

    @property
    def installed(self) -> str | None: ...

    @property
    def rolled_back(self) -> tuple[str, str, str] | None:
        """(from, to, reason) when this start went back to the previous release."""
        ...


class DiagnosticsSource(Protocol):
    """Build the GetDiagnostics archive in the empty directory ``out`` for
    ``start``..``stop`` (``ops.diagnostics.build_diagnostics``): the file, or None
    when there is nothing to send. Blocking: called in a worker thread."""

    def __call__(
        self, out: Path, *, start: datetime | None, stop: datetime | None
    ) -> Path | None: ...


class LogSource(Protocol):
    """Build a GetLog file of ``kind`` in the empty directory ``out``
    (``ops.diagnostics.build_log``): the file, or None when there is nothing to
    send. Blocking: called in a worker thread."""

    def __call__(
        self, out: Path, kind: LogType, start: datetime | None, stop: datetime | None
    ) -> Path | None: ...


class SignatureCheck(Protocol):
    """The ManufacturerRootCertificates and the firmware signature
    (``ocpp16.certificates``). Blocking: called in a worker thread. A refusal is
    ``CertificateError`` (any other exception is a refusal too)."""

    def manufacturer_root_installed(self) -> bool:
        """At least one ManufacturerRootCertificate is installed."""
        ...

    def check_certificate(self, signing_certificate: str) -> None:
        """The PEM signing certificate chains to an installed
        ManufacturerRootCertificate and is valid now."""
        ...

    def check_signature(self, image: Path, signature: str, signing_certificate: str) -> None:
        """``signature`` (Base64) is the certificate's key's signature of the whole
        file (SHA-256; RSA-PSS or ECDSA)."""
        ...


class StationHooks(Protocol):
    """What an installation needs of the station (``evse`` through the integrator)."""

    def transactions_running(self) -> bool: ...

    async def make_unavailable(self) -> None:
        """Idle connectors Unavailable now, the others as soon as their transaction
        ends; no new transaction starts. For this run only (not persisted)."""
        ...

    async def restore_availability(self) -> None:
        """Back to what ``make_unavailable`` found (the update ended without a
        restart)."""
        ...

    async def restart(self) -> None:
        """End the station and restart the process (into the switched release)."""
        ...


class TransferReport(Protocol):
    """One attempt's progress, as it goes."""

    def advance(self, done: int, total: int | None) -> None: ...

    def end(self, failure: str | None) -> None:
        """Over: complete (``failure`` None) or not."""
        ...


class ProgressSink(Protocol):
    """Where transfer progress goes (``evse status``, the log): one report per
    attempt. Its errors never fail a transfer (the profile logs them)."""

    def begin(self, name: str) -> TransferReport: ...


#: Raise a security event (``ocpp16.security_events.SecurityEvents.emit``).
Emit = Callable[[str, str | None], None]
