"""The Local Authorization List and the Authorization Cache (OCPP 1.6 §3.5).

Theory of operation
-------------------
Two tables of id tags, each entry an IdTagInfo (status, expiryDate,
parentIdTag), kept in the station's one SQLite file in tables of their own
(prefixed ``ocpp_``, schema version in ``ocpp_auth_meta``; ``user_version``
belongs to ``evse.store`` and ``ocpp_meta`` to the message queue):

* the **Local Authorization List** (§3.5.2), written only by the central
  system's SendLocalList (§5.15) and read back by GetLocalListVersion
  (§5.10). At most ``LocalAuthListMaxLength`` (50) entries, at most
  ``SendLocalListMaxLength`` (10) per message (station-spec §1, §2);
* the **Authorization Cache** (§3.5.1): every IdTagInfo the central system
  answers (Authorize.conf, StartTransaction.conf, StopTransaction.conf),
  valid or not, at most 20 entries (station-spec §1); ClearCache (§5.4)
  empties it.

``LocalAuth`` owns both. Every write runs the ``ocpp16.sqlite.SqliteAccess``
discipline of the store and the queue: one connection, one ``BEGIN
IMMEDIATE`` transaction committed (WAL, ``synchronous=FULL``) before the
method returns, the reads that decide the write inside that transaction. A
Full update deletes and re-inserts the whole list and its version in ONE
transaction, so a kill -9 or a power loss leaves the old list or the new one,
never a mix. After the commit the new contents are published as an immutable
in-memory snapshot: reads (``lookup``, ``parent_of``, the chain's steps) never
touch the disk and never wait for a write in another thread, so the
authorization steps are pure lookups on the trio thread. This object must be
the only writer of its tables (one station per data directory).

The writes are synchronous, like ``evse.store`` and the queue; trio code runs
them through ``trio.to_thread.run_sync``. The reads are cheap and safe from
any thread.

Id tags are CiString20Type (§7 IdToken, "case insensitive"): every id tag
and parentIdTag is normalized on the way in with ``ocpp16.idtag.normalize_id_tag``,
the one rule ``evse.auth`` re-exports too. Stored and compared in that form.

Decisions (where OCPP 1.6 leaves room)
--------------------------------------
* **Valid means Accepted.** An entry authorizes only if its status is
  Accepted and its expiryDate is not past (``IdTagInfo.status_at``: an
  Accepted entry at or after its expiry reads as Expired, the chain's own
  rule). ConcurrentTx is not valid here: §3.5.4 says list entries "that have
  a status other than Accepted MUST be rejected" offline, and online the
  central system, which knows whether the other transaction still runs,
  decides. The same rule decides which cache entries are "not valid" for
  eviction.
* **GetLocalListVersion** (§5.10): 0 when the list is empty ("a version
  number of 0 SHALL be used to indicate that the local authorization list
  is empty"), so an update that leaves the list empty (a Full one without
  entries, a Differential one deleting the last entry) stores version 0;
  -1 ("does not support Local Authorization Lists") while
  LocalAuthListEnabled is false, the counterpart of answering SendLocalList
  with NotSupported then: the central system never sees a version it cannot
  update.
* **SendLocalList** (§5.15, §6.41/§6.42), checked in this order, nothing
  changes unless the answer is Accepted: LocalAuthListEnabled false ->
  NotSupported; more than SendLocalListMaxLength entries -> Failed; a
  Differential update whose listVersion is not above the current version ->
  VersionMismatch; an id tag given twice (case-insensitively: "All idTags
  ... MUST be unique") or that is not a valid IdToken, an entry without
  idTagInfo in a Full update ("Required when UpdateType is Full"), a Full
  update with a listVersion below 0, or at 0 with entries (0 means empty,
  -1 unsupported: §5.10) -> Failed; a result above LocalAuthListMaxLength ->
  Failed. A Differential entry without idTagInfo deletes its id (deleting an
  id that is not listed is harmless); a Differential update without entries
  changes no entry but takes the new version (listVersion is "the version
  number of the list after the update has been applied"). A failure to
  write the file is answered Failed ("Failed to update the Local
  Authorization List") and logged.
* **The cache** (§3.5.1): an IdTagInfo received for an id in the local
  list is not cached ("Identifiers known in the Local Authorization List
  SHALL NOT be added to the Authorization Cache", §3.5.3), whether the list
  is enabled or not, and an id that a SendLocalList puts in the list leaves
  the cache in the same transaction: an id is never in both. When a new id
  finds the cache full, one entry makes room: the least recently updated
  entry that is not valid at that moment, else the least recently updated
  valid one. "Least recently updated" is by an update counter, not by the
  wall clock, which the central system may set backwards. An expired entry
  reads as Expired (it is not rewritten: a read never writes). With
  AuthorizationCacheEnabled false the cache is neither read (lookups,
  ``parent_of``, the cache step) nor written (``update_cache``).
* **ClearCache** (§5.4, "Accepted if the Charge Point has executed the
  request, otherwise Rejected"): empties the stored cache and answers
  Accepted even while AuthorizationCacheEnabled is false, since entries kept
  then would come back into use when the key is set to true again, which is
  what the central system asked to prevent; Rejected only when the file
  cannot be written.
* **LocalListConflict** (§3.5.3, §7 ChargePointErrorCode "The authorization
  information received from the Central System is in conflict with the
  LocalAuthorizationList"): ``conflicts`` compares what the two say about
  the id at ``now``: a conflict when one makes it valid and the other not,
  when both refuse with different statuses, or when both make it valid
  under different parentIdTags. Accepted and ConcurrentTx agree (the id is
  valid; ConcurrentTx speaks of a transaction, not of the id); a different
  expiryDate alone is no conflict (the answer to Authorize may carry a
  shorter validity meant for the cache).

The authorization steps (§3.5, keys LocalPreAuthorize, LocalAuthorizeOffline,
AllowOfflineTxForUnknownId, LocalAuthListEnabled, AuthorizationCacheEnabled)
---------------------------------------------------------------------------
``LocalListStep`` and ``CacheStep`` fit ``evse.auth.AuthChain`` (its
``AuthStep`` protocol): put them before the online Authorize step, the list
first (§3.5.3: "Local Authorization List entries as having priority over
Authorization Cache entries"). Each reads ``online()`` and the settings at
the time of the call and decides with ``decide``:

=========  ===================  ===========================================
link       entry (at ``now``)   answer
=========  ===================  ===========================================
online     Accepted             Accepted if LocalPreAuthorize, else none
online     anything else        none: the central system decides (§3.5.1:
                                a NOT-valid entry is checked again online)
offline    Accepted             Accepted if LocalAuthorizeOffline, else none
offline    anything else        that status (Blocked, Expired, Invalid,
                                ConcurrentTx): refused even with
                                AllowOfflineTxForUnknownId, since the id is
                                not unknown (§3.5.4)
=========  ===================  ===========================================

"None" is no opinion: the next step decides (the online Authorize step, or
offline the "unknown id allowed" step, which is where
AllowOfflineTxForUnknownId is applied). A disabled list or cache has no
opinion on anything. ``ocpp16/`` may not import ``evse/``, so the steps do
not build ``evse.auth.AuthResult`` themselves: they hand a ``LocalAnswer``
to the ``result`` function they are given, e.g.::

    def to_auth_result(answer: LocalAnswer) -> AuthResult:
        return AuthResult(answer.id_tag, AuthStatus(answer.status), answer.source,
                          parent_id_tag=answer.parent_id_tag, expiry=answer.expiry)

    chain = AuthChain([LocalListStep(auth, online=..., result=to_auth_result),
                       CacheStep(auth, online=..., result=to_auth_result), online_step])
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, Generic, Self, TypeVar

import trio

from ocpp16.errors import OcppError
from ocpp16.idtag import ID_TAG_MAX_LENGTH, normalize_id_tag
from ocpp16.schemas import format_date_time, parse_date_time
from ocpp16.sqlite import SqliteAccess

log = logging.getLogger(__name__)

_R = TypeVar("_R")

#: LocalAuthListMaxLength (OCPP 1.6 §9.2; station-spec §1, §2).
LOCAL_AUTH_LIST_MAX_LENGTH: Final = 50
#: SendLocalListMaxLength (OCPP 1.6 §9.2; station-spec §1, §2).
SEND_LOCAL_LIST_MAX_LENGTH: Final = 10
#: Entries of the Authorization Cache (station-spec §1, ClearCache row).
AUTHORIZATION_CACHE_SIZE: Final = 20
#: GetLocalListVersion.conf (§5.10): the list is empty.
EMPTY_LIST_VERSION: Final = 0
#: GetLocalListVersion.conf (§5.10): local lists are not supported (here: disabled).
UNSUPPORTED_LIST_VERSION: Final = -1

#: How long a write waits for another connection to the file (the store's, the queue's).
BUSY_TIMEOUT_S: Final = 10.0
_SYNCHRONOUS_FULL: Final = 2
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1

#: Step names, the ``source`` of their answers.
LIST_SOURCE: Final = "local list"
CACHE_SOURCE: Final = "cache"


class LocalAuthError(OcppError):
    """The local list / cache file at ``path`` failed; ``reason`` says how."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class AuthorizationStatus(StrEnum):
    """OCPP 1.6 §7 AuthorizationStatus (the values of ``evse.auth.AuthStatus``)."""

    ACCEPTED = "Accepted"
    BLOCKED = "Blocked"
    EXPIRED = "Expired"
    INVALID = "Invalid"
    CONCURRENT_TX = "ConcurrentTx"


