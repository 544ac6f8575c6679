"""An RFID card reader on a serial line (USB CDC/FTDI or RS-232).

Theory of operation
-------------------
Common readers send one ASCII line per card presented, e.g. ``04A2B3C4\\r\\n``
or ``\\x02123456789A\\x03\\r\\n``; the framing around the UID differs between
models, so a regular expression with one capture group (the tag) says where
it is (``RfidConfig.pattern``). Some readers send the UID's bytes in reverse
order (little-endian); ``reverse_bytes`` turns them around, so the same card
gives the same idTag whichever reader reads it.

The byte stream is cut into lines at ``\\r`` and/or ``\\n``; a line longer
than ``MAX_LINE`` bytes (wrong baud rate, a reader in a binary mode) is
dropped whole, up to its line end, so garbage never grows memory and the tail
of a garbage line is never taken for a card. A matching tag is normalized
(``evse.auth.normalize_id_tag``: OCPP idTags are case-insensitive), then
debounced: readers repeat the UID for as long as the card lies on them, so a
tag seen again within ``debounce`` seconds of its last sighting is ignored
(every sighting restarts the window: a card left on the reader counts once).
Time is trio's clock.

The port is opened with ``fieldbus.links.SerialLink`` (pyserial configures,
trio waits on the descriptor: no threads). A reader unplugged at start or
later never stops the station: ``run`` reports ``started`` after the first
open attempt *whatever its outcome*, keeps ``state`` (ok / disconnected with
the reason, for the status display and StatusNotification's error code
ReaderFailure, OCPP 1.6 ChargePointErrorCode) and tries to open the port
again every ``reopen_interval`` seconds.

The pure parts (``LineSplitter``, ``RfidConfig.tag_from_line``,
``Debouncer``) take bytes and times and return lines, tags and decisions;
``RfidReader`` is the thin trio loop around them.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum

import trio

from evse.auth import normalize_id_tag
from fieldbus.errors import Disconnected, FieldbusError
from fieldbus.links import SerialLink
from fieldbus.ports import RtuPort

log = logging.getLogger(__name__)

#: Longest line kept, in bytes; a card line is a few dozen at most.
MAX_LINE = 256

DEFAULT_PATTERN = r"^\W*([0-9A-Fa-f]{4,20})\W*$"

_LINE_END = re.compile(rb"[\r\n]")
_HEX = re.compile(r"[0-9A-F]+")
_LOGGED_LINE = 80


@dataclass(frozen=True, slots=True)
class RfidConfig:
    """One reader: where it is and how its lines look."""

    device: str
    baud: int = 9600
    #: A regular expression with exactly one capture group, the tag. Searched
    #: (not full-matched) in each line, decoded as Latin-1 so every byte is one
    #: character (``\\x02`` and ``\\x03`` are written as such in the pattern).
    pattern: str = DEFAULT_PATTERN
    #: Reverse the order of the hex bytes of the tag ("04A2B3C4" -> "C4B3A204").
    reverse_bytes: bool = False
    #: Seconds: the same tag again within this of its last sighting is ignored.
    debounce: float = 2.0
    #: Seconds between attempts to open a missing or failed port.
    reopen_interval: float = 5.0
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.device:
            raise ValueError("RFID reader device is empty")
        if self.baud <= 0:
            raise ValueError(f"RFID reader baud={self.baud} is not a positive number")
        if not (self.debounce >= 0 and math.isfinite(self.debounce)):
            raise ValueError(f"RFID reader debounce={self.debounce!r} must be 0 or more seconds")
        if not (self.reopen_interval > 0 and math.isfinite(self.reopen_interval)):
            raise ValueError(
                f"RFID reader reopen_interval={self.reopen_interval!r} must be more than 0 seconds"
            )
        try:
            regex = re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(
                f"RFID pattern {self.pattern!r} is not a regular expression ({exc})"
            ) from None
        if regex.groups != 1:
            raise ValueError(
                f"RFID pattern {self.pattern!r} has {regex.groups} capture groups; "
                "it needs exactly one, around the tag (use (?:...) for other groups)"
            )
        object.__setattr__(self, "regex", regex)

    def tag_from_line(self, line: bytes) -> str:
        """The normalized tag in one line (without its line end).

        Raises ``ValueError`` saying why the line holds no tag.
        """
        match = self.regex.search(line.decode("latin-1"))
        if match is None:
            raise ValueError("does not match the pattern")
        raw = match.group(1)
        if raw is None:
            raise ValueError("matches the pattern, but without its tag group")
        tag = normalize_id_tag(raw)
        if self.reverse_bytes:
            tag = reverse_hex_bytes(tag)
        return tag


def reverse_hex_bytes(tag: str) -> str:
    """``"04A2B3C4"`` -> ``"C4B3A204"``; ``ValueError`` if not whole hex bytes."""
    if len(tag) % 2 or not _HEX.fullmatch(tag.upper()):
        raise ValueError(f"tag {tag!r} is not whole hex bytes, so it cannot be byte-reversed")
    return "".join(tag[i : i + 2] for i in range(len(tag) - 2, -1, -2))


class LineSplitter:
    """Bytes in, complete lines out; lines end at ``\\r`` and/or ``\\n``.

    Empty lines are skipped. A line over ``max_length`` bytes is dropped up to
    its line end, so at most ``max_length`` bytes are ever held.
    """

    def __init__(self, max_length: int = MAX_LINE) -> None:
        self.max_length = max_length
        #: Lines dropped for length so far.
        self.overlong = 0
        self._buffer = b""
        self._discarding = False

    @property
    def pending(self) -> int:
        """Bytes held of an unfinished line."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        *ended, tail = _LINE_END.split(data)
        lines: list[bytes] = []
        for piece in ended:
            if self._discarding:
                # The line end of a line already dropped.
                self._discarding = False
                continue
            line, self._buffer = self._buffer + piece, b""
            if len(line) > self.max_length:
                self.overlong += 1
            elif line:
                lines.append(line)
        if not self._discarding:
            self._buffer += tail
            if len(self._buffer) > self.max_length:
                self._buffer = b""
                self._discarding = True
                self.overlong += 1
        return lines


