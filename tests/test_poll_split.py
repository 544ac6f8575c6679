"""The bus split for safety: every board poll reads only what safety needs, the
read-backs every READBACK_EVERY-th poll; the meter reads in small requests, each
fitted into the time the board's poller leaves free (``LineShare``).

On the virtual-clock rig (RTU at 9600 baud, the meter on the board's line):
a fault that shows while a meter request is on the wire is switched off within
what the wire allows a station that adds nothing of its own, and no board poll
waits for the meter while charging.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import pytest
import trio
import trio.testing

from evse.connector import StopReason
from fieldbus.boards import (
    BOARD_MODELS,
    LINE_SHARE_STALE,
    READBACK_EVERY,
    SAFETY_FIELDS,
    Bit,
    Board,
    BoardModel,
    LineShare,
    PilotState,
)
from fieldbus.errors import ExceptionReply
from fieldbus.master import ModbusMaster, Wanted
from fieldbus.memory import MemoryLink, WireTiming, pdu_sizes
from fieldbus.meters import LINE_SHARE_MAX_READ, METER_MODELS, Meter
from fieldbus.ports import RtuPort
from fieldbus.registers import Block, DType, Field, Table
from ops.sim.app import DeviceSpec as SimDevice
from ops.sim.app import SimConfig, Simulator
from tests.vclock_rig import (
    _READ_FUNCTIONS,
    BOARD_UNIT,
    BOARDS,
    METER_UNIT,
    PORTS,
    TARGET_SLACK,
    Injection,
    SeenRequest,
    board_exchanges,
    inject,
    measure,
    request_gap,
    vclock_rig,
)

HR, IR, COIL = Table.HOLDING, Table.INPUT, Table.COIL
#: The rig's serial line: 9600 baud 8N1.
RTU = RtuPort("/dev/ttySIM0", baud=9600)
assert PORTS["rtu"].startswith("rtu:///dev/ttySIM0?baud=9600&parity=N&stopbits=1")


# -- the plan of a poll ---------------------------------------------------------------


def test_each_poll_reads_what_safety_needs_and_readbacks_apart() -> None:
    """Per model: one request per poll, the read-backs of their own every Nth poll."""
    plans = {kind: m.poll_plan() for kind, m in BOARD_MODELS.items()}
    din, heid, evcc = plans["evse-din"], plans["heidelberg"], plans["ev-cc"]
    # EVSE DIN: 1000..1007 in one request; the read-backs ride along (a request
    # of their own would cost a 100 ms request gap).
    assert [(b.table, b.address, b.count) for b in din.every_poll] == [(HR, 1000, 8)]
    assert din.readbacks == ()
    # Heidelberg: the state register every poll, the current command apart.
    assert [(b.table, b.address, b.count) for b in heid.every_poll] == [(IR, 5, 1)]
    assert [(b.table, b.address, b.names) for b in heid.readbacks] == [(HR, 261, ("command",))]
    # EV-CC: pilot + cable (PP) every poll, command and enable coil apart.
    assert [(b.table, b.address, b.count) for b in evcc.every_poll] == [(IR, 100, 2)]
    assert {(b.table, b.address) for b in evcc.readbacks} == {(HR, 528), (COIL, 400)}
    for plan in plans.values():
        assert plan.every == READBACK_EVERY == 10


@pytest.mark.parametrize("kind", sorted(BOARD_MODELS))
def test_no_safety_field_is_a_readback(kind: str) -> None:
    model = BOARD_MODELS[kind]
    plan = model.poll_plan()
    fields = set(model.status_fields())
    assert fields & SAFETY_FIELDS <= plan.every_poll_fields
    assert {n for b in plan.readbacks for n in b.names} & SAFETY_FIELDS == set()
    # Every field is read by one plan or the other.
    assert plan.every_poll_fields | {n for b in plan.readbacks for n in b.names} == fields


def test_contactor_feedback_apart_is_still_read_every_poll() -> None:
    """A board with a real auxiliary contact on a register of its own: it is
    safety (the welded check), so it is polled every time, not as a read-back."""
    model = BoardModel(
        kind="test",
        title="feedback test board",
        pilot=Field(IR, 5),
        pilot_codes={2: PilotState.A, 6: PilotState.C},
        current_command=Field(HR, 300),
        max_current=16.0,
        contactor=Bit(Field(Table.DISCRETE_INPUT, 40, DType.BIT)),
        relay=Bit(Field(COIL, 90, DType.BIT)),
    )
    plan = model.poll_plan()
    assert {"pilot", "contactor"} <= plan.every_poll_fields
    assert {n for b in plan.readbacks for n in b.names} == {"command", "relay"}


# -- the read-backs' cadence ----------------------------------------------------------


class FakeMaster:
    """Registers in a dict; records every read (function, address, count)."""

    where = "fake:0"
    gap = 0.0

    def __init__(self, regs: dict[tuple[Table, int], int]) -> None:
        self.regs = regs
        self.requests: list[tuple[int, int, int]] = []
        self.refuse: set[tuple[int, int]] = set()

    def set_unit_gap(self, unit: int, seconds: float) -> None:
        pass

    def _get(self, code: int, table: Table, address: int, count: int) -> list[int]:
        self.requests.append((code, address, count))
        if (code, address) in self.refuse:
            raise ExceptionReply(code, 2, where=self.where)
        return [self.regs.get((table, a), 0) for a in range(address, address + count)]

    async def read_holding_registers(self, unit: int, address: int, count: int) -> list[int]:
        return self._get(3, HR, address, count)

    async def read_input_registers(self, unit: int, address: int, count: int) -> list[int]:
        return self._get(4, IR, address, count)

    async def read_coils(self, unit: int, address: int, count: int) -> list[bool]:
        return [bool(v) for v in self._get(1, COIL, address, count)]


def evcc(command: int = 16, enable: int = 1) -> dict[tuple[Table, int], int]:
    return {(IR, 100): ord("C"), (IR, 101): 20, (HR, 528): command, (COIL, 400): enable}


async def test_readbacks_every_nth_poll_keep_their_last_value(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = FakeMaster(evcc())
    board = Board(cast(ModbusMaster, bus), 1, BOARD_MODELS["ev-cc"])
    first = await board.read_status()
    # The first poll reads everything.
    assert bus.requests == [(4, 100, 2), (3, 528, 1), (1, 400, 1)]
    assert (first.command_a, first.enabled, first.cable_limit_a) == (16.0, True, 20.0)
    bus.regs.update({(HR, 528): 10, (COIL, 400): 0, (IR, 101): 13})
    polls: list[list[tuple[int, int, int]]] = []
    for _ in range(2 * READBACK_EVERY):
        await trio.sleep(0.1)
        bus.requests.clear()
        status = await board.read_status()
        polls.append(list(bus.requests))
        # The cable limit is a safety field: fresh on every poll.
        assert status.cable_limit_a == 13.0
        assert status.read_at == trio.current_time()
    # Poll n (n = 1, 2, ...) reads the read-back whose turn n % 10 is: the command
    # at 10, 20, the enable coil at 11 (the first poll was poll 0).
    for n, requests in enumerate(polls, start=1):
        extra = [r for r in requests if r != (4, 100, 2)]
        expected = {0: [(3, 528, 1)], 1: [(1, 400, 1)]}.get(n % READBACK_EVERY, [])
        assert extra == expected, f"poll {n}: {requests}"


async def test_readback_age_is_reported(autojump_clock: trio.testing.MockClock) -> None:
    bus = FakeMaster(evcc())
    board = Board(cast(ModbusMaster, bus), 1, BOARD_MODELS["ev-cc"])
    began = trio.current_time()
    await board.read_status()
    await trio.sleep(0.1)
    bus.regs[(HR, 528)] = 8
    status = await board.read_status()
    # Not this poll's turn: the command keeps its value of the first poll.
    assert status.command_a == 16.0
    assert status.readback_at == began < status.read_at
    # DIN: everything in the one request, every field as fresh as the poll.
    din = Board(cast(ModbusMaster, FakeMaster({(HR, 1002): 3})), 1, BOARD_MODELS["evse-din"])
    await trio.sleep(0.1)
    s = await din.read_status()
    assert s.readback_at == s.read_at == trio.current_time()


async def test_the_poller_reads_readbacks_only_after_its_verdict() -> None:
    bus = FakeMaster(evcc())
    board = Board(cast(ModbusMaster, bus), 1, BOARD_MODELS["ev-cc"])
    status = await board.read_status(readbacks=False)
    assert bus.requests == [(4, 100, 2)]
    assert status.command_a == 0.0 and status.enabled is None  # never read yet
    assert board.readbacks_due
    refreshed = await board.read_readbacks()
    assert refreshed is not None
    assert (refreshed.command_a, refreshed.enabled) == (16.0, True)
    # The safety fields are the poll's, with its time.
    assert (refreshed.pilot, refreshed.read_at) == (status.pilot, status.read_at)
    assert await board.read_readbacks() is None
    assert not board.readbacks_due


async def test_a_failing_readback_never_fails_the_safety_read() -> None:
    bus = FakeMaster(evcc())
    bus.refuse.add((3, 528))
    board = Board(cast(ModbusMaster, bus), 1, BOARD_MODELS["ev-cc"])
    status = await board.read_status(readbacks=False)
    assert status.pilot is PilotState.C
    with pytest.raises(ExceptionReply):
        await board.read_readbacks()
    # Never read yet: it stays due on every poll until it is.
    bus.requests.clear()
    await board.read_status(readbacks=False)
    assert board.readbacks_due
    bus.refuse.clear()
    refreshed = await board.read_readbacks()
    assert refreshed is not None and refreshed.command_a == 16.0
    assert (3, 528, 1) in bus.requests


# -- the meter's requests -------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(METER_MODELS))
def test_meter_requests_are_small(kind: str) -> None:
    meter = Meter(cast(ModbusMaster, FakeMaster({})), 1, METER_MODELS[kind])
    blocks = meter._reader.blocks
    assert max(b.count for b in blocks) <= min(LINE_SHARE_MAX_READ, METER_MODELS[kind].max_read)
    # Each request, at 9600 baud 8N1 with a 2 ms turnaround, t3.5 before it.
    timing = WireTiming.for_port(RTU)
    for b in blocks:
        hold = RTU.frame_gap + timing.exchange_time(*pdu_sizes(_READ_FUNCTIONS[b.table], b.count))
        assert hold <= 0.0359, (kind, b, hold)


#: The longest a meter request holds a 9600-baud line: 8 registers (request 8
#: bytes, 2 ms turnaround, reply 21 bytes) after t3.5.
METER_HOLD = 3.5 * 10 / 9600 + (8 + 21) * 10 / 9600 + 0.002


@asynccontextmanager
async def shared_line() -> AsyncIterator[tuple[ModbusMaster, Board, Meter, Simulator]]:
    """An EV-CC and an SDM630 on one RTU line at 9600 baud (no station)."""
    sim = Simulator(
        SimConfig(
            devices=[SimDevice("ev-cc", BOARD_UNIT), SimDevice("sdm630", METER_UNIT)],
            tcp_port=None,
            rtu=False,
            control_port=None,
        )
    )
    sim.station.updated = trio.current_time()
    sim.station.board.last_request = trio.current_time()
    async with trio.open_nursery() as nursery:
        link = MemoryLink(RTU, sim.server, nursery, timing=WireTiming.for_port(RTU))
        async with ModbusMaster(link, timeout=0.5, retries=0) as master:
            yield (
                master,
                Board(master, BOARD_UNIT, BOARD_MODELS["ev-cc"]),
                Meter(master, METER_UNIT, METER_MODELS["sdm630"]),
                sim,
            )
        nursery.cancel_scope.cancel()


async def test_a_board_poll_waits_at_most_one_small_meter_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A board poll that wants the line at any instant of a meter reading gets it
    within METER_HOLD (nothing overtakes a request on the wire, but every poll
    gets in between two meter requests)."""
    rng = random.Random(7)
    timing = WireTiming.for_port(RTU)
    own = RTU.frame_gap + timing.frame_time(pdu_sizes(4, 2)[0] + timing.overhead)
    waits: list[float] = []
    async with shared_line() as (_, board, meter, _sim):
        await trio.sleep(1.0)  # past the start: the master's last request is "long ago"
        reading_time = 0.0
        for _ in range(200):
            await trio.sleep(0.05)
            began = trio.current_time()
            asked: list[float] = []
            served: list[float] = []

            async def poll(delay: float, asked: list[float], served: list[float]) -> None:
                await trio.sleep(delay)
                asked.append(trio.current_time())
                await board.read_status(readbacks=False)
                served.append(trio.current_time())

            async with trio.open_nursery() as nursery:
                delay = rng.uniform(0.0, reading_time or 0.15)
                nursery.start_soon(poll, delay, asked, served)
                await meter.read()
            reading_time = trio.current_time() - began
            # The poll's request frame reached the board at served - turnaround -
            # reply; its wait for the line is what is left after its own silence and frame.
            reply = timing.frame_time(pdu_sizes(4, 2)[1] + timing.overhead)
            arrived = served[0] - timing.turnaround - reply
            waits.append(arrived - asked[0] - own)
    assert max(waits) <= METER_HOLD + 1e-9, max(waits)
    # Most of the time the poll did wait: the readings really overlapped.
    assert sum(1 for w in waits if w > 0.001) > len(waits) / 2


