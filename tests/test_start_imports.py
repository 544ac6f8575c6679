"""What a station with no central system loads at start (issue 7, resident memory).

jsonschema and the ocpp package's runtime (``ocpp/v16/__init__.py`` imports its
asyncio ChargePoint) cost about 5 MB resident; the station needs them only once
it validates an OCPP payload, i.e. once a central system is connected
(ocpp16/schemas.py). difflib is only for a misspelt key in the file. A fresh
interpreter goes through the start of ``evse run`` (ops/run.py's
``_run_locked`` and ``_supervise``, up to the Supervisor) and reports what it
has loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Module name prefixes the start must not load ("ocpp." is the ocpp package's
#: modules: its empty top-level ``ocpp`` is how schemas.py finds its files).
LAZY = (
    "jsonschema",
    "referencing",
    "rpds",
    "ocpp.",
    "asyncio",
    "difflib",
    # Release images are built and read only by `evse release` and an update
    # (zipfile is not here: importlib.metadata, for the version, loads it).
    "tarfile",
)

CHILD = """
import json, sys
from pathlib import Path

import ops.cli  # what `python -m ops.cli run` loads; its run command then:
from evse.supervisor import Supervisor
from ops.config import config_from_dict
from ops.control import control_service
from ops.progress import Transfers
from ops.run import open_central, plan_from_config

LAZY = tuple(json.loads(sys.argv[2]))
data_dir = Path(sys.argv[1])
config = config_from_dict(
    {
        "station": {"serial": "IMPORTS-0001", "data_dir": str(data_dir)},
        "board": {"kind": "evse-din", "port": "tcp://127.0.0.1:1502", "unit": 1},
        "meter": {"kind": "sdm630", "port": "tcp://127.0.0.1:1502", "unit": 2},
        "authorization": {"mode": "local", "tags": ["04A2B3C4"]},
        "web": {"enabled": False},
    }
)
central = open_central(config)
try:
    services = [
        control_service(
            str(data_dir / "control.sock"), central.registry, central.queue, Transfers(),
            config=config,
        )
    ]
    plan = plan_from_config(
        config,
        services=services,
        registry=central.registry,
        central_steps=central.port.auth_steps(),
    )
    Supervisor(plan, central=central.port)
    loaded = lambda: sorted(m for m in sys.modules if m.startswith(LAZY))
    at_start = loaded()
    # The first payload a connected station validates (its BootNotification).
    from ocpp16.schemas import validate_request
    validate_request(
        "BootNotification", {"chargePointVendor": "evse-firmware", "chargePointModel": "AC"}
    )
    print(json.dumps({"start": at_start, "validated": loaded()}))
finally:
    central.close()
"""


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    data_dir = tmp_path_factory.mktemp("data")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(data_dir), json.dumps(LAZY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out: dict[str, list[str]] = json.loads(result.stdout)
    return out


@pytest.mark.slow  # starts a process
def test_start_without_central_system_loads_no_ocpp_runtime_jsonschema_or_difflib(
    loaded: dict[str, list[str]],
) -> None:
    assert loaded["start"] == []


@pytest.mark.slow  # starts a process
def test_first_validation_loads_jsonschema_but_not_the_ocpp_runtime(
    loaded: dict[str, list[str]],
) -> None:
    # The check above sees the modules when they are there.
    assert "jsonschema" in loaded["validated"]
    assert not [m for m in loaded["validated"] if m.startswith(("ocpp.", "asyncio"))]


def test_enums_loaded_alone_are_the_ocpp_packages_enums() -> None:
    from ocpp.v16 import enums  # noqa: PLC0415 - the package as anyone else imports it

    from ocpp16.schemas import ACTIONS, OCPP_ENUMS  # noqa: PLC0415

    assert {a.value for a in enums.Action} == ACTIONS
    for name in (
        "ChargingProfileKindType",
        "ChargingProfilePurposeType",
        "ChargingProfileStatus",
        "ChargingRateUnitType",
        "ClearChargingProfileStatus",
        "RecurrencyKind",
    ):
        ours, theirs = getattr(OCPP_ENUMS, name), getattr(enums, name)
        assert [(m.name, m.value) for m in ours] == [(m.name, m.value) for m in theirs]
        # StrEnum members: equal to the package's and to their text in payloads.
        assert all(m == getattr(theirs, m.name) == m.value for m in ours)
