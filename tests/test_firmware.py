"""The firmware update and upload machines (ocpp16/firmware.py), sans-I/O.

Every row of both transition tables is taken from a state reached by real
events and checked against the states it declares; every missing row raises
IllegalTransition naming machine, state and event; the notification
sequences of OCPP 1.6 (5.19, 5.9) and the whitepaper (L01, N01) are checked
exactly, and a random walk over the accepted events keeps the rules (each
status once, the kind's vocabulary, every signed one with its requestId).
No time passes here: ``now`` is an argument.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocpp16.errors import IllegalTransition
from ocpp16.firmware import (
    CANCELLABLE,
    COMMANDS,
    DEFAULT_RETRIES,
    DEFAULT_RETRY_INTERVAL,
    FIRMWARE_ROLLED_BACK,
    FIRMWARE_TRANSITIONS,
    FIRMWARE_UPDATED,
    INVALID_SIGNATURE,
    MAX_RETRIES,
    PLAIN_STATUSES,
    SIGNED_STATUSES,
    UPLOAD_TRANSITIONS,
    AwaitDelay,
    AwaitIdle,
    AwaitTime,
    Cancelled,
    CheckSignature,
    ClearPending,
    Download,
    DownloadFailed,
    DownloadSucceeded,
    Effect,
    Event,
    FirmwareRequest,
    FirmwareUpdate,
    FwState,
    Install,
    InstallFailed,
    InstallSucceeded,
    InstallTimeReached,
    Kind,
    MakeUnavailable,
    Notify,
    PendingInstall,
    RemoveFile,
    Requested,
    Restart,
    Restarted,
    RestoreAvailability,
    RetrieveTimeReached,
    Retry,
    RetryTimeReached,
    SavePending,
    SecurityEvent,
    SignatureChecked,
    StationIdle,
    Switch,
    Switched,
    SwitchFailed,
    Upload,
    UploadFailed,
    UploadKind,
    UploadMachine,
    UploadRequest,
    UploadRequested,
    UploadSucceeded,
    UpState,
    as_plain_status,
)

NOW = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
LATER = NOW + timedelta(hours=1)
IMAGE = Path("/data/firmware/update-1-evse-1.3.0.tar")
URL = "https://firmware.example/evse-1.3.0.tar"


def plain(*, retrieve: datetime = NOW, retry: Retry | None = None) -> FirmwareRequest:
    return FirmwareRequest(Kind.PLAIN, URL, retrieve, IMAGE, retry or Retry(2, 60))


def signed(
    *,
    retrieve: datetime = NOW,
    install: datetime | None = None,
    retry: Retry | None = None,
    request_id: int = 7,
) -> FirmwareRequest:
    return FirmwareRequest(
        Kind.SIGNED,
        URL,
        retrieve,
        IMAGE,
        retry or Retry(2, 60),
        request_id=request_id,
        install_at=install,
        signature="c2lnbmF0dXJl",
        signing_certificate="-----BEGIN CERTIFICATE-----",
    )


def notified(effects: list[Effect]) -> list[Any]:
    """The statuses (with requestId, if any) the effects notify."""
    out: list[Any] = []
    for e in effects:
        if isinstance(e, Notify):
            rid = e.payload.get("requestId")
            out.append(e.payload["status"] if rid is None else (e.payload["status"], rid))
    return out


def run(
    machine: FirmwareUpdate | UploadMachine, *events: Event, now: datetime = NOW
) -> list[Effect]:
    effects: list[Effect] = []
    for event in events:
        effects.extend(machine.handle(event, now))
    return effects


# -- reaching every state ------------------------------------------------------------------------

#: state -> (a request, the events after Requested that lead there).
PATHS: dict[FwState, tuple[Callable[[], FirmwareRequest], tuple[Event, ...]]] = {
    FwState.DOWNLOAD_SCHEDULED: (lambda: plain(retrieve=LATER), ()),
    FwState.DOWNLOADING: (plain, ()),
    FwState.DOWNLOAD_RETRY: (plain, (DownloadFailed("refused"),)),
    FwState.VERIFYING_SIGNATURE: (signed, (DownloadSucceeded(),)),
    FwState.INSTALL_SCHEDULED: (
        lambda: signed(install=LATER),
        (DownloadSucceeded(), SignatureChecked(valid=True)),
    ),
    FwState.WAITING_FOR_IDLE: (plain, (DownloadSucceeded(),)),
    FwState.INSTALLING: (plain, (DownloadSucceeded(), StationIdle())),
    FwState.SWITCHING: (
        plain,
        (DownloadSucceeded(), StationIdle(), InstallSucceeded("1.3.0", "1.2.3")),
    ),
    FwState.REBOOTING: (
        plain,
        (DownloadSucceeded(), StationIdle(), InstallSucceeded("1.3.0", "1.2.3"), Switched()),
    ),
}


def reach(state: FwState) -> FirmwareUpdate:
    machine = FirmwareUpdate()
    if state is not FwState.IDLE:
        request, events = PATHS[state]
        run(machine, Requested(request()), *events)
    assert machine.state is state
    return machine


#: One instance of every event type (either machine's).
EVENTS: tuple[Event, ...] = (
    Requested(plain()),
    RetrieveTimeReached(),
    DownloadSucceeded(),
    DownloadFailed("refused"),
    RetryTimeReached(),
    SignatureChecked(valid=True),
    InstallTimeReached(),
    StationIdle(),
    InstallSucceeded("1.3.0", "1.2.3"),
    InstallFailed("broken"),
    Switched(),
    SwitchFailed("read-only"),
    Restarted(installed=True),
    Cancelled("a new request"),
    UploadRequested(UploadRequest(UploadKind.DIAGNOSTICS, URL, Path("/tmp/d.zip"))),
    UploadSucceeded(),
    UploadFailed("refused"),
)


def test_every_firmware_state_is_reachable_and_has_a_row() -> None:
    assert set(FIRMWARE_TRANSITIONS) == set(FwState)
    for state in FwState:
        assert reach(state).state is state


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (state, event)
        for state in FwState
        for event in EVENTS
        if type(event) not in FIRMWARE_TRANSITIONS[state]
    ],
    ids=lambda x: getattr(x, "value", type(x).__name__),
)
def test_a_firmware_event_its_state_does_not_accept_is_illegal(
    state: FwState, event: Event
) -> None:
    machine = reach(state)
    assert not machine.accepts(event)
    with pytest.raises(IllegalTransition) as caught:
        machine.handle(event, NOW)
    error = caught.value
    assert (error.machine, error.state, error.event) == (
        "firmware update",
        state.value,
        type(event).__name__,
    )
    assert state.value in str(error) and type(event).__name__ in str(error)
    assert machine.state is state  # refused, nothing changed


#: Variants of the accepted events that take every branch of the transitions.
BRANCHES: dict[type, tuple[Event, ...]] = {
    Requested: (Requested(plain()), Requested(plain(retrieve=LATER)), Requested(signed())),
    DownloadFailed: (DownloadFailed("refused"), DownloadFailed("too big", retryable=False)),
    SignatureChecked: (SignatureChecked(valid=True), SignatureChecked(False, "bad")),
    InstallFailed: (InstallFailed("broken"), InstallFailed("hash", verification=True)),
    Restarted: (
        Restarted(installed=True),
        Restarted(installed=False, reason="running 1.2.3"),
        Restarted(installed=False, reason="crashed", rolled_back=True),
    ),
}


@pytest.mark.parametrize(
    ("state", "event_type"),
    [(state, event_type) for state, row in FIRMWARE_TRANSITIONS.items() for event_type in row],
    ids=lambda x: getattr(x, "value", getattr(x, "__name__", str(x))),
)
def test_every_firmware_row_leads_where_it_says_with_one_command_last(
    state: FwState, event_type: type
) -> None:
    _, targets = FIRMWARE_TRANSITIONS[state][event_type]
    variants = BRANCHES.get(event_type) or tuple(e for e in EVENTS if type(e) is event_type)
    for event in variants:
        machine = reach(state)
        effects = machine.handle(event, NOW)
        assert machine.state in targets
        commands = [i for i, e in enumerate(effects) if isinstance(e, COMMANDS)]
        assert len(commands) <= 1 and (not commands or commands[0] == len(effects) - 1)
        if machine.state is FwState.IDLE:
            assert machine.signed_status == ("Idle", None) and machine.request is None
        else:
            assert commands or isinstance(effects[-1], Restart), "a busy machine must wait"


def test_plain_update_download_and_install_tc_044_1() -> None:
    m = FirmwareUpdate()
    assert m.plain_status == "Idle"
    assert run(m, Requested(plain())) == [
        Notify("FirmwareStatusNotification", {"status": "Downloading"}),
        Download(URL, IMAGE, 1, 3),
    ]
    assert m.plain_status == "Downloading"
    assert run(m, DownloadSucceeded()) == [
        Notify("FirmwareStatusNotification", {"status": "Downloaded"}),
        MakeUnavailable(),
        AwaitIdle(),
    ]
    assert m.plain_status == "Downloaded"
    assert run(m, StationIdle()) == [
        Notify("FirmwareStatusNotification", {"status": "Installing"}),
        Install(IMAGE),
    ]
    pending = PendingInstall(Kind.PLAIN, "1.3.0", "1.2.3")
    assert run(m, InstallSucceeded("1.3.0", "1.2.3")) == [
        RemoveFile(IMAGE),
        SavePending(pending),
        Switch("1.3.0"),
    ]
    # No InstallRebooting in 1.6: silent, the restart follows.
    assert run(m, Switched()) == [Restart()]
    assert m.plain_status == "Installing"

    after = FirmwareUpdate(pending)  # the next process
    assert after.state is FwState.REBOOTING and after.plain_status == "Installing"
    assert run(after, Restarted(installed=True)) == [
        SecurityEvent(FIRMWARE_UPDATED, "1.2.3 -> 1.3.0"),
        Notify("FirmwareStatusNotification", {"status": "Installed"}),
        ClearPending(),
    ]
    assert after.idle and after.plain_status == "Idle" and after.pending is None


def test_signed_update_tc_080_every_status_with_the_request_id() -> None:
    m = FirmwareUpdate()
    effects = run(
        m,
        Requested(signed()),
        DownloadSucceeded(),
        SignatureChecked(valid=True),
        StationIdle(),
        InstallSucceeded("1.3.0", "1.2.3"),
        Switched(),
    )
    assert notified(effects) == [
        ("Downloading", 7),
        ("Downloaded", 7),
        ("SignatureVerified", 7),
        ("Installing", 7),
        ("InstallRebooting", 7),
    ]
    assert {e.action for e in effects if isinstance(e, Notify)} == {
        "SignedFirmwareStatusNotification"
    }
    check = next(e for e in effects if isinstance(e, CheckSignature))
    assert check == CheckSignature(IMAGE, "c2lnbmF0dXJl", "-----BEGIN CERTIFICATE-----")
    assert m.signed_status == ("InstallRebooting", 7)
    # Across the restart the requestId comes from the saved installation.
    save = next(e for e in effects if isinstance(e, SavePending))
    after = FirmwareUpdate(PendingInstall.from_json(save.pending.to_json()))
    assert notified(run(after, Restarted(installed=True))) == [("Installed", 7)]


def test_an_invalid_signature_tc_081_installs_nothing() -> None:
    m = FirmwareUpdate()
    effects = run(m, Requested(signed()), DownloadSucceeded(), SignatureChecked(False, "forged"))
    assert notified(effects) == [("Downloading", 7), ("Downloaded", 7), ("InvalidSignature", 7)]
    assert effects[-2:] == [SecurityEvent(INVALID_SIGNATURE, "forged"), RemoveFile(IMAGE)]
    assert not any(isinstance(e, Install | Switch | MakeUnavailable) for e in effects)
    assert m.idle


def test_no_download_before_the_retrieve_date() -> None:
    m = FirmwareUpdate()
    effects = run(m, Requested(plain(retrieve=LATER)))
    # 1.6 has no DownloadScheduled: nothing is sent until the download starts.
    assert effects == [AwaitTime(LATER, RetrieveTimeReached())]
    assert m.plain_status == "Idle" and m.signed_status == ("DownloadScheduled", None)
    assert run(m, RetrieveTimeReached(), now=LATER) == [
        Notify("FirmwareStatusNotification", {"status": "Downloading"}),
        Download(URL, IMAGE, 1, 3),
    ]
    s = FirmwareUpdate()
    assert notified(run(s, Requested(signed(retrieve=LATER)))) == [("DownloadScheduled", 7)]
    # A retrieve date in the past (or now) downloads at once.
    assert isinstance(run(FirmwareUpdate(), Requested(plain(retrieve=NOW)))[-1], Download)


def test_retries_zero_makes_one_attempt_tc_044_2() -> None:
    m = FirmwareUpdate()
    first = run(m, Requested(plain(retry=Retry(0, 60))))
    assert first[-1] == Download(URL, IMAGE, 1, 1)
    assert run(m, DownloadFailed("refused")) == [
        Notify("FirmwareStatusNotification", {"status": "DownloadFailed"}),
        RemoveFile(IMAGE),
    ]
    assert m.idle


def test_retries_wait_the_interval_and_notify_once() -> None:
    m = FirmwareUpdate()
    effects = run(m, Requested(plain(retry=Retry(2, 120))))
    downloads = [effects[-1]]
    for _ in range(2):
        assert run(m, DownloadFailed("refused")) == [AwaitDelay(120, RetryTimeReached())]
        assert m.state is FwState.DOWNLOAD_RETRY and m.plain_status == "Downloading"
        again = run(m, RetryTimeReached())
        assert notified(again) == []  # Downloading was sent once
        downloads.extend(again)
    assert downloads == [Download(URL, IMAGE, n, 3) for n in (1, 2, 3)]
    assert notified(run(m, DownloadFailed("refused"))) == ["DownloadFailed"]


def test_a_failure_another_attempt_cannot_mend_ends_at_once() -> None:
    m = FirmwareUpdate()
    run(m, Requested(plain(retry=Retry(5, 10))))
    assert notified(run(m, DownloadFailed("over the size cap", retryable=False))) == [
        "DownloadFailed"
    ]


def test_installation_failed_tc_044_3_restores_the_connectors() -> None:
    m = reach(FwState.INSTALLING)
    assert run(m, InstallFailed("self-check failed")) == [
        Notify("FirmwareStatusNotification", {"status": "InstallationFailed"}),
        RestoreAvailability(),
        RemoveFile(IMAGE),
    ]
    # A manifest that does not verify: the plain vocabulary has one failure.
    m = reach(FwState.INSTALLING)
    assert notified(run(m, InstallFailed("hash", verification=True))) == ["InstallationFailed"]
    s = FirmwareUpdate()
    run(s, Requested(signed()), DownloadSucceeded(), SignatureChecked(True), StationIdle())
    assert notified(run(s, InstallFailed("hash", verification=True))) == [
        ("InstallVerificationFailed", 7)
    ]


def test_a_failed_switch_forgets_the_pending_installation() -> None:
    m = reach(FwState.SWITCHING)
    assert m.pending == PendingInstall(Kind.PLAIN, "1.3.0", "1.2.3")
    assert run(m, SwitchFailed("read-only file system")) == [
        ClearPending(),
        Notify("FirmwareStatusNotification", {"status": "InstallationFailed"}),
        RestoreAvailability(),
    ]
    assert m.idle and m.pending is None


def test_after_the_restart_a_rollback_or_the_old_release_is_installation_failed() -> None:
    pending = PendingInstall(Kind.SIGNED, "1.3.0", "1.2.3", request_id=9)
    m = FirmwareUpdate(pending)
    assert m.signed_status == ("InstallRebooting", 9)
    assert run(m, Restarted(False, "from 1.3.0 to 1.2.3: crashed 3 times", rolled_back=True)) == [
        SecurityEvent(FIRMWARE_ROLLED_BACK, "from 1.3.0 to 1.2.3: crashed 3 times"),
        Notify(
            "SignedFirmwareStatusNotification", {"status": "InstallationFailed", "requestId": 9}
        ),
        ClearPending(),
    ]
    m = FirmwareUpdate(pending)
    effects = run(m, Restarted(False, "running 1.2.3, not 1.3.0"))
    assert notified(effects) == [("InstallationFailed", 9)]
    assert not any(isinstance(e, SecurityEvent) for e in effects)


def test_install_date_in_the_future_is_install_scheduled() -> None:
    m = FirmwareUpdate()
    effects = run(m, Requested(signed(install=LATER)), DownloadSucceeded(), SignatureChecked(True))
    assert notified(effects)[-1] == ("InstallScheduled", 7)
    assert effects[-1] == AwaitTime(LATER, InstallTimeReached())
    assert m.plain_status == "Downloaded"
    assert run(m, InstallTimeReached(), now=LATER) == [MakeUnavailable(), AwaitIdle()]
    # Already past when the image is verified: at once.
    m = FirmwareUpdate()
    effects = run(m, Requested(signed(install=NOW)), DownloadSucceeded(), SignatureChecked(True))
    assert effects[-2:] == [MakeUnavailable(), AwaitIdle()]


@pytest.mark.parametrize("state", sorted(CANCELLABLE), ids=lambda s: s.value)
def test_a_cancel_is_silent_and_cleans_up(state: FwState) -> None:
    m = reach(state)
    assert m.cancellable
    effects = m.handle(Cancelled("a new request"), NOW)
    assert notified(effects) == []
    restore = [RestoreAvailability()] if state is FwState.WAITING_FOR_IDLE else []
    assert effects == [*restore, RemoveFile(IMAGE)]
    assert m.idle and m.signed_status == ("Idle", None)
    # The machine takes the next request.
    assert run(m, Requested(signed(request_id=8)))[0] == Notify(
        "SignedFirmwareStatusNotification", {"status": "Downloading", "requestId": 8}
    )


def test_from_installing_on_nothing_is_cancelled() -> None:
    for state in (FwState.INSTALLING, FwState.SWITCHING, FwState.REBOOTING):
        m = reach(state)
        assert not m.cancellable
        with pytest.raises(IllegalTransition):
            m.handle(Cancelled(), NOW)


def test_a_signed_only_status_maps_onto_the_nearest_plain_one() -> None:
    assert {as_plain_status(s) for s in SIGNED_STATUSES} <= PLAIN_STATUSES
    assert as_plain_status("SignatureVerified") == "Downloaded"
    assert as_plain_status("InstallRebooting") == "Installing"
    assert as_plain_status("DownloadScheduled") == "Idle"
    assert all(as_plain_status(s) == s for s in PLAIN_STATUSES)
    m = reach(FwState.INSTALL_SCHEDULED)
    assert (m.plain_status, m.signed_status) == ("Downloaded", ("InstallScheduled", 7))


def test_retry_from_the_payload() -> None:
    assert Retry.from_payload({}) == Retry(DEFAULT_RETRIES, DEFAULT_RETRY_INTERVAL)
    assert Retry.from_payload({}).attempts == DEFAULT_RETRIES + 1
    assert Retry.from_payload({"retries": 0, "retryInterval": 5}).attempts == 1
    assert Retry.from_payload({"retries": 10**6}).retries == MAX_RETRIES
    with pytest.raises(ValueError, match="retries"):
        Retry.from_payload({"retries": -1})
    with pytest.raises(ValueError, match="retryInterval"):
        Retry.from_payload({"retryInterval": -5})


def test_a_signed_request_needs_its_request_id() -> None:
    with pytest.raises(ValueError, match="requestId"):
        FirmwareRequest(Kind.SIGNED, URL, NOW, IMAGE)
    with pytest.raises(ValueError, match="requestId"):
        UploadRequest(UploadKind.LOG, URL, IMAGE)


def test_the_pending_installation_round_trips_and_refuses_anything_else() -> None:
    for pending in (
        PendingInstall(Kind.PLAIN, "1.3.0", "1.2.3"),
        PendingInstall(Kind.SIGNED, "2.0.0", "1.3.0", request_id=4),
    ):
        assert PendingInstall.from_json(pending.to_json()) == pending
    good = {"format": 1, "kind": "UpdateFirmware", "version": "1", "previous": "0"}
    for text in (
        "",
        "[]",
        '{"format": 2}',
        json.dumps({**good, "kind": "Other", "requestId": None}),
        json.dumps({**good, "version": 1, "requestId": None}),
        json.dumps({**good, "requestId": "x"}),
        json.dumps(good),  # no requestId at all
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - every refusal is a ValueError
            PendingInstall.from_json(text)


# -- the upload ----------------------------------------------------------------------------------

DIAG = UploadRequest(
    UploadKind.DIAGNOSTICS,
    "ftp://u:p@logs.example/in/",
    Path("/data/uploads/d-1/diagnostics.zip"),
    Retry(1, 30),
    scratch=Path("/data/uploads/d-1"),
)
SECURITY_LOG = UploadRequest(
    UploadKind.LOG, "https://logs.example/", Path("/data/uploads/l-2/security.log"), Retry(0, 0), 5
)

UPLOAD_PATHS: dict[UpState, tuple[Event, ...]] = {
    UpState.IDLE: (),
    UpState.UPLOADING: (UploadRequested(DIAG),),
    UpState.UPLOAD_RETRY: (UploadRequested(DIAG), UploadFailed("refused")),
}


def reach_upload(state: UpState) -> UploadMachine:
    machine = UploadMachine(UploadKind.DIAGNOSTICS)
    run(machine, *UPLOAD_PATHS[state])
    assert machine.state is state
    return machine


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (state, event)
        for state in UpState
        for event in EVENTS
        if type(event) not in UPLOAD_TRANSITIONS[state]
    ],
    ids=lambda x: getattr(x, "value", type(x).__name__),
)
def test_an_upload_event_its_state_does_not_accept_is_illegal(state: UpState, event: Event) -> None:
    machine = reach_upload(state)
    assert not machine.accepts(event)
    with pytest.raises(IllegalTransition) as caught:
        machine.handle(event, NOW)
    assert (caught.value.machine, caught.value.state, caught.value.event) == (
        "GetDiagnostics upload",
        state.value,
        type(event).__name__,
    )


@pytest.mark.parametrize(
    ("state", "event_type"),
    [(state, event_type) for state, row in UPLOAD_TRANSITIONS.items() for event_type in row],
    ids=lambda x: getattr(x, "value", getattr(x, "__name__", str(x))),
)
def test_every_upload_row_leads_where_it_says(state: UpState, event_type: type) -> None:
    _, targets = UPLOAD_TRANSITIONS[state][event_type]
    branches: dict[type, tuple[Event, ...]] = {
        UploadFailed: (UploadFailed("refused"), UploadFailed("no such host", retryable=False)),
        UploadRequested: (UploadRequested(DIAG),),
    }
    variants = branches.get(event_type) or tuple(e for e in EVENTS if type(e) is event_type)
    for event in variants:
        machine = reach_upload(state)
        effects = machine.handle(event, NOW)
        assert machine.state in targets
        commands = [i for i, e in enumerate(effects) if isinstance(e, COMMANDS)]
        assert len(commands) <= 1 and (not commands or commands[0] == len(effects) - 1)
        assert bool(commands) is (machine.state is not UpState.IDLE)


def test_get_diagnostics_tc_045_1_and_2() -> None:
    m = UploadMachine(UploadKind.DIAGNOSTICS)
    assert m.status == "Idle"
    assert run(m, UploadRequested(DIAG)) == [
        Notify("DiagnosticsStatusNotification", {"status": "Uploading"}),
        Upload(DIAG.location, DIAG.file, 1, 2),
    ]
    assert m.status == "Uploading"
    assert run(m, UploadSucceeded()) == [
        Notify("DiagnosticsStatusNotification", {"status": "Uploaded"}),
        RemoveFile(DIAG.scratch),  # type: ignore[arg-type]
    ]
    assert m.status == "Idle"
    # Upload failed: one retry after retryInterval, then UploadFailed once.
    effects = run(m, UploadRequested(DIAG), UploadFailed("refused"))
    assert effects[-1] == AwaitDelay(30, RetryTimeReached())
    assert run(m, RetryTimeReached()) == [Upload(DIAG.location, DIAG.file, 2, 2)]
    assert run(m, UploadFailed("refused")) == [
        Notify("DiagnosticsStatusNotification", {"status": "UploadFailed"}),
        RemoveFile(DIAG.scratch),  # type: ignore[arg-type]
    ]


def test_get_log_statuses_carry_the_request_id_and_the_schema_spelling() -> None:
    m = UploadMachine(UploadKind.LOG)
    effects = run(m, UploadRequested(SECURITY_LOG), UploadFailed("refused"))
    assert effects == [
        Notify("LogStatusNotification", {"status": "Uploading", "requestId": 5}),
        Upload(SECURITY_LOG.location, SECURITY_LOG.file, 1, 1),
        Notify("LogStatusNotification", {"status": "UploadFailure", "requestId": 5}),
        RemoveFile(SECURITY_LOG.file),
    ]
    run(m, UploadRequested(SECURITY_LOG))
    assert (m.status, m.request_id) == ("Uploading", 5)
    with pytest.raises(ValueError, match="GetDiagnostics"):
        UploadMachine(UploadKind.LOG).handle(UploadRequested(DIAG), NOW)


def test_a_cancelled_upload_is_silent() -> None:
    for state in (UpState.UPLOADING, UpState.UPLOAD_RETRY):
        m = reach_upload(state)
        assert m.handle(Cancelled("a new GetDiagnostics"), NOW) == [RemoveFile(DIAG.scratch)]  # type: ignore[arg-type]
        assert m.idle


# -- a random walk ---------------------------------------------------------------------------

WALK_EVENTS: tuple[Event, ...] = (
    Requested(plain()),
    Requested(plain(retrieve=LATER, retry=Retry(1, 5))),
    Requested(signed(request_id=1)),
    Requested(signed(install=LATER, request_id=2, retry=Retry(0, 0))),
    RetrieveTimeReached(),
    DownloadSucceeded(),
    DownloadFailed("refused"),
    DownloadFailed("too big", retryable=False),
    RetryTimeReached(),
    SignatureChecked(valid=True),
    SignatureChecked(False, "forged"),
    InstallTimeReached(),
    StationIdle(),
    InstallSucceeded("1.3.0", "1.2.3"),
    InstallFailed("broken"),
    InstallFailed("hash", verification=True),
    Switched(),
    SwitchFailed("read-only"),
    Restarted(installed=True),
    Restarted(False, "crashed", rolled_back=True),
    Cancelled("a new request"),
)
FINAL = {
    "DownloadFailed",
    "InvalidSignature",
    "InstallationFailed",
    "InstallVerificationFailed",
    "Installed",
}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(WALK_EVENTS) - 1), max_size=60))
def test_a_random_walk_keeps_the_notification_rules(choices: list[int]) -> None:
    m = FirmwareUpdate()
    sent: list[str] = []  # statuses of the request in progress
    for choice in choices:
        accepted = [e for e in WALK_EVENTS if m.accepts(e)]
        if not accepted:
            # REBOOTING waits for the restart: the next process takes over.
            assert m.state is FwState.REBOOTING
            assert m.pending is not None
            m = FirmwareUpdate(PendingInstall.from_json(m.pending.to_json()))
            accepted = [e for e in WALK_EVENTS if m.accepts(e)]
        event = accepted[choice % len(accepted)]
        if isinstance(event, Requested):
            sent = []
        kind, request_id = m.kind, m.request_id
        effects = m.handle(event, NOW)
        if isinstance(event, Requested):
            kind, request_id = m.kind, m.request_id
        commands = [e for e in effects if isinstance(e, COMMANDS)]
        assert len(commands) <= 1
        for effect in effects:
            if not isinstance(effect, Notify):
                continue
            status = effect.payload["status"]
            if kind is Kind.PLAIN:
                assert effect.action == "FirmwareStatusNotification"
                assert status in PLAIN_STATUSES and "requestId" not in effect.payload
            else:
                assert effect.action == "SignedFirmwareStatusNotification"
                assert status in SIGNED_STATUSES
                assert effect.payload["requestId"] == request_id
            assert status not in sent, f"{status} twice: {sent}"
            assert not (FINAL & set(sent)), f"{status} after the end: {sent}"
            sent.append(status)
        if isinstance(event, Cancelled):
            assert not any(isinstance(e, Notify) for e in effects)
            sent = []
        if m.idle:
            sent = []