async def test_the_meter_fits_its_requests_into_the_line_share(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With the board's LineShare, a meter request never starts unless it ends
    before the share does; a share not renewed for LINE_SHARE_STALE holds nobody."""
    async with shared_line() as (_, board, meter, _sim):
        await trio.sleep(1.0)
        await meter.read()  # unshared: learns how long each request takes
        took = [meter.request_time(i) for i in range(meter.requests_per_reading)]
        assert max(took) <= METER_HOLD + 1e-9
        share = board.line
        # (start, end, the share's end, the silence after the board's request)
        requests: list[tuple[float, float, float, float]] = []
        read_block = meter._read_block

        async def timed(block: Block, wanted: Wanted) -> list[int]:
            assert wanted is not None  # every request fitted (and was checked again)
            start, until, free_from = trio.current_time(), share.until, share.free_from
            words = await read_block(block, wanted)
            requests.append((start, trio.current_time(), until, free_from))
            return words

        meter._read_block = timed  # type: ignore[method-assign]
        polls: list[float] = []

        async def board_poller() -> None:
            next_at = trio.current_time()
            while True:
                began = trio.current_time()
                await board.read_status(readbacks=False)
                polls.append(trio.current_time() - began)
                next_at += 0.1
                board.share_line(next_at)
                await trio.sleep_until(next_at)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(board_poller)
            await trio.sleep(0.05)  # its first verdict (before it, the share is void)
            for _ in range(10):
                await meter.read(share=share)
            nursery.cancel_scope.cancel()
        timing = WireTiming.for_port(RTU)
        gap = RTU.frame_gap
        assert len(requests) == 10 * meter.requests_per_reading
        for (start, end, until, free_from), previous in zip(
            requests, [None, *requests[:-1]], strict=True
        ):
            # Each request ended before the board's next one may go: no poll waited.
            assert end <= until + 1e-9
            # It went once the line's silence was over (the master had nothing
            # left to wait, so nothing to busy-wait).
            assert start >= free_from - 1e-9
            if previous is not None and previous[1] + gap > free_from:
                assert start >= previous[1] + gap - 1e-9
        # And every poll after the first took exactly its own exchange: it never
        # waited for the line.
        own = timing.exchange_time(*pdu_sizes(4, 2))
        assert polls[1:] == pytest.approx([own] * (len(polls) - 1), abs=1e-9)
        # A share not renewed (a silent board, a poller that stopped): a request
        # that does not fit waits LINE_SHARE_STALE at most, then nobody waits.
        stale = LineShare()
        began = trio.current_time()
        stale.open(began)
        await stale.wait(0.05)
        assert trio.current_time() - began == pytest.approx(LINE_SHARE_STALE)
        began = trio.current_time()
        await stale.wait(0.05)
        assert trio.current_time() == began


# -- the station on the virtual clock (RTU, the meter on the board's line) ------------


def _is_meter(r: SeenRequest) -> bool:
    return r.unit == METER_UNIT


@pytest.mark.parametrize("board", BOARDS)
async def test_fault_during_a_meter_request_is_off_within_the_bound(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, board: str
) -> None:
    """The RCD trips (EV-CC: pilot E) while a meter request is on the wire: the
    off-write lands within the target, or, where the wire itself allows less
    (EVSE DIN: its 100 ms request gap before the poll and again before the
    write), within what it allows + 10 ms: no meter time on top."""
    async with vclock_rig(tmp_path, board=board, transport="rtu", free=True) as rig:
        bound = max(rig.off_bound(), rig.off_ideal() + TARGET_SLACK)
        latencies = []
        rng = random.Random(3)
        for _ in range(12):
            rig.plug()
            await rig.status("Charging")
            request = await rig.next_request(_is_meter, what="a meter request")
            # Somewhere in that request's exchange: it reached the meter at
            # request.t, its reply takes 2 ms + up to 21 bytes (22 ms) more.
            await trio.sleep(rng.uniform(0.0, 0.024))
            assert request.t <= trio.current_time()
            injection = inject(rig, "rcd_trip", None)

            def answered(i: Injection = injection) -> bool:
                return measure(rig, i) is not None

            await rig.until(answered, what="the off-write")
            result = measure(rig, injection)
            assert result is not None
            reference, off = result
            latencies.append(off["t"] - reference)
            rig.sim.clear_faults()
            rig.unplug()
            await rig.status("Available")
        print(f"\nLATENCY {board}: max {max(latencies) * 1e3:.1f} ms, bound {bound * 1e3:.1f}")
        assert max(latencies) <= bound + 1e-9


@pytest.mark.parametrize("board", BOARDS)
async def test_no_board_poll_waits_for_the_meter_while_charging(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, board: str
) -> None:
    """Steady charging on RTU for 20 virtual s (20 meter readings): the board's
    safety request goes out at the same instant of every poll cycle; the meter
    never delays it, the read-backs never do either."""
    async with vclock_rig(tmp_path, board=board, transport="rtu", free=True) as rig:
        rig.plug()
        await rig.status("Charging")
        await trio.sleep(1.0)  # the start's own writes and fresh readings are done
        since = len(rig.requests)
        meter_reads = len(rig.meter_readings)
        await trio.sleep(20.0)
        pilot = rig.model.pilot
        polls = [r.t for r in rig.requests[since:] if r.unit == BOARD_UNIT and r.reads(pilot)]
        gaps = [b - a for a, b in itertools.pairwise(polls)]
        assert len(rig.meter_readings) - meter_reads >= 19
        # One cycle: the poll interval, or (EVSE DIN) the board's own request gap
        # after the exchange, whichever is longer; the same for every poll.
        timing, port = rig.timing, rig.port
        poll = sum(timing.exchange_time(*x) for x in board_exchanges(rig.model)[:-1])
        cycle = max(rig.settings.board_poll, poll + request_gap(rig.model, port))
        assert max(gaps) - min(gaps) <= 1e-6, (min(gaps), max(gaps))
        assert min(gaps) == pytest.approx(cycle, abs=1e-6)
        # The meter had the line in between: every request of every reading.
        assert sum(1 for r in rig.requests[since:] if r.unit == METER_UNIT) >= 19 * 5


async def test_a_fault_on_a_readback_poll_skips_the_readback(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Heidelberg on RTU: a fault that shows on a poll whose read-back is due gets
    its off-write first; the read-back of HR 261 waits for the next turn."""
    async with vclock_rig(tmp_path, board="heidelberg", transport="rtu", free=True) as rig:
        rig.plug()
        await rig.status("Charging")
        command = rig.model.current_command

        def is_readback(r: SeenRequest) -> bool:
            return r.unit == BOARD_UNIT and r.reads(command)

        await rig.next_request(is_readback, what="a read-back")
        for _ in range(READBACK_EVERY - 1):
            await rig.next_read()
        # The next poll is a read-back poll: the fault shows there.
        since = len(rig.requests)
        injection = inject(rig, "rcd_trip", None)
        await rig.until(lambda: measure(rig, injection) is not None, what="the off-write")
        result = measure(rig, injection)
        assert result is not None
        reference, off = result
        between = [r for r in rig.requests[since:] if r.t < off["t"]]
        assert [r for r in between if is_readback(r)] == []
        assert any(r.reads(rig.model.pilot) for r in between)
        assert off["t"] - reference <= rig.off_bound()


async def test_a_request_longer_than_any_share_goes_late_never_starved(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A slow device (a request longer than any share) still gets the line: at
    the first share opened LINE_SHARE_STALE after it began to wait."""
    share = LineShare()
    opened: list[float] = []

    async def poller() -> None:
        while True:
            now = trio.current_time()
            share.open(now + 0.05)
            opened.append(now)
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller)
        await trio.sleep(0.01)
        began = trio.current_time()
        await share.wait(0.2)
        waited = trio.current_time() - began
        nursery.cancel_scope.cancel()
    assert LINE_SHARE_STALE <= waited <= LINE_SHARE_STALE + 0.1 + 1e-9
    # It went at a share's start (just after the board's verdict), not in between.
    assert trio.current_time() in opened


async def test_an_off_sequence_is_never_split_by_the_meter(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """EV-CC on RTU (every off is command 0, then the enable coil off): a stop
    requested while the meter reads in the poller's share gets both writes back
    to back; the meter's next request waits for the poller's next verdict."""
    async with vclock_rig(tmp_path, board="ev-cc", transport="rtu", free=True) as rig:
        rng = random.Random(5)
        command, enable = rig.model.current_command, rig.model.enable
        assert enable is not None
        for _ in range(8):
            rig.plug()
            await rig.status("Charging")
            await rig.next_request(_is_meter, what="a meter request")
            await trio.sleep(rng.uniform(0.0, 0.03))
            marker = rig.mark("stop")
            since = len(rig.requests)
            rig.nursery.start_soon(rig.station.request_stop, StopReason.REMOTE)
            off = await rig.next_off(marker["seq"])

            def disabled(r: SeenRequest, coil: int = enable.field.address) -> bool:
                return r.unit == BOARD_UNIT and r.function == 5 and r.address == coil

            def disable_written(since: int = since) -> bool:
                return any(disabled(r) for r in rig.requests[since:])

            await rig.until(disable_written, what="the disable write")
            after = rig.requests[since:]
            first = next(i for i, r in enumerate(after) if r.t >= off["t"] - 1e-9)
            assert after[first].function == 6 and after[first].address == command.address
            last = next(i for i, r in enumerate(after) if disabled(r))
            # (The board's own poll may come in between: it was waiting for the bus.)
            assert not any(_is_meter(r) for r in after[first:last]), after[first : last + 1]
            await rig.status("Finishing")
            rig.unplug()
            await rig.status("Available")
