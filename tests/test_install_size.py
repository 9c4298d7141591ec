"""What a device install weighs, per dependency, on Linux x86_64 and aarch64 (Raspberry Pi OS 64-bit, Jetson):
pip resolves and downloads the wheels of the device's requirements for the target platform (no emulation
needed: ``pip download --only-binary=:all: --platform ... --python-version ...``), and each wheel's files are
summed as unpacked (an install adds only ``.pyc`` files and a RECORD on top, when it compiles them).

``python -m tests.test_install_size [--json FILE]`` prints the table that docs/benchmarks.md quotes; the slow
test checks what the README's dependency table says: the aarch64 install carries no onnx, sympy or h5py,
the x86_64 one carries the training build (a measured decision, README) and not stock onnxruntime beside it,
and both runtimes install the same ``onnxruntime`` package (why the training build is not an extra).
Needs the package index (PyPI)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

BASE = [
    "numpy>=1.24",
    "paho-mqtt>=2.0,<3",
    "typer>=0.12",
    "pydantic>=2.5,<3",
    "safetensors>=0.4",
    "cryptography>=42",
]
PLATFORMS = {
    "x86_64": ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64"],
    "aarch64": ["manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux2014_aarch64", "manylinux_2_17_aarch64"],
}
RUNTIMES = {
    "stock onnxruntime (portable graph)": ["onnxruntime>=1.17"],
    "onnxruntime-training-cpu 1.19.2": ["onnxruntime-training-cpu==1.19.2"],
}
PYTHON = "3.11"


def project(wheel: Path) -> str:
    """The normalised project name of a wheel file."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def unpacked_bytes(wheel: Path) -> int:
    with zipfile.ZipFile(wheel) as z:
        return sum(info.file_size for info in z.infolist())


def measure(arch: str, requirements: list[str], folder: Path) -> dict[str, Any]:
    """Resolve and download ``requirements`` for Linux ``arch``, CPython ``PYTHON``; bytes per project."""
    platforms = [arg for tag in PLATFORMS[arch] for arg in ("--platform", tag)]
    args = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", *platforms]
    args += ["--python-version", PYTHON, "--implementation", "cp", "-d", str(folder), *requirements]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"pip download for {arch} failed: {done.stderr[-2000:]}")
    wheels = sorted(folder.glob("*.whl"))
    sizes = {project(w): unpacked_bytes(w) for w in wheels}
    return {"arch": arch, "wheels": [w.name for w in wheels], "bytes": sizes, "total": sum(sizes.values())}


def measure_all() -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="nefl-install-size-") as tmp:
        for arch in PLATFORMS:
            for runtime, reqs in RUNTIMES.items():
                if arch == "aarch64" and "training" in runtime:
                    continue  # no Linux aarch64 wheel of the training build exists
                row = measure(arch, BASE + reqs, Path(tmp) / f"{arch}-{len(rows)}")
                rows.append({"runtime": runtime, **row})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    names = sorted({n for r in rows for n in r["bytes"]}, key=lambda n: -max(r["bytes"].get(n, 0) for r in rows))
    head = "| project | " + " | ".join(f"{r['arch']}, {r['runtime']}" for r in rows) + " |"
    lines = [head, "|---|" + "---|" * len(rows)]
    for n in names:
        cells = [f"{r['bytes'][n] / 1e6:.1f}" if n in r["bytes"] else "-" for r in rows]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("| **total (MB)** | " + " | ".join(f"**{r['total'] / 1e6:.1f}**" for r in rows) + " |")
    return "\n".join(lines)


def for_target(requirements: list[str], arch: str) -> list[str]:
    """``requirements`` whose markers hold on Linux ``arch``, CPython ``PYTHON``, markers dropped (pip
    evaluates ``platform_machine`` against this host, not the ``--platform`` it downloads for)."""
    from packaging.requirements import Requirement

    env = {"platform_machine": arch, "sys_platform": "linux", "platform_system": "Linux", "python_version": PYTHON,
           "python_full_version": f"{PYTHON}.0", "implementation_name": "cpython", "os_name": "posix"}  # fmt: skip
    kept = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            kept.append(str(req))
    return kept


def top_level(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return {n.split("/")[0] for n in z.namelist() if not n.split("/")[0].endswith((".dist-info", ".libs"))}


@pytest.mark.slow
def test_the_device_install_is_what_the_readme_says(tmp_path: Path) -> None:
    import tomllib

    # Execute: resolve the device's requirements as pyproject.toml declares them, for both platforms.
    declared = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    results = {arch: measure(arch, for_target(declared["dependencies"], arch), tmp_path / arch) for arch in PLATFORMS}

    # Assert: aarch64 carries stock onnxruntime and nothing of the training build; x86_64 carries the
    # training build (the measured decision in the README), not stock onnxruntime beside it.
    heavy = {"onnx", "sympy", "h5py", "onnxruntime-training-cpu"}
    assert not heavy & set(results["aarch64"]["bytes"]), f"aarch64 carries {heavy & set(results['aarch64']['bytes'])}"
    assert "onnxruntime" in results["aarch64"]["bytes"], results["aarch64"]["wheels"]
    x86 = set(results["x86_64"]["bytes"])
    assert "onnxruntime-training-cpu" in x86 and "onnxruntime" not in x86, results["x86_64"]["wheels"]

    # Assert: why the training build is not an extra: both runtimes install the same import package, so an
    # extra beside stock onnxruntime would install two distributions over one folder.
    wheels = {project(w): w for arch in PLATFORMS for w in (tmp_path / arch).glob("onnxruntime*.whl")}
    assert top_level(wheels["onnxruntime"]) == top_level(wheels["onnxruntime-training-cpu"]) == {"onnxruntime"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, help="Write the measurements here too.")
    args = parser.parse_args()
    rows = measure_all()
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