class UpdateType(StrEnum):
    """OCPP 1.6 §7 UpdateType (SendLocalList.req ``updateType``)."""

    DIFFERENTIAL = "Differential"
    FULL = "Full"


class UpdateStatus(StrEnum):
    """OCPP 1.6 §7 UpdateStatus (SendLocalList.conf ``status``)."""

    ACCEPTED = "Accepted"
    FAILED = "Failed"
    NOT_SUPPORTED = "NotSupported"
    VERSION_MISMATCH = "VersionMismatch"


class ClearCacheStatus(StrEnum):
    """OCPP 1.6 §7 ClearCacheStatus (ClearCache.conf ``status``)."""

    ACCEPTED = "Accepted"
    REJECTED = "Rejected"


def _lookup_key(id_tag: str) -> str | None:
    """The key a tag is looked up by, or None if it cannot be a valid tag."""
    try:
        return normalize_id_tag(id_tag)
    except ValueError:
        return None


def _require_aware(value: datetime, what: str) -> None:
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} {value!r} is not a datetime with a time zone")


@dataclass(frozen=True, slots=True)
class IdTagInfo:
    """OCPP 1.6 §7 IdTagInfo: an id tag's status, expiry and parent.

    ``parent_id_tag`` is normalized; ``expiry_date`` must be timezone-aware.
    Construction raises ``ValueError`` for anything else.
    """

    status: AuthorizationStatus
    expiry_date: datetime | None = None
    parent_id_tag: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", AuthorizationStatus(self.status))
        if self.expiry_date is not None:
            _require_aware(self.expiry_date, "expiryDate")
        if self.parent_id_tag is not None:
            object.__setattr__(self, "parent_id_tag", normalize_id_tag(self.parent_id_tag))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> IdTagInfo:
        """From an OCPP ``idTagInfo`` object; ``ValueError`` if it is not one."""
        if not isinstance(data, Mapping):
            raise ValueError(f"idTagInfo {data!r} is not an object")
        unknown = sorted(set(data) - {"status", "expiryDate", "parentIdTag"})
        if unknown:
            raise ValueError(f"idTagInfo has unknown fields: {', '.join(map(str, unknown))}")
        if "status" not in data:
            raise ValueError("idTagInfo has no status")
        expiry = data.get("expiryDate")
        if expiry is not None and not isinstance(expiry, str):
            raise ValueError(f"idTagInfo expiryDate {expiry!r} is not text")
        parent = data.get("parentIdTag")
        return cls(
            AuthorizationStatus(data["status"]),
            None if expiry is None else parse_date_time(expiry),
            parent,
        )

    def to_json(self) -> dict[str, Any]:
        """As an OCPP ``idTagInfo`` object (no null fields)."""
        out: dict[str, Any] = {"status": self.status.value}
        if self.expiry_date is not None:
            out["expiryDate"] = format_date_time(self.expiry_date)
        if self.parent_id_tag is not None:
            out["parentIdTag"] = self.parent_id_tag
        return out

    def status_at(self, now: datetime) -> AuthorizationStatus:
        """The status at ``now``: Accepted at or after the expiryDate reads as Expired.

        IdTagInfo.expiryDate is the "date and time after which the token must be
        considered invalid" (§7); §3.5.1: an expired cache entry "SHALL be changed
        to expired". The same rule as ``evse.auth.is_expired``.
        """
        if (
            self.status is AuthorizationStatus.ACCEPTED
            and self.expiry_date is not None
            and now >= self.expiry_date
        ):
            return AuthorizationStatus.EXPIRED
        return self.status

    def valid_at(self, now: datetime) -> bool:
        """Whether the id authorizes at ``now`` (see "Valid means Accepted")."""
        return self.status_at(now) is AuthorizationStatus.ACCEPTED


