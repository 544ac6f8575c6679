"""Current-limit arbitration, table-driven."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evse.limits import CentralSystem, Limit, LimitInputs, arbitrate, failsafe_current

OFF, ON, NONE = CentralSystem.OFFLINE, CentralSystem.ONLINE, CentralSystem.NOT_CONFIGURED


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        (LimitInputs(32, 16, 6), Limit(16, "installer")),
        (LimitInputs(16, 32, 6), Limit(16, "hardware")),
        (LimitInputs(32, 32, 6, cable=20), Limit(20, "cable")),
        (LimitInputs(32, 32, 6, cable=13, smart_charging=10), Limit(10, "smart_charging")),
        (LimitInputs(32, 32, 8, central_system=OFF), Limit(8, "fallback")),
        (LimitInputs(32, 32, 8, central_system=ON), Limit(32, "hardware")),
        (LimitInputs(32, 32, 8, central_system=NONE), Limit(32, "hardware")),
        # Offline with a schedule still in force: the schedule gives the limit.
        (
            LimitInputs(32, 32, 8, smart_charging=20, central_system=OFF),
            Limit(20, "smart_charging"),
        ),
        (LimitInputs(32, 32, 5.9, central_system=OFF), Limit(0, "fallback (below 6 A)")),
        (LimitInputs(32, 32, 6, smart_charging=0), Limit(0, "smart_charging (below 6 A)")),
        (LimitInputs(32, 32, 6, smart_charging=6), Limit(6, "smart_charging")),
        (LimitInputs(32, 4, 6), Limit(0, "installer (below 6 A)")),
    ],
)
def test_lowest_limit_wins(inputs: LimitInputs, expected: Limit) -> None:
    assert arbitrate(inputs) == expected


amps = st.floats(min_value=0, max_value=100, allow_nan=False)


@given(amps, amps, amps, st.none() | amps, st.none() | amps, st.sampled_from(list(CentralSystem)))
def test_never_above_any_limit_and_never_between_0_and_6(
    hw: float, inst: float, fb: float, cable: float | None, sc: float | None, cs: CentralSystem
) -> None:
    result = arbitrate(LimitInputs(hw, inst, fb, cable, sc, cs))
    assert result.amps == 0 or result.amps >= 6
    assert result.amps <= min(hw, inst)
    for extra in (cable, sc):
        if extra is not None:
            assert result.amps <= extra
    if cs is CentralSystem.OFFLINE and sc is None:
        assert result.amps <= fb


def test_failsafe_current_is_the_fallback_or_off() -> None:
    assert failsafe_current(10) == 10
    assert failsafe_current(5) == 0


def test_a_limit_that_is_not_a_number_fails_closed() -> None:
    nan = float("nan")
    assert arbitrate(LimitInputs(32, 32, 6, smart_charging=nan)).amps == 0
    assert arbitrate(LimitInputs(nan, 32, 6)).amps == 0
    assert arbitrate(LimitInputs(32, 32, nan, central_system=OFF)).amps == 0
