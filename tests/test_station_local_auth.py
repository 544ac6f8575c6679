"""Stopping by tag and StopTransactionOnInvalidId, on the whole station (virtual clock).

The station runs in ``tests/vclock_rig.py`` (simulator, Modbus on an in-memory
link, supervisor, SQLite) with the authorization chain of a real station:
the local list and the cache (``ocpp16.local_auth`` steps, on a SQLite file)
and a stand-in for the online Authorize step whose answers the test sets and
whose link the test cuts (``Central.online``).

Issue 8, Core finding: offline, the tag that started the running transaction
was judged Invalid (no step knew it: the online step has no opinion offline,
AllowOfflineTxForUnknownId is false), so a local stop never happened. The tag
that started a transaction, or one with the same parentIdTag, may always
stop it, online or offline; the same tag stops it without an Authorize.req.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from pathlib import Path

import trio
import trio.testing

from evse.auth import AuthResult, AuthStatus, AuthStep
from evse.limits import CentralSystem
from evse.ocpp_port import local_result
from evse.station import STARTED_IT
from ocpp16.local_auth import (
    AuthorizationData,
    AuthorizationStatus,
    AuthSettings,
    CacheStep,
    IdTagInfo,
    LocalAuth,
    LocalListStep,
    UpdateStatus,
    UpdateType,
)
from tests.vclock_rig import RecordingCentral, VRig, vclock_rig

A = AuthStatus
STARTER = "CARD0001"
GROUP = "FLEET01"


class Central(RecordingCentral):
    """The recording port with a link the test switches."""

    def __init__(self) -> None:
        super().__init__()
        self.online = True

    @property
    def link(self) -> CentralSystem:
        return CentralSystem.ONLINE if self.online else CentralSystem.OFFLINE


class Authorize:
    """The online step: the central system's answers while online, no opinion offline."""

    name = "online"

    def __init__(self, central: Central, answers: dict[str, tuple[AuthStatus, str | None]]):
        self.central = central
        self.answers = answers
        self.asked: list[str] = []

    async def authorize(self, id_tag: str, now: datetime) -> AuthResult | None:
        await trio.lowlevel.checkpoint()
        self.asked.append(id_tag)
        if not self.central.online:
            return None
        status, parent = self.answers.get(id_tag, (A.INVALID, None))
        return AuthResult(id_tag, status, "central system", parent_id_tag=parent)


def local_steps(auth: LocalAuth, central: Central) -> list[AuthStep]:
    def online() -> bool:
        return central.online

    return [
        LocalListStep(auth, online=online, result=local_result),
        CacheStep(auth, online=online, result=local_result),
    ]


def open_auth(tmp_path: Path, **keys: bool) -> LocalAuth:
    return LocalAuth.open(tmp_path / "auth.sqlite", settings=lambda: AuthSettings(**keys))


def stops(rig: VRig) -> list[tuple[str, str | None, str | None]]:
    return [
        (str(reason), tag, stop_tag)
        for reason, tag, stop_tag in rig.db_rows(
            "SELECT stop_reason, id_tag, stop_id_tag FROM transactions"
        )
    ]


async def test_offline_the_tag_that_started_the_transaction_stops_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """OCPP 1.6 TC_038 (Offline Stop Transaction) on the station: started online,
    link lost, the same card (any case) stops it: Local, Finishing, no Authorize."""
    central = Central()
    online = Authorize(central, {STARTER: (A.ACCEPTED, None)})
    with open_auth(tmp_path) as auth:
        steps = [*local_steps(auth, central), online]
        async with vclock_rig(
            tmp_path, central=central, plan=lambda p: replace(p, auth_steps=steps)
        ) as rig:
            await rig.charge(STARTER)
            central.online = False
            # What the chain says of it offline: nobody knows it (the bug's verdict).
            verdict = await rig.station.auth.authorize(STARTER, datetime.now().astimezone())
            assert verdict.status is A.INVALID
            asked = len(online.asked)
            result = await rig.station.present_id_tag(STARTER.lower())
            assert (result.status, result.source) == (A.ACCEPTED, STARTED_IT)
            await rig.status("Finishing")
            assert online.asked[asked:] == []  # no Authorize.req for the same identifier
            await rig.until(lambda: rig.sim.station.board.command == 0.0, what="the off")
    assert stops(rig) == [("Local", STARTER, STARTER.lower())]


