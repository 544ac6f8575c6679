"""Register fields as data: decoding, encoding, read planning.

Expected register contents are built here with ``struct`` from the physical
value, never with ``Field.encode``, so a bug in the codec cannot hide itself.
"""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fieldbus.errors import DeviceDataError
from fieldbus.registers import (
    Block,
    DType,
    Field,
    Table,
    WordOrder,
    decode_fields,
    plan_reads,
)

HI = WordOrder.HIGH_FIRST
LO = WordOrder.LOW_FIRST


def words(fmt: str, value: float, order: WordOrder = HI) -> list[int]:
    """Big-endian ``struct`` packing split into 16-bit words, in ``order``."""
    data = struct.pack(">" + fmt, value)
    out = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    return out if order is HI else out[::-1]


# -- decode: every type, both word orders -------------------------------------


@pytest.mark.parametrize(
    ("dtype", "fmt", "value"),
    [
        (DType.U16, "H", 0xBEEF),
        (DType.S16, "h", -2),
        (DType.S16, "h", 32767),
        (DType.U32, "I", 0x1234_5678),
        (DType.S32, "i", -123_456_789),
        (DType.U64, "Q", 0x0123_4567_89AB_CDEF),
    ],
)
@pytest.mark.parametrize("order", [HI, LO])
def test_decode_integers(dtype: DType, fmt: str, value: int, order: WordOrder) -> None:
    f = Field(Table.INPUT, 0, dtype, word_order=order)
    assert f.decode(words(fmt, value, order)) == float(value)


def test_word_order_matters() -> None:
    regs = [0x0001, 0x0002]
    assert Field(Table.INPUT, 0, DType.U32, word_order=HI).decode(regs) == 0x0001_0002
    assert Field(Table.INPUT, 0, DType.U32, word_order=LO).decode(regs) == 0x0002_0001


def test_u64_low_word_first_reverses_all_four_words() -> None:
    f = Field(Table.HOLDING, 0, DType.U64, word_order=LO)
    assert f.decode([0x4444, 0x3333, 0x2222, 0x1111]) == float(0x1111_2222_3333_4444)


@pytest.mark.parametrize("order", [HI, LO])
@pytest.mark.parametrize("value", [230.25, -1500.5, 0.0, 1.0e9])
def test_decode_float32(order: WordOrder, value: float) -> None:
    f = Field(Table.INPUT, 0, DType.F32, word_order=order)
    assert f.decode(words("f", value, order)) == value


def test_decode_bit() -> None:
    f = Field(Table.COIL, 0, DType.BIT)
    assert f.decode([0]) == 0.0
    assert f.decode([1]) == 1.0
    assert f.decode([0xFF00]) == 1.0  # any non-zero value is "on"


def test_decode_char_uses_the_low_byte_only() -> None:
    f = Field(Table.INPUT, 100, DType.CHAR)
    assert f.decode([ord("C")]) == ord("C")
    assert f.decode([(ord("A") << 8) | ord("B")]) == ord("B")


@pytest.mark.parametrize(
    ("dtype", "count"), [(DType.U16, 2), (DType.U32, 1), (DType.F32, 3), (DType.U64, 2)]
)
def test_wrong_register_count_is_a_data_error(dtype: DType, count: int) -> None:
    with pytest.raises(DeviceDataError, match="needs"):
        Field(Table.INPUT, 7, dtype).decode([0] * count)


# -- scale ----------------------------------------------------------------------


def test_scale_integer() -> None:
    f = Field(Table.INPUT, 0, DType.S32, 0.1, LO)
    assert f.decode(words("i", 2301, LO)) == pytest.approx(230.1)
    assert f.decode(words("i", -2301, LO)) == pytest.approx(-230.1)


def test_scale_up() -> None:
    f = Field(Table.HOLDING, 0, DType.U64, 10.0)
    assert f.decode(words("Q", 123_456_789)) == 1_234_567_890.0


