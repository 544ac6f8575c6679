"""The fieldbus package's one family of errors.

Everything that can go wrong below the device drivers is translated into one
of these where it enters (pyserial, the socket, pymodbus's decoder), so that
callers catch ``FieldbusError`` and never a library's own exception.
Each error carries ``where``: the port and, where known, the unit id, so a
one-line message tells an installer which device failed.
"""

from __future__ import annotations

# Modbus Application Protocol V1.1b3, section 7: exception codes.
EXCEPTION_NAMES: dict[int, str] = {
    0x01: "ILLEGAL FUNCTION",
    0x02: "ILLEGAL DATA ADDRESS",
    0x03: "ILLEGAL DATA VALUE",
    0x04: "SERVER DEVICE FAILURE",
    0x05: "ACKNOWLEDGE",
    0x06: "SERVER DEVICE BUSY",
    0x08: "MEMORY PARITY ERROR",
    0x0A: "GATEWAY PATH UNAVAILABLE",
    0x0B: "GATEWAY TARGET DEVICE FAILED TO RESPOND",
}


class FieldbusError(Exception):
    """Base of every error raised by fieldbus/."""

    def __init__(self, message: str, *, where: str = "") -> None:
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class PortConfigError(FieldbusError):
    """The port or device address is misconfigured (bad URL, baud rate, unit id)."""


class Disconnected(FieldbusError):
    """The link is down: the TCP peer closed or refused, the serial port vanished."""


class ModbusTimeout(FieldbusError):
    """No complete reply arrived within the request timeout."""


class FrameError(FieldbusError):
    """A reply arrived but is corrupt: CRC mismatch, bad length, wrong function."""


class ExceptionReply(FieldbusError):
    """The device answered with a Modbus exception response."""

    def __init__(self, function_code: int, code: int, *, where: str = "") -> None:
        self.function_code = function_code
        self.code = code
        self.name = EXCEPTION_NAMES.get(code, "UNKNOWN EXCEPTION")
        super().__init__(
            f"exception reply {code} ({self.name}) to function {function_code}", where=where
        )


class DeviceDataError(FieldbusError):
    """The device answered, but with a value its register map does not allow."""


class Unsupported(FieldbusError):
    """The device model has no such feature (e.g. a hardware failsafe)."""


class Superseded(FieldbusError):
    """A request dropped before it went on the wire: its caller no longer wants it
    (a current command overtaken by an off-write)."""
