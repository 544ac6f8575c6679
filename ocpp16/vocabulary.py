"""The OCPP 1.6 words the station and the charge point share: statuses, error
codes and stop reasons.

Declared once, here, so that no other module spells these strings again:
``evse.connector`` decides them, ``evse.store`` keeps them, ``ocpp16`` sends
them. This module imports nothing but the standard library, so the charging
core (``evse.connector``, sans-I/O) can use it without loading trio, the
WebSocket stack or the ``ocpp`` package.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """OCPP 1.6 ChargePointStatus (section 7.7)."""

    AVAILABLE = "Available"
    PREPARING = "Preparing"
    CHARGING = "Charging"
    SUSPENDED_EV = "SuspendedEV"
    SUSPENDED_EVSE = "SuspendedEVSE"
    FINISHING = "Finishing"
    RESERVED = "Reserved"
    UNAVAILABLE = "Unavailable"
    FAULTED = "Faulted"


class ErrorCode(StrEnum):
    """OCPP 1.6 ChargePointErrorCode (section 7.6)."""

    NO_ERROR = "NoError"
    CONNECTOR_LOCK_FAILURE = "ConnectorLockFailure"
    EV_COMMUNICATION_ERROR = "EVCommunicationError"
    GROUND_FAILURE = "GroundFailure"
    HIGH_TEMPERATURE = "HighTemperature"
    INTERNAL_ERROR = "InternalError"
    LOCAL_LIST_CONFLICT = "LocalListConflict"
    OTHER_ERROR = "OtherError"
    OVER_CURRENT_FAILURE = "OverCurrentFailure"
    OVER_VOLTAGE = "OverVoltage"
    POWER_METER_FAILURE = "PowerMeterFailure"
    POWER_SWITCH_FAILURE = "PowerSwitchFailure"
    READER_FAILURE = "ReaderFailure"
    RESET_FAILURE = "ResetFailure"
    UNDER_VOLTAGE = "UnderVoltage"
    WEAK_SIGNAL = "WeakSignal"


class StopReason(StrEnum):
    """OCPP 1.6 Reason for StopTransaction (section 7.33)."""

    EMERGENCY_STOP = "EmergencyStop"
    EV_DISCONNECTED = "EVDisconnected"
    HARD_RESET = "HardReset"
    LOCAL = "Local"
    OTHER = "Other"
    POWER_LOSS = "PowerLoss"
    REBOOT = "Reboot"
    REMOTE = "Remote"
    SOFT_RESET = "SoftReset"
    UNLOCK_COMMAND = "UnlockCommand"
    DE_AUTHORIZED = "DeAuthorized"


#: The statuses of a connector while a transaction runs on it (OCPP 1.6 4.9:
#: Charging, SuspendedEV, SuspendedEVSE come between StartTransaction and
#: StopTransaction).
TRANSACTION_STATUSES: frozenset[Status] = frozenset(
    {Status.CHARGING, Status.SUSPENDED_EV, Status.SUSPENDED_EVSE}
)