async def test_online_the_tag_that_started_the_transaction_stops_it_without_authorize(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    central = Central()
    online = Authorize(central, {STARTER: (A.ACCEPTED, None)})
    async with vclock_rig(
        tmp_path, central=central, plan=lambda p: replace(p, auth_steps=[online])
    ) as rig:
        await rig.charge(STARTER)
        assert online.asked == [STARTER]
        # The central system would now refuse it: the card still ends its own session.
        online.answers[STARTER] = (A.BLOCKED, None)
        await rig.station.present_id_tag(STARTER)
        await rig.status("Finishing")
        assert online.asked == [STARTER]
    assert stops(rig) == [("Local", STARTER, STARTER)]


async def test_offline_a_tag_of_the_same_parent_stops_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The starting tag's parent came with its Authorize answer; offline, the other
    tags' parents come from the local list whatever LocalAuthorizeOffline says. A
    tag the list refuses by name (Blocked), an unknown tag and a tag of another
    group change nothing; a listed Accepted tag of the group stops it (Local)."""
    central = Central()
    online = Authorize(central, {STARTER: (A.ACCEPTED, GROUP)})
    with open_auth(tmp_path, local_authorize_offline=False) as auth:

        def listed(tag: str, status: AuthStatus, parent: str) -> AuthorizationData:
            info = IdTagInfo(AuthorizationStatus(status.value), parent_id_tag=parent)
            return AuthorizationData(tag, info)

        entries = [
            listed("MEMBER02", A.ACCEPTED, GROUP),
            listed("BLOCKED3", A.BLOCKED, GROUP),
            listed("OTHER004", A.ACCEPTED, "FLEET02"),
        ]
        assert auth.send_local_list(1, UpdateType.FULL, entries) is UpdateStatus.ACCEPTED
        steps = [*local_steps(auth, central), online]
        async with vclock_rig(
            tmp_path, central=central, plan=lambda p: replace(p, auth_steps=steps)
        ) as rig:
            await rig.charge(STARTER)
            assert rig.station.connector.snapshot.parent_id_tag == GROUP
            central.online = False
            for tag in ("BLOCKED3", "UNKNOWN5", "OTHER004"):
                await rig.station.present_id_tag(tag)
                assert rig.station.connector.status.value == "Charging", tag
            result = await rig.station.present_id_tag("member02")
            # LocalAuthorizeOffline is false: the list does not authorize it to
            # start anything, but it names its group.
            assert result.status is A.INVALID
            await rig.status("Finishing")
    assert stops(rig) == [("Local", STARTER, "member02")]


async def test_online_a_tag_of_the_same_parent_stops_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """OCPP 1.6 TC_069 (ParentIdTag in StopTransaction matches ParentIdTag in
    StartTransaction) on the station: the other card is authorized online and its
    answer carries the same parentIdTag."""
    central = Central()
    online = Authorize(central, {STARTER: (A.ACCEPTED, GROUP), "MEMBER02": (A.ACCEPTED, GROUP)})
    online.answers["OTHER004"] = (A.ACCEPTED, "FLEET02")
    async with vclock_rig(
        tmp_path, central=central, plan=lambda p: replace(p, auth_steps=[online])
    ) as rig:
        await rig.charge(STARTER)
        await rig.station.present_id_tag("OTHER004")
        assert rig.station.connector.status.value == "Charging"
        await rig.station.present_id_tag("MEMBER02")
        await rig.status("Finishing")
        assert online.asked == [STARTER, "OTHER004", "MEMBER02"]
    assert stops(rig) == [("Local", STARTER, "MEMBER02")]


async def test_the_starting_tags_parent_from_the_cache_when_its_authorization_had_none(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A transaction started by a tag whose authorization gave no parent (the
    installer's tag, a remote start) learns its group from the cache (where the
    StartTransaction answer goes)."""
    central = Central()
    online = Authorize(central, {STARTER: (A.ACCEPTED, None)})
    with open_auth(tmp_path) as auth:
        steps = [*local_steps(auth, central), online]
        async with vclock_rig(
            tmp_path, central=central, plan=lambda p: replace(p, auth_steps=steps)
        ) as rig:
            await rig.charge(STARTER)
            now = datetime.now().astimezone()
            # The StartTransaction.conf: Accepted, with a parent.
            auth.update_cache(
                STARTER, IdTagInfo(AuthorizationStatus.ACCEPTED, parent_id_tag=GROUP), now
            )
            auth.update_cache(
                "MEMBER02", IdTagInfo(AuthorizationStatus.ACCEPTED, parent_id_tag=GROUP), now
            )
            central.online = False
            await rig.station.present_id_tag("MEMBER02")
            await rig.status("Finishing")
    assert stops(rig) == [("Local", STARTER, "MEMBER02")]


async def test_start_refused_with_stop_transaction_on_invalid_id_false_suspends_energy(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """StopTransactionOnInvalidId = false (what ``OcppPort.suspend_transaction`` asks):
    the transaction goes on, offered 0 A (SuspendedEVSE) until it ends; the next
    transaction is offered the arbitrated current again."""
    central = Central()
    online = Authorize(central, {STARTER: (A.ACCEPTED, None)})
    async with vclock_rig(
        tmp_path, central=central, plan=lambda p: replace(p, auth_steps=[online])
    ) as rig:
        await rig.charge(STARTER)
        tx = rig.station.tx
        assert tx is not None
        assert not await rig.station.deauthorize(tx.id + 1, stop=False)  # not that one
        assert rig.station.connector.status.value == "Charging"
        assert await rig.station.deauthorize(tx.id, stop=False)
        await rig.status("SuspendedEVSE")
        await rig.until(lambda: rig.sim.station.board.command == 0.0, what="offer 0 A")
        assert rig.station.limit.bound_by == "deauthorized"
        assert rig.station.tx is not None and rig.station.tx.id == tx.id
        # A limit input changes meanwhile: still nothing for this transaction.
        await rig.station.inputs_changed()
        await trio.sleep(2.0)
        assert rig.station.connector.status.value == "SuspendedEVSE"
        assert rig.sim.station.board.command == 0.0
        await rig.station.present_id_tag(STARTER)  # its own card still stops it
        await rig.status("Finishing")
        rig.unplug()
        await rig.status("Available")
        await rig.charge(STARTER)
        await rig.until(lambda: rig.sim.station.board.command > 0, what="an offer again")
        assert rig.station.limit.bound_by != "deauthorized"
    assert stops(rig)[0] == ("Local", STARTER, STARTER)


async def test_start_refused_with_stop_transaction_on_invalid_id_true_stops_deauthorized(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    central = Central()
    online = Authorize(central, {STARTER: (A.ACCEPTED, None)})
    async with vclock_rig(
        tmp_path, central=central, plan=lambda p: replace(p, auth_steps=[online])
    ) as rig:
        await rig.charge(STARTER)
        tx = rig.station.tx
        assert tx is not None
        assert await rig.station.deauthorize(tx.id, stop=True)
        await rig.status("Finishing")
        await rig.until(lambda: rig.sim.station.board.command == 0.0, what="the off")
        assert not await rig.station.deauthorize(tx.id, stop=True)  # over already
    assert stops(rig) == [("DeAuthorized", STARTER, None)]