def test_scale_float() -> None:
    f = Field(Table.INPUT, 0, DType.F32, 1000.0)
    assert f.decode(words("f", 12.5)) == 12500.0


# -- "not available" ------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "fmt", "sentinel", "order"),
    [
        (DType.U16, "H", 0xFFFF, HI),
        (DType.S16, "H", 0x7FFF, HI),
        (DType.U32, "I", 0xFFFF_FFFF, HI),
        (DType.S32, "I", 0x7FFF_FFFF, HI),
        (DType.S32, "I", 0x7FFF_FFFF, LO),
        (DType.U64, "Q", 0xFFFF_FFFF_FFFF_FFFF, HI),
    ],
)
def test_sentinel_decodes_to_none(dtype: DType, fmt: str, sentinel: int, order: WordOrder) -> None:
    f = Field(Table.HOLDING, 0, dtype, 0.01, order, na=frozenset({sentinel}))
    assert f.decode(words(fmt, sentinel, order)) is None


def test_signed_sentinel_is_compared_as_the_unsigned_bit_pattern() -> None:
    # 0x7FFF_FFFF is the sentinel; -1 (all ones) is a real value of -0.01.
    f = Field(Table.HOLDING, 0, DType.S32, 0.01, na=frozenset({0x7FFF_FFFF}))
    assert f.decode(words("i", -1)) == pytest.approx(-0.01)
    assert f.decode(words("i", 0x7FFF_FFFE)) == pytest.approx(0x7FFF_FFFE * 0.01)


def test_sentinel_in_low_word_first_order_needs_the_reordered_words() -> None:
    f = Field(Table.INPUT, 0, DType.U32, word_order=LO, na=frozenset({0x0000_FFFF}))
    assert f.decode([0xFFFF, 0x0000]) is None
    assert f.decode([0x0000, 0xFFFF]) == float(0xFFFF_0000)


def test_without_sentinel_all_ones_is_a_value() -> None:
    assert Field(Table.HOLDING, 0, DType.U16).decode([0xFFFF]) == 65535.0


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("order", [HI, LO])
def test_float_nan_and_inf_decode_to_none(value: float, order: WordOrder) -> None:
    f = Field(Table.INPUT, 0, DType.F32, word_order=order)
    assert f.decode(words("f", value, order)) is None


def test_float_explicit_sentinel_bits() -> None:
    f = Field(Table.INPUT, 0, DType.F32, na=frozenset({0xFFFF_FFFF}))
    assert f.decode([0xFFFF, 0xFFFF]) is None  # also a NaN
    f = Field(Table.INPUT, 0, DType.F32, na=frozenset({0x0000_0000}))
    assert f.decode([0, 0]) is None


# -- encode (checked against struct, not against decode) ------------------------


@pytest.mark.parametrize(
    ("dtype", "scale", "order", "value", "expected"),
    [
        (DType.U16, 0.1, HI, 16.0, [160]),
        (DType.U16, 0.001, HI, 10.0, [10000]),
        (DType.S16, 0.1, HI, -50.0, words("h", -500)),
        (DType.U32, 1.0, HI, 0x1234_5678, [0x1234, 0x5678]),
        (DType.U32, 1.0, LO, 0x1234_5678, [0x5678, 0x1234]),
        (DType.S32, 0.1, LO, -230.1, words("i", -2301, LO)),
        (DType.U64, 10.0, HI, 1_234_567_890.0, words("Q", 123_456_789)),
        (DType.F32, 1.0, HI, 230.25, words("f", 230.25)),
        (DType.F32, 1000.0, LO, 1500.0, words("f", 1.5, LO)),
        (DType.BIT, 1.0, HI, 1.0, [1]),
        (DType.BIT, 1.0, HI, 0.0, [0]),
        (DType.CHAR, 1.0, HI, ord("F"), [ord("F")]),
    ],
)
def test_encode(
    dtype: DType, scale: float, order: WordOrder, value: float, expected: list[int]
) -> None:
    assert Field(Table.HOLDING, 0, dtype, scale, order).encode(value) == expected


