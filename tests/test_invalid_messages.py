"""Whitepaper ed. 3 InvalidMessages: a frame the central system sends that is refused
or not understood raises the (non-critical) security event, at most once a minute
with the ones in between counted; the frame still gets its CALLERROR.

The charge point's real session (ocpp16/chargepoint.py, channel.py, rpc.py) over the
rig's in-memory connection (tests/chargepoint_rig.py), on a virtual clock.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from ocpp16.chargepoint import INVALID_MESSAGES_EVERY
from tests.chargepoint_rig import open_rig, settle


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock()


async def test_garbage_is_answered_and_raised_once_a_minute_with_a_count(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with open_rig(tmp_path, clock) as rig:
        raised: list[tuple[str, str | None]] = []

        def emit(event_type: str, tech_info: str | None = None, /) -> None:
            raised.append((event_type, tech_info))

        rig.cp.emit = emit
        cs = await rig.connect()
        await settle(lambda: cs.payloads("StatusNotification"), "registered")
        # Not JSON, but with a UniqueId: a CALLERROR FormationViolation goes back.
        cs.send_raw('[2,"bad-1","Reset",{"type":')
        await settle(lambda: raised, "the first event")
        ((event_type, info),) = raised
        assert event_type == "InvalidMessages"
        assert info is not None and "bad-1" in info and "FormationViolation" in info
        stray = await cs.stray()
        assert stray[:3] == [4, "bad-1", "FormationViolation"]
        # Three more within the minute: counted, not raised.
        for n in range(3):
            cs.send_raw(f'[2,"bad-{n + 2}","NoSuchAction",{{}}]')
            await cs.stray()
        await trio.sleep(1)
        assert len(raised) == 1
        # After the minute, the next raises again and names the three in between.
        await trio.sleep(INVALID_MESSAGES_EVERY)
        cs.send_raw('[2,"bad-9","Reset",{"type":"Medium"}]')
        await settle(lambda: len(raised) == 2, "the second event")
        info = raised[1][1]
        assert info is not None and "bad-9" in info and "(and 3 more since the last event)" in info
