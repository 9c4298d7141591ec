"""An emulated Raspberry Pi (Debian arm64 under qemu-user-static) trains with stock onnxruntime from PyPI and
gets the same step as this x86_64 machine. Slow (a few minutes the first time): `just test-arm64`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nefl_edge.core.specs import ModelConfig, SubmodelSpec
from tests.helpers import build_wheel, step_differences, write_step_inputs

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "arm64"


@pytest.mark.slow
def test_one_step_on_an_emulated_arm64_device_matches_x86_64(
    small_artifacts: Path, small_config: ModelConfig, small_specs: list[SubmodelSpec], fmnist_dir: Path, tmp_path: Path
) -> None:
    root = Path(os.environ.get("NEFL_ARM64_ROOT", REPO / ".cache" / "arm64-rootfs"))
    wheel = build_wheel(tmp_path / "wheel")
    started = time.perf_counter()
    subprocess.run([str(HERE / "build-rootfs.sh"), str(root), str(wheel)], check=True)
    built = time.perf_counter() - started

    work = root / "tmp" / "nefl-arm64"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(small_artifacts, work / "artifacts")
    shutil.copy(HERE / "one_step.py", work / "one_step.py")
    write_step_inputs(work, small_config, small_specs, fmnist_dir)

    subprocess.run([sys.executable, str(work / "one_step.py"), str(work)], check=True)
    started = time.perf_counter()
    clean_env = ["env", "-i", "PATH=/usr/bin:/bin", "HOME=/root"]
    subprocess.run(
        ["chroot", str(root), *clean_env, "/opt/nefl/bin/python", "/tmp/nefl-arm64/one_step.py", "/tmp/nefl-arm64"],
        check=True,
    )
    emulated = time.perf_counter() - started

    pi, host = np.load(work / "result-aarch64.npz"), np.load(work / "result-x86_64.npz")
    differences = step_differences(pi, host)
    for key, diff in differences.items():
        assert diff <= 1e-5, f"{key}: aarch64 and x86_64 differ by {diff}"
    worst = max(differences.values())
    record: dict[str, Any] = {
        "rootfs_setup_s": round(built, 1),
        "emulated_run_s": round(emulated, 1),
        "step_s": {
            "aarch64 (qemu)": [round(float(pi[f"{i}/seconds"]), 3) for i in range(len(small_specs))],
            "x86_64": [round(float(host[f"{i}/seconds"]), 3) for i in range(len(small_specs))],
        },
        "onnxruntime": {"aarch64": str(pi["onnxruntime"]), "x86_64": str(host["onnxruntime"])},
        "max_abs_diff": worst,
    }
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results" / "arm64.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    from bench.common import write_section

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    steps = record["step_s"]
    write_section(
        "arm64",
        "\n".join(
            [
                "## An emulated Raspberry Pi (Debian arm64 under qemu-user-static)",
                "",
                f"`./dev test-arm64` at commit `{commit}`: onnxruntime {record['onnxruntime']['aarch64']} (aarch64, "
                f"from PyPI) vs {record['onnxruntime']['x86_64']} (x86_64), one portable SGD step (momentum 0.9, "
                f"weight decay 5e-4, batch 32) per submodel of resnet-small. Largest difference of any tensor: "
                f"{worst:.1e} (limit 1e-5). Root file system and install: {record['rootfs_setup_s']:.0f} s "
                "(about 230 s when built from scratch, seconds when cached); the emulated run: "
                f"{record['emulated_run_s']:.0f} s. Emulation is not a Pi's speed: qemu-user runs the aarch64 "
                "code about 60-100x slower than native here.",
                "",
                "| submodel | step s, aarch64 (qemu) | step s, x86_64 |",
                "|---|---|---|",
                *(
                    f"| {i} | {a:.2f} | {b:.3f} |"
                    for i, (a, b) in enumerate(zip(steps["aarch64 (qemu)"], steps["x86_64"]))
                ),
                "",
            ]
        ),
    )
