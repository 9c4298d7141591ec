"""One error model: an error of ours ends a command with one `error:` line and its documented exit code;
both command lines have --version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nefl_edge.core import __version__
from nefl_edge.core.errors import ExitCode


def coord(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nefl_edge.coordinator", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


@pytest.mark.parametrize("module", ["nefl_edge.coordinator", "nefl_edge.edge_client"])
def test_both_command_lines_tell_their_version(module: str) -> None:
    run = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60)

    assert run.returncode == 0, run.stderr
    program = "nefl-coord" if module.endswith("coordinator") else "nefl-edge"
    assert run.stdout.startswith(f"{program} {__version__} (commit "), run.stdout
    assert "ONNX Runtime " in run.stdout and "Python " in run.stdout, run.stdout


def test_a_method_the_devices_cannot_train_is_refused_with_exit_code_2(tmp_path: Path) -> None:
    run = coord("serve", "--broker", "127.0.0.1:1", "--method", "fjord", "--runs-dir", str(tmp_path))

    assert run.returncode == ExitCode.BAD_INPUT, run.stderr
    assert run.stderr.count("error:") == 1 and "simulate" in run.stderr
    assert "Traceback" not in run.stderr


def test_an_unknown_mqtt_version_is_refused(tmp_path: Path) -> None:
    run = coord("serve", "--broker", "127.0.0.1:1", "--mqtt-version", "7", "--runs-dir", str(tmp_path))

    assert run.returncode == ExitCode.BAD_INPUT
    assert "--mqtt-version must be 3.1.1 or 5" in run.stderr


def test_an_unreachable_broker_exits_with_code_3(tmp_path: Path) -> None:
    run = coord(
        "serve", "--broker", "127.0.0.1:1", "--gammas", "0.5,1.0", "--eval-samples", "50", "--runs-dir", str(tmp_path)
    )

    assert run.returncode == ExitCode.BROKER, run.stderr[-2000:]
    assert run.stderr.count("error:") == 1 and "127.0.0.1:1" in run.stderr


def test_resume_of_a_folder_without_a_checkpoint_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")

    run = coord("serve", "--broker", "127.0.0.1:1", "--resume", str(tmp_path))

    assert run.returncode == ExitCode.BAD_INPUT
    assert "checkpoint.json is missing" in run.stderr


def test_resume_refuses_a_state_file_that_was_altered(tmp_path: Path) -> None:
    from nefl_edge.coordinator import checkpoint

    checkpoint.save(tmp_path, checkpoint.Checkpoint(2, {"w": __import__("numpy").ones(3, "float32")}, {}, {}))
    state = next(tmp_path.glob("state-*.safetensors"))
    state.write_bytes(state.read_bytes()[:-4] + b"\0\0\0\0")

    with pytest.raises(checkpoint.CheckpointError, match="does not match the sha256"):
        checkpoint.load(tmp_path)
    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint\.json is damaged"):
        checkpoint.load(tmp_path)
