"""The Local Authorization List and the Authorization Cache (OCPP 1.6 §3.5, §5.4,
§5.10, §5.15): the SendLocalList rules, versions, limits, the cache's eviction,
persistence, the authorization steps' policy table, and a real kill -9."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from evse import auth as evse_auth
from evse.auth import AuthChain, AuthResult, AuthStatus
from evse.store import Store
from ocpp16 import idtag
from ocpp16.config import KEYS, OCPP, Configuration
from ocpp16.errors import OcppError
from ocpp16.local_auth import (
    AUTHORIZATION_CACHE_SIZE,
    LOCAL_AUTH_LIST_MAX_LENGTH,
    SCHEMA_VERSION,
    SEND_LOCAL_LIST_MAX_LENGTH,
    AuthorizationData,
    AuthorizationStatus,
    AuthSettings,
    CacheStep,
    ClearCacheStatus,
    IdTagInfo,
    ListState,
    LocalAnswer,
    LocalAuth,
    LocalAuthError,
    LocalListStep,
    UpdateStatus,
    UpdateType,
    choose_eviction,
    conflicts,
    decide,
    normalize_id_tag,
    plan_list_update,
)
from ocpp16.queue import TransactionQueue
from tests import local_list_crash_child as child

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
A = AuthorizationStatus
FULL, DIFF = UpdateType.FULL, UpdateType.DIFFERENTIAL
ACCEPTED, FAILED = UpdateStatus.ACCEPTED, UpdateStatus.FAILED
MISMATCH, NOT_SUPPORTED = UpdateStatus.VERSION_MISMATCH, UpdateStatus.NOT_SUPPORTED


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def info(
    status: AuthorizationStatus = A.ACCEPTED,
    expiry: datetime | None = None,
    parent: str | None = None,
) -> IdTagInfo:
    return IdTagInfo(status, expiry, parent)


def entry(
    tag: str,
    status: AuthorizationStatus = A.ACCEPTED,
    *,
    expiry: datetime | None = None,
    parent: str | None = None,
) -> AuthorizationData:
    return AuthorizationData(tag, info(status, expiry, parent))


def delete(tag: str) -> AuthorizationData:
    return AuthorizationData(tag)


def tags(prefix: str, n: int, start: int = 0) -> list[AuthorizationData]:
    return [entry(f"{prefix}{i:02d}") for i in range(start, start + n)]


class Keys:
    """The §3.5 keys, changeable between calls (everything reads them at each use)."""

    def __init__(self) -> None:
        self.value = AuthSettings()

    def set(self, **changes: bool) -> None:
        self.value = dataclasses.replace(self.value, **changes)

    def __call__(self) -> AuthSettings:
        return self.value


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "station.db"


@pytest.fixture
def keys() -> Keys:
    return Keys()


@pytest.fixture
def auth(db: Path, keys: Keys) -> Iterator[LocalAuth]:
    a = LocalAuth.open(db, settings=keys)
    yield a
    a.close()


def state(auth: LocalAuth) -> tuple[int, dict[str, IdTagInfo]]:
    return auth.get_local_list_version(), dict(auth.list_entries())


def on_disk(db: Path) -> tuple[int, dict[str, IdTagInfo], list[tuple[str, IdTagInfo]]]:
    """What a fresh open of the file reads: list version, list, cache (oldest first)."""
    with LocalAuth.open(db) as fresh:
        cache = [(e.id_tag, e.info) for e in fresh.cache_entries()]
        return fresh.get_local_list_version(), dict(fresh.list_entries()), cache


def fill_list(auth: LocalAuth, n: int, *, prefix: str = "L", version: int = 1) -> int:
    """A list of ``n`` entries, sent 10 at a time (a Full, then Differentials); the version."""
    batches = [tags(prefix, min(10, n - i), i) for i in range(0, n, 10)] or [[]]
    assert auth.send_local_list(version, FULL, batches[0]) == ACCEPTED
    for batch in batches[1:]:
        version += 1
        assert auth.send_local_list(version, DIFF, batch) == ACCEPTED
    return version


# -- opening, the file, agreement with evse/ and the configuration ------------------------


def test_open_sets_wal_full_sync_and_shares_the_file_with_the_store_and_the_queue(
    db: Path,
) -> None:
    with Store.open(db) as store, TransactionQueue.open(db) as queue, LocalAuth.open(db) as auth:
        assert auth.schema_version == SCHEMA_VERSION == 1
        assert store.schema_version >= 1 and queue.schema_version >= 1
        assert auth.send_local_list(1, FULL, [entry("A")]) == ACCEPTED
        assert auth.update_cache("B", info(), T0)
        store.set_setting("x", "y")
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"ocpp_local_list", "ocpp_auth_cache", "ocpp_auth_meta", "settings"} <= names
        # The tables hold what was committed; user_version stays the store's.
        assert conn.execute("SELECT id_tag, status FROM ocpp_local_list").fetchall() == [
            ("A", "Accepted")
        ]
    finally:
        conn.close()
    assert on_disk(db)[:2] == (1, {"A": info()})


def test_open_refuses_what_is_not_a_usable_file(tmp_path: Path) -> None:
    with pytest.raises(LocalAuthError, match="cannot enable WAL"):
        LocalAuth.open(":memory:")
    with pytest.raises(LocalAuthError, match="does not exist"):
        LocalAuth.open(tmp_path / "missing" / "station.db")
    with pytest.raises(LocalAuthError, match="is a directory"):
        LocalAuth.open(tmp_path)
    with pytest.raises(ValueError, match="cache_size"):
        LocalAuth.open(tmp_path / "x.db", cache_size=0)
    assert issubclass(LocalAuthError, OcppError)


def test_a_newer_schema_is_refused(db: Path) -> None:
    LocalAuth.open(db).close()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("UPDATE ocpp_auth_meta SET value = 99 WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(LocalAuthError, match="newer than this firmware"):
        LocalAuth.open(db)


def test_a_closed_object_refuses_reads_and_answers_failed_and_rejected(db: Path) -> None:
    auth = LocalAuth.open(db)
    auth.close()
    auth.close()  # harmless
    with pytest.raises(LocalAuthError, match="closed"):
        auth.get_local_list_version()
    with pytest.raises(LocalAuthError, match="closed"):
        auth.lookup("A", T0)
    with pytest.raises(LocalAuthError, match="closed"):
        auth.update_cache("A", info(), T0)
    # The OCPP answers for "could not store": Failed (§6.42), Rejected (§6.12).
    assert auth.send_local_list(1, FULL, [entry("A")]) == FAILED
    assert auth.clear_cache() == ClearCacheStatus.REJECTED


def test_one_normalization_rule_for_both_sides() -> None:
    """ocpp16.idtag holds the one rule; evse.auth and this module re-export it."""
    assert normalize_id_tag is evse_auth.normalize_id_tag is idtag.normalize_id_tag
    assert evse_auth.ID_TAG_MAX_LENGTH == idtag.ID_TAG_MAX_LENGTH == 20
    for raw in ["", "  ", "x" * 21, "ß", "a\tb", 7]:
        with pytest.raises(ValueError, match="id tag"):
            normalize_id_tag(raw)  # type: ignore[arg-type]
    assert normalize_id_tag(" 04a2b3c4 ") == "04A2B3C4"
    assert idtag.same_id_tag("abc", " ABC")
    assert not idtag.same_id_tag("abc", None)
    assert not idtag.same_id_tag("ß", "ß")


def test_constants_and_defaults_agree_with_the_configuration_keys(tmp_path: Path) -> None:
    defaults = {k.name: k.default for k in KEYS}
    assert int(defaults["LocalAuthListMaxLength"]) == LOCAL_AUTH_LIST_MAX_LENGTH == 50
    assert int(defaults["SendLocalListMaxLength"]) == SEND_LOCAL_LIST_MAX_LENGTH == 10
    assert AUTHORIZATION_CACHE_SIZE == 20
    assert {s.value for s in AuthorizationStatus} == {s.value for s in AuthStatus}
    with Store.open(tmp_path / "c.db") as store:
        config = Configuration(store)
        # The station's defaults (spec §2) are AuthSettings' defaults.
        assert AuthSettings.from_keys(config.get_bool) == AuthSettings()
        assert config.change("LocalAuthListEnabled", "false", source=OCPP).status == "Accepted"
        assert config.change("AllowOfflineTxForUnknownId", "true", source=OCPP).status == (
            "Accepted"
        )
        assert AuthSettings.from_keys(config.get_bool) == AuthSettings(
            local_auth_list_enabled=False, allow_offline_tx_for_unknown_id=True
        )


def test_id_tag_info_json_round_trip_and_refusals() -> None:
    plus2 = timezone(timedelta(hours=2))
    parsed = IdTagInfo.from_json(
        {"status": "Accepted", "expiryDate": "2026-06-01T14:00:00+02:00", "parentIdTag": "grp"}
    )
    assert parsed == IdTagInfo(A.ACCEPTED, datetime(2026, 6, 1, 14, tzinfo=plus2), "GRP")
    assert parsed.to_json() == {
        "status": "Accepted",
        "expiryDate": "2026-06-01T12:00:00Z",
        "parentIdTag": "GRP",
    }
    assert IdTagInfo.from_json(parsed.to_json()) == parsed
    assert AuthorizationData.from_json({"idTag": "abc"}) == AuthorizationData("ABC")
    assert AuthorizationData.from_json(
        {"idTag": "abc", "idTagInfo": {"status": "Blocked"}}
    ).to_json() == {"idTag": "ABC", "idTagInfo": {"status": "Blocked"}}
    bad_infos: list[dict[str, Any]] = [
        {},
        {"status": "Maybe"},
        {"status": "Accepted", "expiryDate": "2026-06-01T12:00:00"},  # no zone
        {"status": "Accepted", "expiryDate": 5},
        {"status": "Accepted", "parentIdTag": "x" * 21},
        {"status": "Accepted", "colour": "red"},
    ]
    for bad in bad_infos:
        with pytest.raises(ValueError):  # noqa: PT011 -- each names its own field
            IdTagInfo.from_json(bad)
    with pytest.raises(ValueError, match="time zone"):
        IdTagInfo(A.ACCEPTED, datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="printable ASCII"):
        AuthorizationData("kärtchen")


# -- SendLocalList and GetLocalListVersion (§5.10, §5.15) ---------------------------------


def test_a_new_list_is_empty_at_version_0(auth: LocalAuth) -> None:
    assert state(auth) == (0, {})


def test_full_replaces_the_whole_list(auth: LocalAuth, db: Path) -> None:
    assert auth.send_local_list(3, FULL, [entry("A"), entry("B", A.BLOCKED)]) == ACCEPTED
    assert state(auth) == (3, {"A": info(), "B": info(A.BLOCKED)})
    # Any version: §5.15's version rule is for Differential updates only.
    assert auth.send_local_list(2, FULL, [entry("C", parent="P")]) == ACCEPTED
    assert state(auth) == (2, {"C": info(parent="P")})
    assert on_disk(db)[:2] == (2, {"C": info(parent="P")})


def test_full_without_entries_empties_the_list_and_the_version_reads_0(auth: LocalAuth) -> None:
    fill_list(auth, 4, version=5)
    assert auth.send_local_list(9, FULL, []) == ACCEPTED
    # §5.10: "a version number of 0 (zero) SHALL be used to indicate that the
    # local authorization list is empty".
    assert state(auth) == (0, {})
    assert auth.send_local_list(0, FULL) == ACCEPTED
    assert state(auth) == (0, {})


def test_ctt_tc_042_2_a_full_update_without_a_list_reads_back_as_version_0(
    auth: LocalAuth,
) -> None:
    # OCPP 1.6 CTT TC_042_2_CS: SendLocalList Full, listVersion 1, list omitted ->
    # Accepted; GetLocalListVersion -> 0. (TC_042_1_CS, the list disabled: -1,
    # is in test_the_list_disabled_answers_not_supported_and_version_minus_1.)
    assert auth.send_local_list_payload({"listVersion": 1, "updateType": "Full"}) == ACCEPTED
    assert auth.get_local_list_version() == 0


@pytest.mark.parametrize("version", [0, -1, -7])
def test_full_with_entries_needs_a_version_above_0(auth: LocalAuth, version: int) -> None:
    fill_list(auth, 2, version=4)
    before = state(auth)
    assert auth.send_local_list(version, FULL, [entry("Z")]) == FAILED
    assert state(auth) == before


def test_full_with_an_entry_without_id_tag_info_fails(auth: LocalAuth, db: Path) -> None:
    fill_list(auth, 3, version=2)
    before = state(auth)
    assert auth.send_local_list(5, FULL, [entry("A"), delete("B")]) == FAILED
    assert state(auth) == before
    assert on_disk(db)[:2] == before


def test_differential_adds_updates_and_deletes(auth: LocalAuth, db: Path) -> None:
    assert auth.send_local_list(1, FULL, [entry("A"), entry("B"), entry("C")]) == ACCEPTED
    update = [entry("b", A.BLOCKED, parent="G"), delete("c"), entry("D"), delete("unknown")]
    assert auth.send_local_list(2, DIFF, update) == ACCEPTED
    expected = {"A": info(), "B": info(A.BLOCKED, parent="G"), "D": info()}
    assert state(auth) == (2, expected)
    assert on_disk(db)[:2] == (2, expected)


@pytest.mark.parametrize("version", [5, 4, 0, -1])
def test_differential_not_above_the_current_version_is_a_mismatch(
    auth: LocalAuth, db: Path, version: int
) -> None:
    assert auth.send_local_list(5, FULL, [entry("A")]) == ACCEPTED
    assert auth.send_local_list(version, DIFF, [entry("B")]) == MISMATCH
    assert auth.send_local_list(version, DIFF, []) == MISMATCH
    assert state(auth) == (5, {"A": info()})
    assert on_disk(db)[:2] == (5, {"A": info()})
    assert auth.send_local_list(6, DIFF, [entry("B")]) == ACCEPTED


def test_differential_on_an_empty_list_compares_with_version_0(auth: LocalAuth) -> None:
    assert auth.send_local_list(0, DIFF, [entry("A")]) == MISMATCH
    assert auth.send_local_list(1, DIFF, [entry("A")]) == ACCEPTED
    assert state(auth) == (1, {"A": info()})


def test_differential_without_entries_keeps_the_entries_and_takes_the_version(
    auth: LocalAuth,
) -> None:
    assert auth.send_local_list(2, FULL, [entry("A")]) == ACCEPTED
    # "no effect on the list"; listVersion is the version "after the update".
    assert auth.send_local_list(7, DIFF, []) == ACCEPTED
    assert state(auth) == (7, {"A": info()})


def test_deleting_the_last_entry_leaves_an_empty_list_at_version_0(auth: LocalAuth) -> None:
    assert auth.send_local_list(2, FULL, [entry("A")]) == ACCEPTED
    assert auth.send_local_list(3, DIFF, [delete("a")]) == ACCEPTED
    assert state(auth) == (0, {})


@pytest.mark.parametrize("update_type", [FULL, DIFF])
def test_more_than_10_entries_in_one_message_fail_and_change_nothing(
    auth: LocalAuth, db: Path, update_type: UpdateType
) -> None:
    fill_list(auth, 5, version=3)
    before = state(auth)
    assert auth.send_local_list(10, update_type, tags("N", 11)) == FAILED
    assert state(auth) == before
    assert on_disk(db)[:2] == before
    # Exactly SendLocalListMaxLength is fine.
    assert auth.send_local_list(10, update_type, tags("N", 10)) == ACCEPTED


def test_a_list_above_50_fails_and_changes_nothing(auth: LocalAuth, db: Path) -> None:
    version = fill_list(auth, 50)
    assert version == 5
    before = state(auth)
    assert len(before[1]) == LOCAL_AUTH_LIST_MAX_LENGTH
    assert auth.send_local_list(6, DIFF, [entry("ONE-MORE")]) == FAILED
    assert auth.send_local_list(6, DIFF, [delete("L00"), *tags("X", 2)]) == FAILED
    assert state(auth) == before
    assert on_disk(db)[:2] == before
    # Staying at 50 (one out, one in, one changed) is fine.
    update = [delete("L00"), entry("X00"), entry("L01", A.BLOCKED)]
    assert auth.send_local_list(6, DIFF, update) == ACCEPTED
    version, entries = state(auth)
    assert version == 6 and len(entries) == 50
    assert "L00" not in entries and entries["X00"] == info()
    assert entries["L01"] == info(A.BLOCKED)


def test_an_id_given_twice_fails_whatever_its_case(auth: LocalAuth) -> None:
    fill_list(auth, 2)
    before = state(auth)
    assert auth.send_local_list(9, FULL, [entry("abc"), entry("ABC ")]) == FAILED
    assert auth.send_local_list(9, DIFF, [entry("abc"), delete("ABC")]) == FAILED
    assert state(auth) == before


def test_the_list_disabled_answers_not_supported_and_version_minus_1(
    auth: LocalAuth, keys: Keys, db: Path
) -> None:
    assert auth.send_local_list(4, FULL, [entry("A")]) == ACCEPTED
    keys.set(local_auth_list_enabled=False)
    assert auth.send_local_list(5, FULL, [entry("B")]) == NOT_SUPPORTED
    assert auth.send_local_list(5, DIFF, [entry("B")]) == NOT_SUPPORTED
    assert auth.send_local_list_payload({"listVersion": 5, "updateType": "Full"}) == NOT_SUPPORTED
    # §5.10: -1, "does not support Local Authorization Lists".
    assert auth.get_local_list_version() == -1
    assert auth.lookup("A", T0) is None
    keys.set(local_auth_list_enabled=True)
    assert state(auth) == (4, {"A": info()})
    assert on_disk(db)[:2] == (4, {"A": info()})


def test_the_json_payload_path(auth: LocalAuth) -> None:
    payload = {
        "listVersion": 3,
        "updateType": "Full",
        "localAuthorizationList": [
            {"idTag": "a", "idTagInfo": {"status": "Accepted", "parentIdTag": "p"}},
            {"idTag": "b", "idTagInfo": {"status": "Expired"}},
        ],
    }
    assert auth.send_local_list_payload(payload) == ACCEPTED
    assert state(auth) == (3, {"A": info(parent="P"), "B": info(A.EXPIRED)})
    before = state(auth)
    bad_payloads: list[dict[str, Any]] = [
        {"listVersion": 4, "updateType": "Partial"},
        {"listVersion": 4, "updateType": "Differential", "localAuthorizationList": {}},
        {"updateType": "Differential"},
        {"listVersion": "4", "updateType": "Differential"},
        {"listVersion": True, "updateType": "Differential"},
        {"listVersion": 2**63, "updateType": "Differential"},
        {
            "listVersion": 4,
            "updateType": "Differential",
            "localAuthorizationList": [{"idTag": "ü"}],
        },
        {
            "listVersion": 4,
            "updateType": "Differential",
            "localAuthorizationList": [
                {"idTag": "c", "idTagInfo": {"status": "Accepted", "expiryDate": "tomorrow"}}
            ],
        },
    ]
    for bad in bad_payloads:
        assert auth.send_local_list_payload(bad) == FAILED, bad
    assert state(auth) == before
    assert auth.send_local_list_payload({"listVersion": 4, "updateType": "Differential"}) == (
        ACCEPTED
    )
    assert auth.send_local_list_payload({"listVersion": 4, "updateType": "Differential"}) == (
        MISMATCH
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(-2, 12),
            st.sampled_from(list(UpdateType)),
            st.lists(
                st.tuples(st.sampled_from("abcdefgh"), st.none() | st.sampled_from(list(A))),
                max_size=4,
            ),
        ),
        max_size=12,
    )
)
def test_every_update_is_all_or_nothing_and_keeps_the_limits(
    updates: list[tuple[int, UpdateType, list[tuple[str, AuthorizationStatus | None]]]],
) -> None:
    current = ListState()
    for version, update_type, items in updates:
        entries = [
            AuthorizationData(tag, None if status is None else IdTagInfo(status))
            for tag, status in items
        ]
        plan = plan_list_update(
            current, version, update_type, entries, max_length=5, send_max_length=3
        )
        if plan.status is not ACCEPTED:
            assert plan.state is current and plan.reason
        else:
            assert len(plan.state.entries) <= 5 and len(entries) <= 3
            assert plan.state.version == (version if plan.state.entries else 0)
            if update_type is DIFF:
                assert version > current.version
            else:
                assert dict(plan.state.entries) == {e.id_tag: e.id_tag_info for e in entries}
            current = plan.state


# -- the cache (§3.5.1, §5.4) ---------------------------------------------------------------


def test_every_answer_is_cached_valid_or_not(auth: LocalAuth) -> None:
    for i, status in enumerate(AuthorizationStatus):
        assert auth.update_cache(f"t{i}", info(status, parent="grp"), at(i))
    assert [(e.id_tag, e.info.status) for e in auth.cache_entries()] == [
        (f"T{i}", status) for i, status in enumerate(AuthorizationStatus)
    ]
    # A new answer for a cached id replaces it.
    assert auth.update_cache("T1", info(A.ACCEPTED), at(10))
    assert auth.cache_entry("t1") == info(A.ACCEPTED)
    assert len(auth.cache_entries()) == len(AuthorizationStatus)


def test_a_full_cache_gives_up_a_not_valid_entry_first_the_least_recently_updated(
    auth: LocalAuth,
) -> None:
    for i in range(20):
        status = A.BLOCKED if i in (4, 9) else A.ACCEPTED
        assert auth.update_cache(f"V{i:02d}", info(status), at(i))
    assert auth.update_cache("NEW1", info(), at(30))
    ids = [e.id_tag for e in auth.cache_entries()]
    assert len(ids) == 20 and "V04" not in ids and "V09" in ids
    assert auth.update_cache("NEW2", info(), at(31))
    ids = [e.id_tag for e in auth.cache_entries()]
    assert "V09" not in ids and "V00" in ids
    # No not-valid entry left: the least recently updated valid one goes.
    assert auth.update_cache("NEW3", info(A.INVALID), at(32))
    ids = [e.id_tag for e in auth.cache_entries()]
    assert "V00" not in ids and ids[0] == "V01" and ids[-1] == "NEW3"
    # And the not-valid newcomer is the next to give way.
    assert auth.update_cache("NEW4", info(), at(33))
    assert "NEW3" not in [e.id_tag for e in auth.cache_entries()]


def test_an_expired_entry_counts_as_not_valid_for_eviction(auth: LocalAuth) -> None:
    for i in range(20):
        expiry = at(100) if i == 7 else None
        assert auth.update_cache(f"V{i:02d}", info(expiry=expiry), at(i))
    assert auth.update_cache("NEW", info(), at(99))  # V07 still valid: V00 goes
    ids = [e.id_tag for e in auth.cache_entries()]
    assert "V00" not in ids and "V07" in ids
    assert auth.update_cache("NEW2", info(), at(100))  # V07 expired at 100: it goes
    assert "V07" not in [e.id_tag for e in auth.cache_entries()]


def test_oldest_means_least_recently_updated_not_earliest_timestamp(auth: LocalAuth) -> None:
    for i in range(20):
        assert auth.update_cache(f"V{i:02d}", info(), at(i))
    # V00 is answered again, and the wall clock has been set back meanwhile.
    assert auth.update_cache("V00", info(), at(-3600))
    assert auth.update_cache("NEW", info(), at(-3599))
    ids = [e.id_tag for e in auth.cache_entries()]
    assert "V00" in ids and "V01" not in ids
    assert ids[-2:] == ["V00", "NEW"]


def test_choose_eviction_on_nothing_and_on_order() -> None:
    assert choose_eviction([], T0) is None


def test_list_ids_are_never_cached_and_leave_the_cache_when_listed(
    auth: LocalAuth, keys: Keys, db: Path
) -> None:
    assert auth.send_local_list(1, FULL, [entry("LISTED")]) == ACCEPTED
    assert not auth.update_cache("listed", info(A.BLOCKED), T0)
    assert auth.cache_entries() == []
    # Not while the list is disabled either: the id is still known in the list.
    keys.set(local_auth_list_enabled=False)
    assert not auth.update_cache("LISTED", info(), T0)
    keys.set(local_auth_list_enabled=True)
    assert auth.update_cache("C1", info(), T0)
    assert auth.update_cache("C2", info(), T0)
    assert auth.send_local_list(2, DIFF, [entry("c1", A.BLOCKED)]) == ACCEPTED
    assert [e.id_tag for e in auth.cache_entries()] == ["C2"]
    assert on_disk(db)[2] == [("C2", info())]
    found = auth.lookup("C1", T0)
    assert found is not None and (found.source, found.status) == ("local list", A.BLOCKED)


def test_the_cache_disabled_is_neither_read_nor_written(
    auth: LocalAuth, keys: Keys, db: Path
) -> None:
    assert auth.update_cache("OLD", info(parent="G"), T0)
    keys.set(authorization_cache_enabled=False)
    assert not auth.update_cache("NEW", info(), T0)
    assert auth.lookup("OLD", T0) is None
    assert auth.parent_of("OLD") is None
    assert [e.id_tag for e in auth.cache_entries()] == ["OLD"]  # kept on disk
    assert on_disk(db)[2] == [("OLD", info(parent="G"))]
    keys.set(authorization_cache_enabled=True)
    found = auth.lookup("old", T0)
    assert found is not None and found.source == "cache"


def test_clear_cache_empties_it_for_good(auth: LocalAuth, keys: Keys, db: Path) -> None:
    assert auth.send_local_list(1, FULL, [entry("L")]) == ACCEPTED
    for i in range(3):
        assert auth.update_cache(f"C{i}", info(), at(i))
    status = auth.clear_cache()
    assert status is ClearCacheStatus.ACCEPTED
    assert json.dumps({"status": status}) == '{"status": "Accepted"}'  # the OCPP text
    assert auth.cache_entries() == []
    assert on_disk(db) == (1, {"L": info()}, [])  # the list is untouched
    # Disabled: still cleared and Accepted (§5.4, see the module docstring).
    assert auth.update_cache("C9", info(), T0)
    keys.set(authorization_cache_enabled=False)
    assert auth.clear_cache() == ClearCacheStatus.ACCEPTED
    keys.set(authorization_cache_enabled=True)
    assert auth.cache_entries() == []
    assert on_disk(db)[2] == []


def test_list_and_cache_survive_a_reopen(db: Path) -> None:
    with LocalAuth.open(db) as auth:
        fill_list(auth, 23, version=7)
        assert (
            auth.send_local_list(20, DIFF, [entry("L05", A.BLOCKED, expiry=at(60), parent="G1")])
            == ACCEPTED
        )
        for i in range(22):  # C00 and C03 (Expired) give way to C20 and C21
            status = A.ACCEPTED if i % 3 else A.EXPIRED
            assert auth.update_cache(f"C{i:02d}", info(status, at(3600 + i), f"P{i}"), at(i))
        version, entries = state(auth)
        cache = [(e.id_tag, e.info, e.seq) for e in auth.cache_entries()]
    assert version == 20 and len(entries) == 23 and len(cache) == 20
    with LocalAuth.open(db) as again:
        assert state(again) == (version, entries)
        assert [(e.id_tag, e.info, e.seq) for e in again.cache_entries()] == cache
        assert again.list_entry("l05") == info(A.BLOCKED, at(60), "G1")
        # Eviction order survives too: the next newcomer evicts the oldest not-valid.
        assert again.update_cache("NEW", info(), at(100))
        gone = {c[0] for c in cache} - {e.id_tag for e in again.cache_entries()}
        assert gone == {"C06"}


def test_writers_in_several_threads_leave_memory_and_disk_alike(auth: LocalAuth, db: Path) -> None:
    def cache_writer(n: int) -> None:
        for i in range(40):
            auth.update_cache(f"W{n}-{i}", info(A.ACCEPTED if i % 2 else A.BLOCKED), at(i))

    def list_writer() -> None:
        for version in range(1, 30):
            auth.send_local_list(version, FULL, tags(f"V{version}-", 3))

    threads = [threading.Thread(target=cache_writer, args=(n,)) for n in range(3)]
    threads.append(threading.Thread(target=list_writer))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    memory = (
        auth.get_local_list_version(),
        dict(auth.list_entries()),
        [(e.id_tag, e.info) for e in auth.cache_entries()],
    )
    assert memory == on_disk(db)
    assert memory[0] == 29 and len(memory[2]) == 20


# -- lookups: expiry, case, parents, priority, conflicts -------------------------------------


def test_an_entry_past_its_expiry_reads_as_expired(auth: LocalAuth) -> None:
    assert auth.send_local_list(1, FULL, [entry("L", expiry=at(10))]) == ACCEPTED
    assert auth.update_cache("C", info(expiry=at(10)), T0)
    assert auth.update_cache("B", info(A.BLOCKED, expiry=at(10)), T0)
    for tag in ("L", "C"):
        before, exactly, after = (auth.lookup(tag, at(s)) for s in (9.999, 10, 11))
        assert before is not None and before.status is A.ACCEPTED
        # "after which the token must be considered invalid": from the expiry on,
        # as evse.auth.is_expired.
        assert exactly is not None and exactly.status is A.EXPIRED
        assert after is not None and after.status is A.EXPIRED
        assert after.info.status is A.ACCEPTED  # stored as received
        assert evse_auth.is_expired(at(10), at(10))
    blocked = auth.lookup("B", at(11))
    assert blocked is not None and blocked.status is A.BLOCKED


def test_lookups_are_case_insensitive(auth: LocalAuth) -> None:
    assert auth.send_local_list(1, FULL, [entry("04a2B3c4", parent="fleet-1")]) == ACCEPTED
    assert auth.update_cache(" deadBEEF ", info(parent="Fleet-2"), T0)
    for tag in ("04A2B3C4", "04a2b3c4", " 04a2B3C4 "):
        found = auth.lookup(tag, T0)
        assert found is not None and found.id_tag == "04A2B3C4" and found.source == "local list"
        assert auth.list_entry(tag) == info(parent="FLEET-1")
        assert auth.parent_of(tag) == "FLEET-1"
    assert auth.parent_of("DEADbeef") == "FLEET-2"
    assert auth.cache_entry("deadbeef") == info(parent="fleet-2")
    assert auth.lookup("not a tag because it is far too long", T0) is None
    assert auth.lookup("", T0) is None
    assert auth.parent_of("") is None


def test_parent_of_reads_the_list_first_then_the_cache_and_honours_the_keys(
    auth: LocalAuth, keys: Keys
) -> None:
    assert auth.send_local_list(1, FULL, [entry("L", A.BLOCKED, parent="PL"), entry("N")]) == (
        ACCEPTED
    )
    assert auth.update_cache("C", info(A.EXPIRED, parent="PC"), T0)
    assert auth.parent_of("L") == "PL"  # whatever the status
    assert auth.parent_of("C") == "PC"
    assert auth.parent_of("N") is None  # listed without a parent
    assert auth.parent_of("unknown") is None
    keys.set(local_auth_list_enabled=False, authorization_cache_enabled=False)
    assert auth.parent_of("L") is None and auth.parent_of("C") is None


CONFLICTS = [
    # (list entry, central answer, conflict?)
    (info(), info(), False),
    (info(parent="G"), info(parent="g"), False),
    (info(), info(A.CONCURRENT_TX), False),  # both valid (§3.5.2)
    (info(expiry=at(3600)), info(expiry=at(60)), False),  # expiry alone
    (info(expiry=at(-1)), info(A.EXPIRED), False),  # the list's entry is expired by now
    (info(), info(A.BLOCKED), True),
    (info(), info(A.INVALID), True),
    (info(), info(A.EXPIRED), True),
    (info(A.BLOCKED), info(), True),
    (info(A.BLOCKED), info(A.INVALID), True),
    (info(A.BLOCKED), info(A.BLOCKED, parent="X"), False),
    (info(expiry=at(-1)), info(), True),
    (info(parent="G1"), info(parent="G2"), True),
    (info(parent="G1"), info(), True),
]


@pytest.mark.parametrize(("listed", "central", "conflict"), CONFLICTS)
def test_conflicts(listed: IdTagInfo, central: IdTagInfo, conflict: bool) -> None:
    assert conflicts(listed, central, T0) is conflict


def test_list_conflict_looks_up_the_enabled_list(auth: LocalAuth, keys: Keys) -> None:
    assert auth.send_local_list(1, FULL, [entry("A")]) == ACCEPTED
    assert auth.list_conflict("a", info(A.BLOCKED), T0)
    assert not auth.list_conflict("a", info(), T0)
    assert not auth.list_conflict("unlisted", info(A.BLOCKED), T0)
    keys.set(local_auth_list_enabled=False)
    assert not auth.list_conflict("a", info(A.BLOCKED), T0)


# -- the authorization steps (§3.5) -------------------------------------------------------


def to_auth_result(answer: LocalAnswer) -> AuthResult:
    """The wiring between ocpp16's answer and evse's result type."""
    return AuthResult(
        answer.id_tag,
        AuthStatus(answer.status),
        answer.source,
        parent_id_tag=answer.parent_id_tag,
        expiry=answer.expiry,
    )


class Link:
    def __init__(self) -> None:
        self.online = True

    def __call__(self) -> bool:
        return self.online


#: What the central system answers in these tests (any status would do: the
#: assertions name the step that answered).
CENTRAL = AuthStatus.ACCEPTED


class Central:
    """The online Authorize step: answers while online, no opinion offline."""

    name = "online"

    def __init__(self, link: Link) -> None:
        self.link = link
        self.asked: list[str] = []

    async def authorize(self, id_tag: str, now: datetime) -> AuthResult | None:
        await trio.lowlevel.checkpoint()
        if not self.link.online:
            return None
        self.asked.append(id_tag)
        return AuthResult(id_tag, CENTRAL, self.name)


class UnknownOffline:
    """§3.5.4: offline, AllowOfflineTxForUnknownId accepts what no step decided."""

    name = "unknown offline"

    def __init__(self, link: Link, keys: Keys) -> None:
        self.link, self.keys = link, keys

    async def authorize(self, id_tag: str, now: datetime) -> AuthResult | None:
        await trio.lowlevel.checkpoint()
        if self.link.online or not self.keys().allow_offline_tx_for_unknown_id:
            return None
        return AuthResult(id_tag, AuthStatus.ACCEPTED, self.name)


def chain_for(auth: LocalAuth, link: Link, keys: Keys) -> tuple[AuthChain, Central]:
    central = Central(link)
    chain = AuthChain(
        [
            LocalListStep(auth, online=link, result=to_auth_result),
            CacheStep(auth, online=link, result=to_auth_result),
            central,
            UnknownOffline(link, keys),
        ]
    )
    return chain, central


#: The stored entries of the table: (name, IdTagInfo or None for "not stored").
ENTRIES: list[tuple[str, IdTagInfo | None]] = [
    ("accepted", info()),
    ("accepted, expiring later", info(expiry=at(3600))),
    ("accepted, expired by now", info(expiry=at(-1))),
    ("blocked", info(A.BLOCKED)),
    ("expired", info(A.EXPIRED)),
    ("invalid", info(A.INVALID)),
    ("concurrent", info(A.CONCURRENT_TX)),
    ("unknown", None),
]


def expected_answer(
    *,
    online: bool,
    pre_authorize: bool,
    authorize_offline: bool,
    allow_unknown: bool,
    where: str,
    stored: IdTagInfo | None,
) -> tuple[str, AuthStatus]:
    """(the step that answers, its status): OCPP 1.6 §3.5, written out case by case."""
    status_now = None if stored is None else stored.status_at(T0)
    valid = status_now is A.ACCEPTED
    if online:
        if valid and pre_authorize:
            return where, AuthStatus.ACCEPTED  # LocalPreAuthorize: no waiting
        return "online", CENTRAL  # everything else goes to the central system
    if stored is not None and not valid:
        assert status_now is not None
        return where, AuthStatus(status_now)  # §3.5.4: known and not Accepted: refused
    if valid and authorize_offline:
        return where, AuthStatus.ACCEPTED  # LocalAuthorizeOffline
    if allow_unknown:
        return "unknown offline", AuthStatus.ACCEPTED  # AllowOfflineTxForUnknownId
    return "none", AuthStatus.INVALID


@pytest.mark.parametrize("where", ["local list", "cache"])
@pytest.mark.parametrize(("kind", "stored"), ENTRIES, ids=[e[0] for e in ENTRIES])
async def test_the_policy_table(db: Path, where: str, kind: str, stored: IdTagInfo | None) -> None:
    keys, link = Keys(), Link()
    with LocalAuth.open(db, settings=keys) as auth:
        if stored is not None:
            if where == "local list":
                assert auth.send_local_list(1, FULL, [AuthorizationData("tag", stored)]) == (
                    ACCEPTED
                )
            else:
                assert auth.update_cache("tag", stored, at(-10))
        chain, central = chain_for(auth, link, keys)
        # One chain for every combination: the steps read the link and the keys
        # at each call.
        for online, pre, offline, unknown in itertools.product([True, False], repeat=4):
            link.online = online
            keys.set(
                local_pre_authorize=pre,
                local_authorize_offline=offline,
                allow_offline_tx_for_unknown_id=unknown,
            )
            case = f"{where}, {kind}, online={online} LocalPreAuthorize={pre}"
            case += f" LocalAuthorizeOffline={offline} AllowOfflineTxForUnknownId={unknown}"
            central.asked.clear()
            result = await chain.authorize("Tag", T0)
            want = expected_answer(
                online=online,
                pre_authorize=pre,
                authorize_offline=offline,
                allow_unknown=unknown,
                where=where,
                stored=stored,
            )
            assert (result.source, result.status) == want, case
            assert result.failures == (), case
            # Answered locally online: the central system was not even asked.
            assert (central.asked == []) is (result.source != "online"), case
            if result.source == where:
                assert stored is not None
                assert result.expiry == stored.expiry_date
                assert result.id_tag == "Tag"


async def test_answers_carry_the_parent_and_a_disabled_table_has_no_opinion(
    auth: LocalAuth, keys: Keys
) -> None:
    link = Link()
    link.online = False
    keys.set(local_authorize_offline=True)
    assert auth.send_local_list(1, FULL, [entry("L", parent="PL")]) == ACCEPTED
    assert auth.update_cache("C", info(parent="PC", expiry=at(60)), T0)
    chain, _ = chain_for(auth, link, keys)
    listed = await chain.authorize("l", T0)
    assert (listed.source, listed.status, listed.parent_id_tag) == ("local list", "Accepted", "PL")
    cached = await chain.authorize("c", T0)
    assert (cached.source, cached.parent_id_tag, cached.expiry) == ("cache", "PC", at(60))
    keys.set(local_auth_list_enabled=False, authorization_cache_enabled=False)
    for tag in ("L", "C"):
        result = await chain.authorize(tag, T0)
        assert (result.source, result.status) == ("none", AuthStatus.INVALID)


async def test_the_list_has_priority_over_the_cache(auth: LocalAuth, keys: Keys) -> None:
    link = Link()
    link.online = False
    keys.set(local_authorize_offline=True, allow_offline_tx_for_unknown_id=True)
    assert auth.update_cache("X", info(), T0)
    assert auth.send_local_list(1, FULL, [entry("X", A.BLOCKED)]) == ACCEPTED
    chain, _ = chain_for(auth, link, keys)
    result = await chain.authorize("x", T0)
    assert (result.source, result.status) == ("local list", AuthStatus.BLOCKED)


def test_decide_is_the_table() -> None:
    keys = AuthSettings(local_pre_authorize=True, local_authorize_offline=True)
    assert decide(A.ACCEPTED, online=True, settings=keys) is A.ACCEPTED
    assert decide(A.BLOCKED, online=True, settings=keys) is None
    assert decide(A.CONCURRENT_TX, online=False, settings=keys) is A.CONCURRENT_TX
    off = AuthSettings(local_pre_authorize=False, local_authorize_offline=False)
    assert decide(A.ACCEPTED, online=True, settings=off) is None
    assert decide(A.ACCEPTED, online=False, settings=off) is None
    assert decide(A.EXPIRED, online=False, settings=off) is A.EXPIRED


def test_step_names_are_their_sources_and_can_be_changed(auth: LocalAuth) -> None:
    steps = (
        LocalListStep(auth, online=Link(), result=to_auth_result),
        CacheStep(auth, online=Link(), result=to_auth_result),
        CacheStep(auth, online=Link(), result=to_auth_result, name="cache 2"),
    )
    assert [s.name for s in steps] == ["local list", "cache", "cache 2"]
    AuthChain(steps)  # unique names: accepted by the chain


# -- a real kill -9 ---------------------------------------------------------------------------


def _killed_child_run(db: Path, rng: random.Random) -> tuple[int, list[int]]:
    """Run the child, SIGKILL it at a random moment: its start version and the versions
    it reported sent."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(child.__file__)), str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(20.0, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        assert first.startswith("ready "), f"child failed: {first!r} {proc.stderr.read()}"
        lines = [proc.stdout.readline() for _ in range(rng.randint(0, 6))]
        # Somewhere inside a later Full update, or between two of them.
        time.sleep(rng.uniform(0, 0.004))
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read()
        assert proc.wait() == -signal.SIGKILL, proc.stderr.read()
    finally:
        watchdog.cancel()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    # A line cut short by the kill was not printed whole: it does not count.
    whole = [line.rstrip("\n") for line in lines] + rest.split("\n")[:-1]
    assert all(line.startswith("sent ") for line in whole), whole
    return int(first.split()[1]), [int(line.split()[1]) for line in whole]


def _expected(version: int) -> Mapping[str, IdTagInfo]:
    if version == 0:
        return {}
    full: dict[str, IdTagInfo] = {}
    for e in child.full_list(version):
        assert e.id_tag_info is not None
        full[e.id_tag] = e.id_tag_info
    assert len(full) == child.ENTRIES
    return full


@pytest.mark.slow
def test_kill_9_during_full_updates_leaves_the_old_list_or_the_new_one(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    db = tmp_path / "crash.db"  # one file for every run: each starts on the last one's list
    committed_unreported = 0
    for run in range(20):
        start, sent = _killed_child_run(db, rng)
        assert sent == list(range(start + 1, start + 1 + len(sent))), (seed, run)
        last = sent[-1] if sent else start
        with LocalAuth.open(db) as auth:
            version, entries = auth.get_local_list_version(), dict(auth.list_entries())
        # Everything reported is on disk; at most the update in flight at the kill
        # was committed too.
        assert version in (last, last + 1), (seed, run, last, version)
        committed_unreported += version == last + 1
        # Exactly that version's complete list: never a mix of two, never a part.
        assert entries == _expected(version), (seed, run, version)
    print(f"seed {seed}: {committed_unreported} of 20 kills came after an unreported commit")
