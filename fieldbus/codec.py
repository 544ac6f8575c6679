"""Modbus frames for the master, sans I/O: the requests it sends, the replies it takes.

The master sends eight functions (Modbus Application Protocol V1.1b3, section
6): 01 / 02 read coils / discrete inputs, 03 / 04 read holding / input
registers, 05 / 06 write a single coil / register, 15 / 16 write multiple
coils / registers. This module builds their frames (the MBAP header on TCP,
section 4.1 of Modbus Messaging on TCP/IP V1.0b; unit id and CRC-16 on RTU,
Modbus over Serial Line V1.02, section 2.5.1), finds replies in the bytes
received and decodes them, an exception reply (section 7) included.

Why not pymodbus's framers and PDU classes, as before: they decode every
function of the protocol, at a cost per poll (the debug strings, an object
per reply, a call per register), and importing any of them imports all of
pymodbus: its datastore, its simulator and asyncio, about 1.3 MB of the
station's memory for eight functions. pymodbus stays the reference:
``fieldbus.server`` (the device simulator) executes requests with its
request classes, and ``tests/test_master_codec.py`` checks every frame built
and every reply decoded here against pymodbus's own.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from fieldbus.errors import ExceptionReply, FrameError

#: The functions the master sends (read / write).
READ_BITS = frozenset({1, 2})
READ_REGISTERS = frozenset({3, 4})
WRITE_FUNCTIONS = frozenset({5, 6, 15, 16})


def _crc_table() -> tuple[int, ...]:
    # CRC-16/MODBUS: polynomial 0x8005 reflected (0xA001), initial value 0xFFFF.
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes | bytearray, end: int | None = None) -> int:
    """CRC-16/MODBUS of ``data[:end]``; on the wire its low byte goes first."""
    crc = 0xFFFF
    table = _CRC_TABLE
    for i in range(len(data) if end is None else end):
        crc = (crc >> 8) ^ table[(crc ^ data[i]) & 0xFF]
    return crc


def _word(name: str, value: int) -> int:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{name} {value} is outside 0..65535")
    return value


# -- requests (PDU: function code and data) -----------------------------------


def read_request(code: int, address: int, count: int) -> bytes:
    """Read ``count`` coils, discrete inputs (1..2000), holding or input registers
    (1..125) (01-04; section 6.1-6.4: what one reply can carry)."""
    if code in READ_REGISTERS:
        most = 125
    elif code in READ_BITS:
        most = 2000
    else:
        raise ValueError(f"function {code} is not a read")
    if not 1 <= count <= most:
        raise ValueError(f"count {count}: one request reads 1..{most}")
    return struct.pack(">BHH", code, _word("address", address), count)


def write_register_request(address: int, value: int) -> bytes:
    """Write single register (06)."""
    return struct.pack(">BHH", 6, _word("address", address), _word("value", value))


def write_coil_request(address: int, value: bool) -> bytes:
    """Write single coil (05): 0xFF00 is on, 0x0000 off."""
    return struct.pack(">BHH", 5, _word("address", address), 0xFF00 if value else 0x0000)


def write_registers_request(address: int, values: Sequence[int]) -> bytes:
    """Write multiple registers (16)."""
    count = len(values)
    if not 1 <= count <= 123:
        raise ValueError(f"{count} registers: one request writes 1..123")
    words = [_word("value", v) for v in values]
    return struct.pack(f">BHHB{count}H", 16, _word("address", address), count, 2 * count, *words)


def write_coils_request(address: int, values: Sequence[bool]) -> bytes:
    """Write multiple coils (15): the first coil in the lowest bit of the first byte."""
    count = len(values)
    if not 1 <= count <= 1968:
        raise ValueError(f"{count} coils: one request writes 1..1968")
    packed = bytearray((count + 7) // 8)
    for i, bit in enumerate(values):
        if bit:
            packed[i >> 3] |= 1 << (i & 7)
    return struct.pack(">BHHB", 15, _word("address", address), count, len(packed)) + packed


# -- frames (ADU) -------------------------------------------------------------


def tcp_frame(unit: int, pdu: bytes, tid: int = 0) -> bytes:
    """MBAP header (transaction id, protocol 0, length) + unit id + PDU."""
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


def rtu_frame(unit: int, pdu: bytes) -> bytes:
    """Unit id + PDU + CRC-16 (low byte first)."""
    body = bytes((unit,)) + pdu
    return body + crc16(body).to_bytes(2, "little")


def rtu_reply_size(data: bytes, start: int) -> int | None:
    """The length of the reply frame starting at ``data[start]``: 0 if its byte
    count has not arrived yet, None if no reply the master expects starts there."""
    code = data[start + 1]
    if code & 0x80:
        return 5  # unit, function | 0x80, exception code, CRC
    if code in READ_BITS or code in READ_REGISTERS:
        if len(data) < start + 3:
            return 0
        return data[start + 2] + 5  # unit, function, byte count, data, CRC
    if code in WRITE_FUNCTIONS:
        return 8  # unit, function, address, value or quantity, CRC
    return None


def find_rtu_reply(data: bytes) -> tuple[int, int, bytes]:
    """The first reply frame in ``data``: (bytes used, unit id, PDU).

    As pymodbus's ``FramerRTU.decode`` for a client: bytes before a frame the
    master expects are skipped; (0, unit, b"") while the frame is incomplete;
    a frame whose CRC does not match uses everything received with an empty
    PDU (the caller reports it); a good frame uses everything received, as
    nothing follows a reply on a line with one request in flight.
    """
    size_of_data = len(data)
    for start in range(size_of_data):
        if size_of_data - start < 4:
            return 0, 0, b""
        size = rtu_reply_size(data, start)
        if size is None:
            continue
        unit = data[start]
        if not size or size_of_data < start + size:
            return 0, unit, b""
        end = start + size
        if crc16(data[start:end], size - 2) != data[end - 2] | data[end - 1] << 8:
            return size_of_data, 0, b""
        return size_of_data, unit, data[start + 1 : end - 2]
    return 0, 0, b""


# -- replies ------------------------------------------------------------------

#: Unpackers of N big-endian registers, made as replies of each size come in.
_REGISTER_STRUCTS: dict[int, struct.Struct] = {}

Reply = list[int] | list[bool] | None


def decode_reply(pdu: bytes, code: int, count: int, where: str, unit: int) -> Reply:
    """The reply PDU to a request of function ``code`` for ``count`` items:
    registers (03, 04), bits (01, 02: ``count`` of them) or None (a write's
    acknowledgement).

    Raises ExceptionReply for an exception reply, FrameError for anything
    else that is not a well-formed reply to that request.
    """
    size = len(pdu)
    function = pdu[0] if size else -1
    if function == code and code in READ_REGISTERS:
        # The pollers' replies first: a poll's hot path.
        byte_count = pdu[1] if size > 1 else -1
        if byte_count < 0 or byte_count & 1 or byte_count > size - 2:
            raise FrameError(f"malformed reply to function {code}: {pdu.hex(' ')}", where=where)
        if byte_count >> 1 != count:
            raise FrameError(f"asked for {count} registers, got {byte_count >> 1}", where=where)
        unpacker = _REGISTER_STRUCTS.get(count)
        if unpacker is None:
            unpacker = _REGISTER_STRUCTS[count] = struct.Struct(f">{count}H")
        return list(unpacker.unpack_from(pdu, 2))
    if function < 0:
        raise FrameError("empty reply", where=where)
    if function == code | 0x80:
        if size < 2:
            raise FrameError(f"malformed exception reply: {pdu.hex(' ')}", where=where)
        raise ExceptionReply(code, pdu[1], where=f"{where} unit {unit}")
    if function != code:
        raise FrameError(
            f"reply with function {function} to a function {code} request", where=where
        )
    if code in READ_BITS:
        byte_count = pdu[1] if size > 1 else -1
        if byte_count < 0 or byte_count > size - 2:
            raise FrameError(f"malformed reply to function {code}: {pdu.hex(' ')}", where=where)
        if byte_count * 8 < count:
            raise FrameError(f"asked for {count} bits, got {byte_count * 8}", where=where)
        return [bool(pdu[2 + (i >> 3)] >> (i & 7) & 1) for i in range(count)]
    # A write: the echo of its address and value or quantity.
    if size < 5:
        raise FrameError(f"malformed reply to function {code}: {pdu.hex(' ')}", where=where)
    return None


__all__ = [
    "Reply",
    "crc16",
    "decode_reply",
    "find_rtu_reply",
    "read_request",
    "rtu_frame",
    "tcp_frame",
    "write_coil_request",
    "write_coils_request",
    "write_register_request",
    "write_registers_request",
]
