"""The RFID reader: pure line/tag/debounce logic, and the reader on a real pty.

The pty tests play the card reader on the pty's master end; the reader opens
the slave by path through fieldbus's SerialLink, as it would a USB reader.
Debounce and re-open use short real times (real file descriptors, so no
autojump clock), with margins of at least 0.1 s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from evse.rfid import (
    MAX_LINE,
    Debouncer,
    LineSplitter,
    ReaderState,
    ReaderStatus,
    RfidConfig,
    RfidReader,
    reverse_hex_bytes,
)
from fieldbus.errors import Disconnected
from fieldbus.links import SerialLink
from fieldbus.ports import RtuPort
from tests.ptypair import PtyPair

WAIT = 5.0
slow = pytest.mark.slow


# --- configuration -------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"([0-9A-F]+", "is not a regular expression"),
        (r"[0-9A-F]+", "has 0 capture groups"),
        (r"(\x02)([0-9A-F]+)", "has 2 capture groups"),
    ],
)
def test_bad_pattern_is_refused_naming_it(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        RfidConfig("/dev/ttyUSB0", pattern=pattern)
    assert repr(pattern) in str(info.value)


def test_pattern_with_one_group_among_non_capturing_ones() -> None:
    config = RfidConfig("/dev/x", pattern=r"^(?:\x02)(?P<uid>[0-9A-F]{10})(?:\x03)$")
    assert config.tag_from_line(b"\x02123456789A\x03") == "123456789A"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": ""}, "device is empty"),
        ({"baud": 0}, "baud=0"),
        ({"debounce": -1}, "debounce=-1"),
        ({"debounce": float("nan")}, "debounce=nan"),
        ({"reopen_interval": 0}, "reopen_interval=0"),
        ({"reopen_interval": float("inf")}, "reopen_interval=inf"),
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"device": "/dev/x", **kwargs}
    with pytest.raises(ValueError, match=message):
        RfidConfig(**args)  # type: ignore[arg-type]


# --- lines and tags (pure) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "tag"),
    [
        (b"04A2B3C4", "04A2B3C4"),
        (b"04a2b3c4", "04A2B3C4"),
        (b"\x02123456789A\x03", "123456789A"),  # the default pattern skips non-word framing
        (b"  [0011223344556677]  ", "0011223344556677"),
        (b"ABCD", "ABCD"),
    ],
)
def test_default_pattern(line: bytes, tag: str) -> None:
    assert RfidConfig("/dev/x").tag_from_line(line) == tag


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"ABC", "does not match"),  # too short for a UID
        (b"0123456789ABCDEF01234", "does not match"),  # 21 digits: not an idTag
        (b"UID=04A2B3C4", "does not match"),
        (b"04A2 B3C4", "does not match"),
        (b"\xff\xfe04A2B3C4", "does not match"),  # latin-1 letters are word characters
    ],
)
def test_default_pattern_refuses(line: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        RfidConfig("/dev/x").tag_from_line(line)


def test_optional_group_that_did_not_match_is_no_tag() -> None:
    config = RfidConfig("/dev/x", pattern=r"^CARD(?: ([0-9A-F]+))?$")
    assert config.tag_from_line(b"CARD 0A0B") == "0A0B"
    with pytest.raises(ValueError, match="without its tag group"):
        config.tag_from_line(b"CARD")


def test_tag_is_normalized_and_checked() -> None:
    config = RfidConfig("/dev/x", pattern=r"^ID:(.*)$")
    assert config.tag_from_line(b"ID: ab-12 ") == "AB-12"
    with pytest.raises(ValueError, match="21 characters"):
        config.tag_from_line(b"ID:" + b"A" * 21)
    with pytest.raises(ValueError, match="empty"):
        config.tag_from_line(b"ID:   ")


def test_reverse_bytes() -> None:
    config = RfidConfig("/dev/x", reverse_bytes=True)
    assert config.tag_from_line(b"04a2b3c4") == "C4B3A204"
    assert config.tag_from_line(b"0011223344556677") == "7766554433221100"
    with pytest.raises(ValueError, match="not whole hex bytes"):
        config.tag_from_line(b"04A2B")
    assert reverse_hex_bytes("AB") == "AB"
    with pytest.raises(ValueError, match="'AB-C'"):
        reverse_hex_bytes("AB-C")


def test_line_splitter_line_ends() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"AA\r\nBB\rCC\nDD\n\r\r\n") == [b"AA", b"BB", b"CC", b"DD"]
    assert splitter.feed(b"E") == []
    assert splitter.feed(b"E") == []
    assert splitter.pending == 2
    assert splitter.feed(b"E\r") == [b"EEE"]
    assert splitter.pending == 0
    assert splitter.overlong == 0


def test_line_splitter_length_boundary() -> None:
    splitter = LineSplitter()
    exact = b"x" * MAX_LINE
    assert splitter.feed(exact + b"\n") == [exact]
    assert splitter.feed(exact + b"y\n") == []
    assert splitter.overlong == 1
    # Split across feeds, the same.
    assert splitter.feed(exact[:100]) == []
    assert splitter.feed(exact[100:] + b"\n") == [exact]
    assert splitter.feed(exact[:100]) == []
    assert splitter.feed(exact[100:] + b"y") == []
    assert splitter.overlong == 2
    assert splitter.feed(b"AFTER\r\n") == []  # still the dropped line, up to its end
    assert splitter.feed(b"NEXT\r\n") == [b"NEXT"]
    assert splitter.overlong == 2


def test_line_splitter_memory_is_bounded() -> None:
    splitter = LineSplitter()
    for _ in range(4096):
        assert splitter.feed(b"\x00\xff" * 256) == []
        assert splitter.pending <= MAX_LINE
    assert splitter.overlong == 1
    assert splitter.feed(b"tail\nnext\n") == [b"next"]


def test_debouncer() -> None:
    debounce = Debouncer(2.0)
    assert debounce.accept("A", 10.0)
    assert not debounce.accept("A", 11.0)
    assert debounce.accept("B", 11.5)  # another card is not held back
    # Every sighting restarts the window: a card lying on the reader counts once.
    assert not debounce.accept("A", 12.9)
    assert not debounce.accept("B", 13.4)
    assert not debounce.accept("A", 14.8)
    assert debounce.accept("B", 15.4)  # 2 s after its last sighting
    assert debounce.accept("A", 16.8)
    assert not debounce.accept("A", 18.7)
    debounce.refresh("A", 20.0)
    assert not debounce.accept("A", 21.9)
    zero = Debouncer(0)
    assert zero.accept("C", 1.0) and zero.accept("C", 1.0)


# --- the reader on a pty -----------------------------------------------------------


@dataclass
class Running:
    reader: RfidReader
    tags: trio.MemoryReceiveChannel[str]
    states: trio.MemoryReceiveChannel[ReaderState]


@asynccontextmanager
async def running_reader(device: str, **options: object) -> AsyncIterator[Running]:
    """The reader in a nursery; tags and state changes arrive on channels."""
    send_tag, tags = trio.open_memory_channel[str](100)
    send_state, states = trio.open_memory_channel[ReaderState](100)
    config = RfidConfig(device, **options)  # type: ignore[arg-type]
    reader = RfidReader(config, send_tag.send, on_state=send_state.send)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            await nursery.start(reader.run)
        yield Running(reader, tags, states)
        nursery.cancel_scope.cancel()


async def next_tag(tags: trio.MemoryReceiveChannel[str]) -> str:
    with trio.fail_after(WAIT):
        return await tags.receive()


async def wait_for_state(
    states: trio.MemoryReceiveChannel[ReaderState], status: ReaderStatus, reason: str = ""
) -> ReaderState:
    """The next state change to ``status`` with ``reason`` in its reason."""
    with trio.fail_after(WAIT):
        async for state in states:
            if state.status is status and reason in state.reason:
                return state
    raise AssertionError("state channel closed")


@pytest.fixture
def pty() -> Iterator[PtyPair]:
    with PtyPair() as pair:
        yield pair


@slow
async def test_reads_typical_card_lines(pty: PtyPair) -> None:
    async with running_reader(pty.path, debounce=0) as run:
        reader, tags = run.reader, run.tags
        assert reader.state == ReaderState(ReaderStatus.OK)
        os.write(pty.master_fd, b"04a2b3c4\r\n")
        assert await next_tag(tags) == "04A2B3C4"
        os.write(pty.master_fd, b"11223344\r55667788\n8899AABBCCDDEEFF\r\n")
        assert [await next_tag(tags) for _ in range(3)] == [
            "11223344",
            "55667788",
            "8899AABBCCDDEEFF",
        ]
        assert reader.state.ok


@slow
async def test_stx_etx_reader_with_custom_pattern(
    pty: PtyPair, caplog: pytest.LogCaptureFixture
) -> None:
    pattern = r"^\x02([0-9A-F]{10})\x03$"
    async with running_reader(pty.path, pattern=pattern) as run:
        tags = run.tags
        # Without the framing this reader's lines do not match: ignored and logged.
        with caplog.at_level(logging.WARNING, logger="evse.rfid"):
            os.write(pty.master_fd, b"0000000001\r\n")
            os.write(pty.master_fd, b"\x02123456789A\x03\r\n")
            assert await next_tag(tags) == "123456789A"
    assert any(
        "ignored line b'0000000001'" in r.getMessage() and "does not match" in r.getMessage()
        for r in caplog.records
    )


@slow
async def test_reverse_bytes_on_the_line(pty: PtyPair) -> None:
    async with running_reader(pty.path, reverse_bytes=True) as run:
        tags = run.tags
        os.write(pty.master_fd, b"04A2B\r\n")  # odd length: cannot be reversed, ignored
        os.write(pty.master_fd, b"04A2B3C4\r\n")
        assert await next_tag(tags) == "C4B3A204"


@slow
async def test_line_split_across_reads(pty: PtyPair) -> None:
    # "04A2" alone would match the pattern: a reader that took each read as a
    # line would report it.
    async with running_reader(pty.path) as run:
        tags = run.tags
        for part in (b"04A2", b"B3C4\r", b"\n", b"DDEEFF00\r", b"\nCAFE", b"BABE\n"):
            os.write(pty.master_fd, part)
            await trio.sleep(0.05)
        assert [await next_tag(tags) for _ in range(3)] == ["04A2B3C4", "DDEEFF00", "CAFEBABE"]


@slow
async def test_debounce(pty: PtyPair) -> None:
    async with running_reader(pty.path, debounce=0.3) as run:
        tags = run.tags
        os.write(pty.master_fd, b"AAAA1111\r\n")
        assert await next_tag(tags) == "AAAA1111"
        os.write(pty.master_fd, b"AAAA1111\r\n")  # repeated while on the reader: ignored
        os.write(pty.master_fd, b"BBBB2222\r\n")  # another card is not held back
        assert await next_tag(tags) == "BBBB2222"
        await trio.sleep(0.45)
        os.write(pty.master_fd, b"AAAA1111\r\n")  # presented again after the window
        assert await next_tag(tags) == "AAAA1111"


@slow
async def test_card_lying_on_the_reader_counts_once(pty: PtyPair) -> None:
    async with running_reader(pty.path, debounce=0.5) as run:
        tags = run.tags
        # Repeated every 0.2 s for 0.8 s: each repeat is within 0.5 s of the
        # last sighting, though the last is well past 0.5 s after the first.
        for _ in range(5):
            os.write(pty.master_fd, b"AAAA1111\r\n")
            await trio.sleep(0.2)
        os.write(pty.master_fd, b"FFFF0000\r\n")
        assert [await next_tag(tags) for _ in range(2)] == ["AAAA1111", "FFFF0000"]


@slow
async def test_repeats_sent_while_the_consumer_is_busy_are_debounced(pty: PtyPair) -> None:
    # Authorizing takes longer than the debounce time; the reader repeats the
    # card meanwhile. Read only afterwards, the repeats must not count as a
    # second presentation.
    tags: list[str] = []

    async def on_tag(tag: str) -> None:
        tags.append(tag)
        await trio.sleep(0.6)

    send_state, states = trio.open_memory_channel[ReaderState](10)
    config = RfidConfig(pty.path, debounce=0.3)
    reader = RfidReader(config, on_tag, on_state=send_state.send)
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        for _ in range(4):
            os.write(pty.master_fd, b"AAAA1111\r\n")
            await trio.sleep(0.1)
        await trio.sleep(0.6)  # the consumer is done and has read the repeats
        assert tags == ["AAAA1111"]
        await trio.sleep(0.4)  # past the window: a new presentation
        os.write(pty.master_fd, b"AAAA1111\r\n")
        await trio.sleep(0.2)
        assert tags == ["AAAA1111", "AAAA1111"]
        nursery.cancel_scope.cancel()
    assert await states.receive() == ReaderState(ReaderStatus.OK)


@slow
async def test_garbage_and_overlong_lines_are_ignored(
    pty: PtyPair, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="evse.rfid"):
        async with running_reader(pty.path) as run:
            tags = run.tags
            # Line noise without a line end, then a tag-like tail: all one
            # overlong line, dropped up to its line end.
            os.write(pty.master_fd, b"\xff\xfe\x00" * 400)
            await trio.sleep(0.05)
            os.write(pty.master_fd, b"AABBCCDD\r\n")
            os.write(pty.master_fd, b"hello world\r\n\r\n\n")
            os.write(pty.master_fd, b" " * 300 + b"12345678\r\n")
            os.write(pty.master_fd, b"11223344\r\n")
            assert await next_tag(tags) == "11223344"
            # The reader survived and still reads.
            os.write(pty.master_fd, b"55667788\r\n")
            assert await next_tag(tags) == "55667788"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("dropped a line over 256 bytes" in m for m in messages) == 2
    assert any("ignored line b'hello world'" in m for m in messages)


@slow
async def test_reader_holds_the_port_exclusively_and_releases_it(pty: PtyPair) -> None:
    other = SerialLink(RtuPort(pty.path))
    async with running_reader(pty.path):
        with pytest.raises(Disconnected, match="lock"):
            await other.open()
    # Cancelled: the port is closed and free again.
    await other.open()
    await other.aclose()


@slow
async def test_port_vanishes_and_is_reopened(tmp_path: Path) -> None:
    link = tmp_path / "rfid"
    with PtyPair() as first, PtyPair() as second:
        link.symlink_to(first.path)
        async with running_reader(str(link), reopen_interval=0.2, debounce=5) as run:
            assert await run.states.receive() == ReaderState(ReaderStatus.OK)
            os.write(first.master_fd, b"04A2B3C4\r\n")
            assert await next_tag(run.tags) == "04A2B3C4"

            # Unplugged mid-line: the device node goes, the line hangs up.
            os.write(first.master_fd, b"DEAD")
            await trio.sleep(0.1)
            link.unlink()
            first.close()
            with trio.fail_after(WAIT):
                lost = await run.states.receive()
            assert lost.status is ReaderStatus.DISCONNECTED
            # A pty hung up reads as end of file; a USB adapter pulled out as EIO.
            assert lost.reason == "serial port closed" or "serial read failed" in lost.reason
            assert run.reader.state == lost
            # Re-open attempts fail while the device is missing; the reason says so.
            with trio.fail_after(WAIT):
                missing = await run.states.receive()
            assert missing.status is ReaderStatus.DISCONNECTED
            assert "cannot open serial port (ENOENT" in missing.reason
            # Repeated failures with the same reason are one state, not one per attempt.
            await trio.sleep(0.5)
            assert run.states.statistics().current_buffer_used == 0

            # Plugged in again (as another tty, behind the same stable name).
            link.symlink_to(second.path)
            with trio.fail_after(WAIT):
                assert await run.states.receive() == ReaderState(ReaderStatus.OK)
            # The same card again, within the debounce time: a reconnect is not
            # a new presentation.
            os.write(second.master_fd, b"04A2B3C4\r\n")
            # The half line from before the unplug is gone, not glued to this one.
            os.write(second.master_fd, b"BEEF\r\n")
            assert await next_tag(run.tags) == "BEEF"


@slow
async def test_station_starts_with_the_reader_unplugged(tmp_path: Path) -> None:
    link = tmp_path / "rfid"
    with trio.fail_after(1):
        async with running_reader(str(link), reopen_interval=60) as run:
            # started() came after the first, failed, attempt, not after a success.
            state = run.reader.state
            assert state.status is ReaderStatus.DISCONNECTED
            assert "cannot open serial port (ENOENT" in state.reason
            assert await run.states.receive() == state


@slow
async def test_reader_plugged_in_after_start(tmp_path: Path) -> None:
    link = tmp_path / "rfid"
    with PtyPair() as pair:
        async with running_reader(str(link), reopen_interval=0.1) as run:
            assert not run.reader.state.ok
            await trio.sleep(0.25)  # a few failed attempts
            link.symlink_to(pair.path)
            await wait_for_state(run.states, ReaderStatus.OK)
            os.write(pair.master_fd, b"04A2B3C4\r\n")
            assert await next_tag(run.tags) == "04A2B3C4"


@slow
async def test_consumer_exception_ends_run(pty: PtyPair) -> None:
    async def on_tag(tag: str) -> None:
        await trio.lowlevel.checkpoint()
        raise RuntimeError(f"consumer bug on {tag}")

    send_state, states = trio.open_memory_channel[ReaderState](10)
    reader = RfidReader(RfidConfig(pty.path), on_tag, on_state=send_state.send)

    async def present_card() -> None:
        await wait_for_state(states, ReaderStatus.OK)
        os.write(pty.master_fd, b"04A2B3C4\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(present_card)
        with trio.fail_after(WAIT), pytest.raises(RuntimeError, match="consumer bug on 04A2B3C4"):
            await reader.run()