def test_encode_rounds_to_nearest_raw() -> None:
    assert Field(Table.HOLDING, 0, DType.U16, 0.1).encode(10.36) == [104]


def test_encode_clamps_to_the_type_range() -> None:
    assert Field(Table.HOLDING, 0, DType.U16).encode(70000) == [0xFFFF]
    assert Field(Table.HOLDING, 0, DType.U16).encode(-5) == [0]
    assert Field(Table.HOLDING, 0, DType.S16).encode(-40000) == words("h", -32768)


def test_encode_none_gives_the_sentinel() -> None:
    f = Field(Table.HOLDING, 0, DType.S32, word_order=LO, na=frozenset({0x7FFF_FFFF}))
    assert f.encode(None) == [0xFFFF, 0x7FFF]


def test_encode_none_without_sentinel_is_refused() -> None:
    with pytest.raises(ValueError, match="not available"):
        Field(Table.HOLDING, 12, DType.U16).encode(None)


# -- round trip (property) ------------------------------------------------------

_INT_RANGES = {
    DType.U16: (0, 0xFFFF),
    DType.S16: (-0x8000, 0x7FFF),
    DType.U32: (0, 0xFFFF_FFFF),
    DType.S32: (-0x8000_0000, 0x7FFF_FFFF),
    DType.U64: (0, 0xFFFF_FFFF_FFFF_FFFF),
}


@given(
    dtype=st.sampled_from(sorted(_INT_RANGES, key=lambda d: d.name)),
    scale=st.sampled_from([1.0, 0.1, 0.01, 0.001, 10.0, 1000.0]),
    order=st.sampled_from([HI, LO]),
    fraction=st.floats(min_value=0.0, max_value=1.0),
)
def test_integer_round_trip_within_resolution(
    dtype: DType, scale: float, order: WordOrder, fraction: float
) -> None:
    low, high = _INT_RANGES[dtype]
    # Stay within the exactly representable range of a double so that
    # "within half a step" is meaningful for the 64-bit type too.
    high = min(high, 2**50)
    low = max(low, -(2**50))
    value = (low + fraction * (high - low)) * scale
    f = Field(Table.HOLDING, 0, dtype, scale, order)
    decoded = f.decode(f.encode(value))
    assert decoded is not None
    assert abs(decoded - value) <= scale / 2 + abs(value) * 1e-12


@given(
    value=st.floats(allow_nan=False, allow_infinity=False, width=32),
    order=st.sampled_from([HI, LO]),
)
def test_float_round_trip(value: float, order: WordOrder) -> None:
    f = Field(Table.INPUT, 0, DType.F32, word_order=order)
    assert f.decode(f.encode(value)) == value


@given(
    value=st.floats(min_value=-1e6, max_value=1e6).filter(lambda v: v == 0 or abs(v) >= 1e-3),
    scale=st.sampled_from([1.0, 1000.0, 0.001]),
)
def test_scaled_float_round_trip_within_float32_precision(value: float, scale: float) -> None:
    f = Field(Table.INPUT, 0, DType.F32, scale)
    decoded = f.decode(f.encode(value))
    assert decoded is not None
    assert decoded == pytest.approx(value, rel=1e-6, abs=1e-12)


# -- plan_reads ------------------------------------------------------------------


def _u16(address: int, table: Table = Table.HOLDING) -> Field:
    return Field(table, address)


def test_plan_one_block_for_close_fields() -> None:
    fields = {"a": _u16(10), "b": Field(Table.HOLDING, 12, DType.U32), "c": _u16(20)}
    assert plan_reads(fields, max_gap=8) == [Block(Table.HOLDING, 10, 11, ("a", "b", "c"))]


def test_plan_sorts_by_address() -> None:
    fields = {"late": _u16(15), "early": _u16(10)}
    assert plan_reads(fields) == [Block(Table.HOLDING, 10, 6, ("early", "late"))]


