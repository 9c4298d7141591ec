"""Both command lines: every command has --help, and start-up imports neither torch nor onnx."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = {
    "nefl_edge.coordinator": [
        "specs",
        "export",
        "export-model",
        "serve",
        "simulate",
        "partition",
        "demo",
        "broker-config",
        "broker",
        "add-device",
        "remove-device",
        "devices",
        "site-broker-config",
        "runs",
        "status",
    ],
    "nefl_edge.edge_client": ["join", "agent", "predict", "install-service", "profile", "identity", "enrol"],
}
PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    code = exc.code or 0
heavy = sorted(m for m in ("torch", "onnx", "matplotlib") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
sys.exit(code)
"""


@pytest.mark.parametrize(("package", "command"), [(p, c) for p, cs in COMMANDS.items() for c in cs])
def test_help_works_without_heavy_imports(package: str, command: str) -> None:
    run = subprocess.run([sys.executable, "-c", PROBE, package, command, "--help"], capture_output=True, text=True)

    assert run.returncode == 0, run.stderr
    assert "Usage" in run.stdout and "--help" in run.stdout
    assert "<bool>" not in run.stdout, f"{package} {command} --help shows a <bool> type after a flag"
    assert run.stdout.strip().splitlines()[-1] == "HEAVY:", f"{package} {command} --help imported heavy modules"


@pytest.mark.parametrize("package", sorted(COMMANDS))
def test_the_list_above_is_every_command(package: str) -> None:
    import importlib

    app = importlib.import_module(f"{package}.cli").app
    names = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}  # type: ignore[union-attr]

    assert names == set(COMMANDS[package])
