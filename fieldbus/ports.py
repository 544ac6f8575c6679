"""Port addresses: ``tcp://host:port`` and ``rtu:///dev/ttyUSB0?baud=9600&parity=N``.

One string names a bus in the config file, on the command line and in error
messages, so an installer writes the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from fieldbus.errors import PortConfigError

# Modbus over Serial Line V1.02, section 2.5.1: 8 data bits; parity even by
# default, none allowed with two stop bits. Real devices (EVSE DIN: 9600 8N1)
# often ship 8N1 with one stop bit, so every combination below is accepted.
STANDARD_BAUDS = (1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200)
PARITIES = ("N", "E", "O")
DEFAULT_TCP_PORT = 502


@dataclass(frozen=True, slots=True)
class TcpPort:
    host: str
    port: int = DEFAULT_TCP_PORT

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RtuPort:
    device: str
    baud: int = 9600
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8

    @property
    def url(self) -> str:
        return (
            f"rtu://{self.device}?baud={self.baud}&parity={self.parity}"
            f"&stopbits={self.stopbits}&bytesize={self.bytesize}"
        )

    @property
    def char_time(self) -> float:
        """Seconds one character takes on the line (start + data + parity + stop bits)."""
        bits = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        return bits / self.baud

    @property
    def frame_gap(self) -> float:
        """Minimum silence between frames, t3.5.

        Modbus over Serial Line V1.02, section 2.5.1.1: 3.5 character times, but
        fixed at 1.750 ms above 19200 baud.
        """
        return 0.00175 if self.baud > 19200 else 3.5 * self.char_time


PortSpec = TcpPort | RtuPort


def _int_param(url: str, name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise PortConfigError(f"{name}={value!r} is not a whole number", where=url) from None


def parse_port(url: str) -> PortSpec:
    """Parse a port URL; every refusal names the offending part."""
    try:
        parts = urlsplit(url)
        port_number = parts.port
    except ValueError as exc:
        raise PortConfigError(f"malformed port URL ({exc})", where=url) from None
    if parts.scheme == "tcp":
        if not parts.hostname:
            raise PortConfigError("tcp:// URL has no host", where=url)
        if parts.path not in ("", "/") or parts.query:
            raise PortConfigError("tcp:// URL takes only host and port", where=url)
        if port_number == 0:
            raise PortConfigError("TCP port 0 is not a device's port", where=url)
        return TcpPort(parts.hostname, DEFAULT_TCP_PORT if port_number is None else port_number)
    if parts.scheme == "rtu":
        if parts.netloc:
            raise PortConfigError(
                f"rtu:// URL has a host {parts.netloc!r}; write rtu:///dev/ttyX (three slashes)",
                where=url,
            )
        if not parts.path or parts.path == "/":
            raise PortConfigError("rtu:// URL names no serial device", where=url)
        try:
            query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError:
            raise PortConfigError(f"malformed query {parts.query!r}", where=url) from None
        allowed = {"baud", "parity", "stopbits", "bytesize"}
        unknown = sorted(set(query) - allowed)
        if unknown:
            raise PortConfigError(
                f"unknown parameter {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})",
                where=url,
            )
        single = {}
        for key, values in query.items():
            if len(values) != 1:
                raise PortConfigError(f"parameter {key!r} given {len(values)} times", where=url)
            single[key] = values[0]
        baud = _int_param(url, "baud", single.get("baud", "9600"))
        if baud not in STANDARD_BAUDS:
            raise PortConfigError(
                f"baud={baud} is not one of {', '.join(map(str, STANDARD_BAUDS))}", where=url
            )
        parity = single.get("parity", "N").upper()
        if parity not in PARITIES:
            raise PortConfigError(f"parity={parity!r} is not one of N, E, O", where=url)
        stopbits = _int_param(url, "stopbits", single.get("stopbits", "1"))
        if stopbits not in (1, 2):
            raise PortConfigError(f"stopbits={stopbits} is not 1 or 2", where=url)
        bytesize = _int_param(url, "bytesize", single.get("bytesize", "8"))
        if bytesize != 8:
            # Modbus RTU is 8 data bits (Serial Line V1.02, section 2.5.1).
            raise PortConfigError(f"bytesize={bytesize}: Modbus RTU needs 8 data bits", where=url)
        return RtuPort(parts.path, baud, parity, stopbits, bytesize)
    raise PortConfigError(
        f"unknown scheme {parts.scheme!r}; use tcp://host:port or rtu:///dev/ttyX?baud=9600",
        where=url,
    )


def check_unit(unit: int) -> int:
    """Modbus unit (device) ids 1..247 address one device (Serial Line V1.02, 2.2)."""
    if not 1 <= unit <= 247:
        raise PortConfigError(f"unit id {unit} is outside 1..247")
    return unit