def test_plan_gap_boundary() -> None:
    # 4 unused registers between: merged at max_gap=4, split at max_gap=3.
    fields = {"a": _u16(0), "b": _u16(5)}
    assert plan_reads(fields, max_gap=4) == [Block(Table.HOLDING, 0, 6, ("a", "b"))]
    assert plan_reads(fields, max_gap=3) == [
        Block(Table.HOLDING, 0, 1, ("a",)),
        Block(Table.HOLDING, 5, 1, ("b",)),
    ]


def test_plan_gap_counts_from_the_end_of_a_wide_field() -> None:
    fields = {"a": Field(Table.INPUT, 0, DType.U64), "b": _u16(6, Table.INPUT)}
    # a occupies 0..3; 2 unused registers (4, 5) before b.
    assert plan_reads(fields, max_gap=2) == [Block(Table.INPUT, 0, 7, ("a", "b"))]
    assert len(plan_reads(fields, max_gap=1)) == 2


def test_plan_max_count_boundary() -> None:
    fields = {"a": Field(Table.INPUT, 0, DType.U32), "b": Field(Table.INPUT, 8, DType.U32)}
    assert plan_reads(fields, max_count=10) == [Block(Table.INPUT, 0, 10, ("a", "b"))]
    assert plan_reads(fields, max_count=9) == [
        Block(Table.INPUT, 0, 2, ("a",)),
        Block(Table.INPUT, 8, 2, ("b",)),
    ]


def test_plan_never_exceeds_max_count() -> None:
    fields = {f"f{i}": Field(Table.INPUT, 2 * i, DType.F32) for i in range(30)}
    blocks = plan_reads(fields, max_count=10, max_gap=8)
    assert all(b.count <= 10 for b in blocks)
    assert len(blocks) == 6
    assert sorted(n for b in blocks for n in b.names) == sorted(fields)


def test_plan_separates_tables() -> None:
    fields = {"h": _u16(0, Table.HOLDING), "i": _u16(1, Table.INPUT), "c": _u16(2, Table.COIL)}
    blocks = plan_reads(fields)
    assert {(b.table, b.address, b.count, b.names) for b in blocks} == {
        (Table.HOLDING, 0, 1, ("h",)),
        (Table.INPUT, 1, 1, ("i",)),
        (Table.COIL, 2, 1, ("c",)),
    }


def test_plan_two_names_for_one_register() -> None:
    reg = _u16(1007)
    assert plan_reads({"contactor": reg, "faults": reg}) == [
        Block(Table.HOLDING, 1007, 1, ("contactor", "faults"))
    ]


# -- decode_fields ---------------------------------------------------------------


def test_decode_fields_uses_each_fields_offset_in_its_block() -> None:
    fields = {
        "v": Field(Table.INPUT, 0, DType.S32, 0.1, LO),
        "hz": Field(Table.INPUT, 3, DType.S16, 0.1),
        "na": Field(Table.INPUT, 4, DType.U16, na=frozenset({0xFFFF})),
        "e": Field(Table.HOLDING, 100, DType.U32),
    }
    blocks = plan_reads(fields)
    assert blocks == [
        Block(Table.INPUT, 0, 5, ("v", "hz", "na")),
        Block(Table.HOLDING, 100, 2, ("e",)),
    ]
    input_regs = [*words("i", 2301, LO), 0x5555, *words("h", 500), 0xFFFF]
    values = decode_fields(fields, [(blocks[0], input_regs), (blocks[1], words("I", 65536))])
    assert values == {
        "v": pytest.approx(230.1),
        "hz": pytest.approx(50.0),
        "na": None,
        "e": 65536.0,
    }


def test_decode_fields_block_not_at_zero() -> None:
    fields = {"a": _u16(200), "b": _u16(203)}
    block = Block(Table.HOLDING, 200, 4, ("a", "b"))
    assert decode_fields(fields, [(block, [7, 0, 0, 9])]) == {"a": 7.0, "b": 9.0}
