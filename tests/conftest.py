"""Shared fixtures: the simulator as a separate process (``evse sim``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

SimFactory = Callable[..., dict[str, Any]]


@pytest.fixture
def sim_process() -> Iterator[SimFactory]:
    """Start ``evse sim`` subprocesses; each call returns its ``ready`` endpoints."""
    procs: list[subprocess.Popen[str]] = []

    def start(*devices: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
        args = [sys.executable, "-m", "ops.cli", "sim", "--tcp-port", "0", "--control-port", "0"]
        for device in devices:
            args += ["--device", device]
        proc = subprocess.Popen(
            [*args, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "error"},
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            assert proc.stderr is not None
            raise RuntimeError(f"evse sim did not start: {proc.stderr.read()}")
        ready: dict[str, Any] = json.loads(line)["ready"]
        return ready

    yield start
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
