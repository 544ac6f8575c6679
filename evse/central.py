"""The port between the station and a central system (OCPP comes in ocpp16/).

The station talks to whatever implements ``CentralSystemPort``: today
``Standalone`` (no central system configured), next the OCPP 1.6 session.
The port never reaches into station state; the station tells it what
happened (notifications the station hands off and never waits for), asks it
for the two things only it can know: whether the central system is reachable
(for the fallback limit) and the smart-charging limit in force, and gets from
it the ``Journal`` that queues a transaction's messages in the same SQLite
commit as the transaction's record. ``link`` and ``smart_charging_limit`` are
read on the station loop's path: they must be cheap (no disk, no files).
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from evse.connector import ErrorCode, Status
from evse.limits import CentralSystem
from evse.store import Journal, TransactionRecord


class CentralSystemPort(Protocol):
    @property
    def link(self) -> CentralSystem: ...

    def smart_charging_limit(self) -> float | None:
        """The smart-charging limit in A now, or None when no schedule applies."""
        ...

    def tx_profile_in_effect(self) -> bool:
        """The smart-charging limit includes a TxProfile of the running transaction:
        offline it stands instead of the fallback limit (evse/limits.py)."""
        ...

    def journal(
        self, *, ending: int | None = None, stopped_at: datetime | None = None
    ) -> Journal | None:
        """What writes a transaction's messages in the store's commit (rule 2);
        None when nothing is reported. ``ending``: the transaction about to end
        (its collected samples go into the StopTransaction)."""
        ...

    async def status_changed(
        self, connector_id: int, status: Status, error_code: ErrorCode, info: str
    ) -> None: ...

    async def transaction_started(self, record: TransactionRecord) -> None: ...

    async def transaction_ended(self, record: TransactionRecord) -> None: ...

    async def run(self) -> None:
        """The port's own long-lived work (the OCPP connection); may fail and be restarted."""
        ...

    def describe(self) -> dict[str, object]:
        """The connection status for operators."""
        ...


class Standalone:
    """No central system: nothing is reported, no fallback limit applies."""

    @property
    def link(self) -> CentralSystem:
        return CentralSystem.NOT_CONFIGURED

    def smart_charging_limit(self) -> float | None:
        return None

    def tx_profile_in_effect(self) -> bool:
        return False

    def journal(
        self, *, ending: int | None = None, stopped_at: datetime | None = None
    ) -> Journal | None:
        return None

    async def status_changed(
        self, connector_id: int, status: Status, error_code: ErrorCode, info: str
    ) -> None:
        return

    async def transaction_started(self, record: TransactionRecord) -> None:
        return

    async def transaction_ended(self, record: TransactionRecord) -> None:
        return

    async def run(self) -> None:
        import trio  # noqa: PLC0415 - only the running slot needs it

        await trio.sleep_forever()

    def describe(self) -> dict[str, object]:
        return {"state": self.link.value}
