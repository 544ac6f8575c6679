"""What meters and boards share: reading a model's fields from the bus."""

from __future__ import annotations

from collections.abc import Mapping

from fieldbus.master import ModbusMaster, Wanted
from fieldbus.registers import Block, Field, Table, decode_fields, plan_reads


class FieldReader:
    """Reads a fixed set of fields from one unit with as few requests as allowed."""

    def __init__(
        self,
        master: ModbusMaster,
        unit: int,
        fields: Mapping[str, Field],
        *,
        max_count: int = 125,
        max_gap: int = 8,
    ) -> None:
        self.master = master
        self.unit = unit
        self.fields = dict(fields)
        self.blocks = plan_reads(self.fields, max_count=max_count, max_gap=max_gap)

    async def read_block(self, block: Block) -> list[int]:
        m, unit = self.master, self.unit
        match block.table:
            case Table.INPUT:
                return await m.read_input_registers(unit, block.address, block.count)
            case Table.HOLDING:
                return await m.read_holding_registers(unit, block.address, block.count)
            case Table.COIL:
                return [int(b) for b in await m.read_coils(unit, block.address, block.count)]
            case Table.DISCRETE_INPUT:
                bits = await m.read_discrete_inputs(unit, block.address, block.count)
                return [int(b) for b in bits]

    async def read(self) -> dict[str, float | None]:
        results = [(block, await self.read_block(block)) for block in self.blocks]
        return decode_fields(self.fields, results)


async def write_field(
    master: ModbusMaster,
    unit: int,
    f: Field,
    value: float,
    *,
    multiple: bool = False,
    urgent: bool = False,
    wanted: Wanted = None,
) -> None:
    """Write one field: function 05 for a coil, 06 for one register, 16 for more.

    ``multiple`` forces function 16 for a single register, for devices that
    implement only 03 and 16 (EVSE DIN). ``urgent``: an off-write, which the
    master sends ahead of every waiting request; ``wanted``: see
    ``ModbusMaster.write_register``.
    """
    words = f.encode(value)
    if f.table is Table.COIL:
        await master.write_coil(unit, f.address, bool(words[0]), urgent=urgent, wanted=wanted)
    elif f.table is not Table.HOLDING:
        raise ValueError(f"cannot write to the {f.table.name} table")
    elif len(words) == 1 and not multiple:
        await master.write_register(unit, f.address, words[0], urgent=urgent, wanted=wanted)
    else:
        await master.write_registers(unit, f.address, words, urgent=urgent, wanted=wanted)
