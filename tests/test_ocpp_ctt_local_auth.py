"""Local Authorization List, authorization cache and offline stop, end to end, named
after the OCA OCPP 1.6 compliance test cases (OCTT, Charge Point side) they cover.

As in tests/test_ocpp_ctt.py: the station runs as a process (``evse run --sim``)
over real sockets against the bench central system (ops/csms.py, built on the
ocpp package's own asyncio runtime) in a process of its own. Tags are presented
through the station's control socket, the EV through its simulator; the
verdicts are the messages the central system received and the answers it got.

The simulator station's installer tags (04A2B3C4, DEMOTAG1) come first in the
authorization chain and are always Accepted, so these tests use other tags:
the central system accepts any tag not starting with BLOCKED/EXPIRED/INVALID.
Where a case names no tag, ``LISTED01`` is "<Configured valid IdTag>".
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.csms_peer import (
    Csms,
    CsmsError,
    call,
    call_result,
    configure,
    disconnect,
    running_csms,
    wait_for,
)
from tests.ocpp_harness import CP, StationProcess, booted, calls, station, statuses, until

pytestmark = pytest.mark.slow

LISTED = "LISTED01"


@pytest.fixture
def csms() -> Iterator[Csms]:
    with running_csms() as cs:
        yield cs


def entry(tag: str, status: str = "Accepted", parent: str | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {"status": status}
    if parent is not None:
        info["parentIdTag"] = parent
    return {"idTag": tag, "idTagInfo": info}


def send_list(csms: Csms, version: int, update: str, *entries: dict[str, Any]) -> str:
    payload: dict[str, Any] = {"listVersion": version, "updateType": update}
    if entries:
        payload["localAuthorizationList"] = list(entries)
    status = call_result(csms, CP, "SendLocalList", payload)["status"]
    assert isinstance(status, str)
    return status


def list_version(csms: Csms) -> int:
    value = call_result(csms, CP, "GetLocalListVersion", {})["listVersion"]
    assert isinstance(value, int)
    return value


def change(csms: Csms, key: str, value: str) -> None:
    answer = call_result(csms, CP, "ChangeConfiguration", {"key": key, "value": value})
    assert answer == {"status": "Accepted"}, (key, value, answer)


def authorizes(csms: Csms, tag: str) -> int:
    """How many Authorize.req the central system received for ``tag``."""
    return sum(1 for m in calls(csms, "Authorize") if m["payload"]["idTag"] == tag)


def go_offline(csms: Csms, st: StationProcess, seconds: float) -> None:
    """Cut the link (abort, no closing handshake) and refuse reconnects for ``seconds``."""
    configure(csms, refuse_for=seconds)
    disconnect(csms, CP, abort=True)
    until(lambda: st.status()["central_system"]["state"] == "offline", 10, "offline")


def back_online(st: StationProcess, within: float = 40.0) -> None:
    until(lambda: st.status()["central_system"]["state"] == "online", within, "online again")


# -- GetLocalListVersion (OCPP 1.6 5.10) ---------------------------------------------------


def test_tc_042_1_get_local_list_version_not_supported(csms: Csms, tmp_path: Path) -> None:
    """TC_042_1 Get Local List Version (not supported): with LocalAuthListEnabled
    false, GetLocalListVersion.conf has listVersion -1 (the case also admits a
    NotSupported CALLERROR; this station answers -1, it implements the profile)."""
    with station(csms, tmp_path):
        booted(csms)
        change(csms, "LocalAuthListEnabled", "false")
        assert call_result(csms, CP, "GetLocalListVersion", {}) == {"listVersion": -1}


def test_tc_042_2_get_local_list_version_empty(csms: Csms, tmp_path: Path) -> None:
    """TC_042_2 Get Local List Version (empty): SendLocalList Full, listVersion 1,
    localAuthorizationList omitted -> Accepted; GetLocalListVersion -> 0 (OCPP 1.6
    5.10: 0 is the empty list)."""
    with station(csms, tmp_path):
        booted(csms)
        assert list_version(csms) == 0
        assert send_list(csms, 1, "Full") == "Accepted"
        assert list_version(csms) == 0


# -- SendLocalList (OCPP 1.6 5.15) -----------------------------------------------------------


def test_tc_043_send_local_list_full_then_differential(csms: Csms, tmp_path: Path) -> None:
    """TC_043 Send Local Authorization List: a Full update, then a Differential one,
    both Accepted; expected behaviour: the station authorizes the ids on the list
    (here with LocalPreAuthorize true: at once, no Authorize.req), a Differential
    entry without idTagInfo deletes its id, and the list survives a restart."""
    with station(csms, tmp_path) as st:
        booted(csms)
        assert send_list(csms, 1, "Full", entry(LISTED), entry("LISTED02")) == "Accepted"
        assert send_list(csms, 2, "Differential", entry("LISTED03"), {"idTag": "LISTED02"}) == (
            "Accepted"
        )
        assert list_version(csms) == 2
        for tag in (LISTED, "listed03"):
            answer = st.present(tag)
            assert (answer["status"], answer["source"]) == ("Accepted", "local list"), tag
        assert authorizes(csms, LISTED) == authorizes(csms, "listed03") == 0
        # Deleted: asked of the central system like any unknown id.
        assert st.present("LISTED02")["source"] == "online"
        assert st.stop()[0] == 0
    with station(csms, tmp_path) as st:
        booted(csms, 2)
        assert list_version(csms) == 2
        assert st.present(LISTED)["source"] == "local list"


def test_tc_043_1_send_local_list_not_supported(csms: Csms, tmp_path: Path) -> None:
    """TC_043_1 Send Local Authorization List - NotSupported: with LocalAuthListEnabled
    false a Full SendLocalList is answered NotSupported; expected behaviour: the
    ids in it are not authorized locally (an Authorize.req goes out for them)."""
    with station(csms, tmp_path) as st:
        booted(csms)
        change(csms, "LocalAuthListEnabled", "false")
        assert send_list(csms, 1, "Full", entry(LISTED)) == "NotSupported"
        answer = st.present(LISTED)
        assert answer["source"] == "online"
        assert authorizes(csms, LISTED) == 1
        change(csms, "LocalAuthListEnabled", "true")
        assert list_version(csms) == 0  # nothing was stored


def test_tc_043_2_send_local_list_version_mismatch(csms: Csms, tmp_path: Path) -> None:
    """TC_043_2 Send Local Authorization List - VersionMismatch: listVersion 2 then
    5 Accepted (GetLocalListVersion 2, then 5); a Differential update whose
    listVersion is not above 5 is VersionMismatch and the version stays 5."""
    with station(csms, tmp_path):
        booted(csms)
        assert send_list(csms, 2, "Full", entry(LISTED)) == "Accepted"
        assert list_version(csms) == 2
        assert send_list(csms, 5, "Differential", entry("LISTED02")) == "Accepted"
        assert list_version(csms) == 5
        assert send_list(csms, 5, "Differential", entry("LISTED03")) == "VersionMismatch"
        assert send_list(csms, 4, "Differential", entry("LISTED03")) == "VersionMismatch"
        assert list_version(csms) == 5


def test_tc_043_3_send_local_list_failed(csms: Csms, tmp_path: Path) -> None:
    """TC_043_3 Send Local Authorization List - Failed: "a state in which it will fail
    to set a Local List": a Full update, listVersion 2, beyond the station's limits
    (11 entries > SendLocalListMaxLength 10; then 51 in the list > LocalAuthListMaxLength
    50) is Failed and nothing changes."""
    with station(csms, tmp_path):
        booted(csms)
        assert send_list(csms, 1, "Full", entry(LISTED)) == "Accepted"
        eleven = [entry(f"TAG{i:05d}") for i in range(11)]
        assert send_list(csms, 2, "Full", *eleven) == "Failed"
        assert list_version(csms) == 1
        for batch in range(5):  # 1 + 5 x 10 = 51 entries
            tags = [entry(f"B{batch}T{i:04d}") for i in range(10)]
            expected = "Failed" if batch == 4 else "Accepted"
            assert send_list(csms, 10 + batch, "Differential", *tags) == expected, batch
        assert list_version(csms) == 13


# -- starting with a local id (OCPP 1.6 3.5) ------------------------------------------------


def test_tc_008_regular_start_id_in_local_list(csms: Csms, tmp_path: Path) -> None:
    """TC_008 Regular Start Charging Session - Id in Local Authorization List:
    LocalPreAuthorize true, AuthorizationCacheEnabled false, LocalAuthListEnabled
    true; GetLocalListVersion, SendLocalList Accepted; the id presented: Preparing
    (no Authorize.req); plugged in: StartTransaction (the central system accepts
    it), then Charging."""
    with station(csms, tmp_path) as st:
        booted(csms)
        change(csms, "AuthorizationCacheEnabled", "false")
        assert list_version(csms) == 0
        assert send_list(csms, 1, "Full", entry(LISTED)) == "Accepted"
        answer = st.present(LISTED)
        assert (answer["status"], answer["source"]) == ("Accepted", "local list")
        until(lambda: statuses(csms)[-1:] == ["Preparing"], 10, "Preparing")
        st.plug()
        start = wait_for(csms, CP, "StartTransaction", within=15)
        assert start["payload"]["idTag"] == LISTED
        assert start["response"]["payload"]["idTagInfo"]["status"] == "Accepted"
        until(lambda: "Charging" in statuses(csms), 15, "Charging")
        assert authorizes(csms, LISTED) == 0


def _cache_by_a_session(csms: Csms, st: StationProcess, tag: str) -> None:
    """One charging session of ``tag`` online: its Authorize, StartTransaction and
    StopTransaction answers go into the cache. Ends unplugged, Available."""
    assert st.present(tag)["source"] == "online"
    st.plug()
    wait_for(csms, CP, "StartTransaction", within=15, where=lambda m: m["payload"]["idTag"] == tag)
    st.wait_status("Charging")
    st.present(tag)
    st.wait_status("Finishing")
    wait_for(csms, CP, "StopTransaction", within=15)
    st.unplug()
    st.wait_status("Available")


def test_tc_007_regular_start_with_a_cached_id(csms: Csms, tmp_path: Path) -> None:
    """TC_007 Regular Start Charging Session - Cached Id: AuthorizationCacheEnabled
    and LocalPreAuthorize true, the id in the cache (put there by an earlier
    session's answers): presented, it is Preparing at once (no Authorize.req);
    plugged in: StartTransaction Accepted, then Charging."""
    tag = "CACHED01"
    with station(csms, tmp_path) as st:
        booted(csms)
        _cache_by_a_session(csms, st, tag)
        assert authorizes(csms, tag) == 1
        answer = st.present(tag)
        assert (answer["status"], answer["source"]) == ("Accepted", "cache")
        until(lambda: statuses(csms)[-1:] == ["Preparing"], 10, "Preparing")
        st.plug()

        def starts() -> list[dict[str, Any]]:
            return [m for m in calls(csms, "StartTransaction") if "response" in m]

        until(lambda: len(starts()) == 2, 15, "the second StartTransaction")
        assert starts()[1]["response"]["payload"]["idTagInfo"]["status"] == "Accepted"
        st.wait_status("Charging")
        assert authorizes(csms, tag) == 1


def test_the_authorization_cache_survives_a_restart(csms: Csms, tmp_path: Path) -> None:
    tag = "CACHED02"
    with station(csms, tmp_path) as st:
        booted(csms)
        assert st.present(tag)["source"] == "online"
        assert st.stop()[0] == 0
    with station(csms, tmp_path) as st:
        booted(csms, 2)
        assert st.present(tag)["source"] == "cache"
        assert authorizes(csms, tag) == 1


def test_a_not_valid_answer_is_cached_and_checked_again_online(csms: Csms, tmp_path: Path) -> None:
    """A Blocked answer is cached too (OCPP 1.6 3.5.1: every IdTagInfo); online a
    not-valid cache entry is no verdict (asked again, the central system may have
    changed its mind); offline it is refused, even with AllowOfflineTxForUnknownId."""
    tag = "BLOCKED77"
    with station(csms, tmp_path) as st:
        booted(csms)
        assert st.present(tag)["status"] == "Blocked"
        assert st.present(tag)["source"] == "online"
        assert authorizes(csms, tag) == 2
        change(csms, "AllowOfflineTxForUnknownId", "true")
        go_offline(csms, st, 4)
        answer = st.present(tag)
        assert (answer["status"], answer["source"]) == ("Blocked", "cache")
        # An id nobody knows is what AllowOfflineTxForUnknownId admits.
        assert st.present("NEWCOMER1")["source"] == "offline unknown id"


def test_tc_061_clear_cache(csms: Csms, tmp_path: Path) -> None:
    """TC_061 Clear Authorization Data in Authorization Cache: AuthorizationCacheEnabled
    and LocalPreAuthorize true, a cached id; ClearCache.conf Accepted; the same id
    presented again is sent in an Authorize.req (no longer in the cache)."""
    tag = "CACHED03"
    with station(csms, tmp_path) as st:
        booted(csms)
        st.present(tag)
        assert st.present(tag)["source"] == "cache"
        assert authorizes(csms, tag) == 1
        assert call_result(csms, CP, "ClearCache", {}) == {"status": "Accepted"}
        assert st.present(tag)["source"] == "online"
        assert authorizes(csms, tag) == 2


# -- offline (OCPP 1.6 3.5.4) ---------------------------------------------------------------


def test_send_local_list_then_offline_start_with_a_listed_tag(csms: Csms, tmp_path: Path) -> None:
    """The issue's end-to-end case (OCTT TC_037_1/TC_039 with the local list): a
    SendLocalList, the link lost, LocalAuthorizeOffline true: a listed Accepted
    tag starts and stops a transaction offline, a listed Blocked tag is refused
    even with AllowOfflineTxForUnknownId; back online the queued StartTransaction
    (idTag the listed tag) and StopTransaction (Local) are delivered in order."""
    with station(csms, tmp_path) as st:
        booted(csms)
        change(csms, "LocalAuthorizeOffline", "true")
        change(csms, "AllowOfflineTxForUnknownId", "true")
        listed = [entry(LISTED, parent="FLEET"), entry("BLOCKED01", "Blocked")]
        assert send_list(csms, 1, "Full", *listed) == "Accepted"
        go_offline(csms, st, 6)
        refused = st.present("BLOCKED01")
        assert (refused["status"], refused["source"]) == ("Blocked", "local list")
        st.plug()
        st.wait_status("Preparing")
        accepted = st.present(LISTED)
        assert (accepted["status"], accepted["source"]) == ("Accepted", "local list")
        st.wait_status("Charging")
        assert st.status()["central_system"]["state"] == "offline"
        st.present(LISTED)
        st.wait_status("Finishing")
        back_online(st)
        start = wait_for(csms, CP, "StartTransaction", within=30)
        stop = wait_for(csms, CP, "StopTransaction", within=30)
        assert start["payload"]["idTag"] == LISTED
        assert stop["payload"]["reason"] == "Local"
        assert stop["payload"]["transactionId"] == start["response"]["payload"]["transactionId"]
        assert start["seq"] < stop["seq"]
        assert authorizes(csms, LISTED) == 0


def test_tc_038_offline_stop_transaction(csms: Csms, tmp_path: Path) -> None:
    """TC_038 Offline Stop Transaction (issue 8's Core finding): Charging with a tag
    the central system authorized (not an installer tag, so no step knows it
    offline with the defaults: LocalAuthorizeOffline and AllowOfflineTxForUnknownId
    false); the link lost, the EV driver presents the same tag: the transaction
    stops; back online: StopTransaction reason Local, StatusNotification Finishing."""
    tag = "ONLINE01"
    with station(csms, tmp_path) as st:
        booted(csms)
        st.plug()
        st.wait_status("Preparing")
        assert st.present(tag)["source"] == "online"
        start = wait_for(csms, CP, "StartTransaction", within=15)
        st.wait_status("Charging")
        until(lambda: "Charging" in statuses(csms), 10, "Charging notified")
        go_offline(csms, st, 4)
        stopped = st.present(tag)
        assert (stopped["status"], stopped["source"]) == ("Accepted", "started the transaction")
        st.wait_status("Finishing")
        back_online(st)
        stop = wait_for(csms, CP, "StopTransaction", within=30)
        assert stop["payload"]["reason"] == "Local"
        assert stop["payload"]["idTag"] == tag
        assert stop["payload"]["transactionId"] == start["response"]["payload"]["transactionId"]
        until(lambda: statuses(csms)[-1:] == ["Finishing"], 15, "Finishing notified")
        assert authorizes(csms, tag) == 1  # the stop asked nobody


def test_offline_a_listed_tag_of_the_same_parent_stops_the_transaction(
    csms: Csms, tmp_path: Path
) -> None:
    """OCTT TC_069's rule offline: the transaction was started by a listed tag of
    group FLEET; offline another listed tag of FLEET stops it (Local, its idTag in
    the StopTransaction), a tag of another group does not."""
    with station(csms, tmp_path) as st:
        booted(csms)
        change(csms, "LocalAuthorizeOffline", "true")
        listed = [
            entry(LISTED, parent="FLEET"),
            entry("MEMBER02", parent="FLEET"),
            entry("OTHER003", parent="OTHERS"),
        ]
        assert send_list(csms, 1, "Full", *listed) == "Accepted"
        go_offline(csms, st, 6)
        st.plug()
        st.wait_status("Preparing")
        assert st.present(LISTED)["source"] == "local list"
        st.wait_status("Charging")
        st.present("OTHER003")
        time.sleep(1.0)
        assert st.status()["status"] == "Charging"
        st.present("MEMBER02")
        st.wait_status("Finishing")
        back_online(st)
        stop = wait_for(csms, CP, "StopTransaction", within=30)
        assert (stop["payload"]["reason"], stop["payload"]["idTag"]) == ("Local", "MEMBER02")


# -- StopTransactionOnInvalidId (OCPP 1.6 9.1.27) -------------------------------------------


def test_start_transaction_answered_invalid_suspends_or_stops_per_stop_transaction_on_invalid_id(
    csms: Csms, tmp_path: Path
) -> None:
    """The installer's tag DEMOTAG1 starts locally; the central system answers its
    StartTransaction Invalid. StopTransactionOnInvalidId false (the default): the
    transaction goes on without energy (SuspendedEVSE, 0 A offered) until its own
    card stops it; true: it is stopped at once with reason DeAuthorized."""
    tag = "DEMOTAG1"
    configure(csms, authorize={"tags": {tag: "Invalid"}})
    with station(csms, tmp_path) as st:
        booted(csms)
        st.plug()
        st.wait_status("Preparing")
        assert st.present(tag)["source"] == "local"
        first = wait_for(csms, CP, "StartTransaction", within=15)
        assert first["response"]["payload"]["idTagInfo"]["status"] == "Invalid"
        view = st.wait_status("SuspendedEVSE")
        assert view["limit"]["bound_by"] == "deauthorized"
        until(lambda: st.status()["offered_a"] == 0.0, 10, "0 A offered")
        until(lambda: "SuspendedEVSE" in statuses(csms), 10, "SuspendedEVSE notified")
        st.present(tag)
        st.wait_status("Finishing")
        stop = wait_for(csms, CP, "StopTransaction", within=15)
        assert stop["payload"]["reason"] == "Local"
        change(csms, "StopTransactionOnInvalidId", "true")
        st.unplug()
        st.wait_status("Available")
        st.plug()
        st.wait_status("Preparing")
        st.present(tag)
        second = wait_for(
            csms,
            CP,
            "StopTransaction",
            within=20,
            since=stop["seq"],
        )
        assert second["payload"]["reason"] == "DeAuthorized"
        st.wait_status("Finishing")


# -- atomicity (issue 8: "a kill -9 during it leaves the old list or the new one") ------------


def _stored_list(db: Path) -> tuple[int, set[str]]:
    conn = sqlite3.connect(db)
    try:
        version = conn.execute(
            "SELECT value FROM ocpp_auth_meta WHERE key = 'local_list_version'"
        ).fetchone()[0]
        tags = {row[0] for row in conn.execute("SELECT id_tag FROM ocpp_local_list")}
    finally:
        conn.close()
    return int(version), tags


def _generation(version: int) -> list[dict[str, Any]]:
    return [entry(f"V{version}T{i:02d}") for i in range(10)]


def test_kill_9_during_a_full_send_local_list_leaves_the_old_or_the_new_list(
    csms: Csms, tmp_path: Path
) -> None:
    """Over real sockets: the station process is killed (SIGKILL) at moments spread
    over a Full SendLocalList's handling (sent, then killed 0..40 ms later); after
    each kill the stored version and entries are exactly the old list or exactly
    the new one, never a mix, GetLocalListVersion after the restart says the same,
    and the next update goes through."""
    db = tmp_path / "station.sqlite"
    current = 1
    boots = 0
    with station(csms, tmp_path):
        boots += 1
        booted(csms, boots)
        assert send_list(csms, current, "Full", *_generation(current)) == "Accepted"
    for delay in (0.0, 0.005, 0.01, 0.02, 0.04):
        new = current + 1
        with station(csms, tmp_path) as st:
            boots += 1
            booted(csms, boots)
            # What the last kill left, read back over OCPP.
            assert list_version(csms) == current
            payload = {
                "listVersion": new,
                "updateType": "Full",
                "localAuthorizationList": _generation(new),
            }

            def send(payload: dict[str, Any] = payload) -> None:
                # CsmsError: the station was gone before the call could be sent.
                with contextlib.suppress(CsmsError):
                    call(csms, CP, "SendLocalList", payload, timeout=2)

            sender = threading.Thread(target=send)
            sender.start()
            time.sleep(delay)
            st.kill()
            sender.join(timeout=20)
        version, tags = _stored_list(db)
        assert (version, tags) in [
            (current, {e["idTag"] for e in _generation(current)}),
            (new, {e["idTag"] for e in _generation(new)}),
        ], (delay, version, sorted(tags))
        current = version
    with station(csms, tmp_path):
        boots += 1
        booted(csms, boots)
        assert list_version(csms) == current
        assert send_list(csms, current + 1, "Full", *_generation(current + 1)) == "Accepted"
        assert list_version(csms) == current + 1
    assert _stored_list(db) == (current + 1, {e["idTag"] for e in _generation(current + 1)})
