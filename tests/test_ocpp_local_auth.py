"""The Local Authorization List Management profile and the authorization cache in the
charge point's session (ocpp16/profiles/local_auth.py, the Core hooks).

No sockets: ``ChargePoint._session`` on a fake connection against a central
system built on a second ``RpcSession`` (tests/chargepoint_rig.py), with the
real Configuration, TransactionQueue and ``LocalAuth`` on one SQLite file and
a MockClock. The list's and the cache's own rules (limits, versions,
eviction, atomicity) are tests/test_local_auth.py's; here: that the calls
reach them with the schemas checked, that every IdTagInfo the central system
answers is cached, that a conflict with the list is reported, and the keys.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from evse.auth import AuthChain, AuthStatus, AuthStep, FreeCharging, LocalTagList
from evse.ocpp_port import local_result
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
from ocpp16.rpc import CallErrorReceived, IncomingCall
from ops.run import open_central, plan_from_config, sim_config
from tests.chargepoint_rig import (
    EPOCH,
    CentralSystem,
    FakeStation,
    Responder,
    Rig,
    open_rig,
    settle,
)

A = AuthorizationStatus


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock()


def entry(tag: str, status: str = "Accepted", parent: str | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {"status": status}
    if parent is not None:
        info["parentIdTag"] = parent
    return {"idTag": tag, "idTagInfo": info}


def full(version: int, *entries: dict[str, Any]) -> dict[str, Any]:
    payload: dict[str, Any] = {"listVersion": version, "updateType": "Full"}
    if entries:
        payload["localAuthorizationList"] = list(entries)
    return payload


def differential(version: int, *entries: dict[str, Any]) -> dict[str, Any]:
    return {
        "listVersion": version,
        "updateType": "Differential",
        "localAuthorizationList": list(entries),
    }


def auth_of(rig: Rig) -> LocalAuth:
    profile = rig.cp.local_auth
    assert profile is not None
    return profile.auth


def id_tag_info(status: str, parent: str | None = None) -> Responder:
    def answer(call: IncomingCall) -> dict[str, Any]:
        info: dict[str, Any] = {"status": status}
        if parent is not None:
            info["parentIdTag"] = parent
        return {"idTagInfo": info}

    return answer


async def registered(rig: Rig, **auto: Responder | None) -> CentralSystem:
    cs = await rig.connect(**auto)
    await settle(lambda: len(cs.payloads("StatusNotification")) >= 2, "StatusNotifications")
    return cs


async def version(cs: CentralSystem) -> int:
    answer = await cs.result("GetLocalListVersion", {})
    value = answer["listVersion"]
    assert isinstance(value, int)
    return value


# -- the profile -------------------------------------------------------------------------


async def test_registered_and_advertised_only_with_a_local_list(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    """SupportedFeatureProfiles lists what is registered; without a local list the
    two calls are NotSupported CallErrors (OCPP-J 4.2.3)."""
    for sub in ("with", "without"):
        (tmp_path / sub).mkdir()
    async with open_rig(tmp_path / "with", clock, local_auth=True) as rig:
        cs = await registered(rig)
        got = await cs.result("GetConfiguration", {"key": ["SupportedFeatureProfiles"]})
        profiles = got["configurationKey"][0]["value"].split(",")
        assert profiles[:1] == ["Core"] and "LocalAuthListManagement" in profiles
    async with open_rig(tmp_path / "without", clock) as rig:
        cs = await registered(rig)
        got = await cs.result("GetConfiguration", {"key": ["SupportedFeatureProfiles"]})
        assert "LocalAuthListManagement" not in got["configurationKey"][0]["value"].split(",")
        for action, payload in [("GetLocalListVersion", {}), ("SendLocalList", full(1))]:
            answer = await cs.call(action, payload)
            assert isinstance(answer, CallErrorReceived)
            assert answer.code == "NotSupported"


async def test_send_local_list_full_and_differential_with_versions(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock, local_auth=True) as rig:
        cs = await registered(rig)
        assert await version(cs) == 0  # empty
        answer = await cs.result("SendLocalList", full(3, entry("aa01"), entry("BB02", "Blocked")))
        assert answer == {"status": "Accepted"}
        assert await version(cs) == 3
        assert set(auth_of(rig).list_entries()) == {"AA01", "BB02"}
        # Differential: add one, delete one (no idTagInfo), version up.
        update = differential(4, entry("CC03"), {"idTag": "bb02"})
        assert await cs.result("SendLocalList", update) == {"status": "Accepted"}
        assert set(auth_of(rig).list_entries()) == {"AA01", "CC03"}
        # Not above the current version: VersionMismatch, nothing changes.
        stale = differential(4, entry("DD04"))
        assert await cs.result("SendLocalList", stale) == {"status": "VersionMismatch"}
        assert await version(cs) == 4
        # More than SendLocalListMaxLength (10) in one message: Failed.
        eleven = [entry(f"T{i:03d}") for i in range(11)]
        assert await cs.result("SendLocalList", full(5, *eleven)) == {"status": "Failed"}
        assert set(auth_of(rig).list_entries()) == {"AA01", "CC03"}
        # What the schema cannot see (not printable ASCII): Failed, not a crash.
        assert await cs.result("SendLocalList", full(6, entry("CAFÉ"))) == {"status": "Failed"}
        # A Full update without entries empties the list: version 0.
        assert await cs.result("SendLocalList", full(7)) == {"status": "Accepted"}
        assert await version(cs) == 0
        assert rig.session_ends == []


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"listVersion": 1, "updateType": "Partial"}, "PropertyConstraintViolation"),
        ({"updateType": "Full"}, "OccurenceConstraintViolation"),
        ({"listVersion": "1", "updateType": "Full"}, "TypeConstraintViolation"),
        (full(1, entry("X" * 21)), "PropertyConstraintViolation"),
        (full(1, {"idTag": "A", "idTagInfo": {"status": "Maybe"}}), "PropertyConstraintViolation"),
        (full(1, {"idTag": "A", "colour": "red"}), "FormationViolation"),
    ],
)
async def test_send_local_list_schema_faults_are_call_errors(
    tmp_path: Path, clock: trio.testing.MockClock, payload: dict[str, Any], code: str
) -> None:
    """Validated against the OCPP 1.6 schema before the handler (``ocpp16.rpc``), as
    every call: a CALLERROR with the OCPP-J code, and the list unchanged."""
    async with open_rig(tmp_path, clock, local_auth=True) as rig:
        cs = await registered(rig)
        cs.send_raw(json.dumps([2, "bad-1", "SendLocalList", payload]))
        frame = await cs.stray()
        assert frame[:3] == [4, "bad-1", code], frame
        assert await version(cs) == 0
        assert rig.session_ends == []


async def test_local_auth_list_disabled_answers_not_supported_and_minus_one(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    """LocalAuthListEnabled = false (live, by ChangeConfiguration): SendLocalList is
    NotSupported and changes nothing, GetLocalListVersion is -1; enabled again, the
    stored list is back with its version."""
    async with open_rig(tmp_path, clock, local_auth=True) as rig:
        cs = await registered(rig)
        assert await cs.result("SendLocalList", full(2, entry("AA01"))) == {"status": "Accepted"}
        change = {"key": "LocalAuthListEnabled", "value": "false"}
        assert await cs.result("ChangeConfiguration", change) == {"status": "Accepted"}
        assert await cs.result("SendLocalList", full(3, entry("BB02"))) == {
            "status": "NotSupported"
        }
        assert await version(cs) == -1
        change["value"] = "true"
        assert await cs.result("ChangeConfiguration", change) == {"status": "Accepted"}
        assert await version(cs) == 2
        assert set(auth_of(rig).list_entries()) == {"AA01"}


async def test_the_keys_are_declared_with_the_reference_defaults(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    keys = [
        "LocalAuthListEnabled",
        "LocalAuthListMaxLength",
        "SendLocalListMaxLength",
        "AuthorizationCacheEnabled",
        "LocalPreAuthorize",
        "LocalAuthorizeOffline",
        "AllowOfflineTxForUnknownId",
        "StopTransactionOnInvalidId",
    ]
    async with open_rig(tmp_path, clock, local_auth=True) as rig:
        cs = await registered(rig)
        got = await cs.result("GetConfiguration", {"key": keys})
        table = {k["key"]: (k["value"], k["readonly"]) for k in got["configurationKey"]}
        assert table == {
            "LocalAuthListEnabled": ("true", False),
            "LocalAuthListMaxLength": ("50", True),
            "SendLocalListMaxLength": ("10", True),
            "AuthorizationCacheEnabled": ("true", False),
            "LocalPreAuthorize": ("true", False),
            "LocalAuthorizeOffline": ("false", False),
            "AllowOfflineTxForUnknownId": ("false", False),
            "StopTransactionOnInvalidId": ("false", False),
        }
        for key in ("LocalAuthListMaxLength", "SendLocalListMaxLength"):
            change = {"key": key, "value": "5"}
            assert await cs.result("ChangeConfiguration", change) == {"status": "Rejected"}


# -- the cache's feed ------------------------------------------------------------------


async def test_every_authorize_answer_is_cached_valid_or_not(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock, local_auth=True) as rig:
        cs = await registered(rig)
        cs.auto["Authorize"] = id_tag_info("Accepted", parent="fleet")
        assert await rig.cp.authorize("good01") == {"status": "Accepted", "parentIdTag": "fleet"}
        cs.auto["Authorize"] = id_tag_info("Blocked")
        assert await rig.cp.authorize("BAD02") == {"status": "Blocked"}
        auth = auth_of(rig)
        good = auth.cache_entry("GOOD01")
        assert good is not None
        assert (good.status, good.parent_id_tag) == (A.ACCEPTED, "FLEET")
        bad = auth.cache_entry("bad02")
        assert bad is not None and bad.status is A.BLOCKED


async def test_start_and_stop_transaction_answers_are_cached(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock, local_auth=True) as rig:
        cs = await registered(
            rig,
            StartTransaction=lambda call: {
                "transactionId": 7,
                "idTagInfo": {"status": "Accepted", "parentIdTag": "G1"},
            },
            StopTransaction=lambda call: {"idTagInfo": {"status": "Expired"}},
        )
        await rig.start_transaction(local_id=1, id_tag="STARTER1")
        await settle(lambda: auth_of(rig).cache_entry("STARTER1") is not None, "start cached")
        await rig.cp.transaction_ended(
            local_id=1,
            connector_id=1,
            id_tag="STARTER1",
            meter_start_wh=1000.0,
            started_at=EPOCH,
            meter_stop_wh=2000.0,
            stopped_at=EPOCH + timedelta(hours=1),
            reason="Local",
            stop_id_tag="STOPPER2",
            end=None,
        )
        await settle(lambda: auth_of(rig).cache_entry("STOPPER2") is not None, "stop cached")
        started = auth_of(rig).cache_entry("STARTER1")
        assert started is not None and started.parent_id_tag == "G1"
        stopped = auth_of(rig).cache_entry("STOPPER2")
        assert stopped is not None and stopped.status is A.EXPIRED
        assert len(cs.payloads("StopTransaction")) == 1


async def test_authorization_cache_disabled_is_neither_written_nor_read(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    settings = {"AuthorizationCacheEnabled": "false"}
    async with open_rig(tmp_path, clock, local_auth=True, settings=settings) as rig:
        cs = await registered(rig, Authorize=id_tag_info("Accepted"))
        await rig.cp.authorize("TAG1")
        assert auth_of(rig).cache_entries() == []
        assert "Authorize" in cs.actions()


async def test_a_listed_id_is_never_cached_and_a_conflict_is_reported(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    """OCPP 1.6 3.5.3: the list says Accepted, the central system Blocked: a
    StatusNotification for connector 0 with errorCode LocalListConflict (status
    connector 0's own), the list unchanged, nothing cached. An answer that agrees
    reports nothing."""
    station = FakeStation()
    async with open_rig(tmp_path, clock, local_auth=True, station=station) as rig:
        cs = await registered(rig)
        assert await cs.result("SendLocalList", full(1, entry("LISTED1"))) == {"status": "Accepted"}
        cs.auto["Authorize"] = id_tag_info("Accepted")
        await rig.cp.authorize("listed1")  # agrees
        cs.auto["Authorize"] = id_tag_info("Blocked")
        await rig.cp.authorize("LISTED1")  # conflicts
        await settle(
            lambda: any(
                p["errorCode"] == "LocalListConflict" for p in cs.payloads("StatusNotification")
            ),
            "LocalListConflict",
        )
        conflicts = [
            p for p in cs.payloads("StatusNotification") if p["errorCode"] == "LocalListConflict"
        ]
        assert len(conflicts) == 1
        assert conflicts[0]["connectorId"] == 0
        assert conflicts[0]["status"] == "Available"
        assert "LISTED1" in conflicts[0]["info"]
        auth = auth_of(rig)
        assert auth.cache_entries() == []
        listed = auth.list_entry("LISTED1")
        assert listed is not None and listed.status is A.ACCEPTED
        assert rig.cp.local_auth is not None
        assert rig.cp.local_auth.conflicts == [("LISTED1", "Accepted", "Blocked")]


async def test_a_conflict_in_a_start_transaction_answer_is_reported_too(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock, local_auth=True) as rig:
        cs = await registered(
            rig,
            StartTransaction=lambda call: {"transactionId": 7, "idTagInfo": {"status": "Invalid"}},
        )
        assert await cs.result("SendLocalList", full(1, entry("LISTED1"))) == {"status": "Accepted"}
        await rig.start_transaction(local_id=1, id_tag="LISTED1")
        await settle(
            lambda: any(
                p["errorCode"] == "LocalListConflict" for p in cs.payloads("StatusNotification")
            ),
            "LocalListConflict",
        )
        # StopTransactionOnInvalidId is false by default: suspended, not stopped.
        await settle(lambda: rig.station.called("suspend_transaction") == [(1,)], "suspended")
        assert rig.station.called("deauthorize") == []


async def test_clear_cache_empties_the_cache_on_disk(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    """ClearCache (Core, 5.4) empties the LocalAuth cache, also while it is disabled;
    the station's own clear_cache is not asked."""
    async with open_rig(tmp_path, clock, local_auth=True) as rig:
        cs = await registered(rig, Authorize=id_tag_info("Accepted"))
        await rig.cp.authorize("TAG1")
        assert len(auth_of(rig).cache_entries()) == 1
        change = {"key": "AuthorizationCacheEnabled", "value": "false"}
        assert await cs.result("ChangeConfiguration", change) == {"status": "Accepted"}
        assert await cs.result("ClearCache", {}) == {"status": "Accepted"}
        assert auth_of(rig).cache_entries() == []
        assert rig.station.called("clear_cache") == []
        path = auth_of(rig).path
    with LocalAuth.open(path) as reopened:
        assert reopened.cache_entries() == []


@pytest.mark.parametrize(("stop_on_invalid", "stopped"), [("true", True), ("false", False)])
async def test_start_answered_not_accepted_stops_or_suspends(
    tmp_path: Path, clock: trio.testing.MockClock, stop_on_invalid: str, stopped: bool
) -> None:
    """StopTransactionOnInvalidId (9.1.27): true -> deauthorize (DeAuthorized),
    false -> suspend_transaction (SuspendedEVSE); an Accepted start neither."""
    settings = {"StopTransactionOnInvalidId": stop_on_invalid}
    async with open_rig(tmp_path, clock, settings=settings) as rig:
        cs = await registered(rig)
        await rig.start_transaction(local_id=1)
        start = await cs.expect("StartTransaction")
        cs.answer(start, {"transactionId": 42, "idTagInfo": {"status": "Expired"}})
        await rig.start_transaction(local_id=2, id_tag="TAG2")
        second = await cs.expect("StartTransaction")
        cs.answer(second, {"transactionId": 43, "idTagInfo": {"status": "Accepted"}})
        await settle(lambda: rig.queue.pending_count() == 0, "delivered")
        stops, suspends = (
            rig.station.called("deauthorize"),
            rig.station.called("suspend_transaction"),
        )
        assert (stops, suspends) == (([(1,)], []) if stopped else ([], [(1,)]))


# -- the chain's side (evse) -----------------------------------------------------------------


def test_the_station_chain_order(tmp_path: Path) -> None:
    """OCPP 1.6 3.5 as ``evse run`` builds it: the installer's tags first (they
    stay), then the local list, the cache, the online Authorize and, offline,
    the unknown-id step; the session advertises the profile."""
    config = sim_config("tcp://127.0.0.1:5020", tmp_path)
    central = open_central(config)
    try:
        plan = plan_from_config(
            config, registry=central.registry, central_steps=central.port.auth_steps()
        )
        names = [step.name for step in plan.auth_steps]
        assert names == ["local", "local list", "cache", "online", "offline unknown id"]
        assert "LocalAuthListManagement" in central.port.chargepoint.profiles.names
        assert central.local_auth is central.port.local_auth is not None
    finally:
        central.close()


def test_parent_of_asks_the_tables_in_chain_order_whatever_the_status(tmp_path: Path) -> None:
    keys = {"authorization_cache_enabled": True}
    auth = LocalAuth.open(tmp_path / "auth.sqlite", settings=lambda: AuthSettings(**keys))
    try:
        listed = IdTagInfo(A.ACCEPTED, parent_id_tag="g-list")
        assert auth.send_local_list(1, UpdateType.FULL, [AuthorizationData("L1", listed)]) is (
            UpdateStatus.ACCEPTED
        )
        now = datetime.now(UTC)
        auth.update_cache("C1", IdTagInfo(A.BLOCKED, parent_id_tag="g-cache"), now)
        installer = LocalTagList({"I1": AuthStatus.ACCEPTED}, parents={"I1": "g-inst"})
        steps: list[AuthStep] = [
            installer,
            LocalListStep(auth, online=lambda: True, result=local_result),
            CacheStep(auth, online=lambda: True, result=local_result),
            FreeCharging(),  # no table: not asked
        ]
        chain = AuthChain(steps)
        assert [chain.parent_of(t) for t in ("i1", "L1", "c1", "NOBODY", "ß")] == [
            "G-INST",
            "G-LIST",
            "G-CACHE",
            None,
            None,
        ]
        keys["authorization_cache_enabled"] = False
        assert chain.parent_of("C1") is None
    finally:
        auth.close()