class Debouncer:
    """Passes a tag unless it was seen within ``interval`` seconds before."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last_seen: dict[str, float] = {}

    def accept(self, tag: str, now: float) -> bool:
        last = self._last_seen.get(tag)
        # Forget tags whose window has passed: the table holds only the cards
        # seen in the last `interval` seconds.
        self._last_seen = {
            seen: at for seen, at in self._last_seen.items() if now - at < self.interval
        }
        self._last_seen[tag] = now
        return last is None or now - last >= self.interval

    def refresh(self, tag: str, now: float) -> None:
        """Count ``tag`` as seen at ``now`` (without a decision)."""
        self._last_seen[tag] = now


class ReaderStatus(StrEnum):
    OK = "ok"
    DISCONNECTED = "disconnected"


@dataclass(frozen=True, slots=True)
class ReaderState:
    status: ReaderStatus
    #: Why the reader is disconnected; empty when ok.
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status is ReaderStatus.OK


class RfidReader:
    """Reads tags from one serial reader and hands each new one to ``on_tag``.

    ``on_tag`` is awaited in the reading loop (it may take as long as an
    authorization); the kernel buffers what the reader sends meanwhile, and
    the debounce window of the tag restarts when ``on_tag`` returns. An exception
    from ``on_tag`` or ``on_state`` ends ``run`` (a bug in the consumer is not
    hidden); port failures never do.
    ``on_state`` is awaited on every change of ``state``.
    """

    def __init__(
        self,
        config: RfidConfig,
        on_tag: Callable[[str], Awaitable[None]],
        *,
        on_state: Callable[[ReaderState], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self._on_tag = on_tag
        self._on_state = on_state
        self.state = ReaderState(ReaderStatus.DISCONNECTED, "not opened yet")
        self._debouncer = Debouncer(config.debounce)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read until cancelled; ``started`` after the first open attempt, even a failed one."""
        link = SerialLink(RtuPort(self.config.device, baud=self.config.baud))
        starting = True
        try:
            while True:
                try:
                    await link.open()
                except FieldbusError as exc:
                    await self._set_state(ReaderState(ReaderStatus.DISCONNECTED, exc.message))
                else:
                    await self._set_state(ReaderState(ReaderStatus.OK))
                    if starting:
                        starting = False
                        task_status.started()
                    try:
                        await self._read(link)
                    except Disconnected as exc:
                        await self._set_state(ReaderState(ReaderStatus.DISCONNECTED, exc.message))
                if starting:
                    starting = False
                    task_status.started()
                await trio.sleep(self.config.reopen_interval)
        finally:
            with trio.CancelScope(shield=True):
                await link.aclose()

    async def _read(self, link: SerialLink) -> None:
        splitter = LineSplitter()
        while True:
            data = await link.receive()
            dropped = splitter.overlong
            lines = splitter.feed(data)
            if splitter.overlong != dropped:
                log.warning(
                    "RFID reader %s: dropped a line over %d bytes (wrong baud rate or format?)",
                    self.config.device,
                    MAX_LINE,
                )
            for line in lines:
                await self._line(line)

    async def _line(self, line: bytes) -> None:
        try:
            tag = self.config.tag_from_line(line)
        except ValueError as exc:
            log.warning(
                "RFID reader %s: ignored line %r: %s",
                self.config.device,
                line[:_LOGGED_LINE],
                exc,
            )
            return
        if not self._debouncer.accept(tag, trio.current_time()):
            log.debug("RFID reader %s: %s again, within the debounce time", self.config.device, tag)
            return
        log.info("RFID reader %s: tag %s", self.config.device, tag)
        await self._on_tag(tag)
        # The window restarts when the consumer is done: the repeats the reader
        # sent meanwhile wait in the kernel's buffer and are read only now, so
        # judged by their read time alone they would pass as a new
        # presentation (and, e.g., stop the transaction just started).
        self._debouncer.refresh(tag, trio.current_time())

    async def _set_state(self, state: ReaderState) -> None:
        if state == self.state:
            return
        self.state = state
        if state.ok:
            log.info("RFID reader %s: open", self.config.device)
        else:
            log.warning(
                "RFID reader %s: disconnected (%s); retrying every %g s",
                self.config.device,
                state.reason,
                self.config.reopen_interval,
            )
        if self._on_state is not None:
            await self._on_state(state)
