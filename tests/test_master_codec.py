"""The master's own Modbus codec (fieldbus.codec) against pymodbus, the reference.

Every request frame the master builds must be byte for byte what pymodbus's
framers build for the same request; every reply pymodbus's server side
encodes must decode to the same registers or bits; the RTU reply finder must
find the same frame (or wait, or report a CRC error) in the same bytes as
pymodbus's ``FramerRTU``. No I/O: pure functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    ReadCoilsResponse,
    ReadDiscreteInputsRequest,
    ReadDiscreteInputsResponse,
    WriteMultipleCoilsRequest,
    WriteMultipleCoilsResponse,
    WriteSingleCoilRequest,
    WriteSingleCoilResponse,
)
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    ReadInputRegistersRequest,
    ReadInputRegistersResponse,
    WriteMultipleRegistersRequest,
    WriteMultipleRegistersResponse,
    WriteSingleRegisterRequest,
    WriteSingleRegisterResponse,
)

from fieldbus import codec
from fieldbus.errors import ExceptionReply, FrameError

units = st.integers(0, 247)
addresses = st.integers(0, 0xFFFF)
words = st.integers(0, 0xFFFF)

_READS: dict[int, type[ModbusPDU]] = {
    1: ReadCoilsRequest,
    2: ReadDiscreteInputsRequest,
    3: ReadHoldingRegistersRequest,
    4: ReadInputRegistersRequest,
}


def pymodbus_frames(request: ModbusPDU) -> tuple[bytes, bytes]:
    """(TCP, RTU) frames pymodbus's client framers build for ``request``."""
    tcp = FramerSocket(DecodePDU(is_server=False)).buildFrame(request)
    rtu = FramerRTU(DecodePDU(is_server=False)).buildFrame(request)
    return tcp, rtu


def server_pdu(response: ModbusPDU) -> bytes:
    """A reply PDU as pymodbus's server side encodes it."""
    return response.function_code.to_bytes(1, "big") + response.encode()


def ours(unit: int, pdu: bytes) -> tuple[bytes, bytes]:
    return codec.tcp_frame(unit, pdu), codec.rtu_frame(unit, pdu)


@given(st.binary(max_size=300))
def test_crc_is_pymodbus_crc(data: bytes) -> None:
    # pymodbus returns the CRC byte-swapped: its high byte is the one sent first.
    swapped = FramerRTU.compute_CRC(data)
    assert codec.crc16(data) == ((swapped & 0xFF) << 8 | swapped >> 8)
    assert codec.crc16(data + b"tail", len(data)) == codec.crc16(data)


@given(st.sampled_from([1, 2, 3, 4]), units, addresses, st.integers(1, 2000))
def test_read_requests_are_pymodbus_frames(code: int, unit: int, address: int, count: int) -> None:
    if code in (3, 4):
        count = count % 125 + 1
    request = _READS[code](address=address, count=count, dev_id=unit)
    assert ours(unit, codec.read_request(code, address, count)) == pymodbus_frames(request)


@pytest.mark.parametrize(("code", "count"), [(1, 0), (2, 2001), (3, 0), (4, 126)])
def test_read_counts_one_reply_cannot_carry_are_refused_as_pymodbus_refuses_them(
    code: int, count: int
) -> None:
    with pytest.raises(ValueError, match=f"count {count}: one request reads 1.."):
        codec.read_request(code, 0, count)
    with pytest.raises(ValueError, match=f"count {count}"):
        pymodbus_frames(_READS[code](address=0, count=count, dev_id=1))


@given(units, addresses, words)
def test_write_register_is_pymodbus_frame(unit: int, address: int, value: int) -> None:
    request = WriteSingleRegisterRequest(address=address, registers=[value], dev_id=unit)
    assert ours(unit, codec.write_register_request(address, value)) == pymodbus_frames(request)


@given(units, addresses, st.booleans())
def test_write_coil_is_pymodbus_frame(unit: int, address: int, value: bool) -> None:
    request = WriteSingleCoilRequest(address=address, bits=[value], dev_id=unit)
    assert ours(unit, codec.write_coil_request(address, value)) == pymodbus_frames(request)


