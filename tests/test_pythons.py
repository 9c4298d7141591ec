"""`pip install nefl-edge` on the oldest and newest Python the device side supports: the markers pick the
right ONNX Runtime, the CLI runs, and a portable training step equals this interpreter's within 1e-5.
Slow (a fresh virtual environment each): `just test-pythons`."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nefl_edge.core.specs import ModelConfig, SubmodelSpec
from tests.helpers import build_wheel, step_differences, write_step_inputs

STEP = Path(__file__).resolve().parent / "arm64" / "one_step.py"


def interpreter(version: str) -> str | None:
    """A working python<version>: pyenv's builds first, then the PATH (whose pyenv shims may not work)."""
    candidates = [str(p) for p in sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python"))]
    candidates.append(shutil.which(f"python{version}") or "")
    for python in filter(None, candidates):
        if subprocess.run([python, "-c", "import venv"], capture_output=True).returncode == 0:
            return python
    return None


@pytest.mark.slow
@pytest.mark.parametrize("version", ["3.9", "3.13"])
def test_the_device_install_trains_on_python(
    version: str,
    small_artifacts: Path,
    small_config: ModelConfig,
    small_specs: list[SubmodelSpec],
    fmnist_dir: Path,
    tmp_path: Path,
) -> None:
    python = interpreter(version)
    if python is None:
        pytest.skip(f"no python{version} on this machine")
    subprocess.run([python, "-m", "venv", str(tmp_path / "venv")], check=True)
    venv_python = str(tmp_path / "venv" / "bin" / "python")
    subprocess.run([venv_python, "-m", "pip", "install", "-q", str(build_wheel(tmp_path))], check=True)

    profile = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "nefl-edge"), "profile", "--artifacts", str(small_artifacts)],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    work = tmp_path / "work"
    work.mkdir()
    (work / "artifacts").symlink_to(small_artifacts)
    write_step_inputs(work, small_config, small_specs, fmnist_dir)
    subprocess.run([sys.executable, str(STEP), str(work)], check=True)
    ours = dict(np.load(work / f"result-{platform.machine()}.npz"))
    subprocess.run([venv_python, str(STEP), str(work)], check=True, cwd=tmp_path)
    theirs = np.load(work / f"result-{platform.machine()}.npz")

    training_build = version != "3.13" and platform.machine() == "x86_64"
    assert json.loads(profile.stdout)["backend"] == ("ort-training" if training_build else "portable")
    assert json.loads(profile.stdout)["samples_per_s"] > 0
    for key, diff in step_differences(theirs, ours).items():
        assert diff <= 1e-5, (version, key)
