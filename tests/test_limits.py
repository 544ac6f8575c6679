"""Current-limit arbitration, table-driven."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evse.limits import (
    MIN_CURRENT,
    CentralSystem,
    Limit,
    LimitInputs,
    arbitrate,
    effective_fallback,
    failsafe_current,
    fallback_max,
)

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
        # Offline with a TxProfile of the running transaction in force: it keeps
        # applying for the rest of the transaction, instead of the fallback.
        (
            LimitInputs(32, 32, 8, smart_charging=20, central_system=OFF, tx_profile=True),
            Limit(20, "smart_charging"),
        ),
        # Offline with a standing ChargePointMax / TxDefault limit: the fallback
        # applies too, the lower wins (a stored profile never lifts the offer
        # above the fallback offline, it may lower it).
        (
            LimitInputs(32, 32, 8, smart_charging=20, central_system=OFF),
            Limit(8, "fallback"),
        ),
        (
            LimitInputs(32, 32, 16, smart_charging=10, central_system=OFF),
            Limit(10, "smart_charging"),
        ),
        # Online the fallback never applies, TxProfile or not.
        (
            LimitInputs(32, 32, 8, smart_charging=20, central_system=ON),
            Limit(20, "smart_charging"),
        ),
        # tx_profile without a limit waives nothing.
        (LimitInputs(32, 32, 8, central_system=OFF, tx_profile=True), Limit(8, "fallback")),
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
    if cs is CentralSystem.OFFLINE:
        # Without tx_profile the fallback always binds offline, a schedule or not.
        assert result.amps <= fb


def test_failsafe_current_is_the_fallback_or_off() -> None:
    assert failsafe_current(10, installer_max=32, hardware_max=80) == 10
    assert failsafe_current(5, installer_max=32, hardware_max=80) == 0


# (fallback, installer_max, hardware_max) -> the fallback in force
@pytest.mark.parametrize(
    ("fallback", "installer_max", "hardware_max", "expected"),
    [
        (10, 32, 80, 10),
        (32, 16, 80, 16),  # above the installer maximum: held at it
        (32, 32, 16, 16),  # above the board's (Heidelberg) maximum: held at it
        (80, 32, 16, 16),
        (16, 16, 16, 16),
        (6, 32, 80, 6),
        (5.999, 32, 80, 0),  # below 6 A is 0 A
        (0, 32, 80, 0),
        (10, 5, 80, 0),  # a maximum below 6 A leaves nothing to offer
        (float("nan"), 32, 80, 0),  # fail closed
        (10, float("nan"), 80, 0),
    ],
)
def test_one_rule_for_fallback_and_failsafe(
    fallback: float, installer_max: float, hardware_max: float, expected: float
) -> None:
    kw = {"installer_max": installer_max, "hardware_max": hardware_max}
    assert effective_fallback(fallback, **kw) == expected
    assert failsafe_current(fallback, **kw) == expected


def test_failsafe_current_never_above_the_installer_or_board_maximum() -> None:
    # Today's bug: FallbackLimit 32 A armed a Heidelberg (16 A) failsafe unclamped.
    assert failsafe_current(32, installer_max=16, hardware_max=80) == 16
    assert failsafe_current(32, installer_max=32, hardware_max=16) == 16


def test_fallback_max_names_what_bounds_it() -> None:
    assert fallback_max(installer_max=16, hardware_max=80) == (16, "installer")
    assert fallback_max(installer_max=32, hardware_max=16) == (16, "hardware")
    assert fallback_max(installer_max=16, hardware_max=16) == (16, "installer")
    assert fallback_max(installer_max=float("nan"), hardware_max=16) == (0, "installer")


def test_the_one_6_a_constant() -> None:
    import ops.config  # noqa: PLC0415
    from fieldbus.boards import BOARD_MODELS  # noqa: PLC0415
    from ocpp16.config import KEYS  # noqa: PLC0415

    assert MIN_CURRENT == 6.0
    # The configuration file has no 6 A of its own any more.
    assert not hasattr(ops.config, "MIN_CHARGING_CURRENT")
    assert ops.config.SETTINGS["limits.fallback"].default == MIN_CURRENT
    # Layers that may not import evse/ keep a copy; it must agree.
    fallback_key = next(k for k in KEYS if k.name == "FallbackLimit")
    assert float(fallback_key.default) == MIN_CURRENT
    for model in BOARD_MODELS.values():
        assert model.capabilities.min_current == MIN_CURRENT, model.kind


@given(amps, amps, amps)
def test_the_fallback_in_force_is_within_every_maximum_and_never_between_0_and_6(
    fb: float, inst: float, hw: float
) -> None:
    result = effective_fallback(fb, installer_max=inst, hardware_max=hw)
    assert result == 0 or result >= MIN_CURRENT
    assert result <= min(fb, inst, hw)
    # The offer while offline agrees with it whenever the fallback binds.
    offline = arbitrate(LimitInputs(hw, inst, fb, central_system=OFF))
    assert offline.amps == result


def test_a_limit_that_is_not_a_number_fails_closed() -> None:
    nan = float("nan")
    assert arbitrate(LimitInputs(32, 32, 6, smart_charging=nan)).amps == 0
    assert arbitrate(LimitInputs(nan, 32, 6)).amps == 0
    assert arbitrate(LimitInputs(32, 32, nan, central_system=OFF)).amps == 0


@given(amps, amps, amps, st.none() | amps, amps)
def test_offline_a_tx_profile_stands_instead_of_the_fallback(
    hw: float, inst: float, fb: float, cable: float | None, sc: float
) -> None:
    """Offline, a TxProfile of the running transaction gives the same offer as online;
    any other smart-charging limit is capped by the fallback as well."""
    planned = arbitrate(LimitInputs(hw, inst, fb, cable, sc, OFF, tx_profile=True))
    assert planned == arbitrate(LimitInputs(hw, inst, fb, cable, sc, ON))
    standing = arbitrate(LimitInputs(hw, inst, fb, cable, sc, OFF))
    assert standing.amps <= planned.amps
    assert standing.amps == 0 or standing.amps <= min(fb, sc)


def test_mains_lost_offers_nothing_whatever_else_allows() -> None:
    inputs = LimitInputs(hardware_max=32.0, installer_max=32.0, fallback=6.0, mains_lost=True)
    limit = arbitrate(inputs)
    assert limit.amps == 0.0
    assert limit.bound_by.startswith("mains lost")