@given(units, addresses, st.lists(words, min_size=1, max_size=123))
def test_write_registers_is_pymodbus_frame(unit: int, address: int, values: list[int]) -> None:
    request = WriteMultipleRegistersRequest(address=address, registers=values, dev_id=unit)
    assert ours(unit, codec.write_registers_request(address, values)) == pymodbus_frames(request)


@given(units, addresses, st.lists(st.booleans(), min_size=1, max_size=1968))
def test_write_coils_is_pymodbus_frame(unit: int, address: int, values: list[bool]) -> None:
    request = WriteMultipleCoilsRequest(address=address, bits=values, dev_id=unit)
    assert ours(unit, codec.write_coils_request(address, values)) == pymodbus_frames(request)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: codec.read_request(3, 70000, 1), "address 70000 is outside 0..65535"),
        (lambda: codec.read_request(3, 0, -1), "count -1: one request reads 1..125"),
        (lambda: codec.read_request(7, 0, 1), "function 7 is not a read"),
        (lambda: codec.write_register_request(0, 65536), "value 65536 is outside"),
        (lambda: codec.write_registers_request(0, []), "0 registers"),
        (lambda: codec.write_registers_request(0, [0] * 124), "124 registers"),
        (lambda: codec.write_coils_request(0, [True] * 1969), "1969 coils"),
    ],
)
def test_requests_that_cannot_be_encoded_are_refused(
    build: Callable[[], bytes], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@given(st.sampled_from([3, 4]), st.lists(words, min_size=1, max_size=125))
def test_register_replies_decode_as_pymodbus_encodes_them(code: int, values: list[int]) -> None:
    response_class = ReadHoldingRegistersResponse if code == 3 else ReadInputRegistersResponse
    pdu = server_pdu(response_class(registers=values))
    assert codec.decode_reply(pdu, code, len(values), "tcp://x:1", 1) == values


@given(st.sampled_from([1, 2]), st.lists(st.booleans(), min_size=1, max_size=2000))
def test_bit_replies_decode_as_pymodbus_encodes_them(code: int, bits: list[bool]) -> None:
    response_class = ReadCoilsResponse if code == 1 else ReadDiscreteInputsResponse
    pdu = server_pdu(response_class(bits=bits))
    assert codec.decode_reply(pdu, code, len(bits), "tcp://x:1", 1) == bits


@pytest.mark.parametrize(
    "response",
    [
        WriteSingleCoilResponse(address=9, bits=[True]),
        WriteSingleRegisterResponse(address=9, registers=[1234]),
        WriteMultipleCoilsResponse(address=9, count=3),
        WriteMultipleRegistersResponse(address=9, count=3),
    ],
)
def test_write_acknowledgements_decode(response: ModbusPDU) -> None:
    pdu = server_pdu(response)
    assert codec.decode_reply(pdu, response.function_code, 0, "tcp://x:1", 1) is None
    with pytest.raises(FrameError, match="malformed reply"):
        codec.decode_reply(pdu[:4], response.function_code, 0, "tcp://x:1", 1)


@pytest.mark.parametrize("code", [1, 2, 3, 4, 5, 6, 15, 16])
@pytest.mark.parametrize("exception", [1, 2, 3, 4, 6, 11])
def test_exception_replies_raise_with_their_code(code: int, exception: int) -> None:
    pdu = server_pdu(ExceptionResponse(code, exception))
    with pytest.raises(ExceptionReply) as info:
        codec.decode_reply(pdu, code, 1, "rtu:///dev/ttyX", 7)
    assert (info.value.function_code, info.value.code) == (code, exception)
    assert info.value.where == "rtu:///dev/ttyX unit 7"


@pytest.mark.parametrize(
    ("pdu", "code", "count", "message"),
    [
        (b"", 3, 1, "empty reply"),
        (b"\x83", 3, 1, "malformed exception reply"),
        (b"\x04\x02\x00\x01", 3, 1, "reply with function 4 to a function 3 request"),
        (b"\x03\x02\x00\x01", 3, 2, "asked for 2 registers, got 1"),
        (b"\x03\x03\x00\x01\x02", 3, 1, "malformed reply to function 3"),
        (b"\x03\x04\x00\x01", 3, 2, "malformed reply to function 3"),
        (b"\x03", 3, 1, "malformed reply to function 3"),
        (b"\x01\x01\x05", 1, 9, "asked for 9 bits, got 8"),
        (b"\x01\x02\x05", 1, 9, "malformed reply to function 1"),
    ],
)
def test_malformed_replies_are_frame_errors(
    pdu: bytes, code: int, count: int, message: str
) -> None:
    with pytest.raises(FrameError, match=message):
        codec.decode_reply(pdu, code, count, "tcp://x:1", 1)


# -- finding RTU replies in the received bytes, as pymodbus's FramerRTU does -----

_REPLIES: list[ModbusPDU] = [
    ReadHoldingRegistersResponse(registers=[1, 2, 3]),
    ReadInputRegistersResponse(registers=list(range(40))),
    ReadCoilsResponse(bits=[True, False, True]),
    ReadDiscreteInputsResponse(bits=[False] * 17),
    WriteSingleRegisterResponse(address=3, registers=[7]),
    WriteSingleCoilResponse(address=3, bits=[False]),
    WriteMultipleRegistersResponse(address=3, count=2),
    WriteMultipleCoilsResponse(address=3, count=9),
    ExceptionResponse(3, 2),
]


def reference_find(data: bytes) -> tuple[int, int, bytes]:
    used, dev_id, _, pdu = FramerRTU(DecodePDU(is_server=False)).decode(data)
    return used, dev_id, pdu


def rtu_reply(unit: int, response: ModbusPDU) -> bytes:
    return codec.rtu_frame(unit, server_pdu(response))


@given(st.sampled_from(_REPLIES), units, st.integers(0, 40))
def test_a_reply_is_found_as_pymodbus_finds_it(response: ModbusPDU, unit: int, cut: int) -> None:
    frame = rtu_reply(unit, response)
    # Whole, or still arriving: the same answer (a frame, or "wait").
    for data in (frame, frame[: min(cut, len(frame))]):
        assert codec.find_rtu_reply(data) == reference_find(data)


@given(st.sampled_from(_REPLIES), units, st.integers(0, 200), st.integers(0, 7))
def test_a_corrupt_reply_is_reported_as_pymodbus_reports_it(
    response: ModbusPDU, unit: int, where: int, bit: int
) -> None:
    frame = bytearray(rtu_reply(unit, response))
    # A flipped bit after the function code (which decides the frame's size).
    position = 2 + where % (len(frame) - 2)
    frame[position] ^= 1 << bit
    data = bytes(frame)
    found = codec.find_rtu_reply(data)
    assert found == reference_find(data)


def test_noise_before_a_reply_is_skipped_as_pymodbus_skips_it() -> None:
    frame = rtu_reply(0x20, ReadHoldingRegistersResponse(registers=[5, 6]))
    # No frame starts where the byte after would be a function neither the
    # master nor pymodbus's client knows (0x41, then the unit id 0x20): the
    # finder moves past each such byte until the reply starts.
    data = bytes([0x3F, 0x41]) + frame
    assert codec.find_rtu_reply(data) == reference_find(data) == (len(data), 0x20, frame[1:-2])


@given(st.binary(max_size=64))
def test_random_bytes_get_the_same_verdict_as_pymodbus(data: bytes) -> None:
    # pymodbus's client table knows more functions than the master sends (07,
    # 08, 11, 12, 17, 20-24, 43): where such a function byte comes first the
    # two may frame differently, so compare only where neither meets one.
    known = {0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0F, 0x10}
    if any(b not in known and not b & 0x80 for b in data[1:]):
        return
    assert codec.find_rtu_reply(data) == reference_find(data)


def test_random_frames_round_trip() -> None:
    # Large random register replies, end to end through both codecs.
    for _ in range(50):
        values = list(os.urandom(2 * 125))
        registers = [values[i] << 8 | values[i + 1] for i in range(0, 250, 2)]
        frame = rtu_reply(9, ReadInputRegistersResponse(registers=registers))
        used, unit, pdu = codec.find_rtu_reply(frame)
        assert (used, unit) == (len(frame), 9)
        assert codec.decode_reply(pdu, 4, 125, "rtu:///dev/x", 9) == registers
