"""The Local Authorization List Management profile (OCPP 1.6 section 3.1) and the
authorization cache's feed.

The list and the cache live in ``ocpp16.local_auth.LocalAuth`` (the station's
SQLite file); this module is what connects them to the session:

* **SendLocalList** (§5.15) and **GetLocalListVersion** (§5.10), the two calls
  of the profile. Their payloads are validated against the OCPP 1.6 schemas
  by ``ocpp16.rpc`` before a handler sees them, as for every call; what the
  schema cannot see (an id tag with a character outside printable ASCII, a
  duplicate) is ``LocalAuth``'s to refuse (Failed). The write runs in a
  worker thread (an fsync): the session serves other calls meanwhile, and the
  answer goes out only once the update is committed. LocalAuthListEnabled
  false: SendLocalList answers NotSupported and GetLocalListVersion -1
  (TC_042_1, TC_043_1: both are what the compliance tool accepts).
* **ClearCache** (§5.4) is Core; its handler (``profiles.core``) asks
  ``clear_cache`` here when the station has a cache.
* **Every IdTagInfo the central system answers** (Authorize.conf,
  StartTransaction.conf, StopTransaction.conf) comes to ``record_answer``:
  it goes into the cache (§3.5.1: valid or not; ``LocalAuth.update_cache``
  keeps out ids of the list and writes nothing while
  AuthorizationCacheEnabled is false) and is compared with the local list
  (§3.5.3): a conflict is reported with a StatusNotification for connector
  0, errorCode LocalListConflict, status connector 0's current one, info
  naming the id tag. The report is a notice, not a state: it is sent once,
  in the background (the Authorize step that brought the answer does not
  wait for it), and connector 0's next regular StatusNotification reports
  its error code as it is then. The list itself is not changed: only
  SendLocalList writes it.

A failure here (an unreadable answer, a file that cannot be written) is
logged and never ends the session: authorization then falls back to the
next step of the chain.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio

from ocpp16.channel import CallFailed
from ocpp16.local_auth import IdTagInfo, LocalAuth, LocalAuthError
from ocpp16.metering import format_time
from ocpp16.policy import status_notification
from ocpp16.profiles import Handler, Task
from ocpp16.vocabulary import ErrorCode

if TYPE_CHECKING:
    from ocpp16.chargepoint import ChargePoint

log = logging.getLogger(__name__)

#: The OCPP feature profile name (SupportedFeatureProfiles).
PROFILE_NAME = "LocalAuthListManagement"


class LocalAuthListProfile:
    """SendLocalList, GetLocalListVersion, and the cache's feed; see the module docstring."""

    name = PROFILE_NAME

    def __init__(self, cp: ChargePoint, auth: LocalAuth) -> None:
        self.cp = cp
        self.auth = auth
        self.handlers: dict[str, Handler] = {
            "SendLocalList": self.send_local_list,
            "GetLocalListVersion": self.get_local_list_version,
        }
        #: LocalListConflict reports so far: (id tag, list status, central status).
        self.conflicts: list[tuple[str, str, str]] = []

    def tasks(self) -> Sequence[Task]:
        return ()

    # -- the central system's calls ----------------------------------------------------------

    async def send_local_list(self, p: dict[str, Any]) -> dict[str, Any]:
        """SendLocalList (§5.15): answered once the update is committed (or refused)."""
        status = await trio.to_thread.run_sync(self.auth.send_local_list_payload, p)
        return {"status": status.value}

    async def get_local_list_version(self, p: dict[str, Any]) -> dict[str, Any]:
        """GetLocalListVersion (§5.10): 0 when empty, -1 while LocalAuthListEnabled is false."""
        await trio.lowlevel.checkpoint()
        return {"listVersion": self.auth.get_local_list_version()}

    async def clear_cache(self) -> str:
        """ClearCache.conf's status (§5.4): Accepted once the cache is empty on disk."""
        status = await trio.to_thread.run_sync(self.auth.clear_cache)
        return status.value

    # -- what the central system answers ---------------------------------------------------

    async def record_answer(self, id_tag: str, info: Mapping[str, Any], *, action: str) -> None:
        """The ``idTagInfo`` of an ``action`` answer (Authorize, StartTransaction,
        StopTransaction) for ``id_tag``: cached, and checked against the list.

        Never raises for the answer or the file (logged); returns once the cache
        entry is committed, before the conflict report (if any) is answered.
        """
        now = self.cp.now()
        try:
            answer = IdTagInfo.from_json(info)
            conflict = self.auth.list_conflict(id_tag, answer, now)
        except (ValueError, LocalAuthError) as exc:
            log.warning("%s answer for id tag %r not cached: %s", action, id_tag, exc)
            return
        try:
            await trio.to_thread.run_sync(self.auth.update_cache, id_tag, answer, now)
        except (ValueError, LocalAuthError) as exc:
            log.error("%s answer for id tag %r not cached: %s", action, id_tag, exc)
        if conflict:
            await self._report_conflict(id_tag, answer, action)

    async def _report_conflict(self, id_tag: str, answer: IdTagInfo, action: str) -> None:
        listed = self.auth.list_entry(id_tag)
        ours = "not listed" if listed is None else listed.status.value
        theirs = answer.status.value
        log.warning(
            "local list conflict: the list says %s for id tag %r, the %s answer %s",
            ours,
            id_tag,
            action,
            theirs,
        )
        self.conflicts.append((id_tag, ours, theirs))
        status, _, _ = self.cp.station.status_of(0)
        payload = status_notification(
            0,
            (status, ErrorCode.LOCAL_LIST_CONFLICT.value, f"{id_tag}: list {ours}, CS {theirs}"),
            format_time(self.cp.now()),
        )

        async def send() -> None:
            try:
                await self.cp.call("StatusNotification", payload)
            except CallFailed as exc:
                log.warning("StatusNotification LocalListConflict not sent: %s", exc)

        if not self.cp.start_background(send, name="local list conflict"):
            await send()


__all__ = ["PROFILE_NAME", "LocalAuthListProfile"]