@dataclass(frozen=True, slots=True)
class AuthorizationData:
    """OCPP 1.6 §7 AuthorizationData: one entry of SendLocalList.req.

    ``id_tag`` is normalized. ``id_tag_info`` None (only in a Differential
    update) deletes the id from the list.
    """

    id_tag: str
    id_tag_info: IdTagInfo | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "id_tag", normalize_id_tag(self.id_tag))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuthorizationData:
        """From an OCPP ``AuthorizationData`` object; ``ValueError`` if it is not one."""
        if not isinstance(data, Mapping):
            raise ValueError(f"localAuthorizationList entry {data!r} is not an object")
        unknown = sorted(set(data) - {"idTag", "idTagInfo"})
        if unknown:
            raise ValueError(f"entry has unknown fields: {', '.join(map(str, unknown))}")
        if "idTag" not in data:
            raise ValueError("entry has no idTag")
        info = data.get("idTagInfo")
        return cls(data["idTag"], None if info is None else IdTagInfo.from_json(info))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"idTag": self.id_tag}
        if self.id_tag_info is not None:
            out["idTagInfo"] = self.id_tag_info.to_json()
        return out


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """The five keys of OCPP 1.6 §3.5 (§9.1, §9.2), with the station's defaults (spec §2)."""

    local_pre_authorize: bool = True
    local_authorize_offline: bool = False
    #: Applied by the "unknown id allowed offline" step after the local steps,
    #: never by them: a listed or cached id is not unknown (§3.5.4).
    allow_offline_tx_for_unknown_id: bool = False
    local_auth_list_enabled: bool = True
    authorization_cache_enabled: bool = True

    @classmethod
    def from_keys(cls, get_bool: Callable[[str], bool]) -> AuthSettings:
        """Read the keys by OCPP name, e.g. ``AuthSettings.from_keys(config.get_bool)``."""
        return cls(
            local_pre_authorize=get_bool("LocalPreAuthorize"),
            local_authorize_offline=get_bool("LocalAuthorizeOffline"),
            allow_offline_tx_for_unknown_id=get_bool("AllowOfflineTxForUnknownId"),
            local_auth_list_enabled=get_bool("LocalAuthListEnabled"),
            authorization_cache_enabled=get_bool("AuthorizationCacheEnabled"),
        )


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One Authorization Cache entry; ``seq`` orders updates (higher: more recent)."""

    id_tag: str
    info: IdTagInfo
    seq: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Found:
    """An id found by ``LocalAuth.lookup``: where, what is stored, and its status at ``now``."""

    id_tag: str  # normalized
    source: str  # LIST_SOURCE or CACHE_SOURCE
    info: IdTagInfo
    status: AuthorizationStatus


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """A local step's answer: the fields of ``evse.auth.AuthResult``, in ocpp16's types."""

    id_tag: str  # as asked
    status: AuthorizationStatus
    source: str  # the step's name
    parent_id_tag: str | None = None
    expiry: datetime | None = None


# -- pure rules -------------------------------------------------------------------------


def decide(
    status: AuthorizationStatus, *, online: bool, settings: AuthSettings
) -> AuthorizationStatus | None:
    """A local step's answer for an id it holds whose status at ``now`` is ``status``.

    None is no opinion. See the table in the module docstring (OCPP 1.6 §3.5,
    §3.5.1, §3.5.4).
    """
    accepted = status is AuthorizationStatus.ACCEPTED
    if online:
        # LocalPreAuthorize: start "without waiting for an authorization response";
        # anything not Accepted is checked again by the central system.
        return status if accepted and settings.local_pre_authorize else None
    if not accepted:
        # §3.5.4: entries "that have a status other than Accepted ... MUST be
        # rejected", and so must ids "apparently expired due to passage of time".
        return status
    return status if settings.local_authorize_offline else None


def _frozen(entries: dict[str, IdTagInfo]) -> Mapping[str, IdTagInfo]:
    return MappingProxyType(entries)


def _agreement(info: IdTagInfo, now: datetime) -> AuthorizationStatus:
    status = info.status_at(now)
    # §3.5.2 maps Accepted and ConcurrentTx both to "valid".
    return AuthorizationStatus.ACCEPTED if status is AuthorizationStatus.CONCURRENT_TX else status


def conflicts(list_info: IdTagInfo, central_info: IdTagInfo, now: datetime) -> bool:
    """Whether the central system's answer for a listed id conflicts with the list entry.

    The station then reports StatusNotification, connector 0, errorCode
    LocalListConflict (§3.5.3, §7 ChargePointErrorCode). See the module
    docstring for what counts as a conflict.
    """
    _require_aware(now, "now")
    ours, theirs = _agreement(list_info, now), _agreement(central_info, now)
    if ours is not theirs:
        return True
    return ours is AuthorizationStatus.ACCEPTED and (
        list_info.parent_id_tag != central_info.parent_id_tag
    )


@dataclass(frozen=True, slots=True)
class ListState:
    """The whole local list: its version and its entries by normalized id tag."""

    version: int = EMPTY_LIST_VERSION
    entries: Mapping[str, IdTagInfo] = field(default_factory=lambda: _frozen({}))


@dataclass(frozen=True, slots=True)
class ListUpdate:
    """What a SendLocalList does: the answer, the list after it and why (for the log)."""

    status: UpdateStatus
    state: ListState
    reason: str = ""


def plan_list_update(
    current: ListState,
    list_version: int,
    update_type: UpdateType,
    entries: Sequence[AuthorizationData],
    *,
    max_length: int = LOCAL_AUTH_LIST_MAX_LENGTH,
    send_max_length: int = SEND_LOCAL_LIST_MAX_LENGTH,
) -> ListUpdate:
    """SendLocalList's rules (§5.15) on ``current``, without I/O.

    Not Accepted: ``state`` is ``current``. LocalAuthListEnabled is the caller's
    (NotSupported comes before any of this).
    """

    def refuse(status: UpdateStatus, reason: str) -> ListUpdate:
        return ListUpdate(status, current, reason)

    failed = UpdateStatus.FAILED
    if isinstance(list_version, bool) or not isinstance(list_version, int):
        return refuse(failed, f"listVersion {list_version!r} is not an integer")
    if not _INT64_MIN <= list_version <= _INT64_MAX:
        # The schema's "integer" has no bound; SQLite's has.
        return refuse(failed, f"listVersion {list_version} does not fit in 64 bits")
    if len(entries) > send_max_length:
        return refuse(
            failed,
            f"{len(entries)} entries in one message; SendLocalListMaxLength is {send_max_length}",
        )
    if update_type is UpdateType.DIFFERENTIAL and list_version <= current.version:
        return refuse(
            UpdateStatus.VERSION_MISMATCH,
            f"differential listVersion {list_version} is not above the current {current.version}",
        )
    seen: set[str] = set()
    for entry in entries:
        if entry.id_tag in seen:
            return refuse(failed, f"id tag {entry.id_tag!r} is given twice")
        seen.add(entry.id_tag)
    if update_type is UpdateType.FULL:
        missing = next((e.id_tag for e in entries if e.id_tag_info is None), None)
        if missing is not None:
            return refuse(failed, f"id tag {missing!r} has no idTagInfo in a Full update")
        if list_version < 0 or (list_version == EMPTY_LIST_VERSION and entries):
            return refuse(
                failed,
                f"a Full update with entries needs a listVersion above 0, not {list_version}",
            )
        result: dict[str, IdTagInfo] = {}
    else:
        result = dict(current.entries)
    for entry in entries:
        if entry.id_tag_info is None:
            result.pop(entry.id_tag, None)
        else:
            result[entry.id_tag] = entry.id_tag_info
    if len(result) > max_length:
        return refuse(
            failed,
            f"the list would hold {len(result)} entries; LocalAuthListMaxLength is {max_length}",
        )
    # §5.10: version 0 is the empty list.
    version = list_version if result else EMPTY_LIST_VERSION
    return ListUpdate(UpdateStatus.ACCEPTED, ListState(version, _frozen(result)))


def choose_eviction(entries: Iterable[CacheEntry], now: datetime) -> CacheEntry | None:
    """The entry a full cache gives up for a new id (§3.5.1): the least recently
    updated one not valid at ``now``, else the least recently updated one."""
    ordered = sorted(entries, key=lambda entry: entry.seq)
    return next((e for e in ordered if not e.info.valid_at(now)), ordered[0] if ordered else None)


# -- the file ---------------------------------------------------------------------------

_STATUSES: Final = ", ".join(f"'{s.value}'" for s in AuthorizationStatus)
_TEXT_TIME: Final = "LIKE '____-__-__T__:__:__.______Z'"


def _entry_columns() -> str:
    # The CHECKs hold the invariants in the file itself, whoever writes it.
    return f"""
        id_tag        TEXT PRIMARY KEY NOT NULL CHECK (typeof(id_tag) = 'text'
                          AND length(id_tag) BETWEEN 1 AND {ID_TAG_MAX_LENGTH}
                          AND id_tag = upper(trim(id_tag))),
        status        TEXT NOT NULL CHECK (status IN ({_STATUSES})),
        expiry_date   TEXT CHECK (expiry_date IS NULL OR expiry_date {_TEXT_TIME}),
        parent_id_tag TEXT CHECK (parent_id_tag IS NULL OR (typeof(parent_id_tag) = 'text'
                          AND length(parent_id_tag) BETWEEN 1 AND {ID_TAG_MAX_LENGTH}
                          AND parent_id_tag = upper(trim(parent_id_tag))))"""


# Migrations of these tables: MIGRATIONS[n] takes the schema_version row of
# ocpp_auth_meta from n to n + 1, in one transaction. Append only.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # 1: the local list with its version, and the cache.
    (
        f"CREATE TABLE ocpp_local_list ({_entry_columns()})",
        f"""
        CREATE TABLE ocpp_auth_cache ({_entry_columns()},
            updated_seq INTEGER NOT NULL UNIQUE CHECK (typeof(updated_seq) = 'integer'
                            AND updated_seq >= 1),
            updated_at  TEXT NOT NULL CHECK (updated_at {_TEXT_TIME})
        )
        """,
        "INSERT INTO ocpp_auth_meta (key, value) VALUES ('local_list_version', 0)",
    ),
)

#: The schema version of these tables that this code writes and understands.
SCHEMA_VERSION: Final = len(MIGRATIONS)

_Row = tuple[str, str, str | None, str | None]


def _to_text(at: datetime) -> str:
    _require_aware(at, "time")
    return at.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _from_text(text: str) -> datetime:
    at = datetime.fromisoformat(text)
    if at.utcoffset() != timedelta(0):
        raise ValueError(f"stored time {text!r} is not UTC")
    return at.astimezone(UTC)


def _info(row: _Row) -> IdTagInfo:
    return IdTagInfo(
        AuthorizationStatus(row[1]),
        None if row[2] is None else _from_text(row[2]),
        row[3],
    )


def _row(id_tag: str, info: IdTagInfo) -> tuple[str, str, str | None, str | None]:
    expiry = None if info.expiry_date is None else _to_text(info.expiry_date)
    return id_tag, info.status.value, expiry, info.parent_id_tag


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """What the readers see: replaced whole after each commit, never changed."""

    local_list: ListState
    cache: Mapping[str, CacheEntry]


class LocalAuth(SqliteAccess):
    """The local list and the cache in the station's file. Open with ``LocalAuth.open(path)``."""

    def __init__(
        self,
        path: Path,
        connection: sqlite3.Connection,
        settings: Callable[[], AuthSettings],
        *,
        list_max_length: int,
        send_max_length: int,
        cache_size: int,
    ) -> None:
        # Use LocalAuth.open: it sets and verifies the pragmas, migrates and loads.
        self._path = path
        self._conn: sqlite3.Connection | None = connection
        self._lock = threading.Lock()
        self.settings = settings
        self.list_max_length = list_max_length
        self.send_max_length = send_max_length
        self.cache_size = cache_size
        self._snapshot = _Snapshot(ListState(), MappingProxyType({}))
        # Snapshots are published after the commit, outside the write lock: the
        # generation (taken inside the write transaction) keeps a slower thread
        # from publishing an older state over a newer one.
        self._generation = 0
        self._published = 0
        self._publish_lock = threading.Lock()

    # -- opening and closing ------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        settings: Callable[[], AuthSettings] = AuthSettings,
        list_max_length: int = LOCAL_AUTH_LIST_MAX_LENGTH,
        send_max_length: int = SEND_LOCAL_LIST_MAX_LENGTH,
        cache_size: int = AUTHORIZATION_CACHE_SIZE,
    ) -> LocalAuth:
        """Open (or create) the tables in the file at ``path``.

        ``settings`` gives the current values of the §3.5 keys, read at every
        use (e.g. ``lambda: AuthSettings.from_keys(config.get_bool)``). The
        limits are the station's (spec §1); tests may widen them.
        """
        path = Path(path)
        for name, value in (
            ("list_max_length", list_max_length),
            ("send_max_length", send_max_length),
            ("cache_size", cache_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} is {value!r}; it must be a whole number >= 1")
        if not path.parent.is_dir():
            raise LocalAuthError(str(path.parent), "directory does not exist")
        if path.is_dir():
            raise LocalAuthError(str(path), "is a directory, not a database file")
        try:
            conn = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise LocalAuthError(str(path), f"cannot open: {exc}") from exc
        auth = cls(
            path,
            conn,
            settings,
            list_max_length=list_max_length,
            send_max_length=send_max_length,
            cache_size=cache_size,
        )
        try:
            auth._configure()
            auth._migrate()
            with auth._read("load the local list and the cache") as c:
                generation = auth._next_generation()
                local_list, cache = auth._load_list(c), auth._load_cache(c)
            auth._publish(generation, local_list, cache)
        except BaseException:
            conn.close()
            raise
        return auth

    def close(self) -> None:
        """Close the file; later calls raise LocalAuthError. Closing twice is harmless."""
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                with self._translate("close"):
                    conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def schema_version(self) -> int:
        """The version of these tables (``ocpp_auth_meta``), not ``user_version``."""
        with self._read("read the schema version") as conn:
            return self._meta(conn, "schema_version")

    # -- the local list (§3.5.2, §5.10, §5.15) ---------------------------------------------

    def send_local_list(
        self,
        list_version: int,
        update_type: UpdateType,
        entries: Sequence[AuthorizationData] = (),
    ) -> UpdateStatus:
        """SendLocalList (§5.15): apply the update, committed before the answer returns.

        The answer is SendLocalList.conf's status; nothing changes unless it is
        Accepted (rules in the module docstring). ``update_type`` may be the
        OCPP text; any other text is a ``ValueError`` (the schema admits only two).
        """
        if not self.settings().local_auth_list_enabled:
            log.info("SendLocalList answered NotSupported: LocalAuthListEnabled is false")
            return UpdateStatus.NOT_SUPPORTED
        update_type = UpdateType(update_type)
        what = f"apply a {update_type.value} SendLocalList, listVersion {list_version}"
        try:
            with self._write(what) as conn:
                plan = plan_list_update(
                    self._load_list(conn),
                    list_version,
                    update_type,
                    entries,
                    max_length=self.list_max_length,
                    send_max_length=self.send_max_length,
                )
                if plan.status is not UpdateStatus.ACCEPTED:
                    log.warning("SendLocalList answered %s: %s", plan.status.value, plan.reason)
                    return plan.status
                conn.execute("DELETE FROM ocpp_local_list")
                conn.executemany(
                    "INSERT INTO ocpp_local_list (id_tag, status, expiry_date, parent_id_tag)"
                    " VALUES (?, ?, ?, ?)",
                    [_row(tag, info) for tag, info in plan.state.entries.items()],
                )
                self._set_meta(conn, "local_list_version", plan.state.version)
                # §3.5.3: an id in the list is never in the cache too.
                conn.executemany(
                    "DELETE FROM ocpp_auth_cache WHERE id_tag = ?",
                    [(tag,) for tag in plan.state.entries],
                )
                cache = self._load_cache(conn)
                generation = self._next_generation()
        except LocalAuthError:
            log.exception("SendLocalList answered Failed: the update could not be stored")
            return UpdateStatus.FAILED
        self._publish(generation, plan.state, cache)
        log.info(
            "local list: %s update to version %d, %d entries",
            update_type.value,
            plan.state.version,
            len(plan.state.entries),
        )
        return UpdateStatus.ACCEPTED

    def send_local_list_payload(self, payload: Mapping[str, Any]) -> UpdateStatus:
        """``send_local_list`` for a SendLocalList.req payload as received (JSON).

        A payload that cannot be read as one (a bad id tag, status or date the
        schema let through) is answered Failed, never raised.
        """
        if not self.settings().local_auth_list_enabled:
            log.info("SendLocalList answered NotSupported: LocalAuthListEnabled is false")
            return UpdateStatus.NOT_SUPPORTED
        try:
            list_version = payload["listVersion"]
            update_type = UpdateType(payload["updateType"])
            raw = payload.get("localAuthorizationList", [])
            if not isinstance(raw, list):
                raise ValueError("localAuthorizationList is not an array")
            entries = [AuthorizationData.from_json(item) for item in raw]
        except KeyError as exc:
            log.warning("SendLocalList answered Failed: the payload has no %s", exc)
            return UpdateStatus.FAILED
        except (TypeError, ValueError) as exc:
            log.warning("SendLocalList answered Failed: %s", exc)
            return UpdateStatus.FAILED
        return self.send_local_list(list_version, update_type, entries)

    def get_local_list_version(self) -> int:
        """GetLocalListVersion.conf's listVersion (§5.10): 0 if the list is empty,
        -1 while LocalAuthListEnabled is false."""
        if not self.settings().local_auth_list_enabled:
            return UNSUPPORTED_LIST_VERSION
        return self._current().local_list.version

    def list_entries(self) -> Mapping[str, IdTagInfo]:
        """The stored list by normalized id tag (whether enabled or not: for display)."""
        return self._current().local_list.entries

    def list_entry(self, id_tag: str) -> IdTagInfo | None:
        """The stored list entry of ``id_tag`` (whether enabled or not)."""
        key = _lookup_key(id_tag)
        return None if key is None else self._current().local_list.entries.get(key)

    def list_conflict(self, id_tag: str, central_info: IdTagInfo, now: datetime) -> bool:
        """Whether the central system's answer for ``id_tag`` conflicts with the enabled
        list (``conflicts``); False for an id that is not listed."""
        if not self.settings().local_auth_list_enabled:
            return False
        listed = self.list_entry(id_tag)
        return listed is not None and conflicts(listed, central_info, now)

    # -- the cache (§3.5.1, §5.4) ------------------------------------------------------------

    def update_cache(self, id_tag: str, info: IdTagInfo, now: datetime) -> bool:
        """Cache what the central system answered for ``id_tag`` (Authorize.conf,
        StartTransaction.conf, StopTransaction.conf), committed before returning.

        False, and nothing written, while AuthorizationCacheEnabled is false and
        for an id in the local list (§3.5.3). ``ValueError`` for an id tag that is
        not one or a naive ``now``.
        """
        key = normalize_id_tag(id_tag)
        _require_aware(now, "now")
        if not self.settings().authorization_cache_enabled:
            return False
        with self._write(f"cache the answer for id tag {key!r}") as conn:
            listed = conn.execute(
                "SELECT 1 FROM ocpp_local_list WHERE id_tag = ?", (key,)
            ).fetchone()
            if listed is not None:
                return False
            cache = self._load_cache(conn)
            if key not in cache and len(cache) >= self.cache_size:
                victim = choose_eviction(cache.values(), now)
                assert victim is not None
                conn.execute("DELETE FROM ocpp_auth_cache WHERE id_tag = ?", (victim.id_tag,))
                log.info("cache full: %r gives way to %r", victim.id_tag, key)
            seq = 1 + max((entry.seq for entry in cache.values()), default=0)
            conn.execute(
                "INSERT INTO ocpp_auth_cache (id_tag, status, expiry_date, parent_id_tag,"
                " updated_seq, updated_at) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id_tag) DO UPDATE SET status = excluded.status,"
                " expiry_date = excluded.expiry_date, parent_id_tag = excluded.parent_id_tag,"
                " updated_seq = excluded.updated_seq, updated_at = excluded.updated_at",
                (*_row(key, info), seq, _to_text(now)),
            )
            local_list, cache = self._load_list(conn), self._load_cache(conn)
            generation = self._next_generation()
        self._publish(generation, local_list, cache)
        return True

    def clear_cache(self) -> ClearCacheStatus:
        """ClearCache (§5.4): empty the stored cache, even while it is disabled.

        Rejected (logged) only when the file cannot be written.
        """
        try:
            with self._write("clear the authorization cache") as conn:
                conn.execute("DELETE FROM ocpp_auth_cache")
                local_list = self._load_list(conn)
                generation = self._next_generation()
        except LocalAuthError:
            log.exception("ClearCache answered Rejected: the cache could not be cleared")
            return ClearCacheStatus.REJECTED
        self._publish(generation, local_list, {})
        return ClearCacheStatus.ACCEPTED

    def cache_entries(self) -> list[CacheEntry]:
        """The stored cache, least recently updated first (whether enabled or not)."""
        return sorted(self._current().cache.values(), key=lambda entry: entry.seq)

    def cache_entry(self, id_tag: str) -> IdTagInfo | None:
        """The stored cache entry of ``id_tag`` (whether enabled or not)."""
        key = _lookup_key(id_tag)
        entry = None if key is None else self._current().cache.get(key)
        return None if entry is None else entry.info

    # -- both ----------------------------------------------------------------------------

    def lookup(self, id_tag: str, now: datetime) -> Found | None:
        """``id_tag`` in the enabled list, else in the enabled cache (§3.5.3: the list
        has priority), with its status at ``now``; None if in neither."""
        return self._find(id_tag, now, self.settings())

    def _find(self, id_tag: str, now: datetime, settings: AuthSettings) -> Found | None:
        _require_aware(now, "now")
        key = _lookup_key(id_tag)
        if key is None:
            return None
        snapshot = self._current()
        if settings.local_auth_list_enabled:
            listed = snapshot.local_list.entries.get(key)
            if listed is not None:
                return Found(key, LIST_SOURCE, listed, listed.status_at(now))
        if settings.authorization_cache_enabled:
            cached = snapshot.cache.get(key)
            if cached is not None:
                return Found(key, CACHE_SOURCE, cached.info, cached.info.status_at(now))
        return None

    def parent_of(self, id_tag: str) -> str | None:
        """The parentIdTag the enabled list, else the enabled cache, gives ``id_tag``.

        Whatever the entry's status: it says which group the tag belongs to
        (stopping another tag's transaction, reservations); whether the tag may
        act is ``lookup``'s or the chain's question.
        """
        settings = self.settings()
        snapshot = self._current()
        key = _lookup_key(id_tag)
        if key is None:
            return None
        if settings.local_auth_list_enabled and key in snapshot.local_list.entries:
            return snapshot.local_list.entries[key].parent_id_tag
        if settings.authorization_cache_enabled and key in snapshot.cache:
            return snapshot.cache[key].info.parent_id_tag
        return None

    # -- internals -----------------------------------------------------------------------

    _closed_message = "the local list and cache are closed"

    def _fail(self, message: str) -> Exception:
        return LocalAuthError(str(self._path), message)

    def _current(self) -> _Snapshot:
        if self._conn is None:
            raise self._fail(self._closed_message)
        return self._snapshot

    def _next_generation(self) -> int:
        """Called inside a read or write block, under ``self._lock``."""
        self._generation += 1
        return self._generation

    def _publish(
        self, generation: int, local_list: ListState, cache: Mapping[str, CacheEntry]
    ) -> None:
        """Make a committed state the one readers see, unless a newer one already is."""
        with self._publish_lock:
            if generation > self._published:
                self._published = generation
                # One assignment: a reader in another thread sees the old snapshot or
                # the new one, never a part of each.
                self._snapshot = _Snapshot(local_list, MappingProxyType(dict(cache)))

    def _configure(self) -> None:
        """Set and verify the pragmas the durability rule depends on."""
        with self._read("configure") as conn:
            # Reading the header first turns a file that is not a database into an
            # error that says so, before any pragma is attempted.
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            if mode != "wal":
                raise self._fail(
                    f"cannot enable WAL journal mode (the file stays in {mode!r} mode)"
                )
            conn.execute("PRAGMA synchronous = FULL")
            sync = int(conn.execute("PRAGMA synchronous").fetchone()[0])
            if sync != _SYNCHRONOUS_FULL:
                raise self._fail(f"synchronous is {sync}, not FULL (2)")
            wanted = round(BUSY_TIMEOUT_S * 1000)
            busy = int(conn.execute(f"PRAGMA busy_timeout = {wanted:d}").fetchone()[0])
            if busy != wanted:
                raise self._fail(f"busy_timeout is {busy} ms, not {wanted}")
            problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise self._fail(f"damaged: {'; '.join(problems[:5])}")

    def _migrate(self) -> None:
        """Bring the tables to SCHEMA_VERSION, one committed migration at a time; the
        version is read inside each migration's transaction (two processes opening a
        new file at once cannot both apply one)."""
        while True:
            with self._write("migrate the local list's schema") as conn:
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS ocpp_auth_meta ("
                    " key TEXT PRIMARY KEY NOT NULL CHECK (typeof(key) = 'text'),"
                    " value INTEGER NOT NULL CHECK (typeof(value) = 'integer'))"
                )
                version = self._meta(conn, "schema_version")
                if version > SCHEMA_VERSION:
                    raise self._fail(
                        f"local list schema version {version} is newer than this firmware's"
                        f" {SCHEMA_VERSION}"
                    )
                if version == SCHEMA_VERSION:
                    return
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                self._set_meta(conn, "schema_version", version + 1)

    @staticmethod
    def _meta(conn: sqlite3.Connection, key: str) -> int:
        row = conn.execute("SELECT value FROM ocpp_auth_meta WHERE key = ?", (key,)).fetchone()
        return 0 if row is None else int(row[0])

    @staticmethod
    def _set_meta(conn: sqlite3.Connection, key: str, value: int) -> None:
        conn.execute(
            "INSERT INTO ocpp_auth_meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _load_list(self, conn: sqlite3.Connection) -> ListState:
        rows: list[_Row] = conn.execute(
            "SELECT id_tag, status, expiry_date, parent_id_tag FROM ocpp_local_list"
        ).fetchall()
        try:
            entries = {row[0]: _info(row) for row in rows}
        except ValueError as exc:
            raise self._fail(f"a stored local list entry is unreadable: {exc}") from exc
        version = self._meta(conn, "local_list_version")
        return ListState(version, MappingProxyType(entries))

    def _load_cache(self, conn: sqlite3.Connection) -> dict[str, CacheEntry]:
        rows: list[tuple[str, str, str | None, str | None, int, str]] = conn.execute(
            "SELECT id_tag, status, expiry_date, parent_id_tag, updated_seq, updated_at"
            " FROM ocpp_auth_cache ORDER BY updated_seq"
        ).fetchall()
        try:
            return {
                row[0]: CacheEntry(row[0], _info(row[:4]), int(row[4]), _from_text(row[5]))
                for row in rows
            }
        except ValueError as exc:
            raise self._fail(f"a stored cache entry is unreadable: {exc}") from exc


# -- the authorization steps (evse.auth.AuthStep) -----------------------------------------


class _LocalStep(Generic[_R]):
    """A step of ``evse.auth.AuthChain`` answering from the list or the cache."""

    #: LIST_SOURCE or CACHE_SOURCE: which table this step reads.
    _table: str

    def __init__(
        self,
        auth: LocalAuth,
        *,
        online: Callable[[], bool],
        result: Callable[[LocalAnswer], _R],
        name: str | None = None,
    ) -> None:
        self.name: str = self._table if name is None else name
        self._auth = auth
        self._online = online
        self._result = result

    def decide(self, id_tag: str, now: datetime) -> LocalAnswer | None:
        """The answer at ``now`` with the current link state and keys; None: no opinion."""
        settings = self._auth.settings()
        found = self._auth._find(id_tag, now, settings)
        if found is None or found.source != self._table:
            # Not held, or held by the list, which is asked first and has priority.
            return None
        status = decide(found.status, online=self._online(), settings=settings)
        if status is None:
            return None
        return LocalAnswer(
            id_tag,
            status,
            self.name,
            parent_id_tag=found.info.parent_id_tag,
            expiry=found.info.expiry_date,
        )

    def parent_of(self, id_tag: str) -> str | None:
        """The parentIdTag this step's table gives ``id_tag``, whatever the entry's
        status and the link state (``evse.auth.AuthChain.parent_of``: which group
        the tag belongs to); None if the table is disabled or does not hold it."""
        found = self._auth._find(id_tag, datetime.now(UTC), self._auth.settings())
        if found is None or found.source != self._table:
            return None
        return found.info.parent_id_tag

    async def authorize(self, id_tag: str, now: datetime) -> _R | None:
        # A lookup in memory: nothing to wait for, but a checkpoint like every step.
        await trio.lowlevel.checkpoint()
        answer = self.decide(id_tag, now)
        return None if answer is None else self._result(answer)


class LocalListStep(_LocalStep[_R]):
    """The Local Authorization List as a chain step (put it before the cache step)."""

    _table = LIST_SOURCE


class CacheStep(_LocalStep[_R]):
    """The Authorization Cache as a chain step (after the list step, before the online one)."""

    _table = CACHE_SOURCE


__all__ = [
    "AUTHORIZATION_CACHE_SIZE",
    "CACHE_SOURCE",
    "EMPTY_LIST_VERSION",
    "LIST_SOURCE",
    "LOCAL_AUTH_LIST_MAX_LENGTH",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SEND_LOCAL_LIST_MAX_LENGTH",
    "UNSUPPORTED_LIST_VERSION",
    "AuthSettings",
    "AuthorizationData",
    "AuthorizationStatus",
    "CacheEntry",
    "CacheStep",
    "ClearCacheStatus",
    "Found",
    "IdTagInfo",
    "ListState",
    "ListUpdate",
    "LocalAnswer",
    "LocalAuth",
    "LocalAuthError",
    "LocalListStep",
    "UpdateStatus",
    "UpdateType",
    "choose_eviction",
    "conflicts",
    "decide",
    "normalize_id_tag",
    "plan_list_update",
]
