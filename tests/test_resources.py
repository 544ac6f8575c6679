"""MemoryExhaustion (ops/resources.py): the rule's floors and hysteresis, the
watch task on trio's virtual clock, and the real readings of this machine."""

from __future__ import annotations

import threading
from pathlib import Path

import trio
import trio.testing

from ops import resources
from ops.resources import MIN_FREE_DISK, MIN_FREE_MEMORY, Reading, ResourceWatch

PLENTY = 10 * MIN_FREE_MEMORY


def test_each_resource_is_raised_once_below_its_floor_and_again_only_after_recovering() -> None:
    rule = ResourceWatch()
    assert rule.observe(Reading(PLENTY, PLENTY)) == []
    (low,) = rule.observe(Reading(MIN_FREE_DISK - 1, PLENTY))
    assert low.startswith("storage: ") and "below 8192 KiB" in low
    # Still low, and hovering just above the floor: not again.
    assert rule.observe(Reading(100, PLENTY)) == []
    assert rule.observe(Reading(MIN_FREE_DISK + 1, PLENTY)) == []
    # Back above twice the floor, then low again: raised again.
    assert rule.observe(Reading(2 * MIN_FREE_DISK, PLENTY)) == []
    assert len(rule.observe(Reading(0, PLENTY))) == 1
    # Memory on its own floor; both at once are two events.
    rule = ResourceWatch()
    got = rule.observe(Reading(0, MIN_FREE_MEMORY - 1))
    assert [g.split(":")[0] for g in got] == ["storage", "memory"]
    # What cannot be read is skipped, not taken for zero.
    assert ResourceWatch().observe(Reading(None, None)) == []


async def test_the_watch_samples_at_once_then_every_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    free = [PLENTY, 0, 0, PLENTY, 0]
    times: list[float] = []
    raised: list[tuple[str, str]] = []

    def read() -> Reading:
        times.append(trio.current_time())
        return Reading(free[min(len(times) - 1, len(free) - 1)], PLENTY)

    with trio.move_on_after(4 * resources.INTERVAL + 1):
        await resources.watch(read, lambda t, info: raised.append((t, info)), in_thread=False)
    assert times == [0.0, 60.0, 120.0, 180.0, 240.0]
    # 0 after plenty: raised; 0 again: not; plenty then 0: raised again.
    assert [t for t, _ in raised] == ["MemoryExhaustion", "MemoryExhaustion"]


async def test_the_station_reads_in_a_worker_thread() -> None:
    where: list[str] = []

    def read() -> Reading:
        where.append(threading.current_thread().name)
        return Reading(0, PLENTY)

    raised: list[str] = []
    with trio.move_on_after(0.2):
        await resources.watch(read, lambda t, info: raised.append(t), interval=0.01)
    assert len(where) >= 2 and threading.main_thread().name not in where
    assert raised == ["MemoryExhaustion"]


def test_this_machine_is_read(tmp_path: Path) -> None:
    reading = resources.reader(tmp_path)()
    assert reading.disk is not None and reading.disk > 0
    assert reading.memory is not None and reading.memory > 0
    assert resources.read_free_disk(tmp_path / "missing") is None
    assert resources.read_meminfo(tmp_path / "no-meminfo") is None
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:   2048 kB\n")
    assert resources.read_meminfo(tmp_path / "meminfo") == 2048 * 1024
