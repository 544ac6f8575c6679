"""What the firmware's wheel holds and needs, the lab package beside it, and
coverage of child processes."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from ops.demo import LAB_MISSING
from tests.test_install import wheelhouse  # noqa: F401 - the session's shared fixture

CHECKOUT = Path(__file__).resolve().parent.parent
FIRMWARE = ("evse", "fieldbus", "ocpp16", "ops")


def project(path: Path) -> dict[str, object]:
    data: dict[str, object] = tomllib.loads(path.read_text())["project"]
    return data


def names(requirements: object) -> set[str]:
    assert isinstance(requirements, list)
    return {
        str(r).split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() for r in requirements
    }


def test_runtime_dependencies_are_the_stations_only() -> None:
    runtime = names(project(CHECKOUT / "pyproject.toml")["dependencies"])
    assert "websockets" not in runtime
    assert {"trio", "pymodbus", "ocpp"} <= runtime
    # The bench central system's own needs are the lab's, still pinned.
    assert {"websockets", "ocpp"} <= names(
        project(CHECKOUT / "lab" / "pyproject.toml")["dependencies"]
    )
    pins = (CHECKOUT / "constraints.txt").read_text().splitlines()
    assert any(line.startswith("websockets==") for line in pins)


def test_no_firmware_module_imports_the_lab_or_websockets() -> None:
    offenders = []
    for package in FIRMWARE:
        for source in sorted((CHECKOUT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(source.read_text(), str(source))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    modules = [node.module]
                else:
                    continue
                offenders += [
                    f"{source.relative_to(CHECKOUT)}: {m}"
                    for m in modules
                    if m.split(".")[0] in ("websockets", "evse_lab")
                ]
    assert offenders == []
    assert not (CHECKOUT / "ops" / "csms.py").exists()


@pytest.mark.slow
def test_the_wheel_holds_the_station_and_its_install_files(wheelhouse: Path) -> None:  # noqa: F811
    wheel = next(wheelhouse.glob("evse_firmware-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        files = set(z.namelist())
        metadata = z.read(next(n for n in files if n.endswith(".dist-info/METADATA"))).decode()
        shipped_pins = z.read("ops/systemd/constraints.txt").decode()
    for name in ("evse.service", "evse.path", "evse.sysusers"):
        assert f"ops/systemd/{name}" in files
    # The link in the checkout becomes the file itself.
    assert shipped_pins == (CHECKOUT / "constraints.txt").read_text()
    assert "ops/install.py" in files and "ops/privileges.py" in files
    # The installer's page has its script and style sheet on a gateway too.
    assert {"ops/web/static/app.js", "ops/web/static/app.css"} <= files
    assert not [f for f in files if "csms" in f or f.startswith(("evse_lab", "tests/", "bench/"))]
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not [line for line in requires if "websockets" in line]


@pytest.mark.slow
def test_demo_without_the_lab_says_how_to_get_it() -> None:
    # As if evse-lab were not installed (a gateway's venv).
    hide = (
        "import sys; sys.modules['evse_lab'] = None; "
        "from ops.cli import main; sys.exit(main(['demo']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", hide],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"evse demo: error: {LAB_MISSING}"]
    assert "pip install -c constraints.txt -e ./lab" in LAB_MISSING


@pytest.mark.slow
def test_lab_central_system_runs_as_a_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "evse_lab.csms", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m evse_lab.csms")


@pytest.mark.slow
def test_coverage_measures_child_processes(tmp_path: Path) -> None:
    """With the project's coverage settings, a module imported only by a child
    process (as ``evse run`` in the end-to-end tests) is measured."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import subprocess, sys\n"
        "subprocess.run([sys.executable, '-c', 'import ops.probe'], check=True)\n"
    )
    # Measured on its own, not by the coverage that may be measuring this test.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    env["COVERAGE_FILE"] = str(tmp_path / ".coverage")
    rc = ["--rcfile", str(CHECKOUT / "pyproject.toml")]
    coverage = [sys.executable, "-m", "coverage"]
    for step in (
        [*coverage, "run", *rc, str(script)],
        [*coverage, "combine", *rc, "--keep"],
    ):
        subprocess.run(step, cwd=CHECKOUT, env=env, check=True, timeout=120, capture_output=True)
    report = subprocess.run(
        [*coverage, "report", *rc, "--include=*/ops/probe.py", "--format=total"],
        cwd=CHECKOUT,
        env=env,
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )
    # Its imports and definitions ran in the child only.
    assert int(report.stdout.strip()) > 0
