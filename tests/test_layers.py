"""The import layers (README, "Layout"), as an allow-list read from the source (every import statement, also
those inside functions), and a probe that mypy resolves first-party imports across the source roots.

Each of the design's top-level folders is a source root of the ``nefl_edge`` namespace package:
``core/nefl_edge/core``, ``edge_client/nefl_edge/edge_client``, ``coordinator/nefl_edge/coordinator``,
``export/nefl_edge/export``. A module may import its own layer and the layers the allow-list names below it.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "edge_client", "export", "coordinator")
"""Source root folder = the package ``nefl_edge.<name>`` it holds."""

ALLOWED: dict[str, set[str]] = {
    # the kernel: nothing of ours above it
    "nefl_edge.core": {"nefl_edge.core"},
    # the device: the kernel and itself
    "nefl_edge.edge_client": {"nefl_edge.core", "nefl_edge.edge_client"},
    # the exporter: the kernel, the model family and what reads a run's checkpoint (export-model), and the
    # device's trainer (to check that artifacts load); never the coordinator's application (run, cli, ...)
    "nefl_edge.export": {
        "nefl_edge.core",
        "nefl_edge.export",
        "nefl_edge.coordinator.__init__",
        "nefl_edge.coordinator.models",
        "nefl_edge.coordinator.strategies",
        "nefl_edge.coordinator.config",
        "nefl_edge.coordinator.checkpoint",
        "nefl_edge.edge_client.trainer",
    },
    # the coordinator: everything; of the device only the trainer and runtime (simulation trains with the
    # device's own code, as Flower's simulation runs the ClientApp)
    "nefl_edge.coordinator": {
        "nefl_edge.core",
        "nefl_edge.export",
        "nefl_edge.coordinator",
        "nefl_edge.edge_client.trainer",
        "nefl_edge.edge_client.runtime",
    },
}
THIRD_PARTY: dict[str, set[str]] = {
    "nefl_edge.core": {"numpy", "paho", "pydantic", "safetensors", "cryptography", "typer", "click"},
    "nefl_edge.edge_client": {
        "numpy",
        "paho",
        "pydantic",
        "safetensors",
        "typer",
        "click",
        "onnxruntime",
        "cryptography",
    },
}
"""Non-stdlib imports the layers that ship to a device may use (never torch, onnx, rich, matplotlib)."""


def modules() -> dict[str, Path]:
    """Module name -> file, from the files alone (path below the source root = import path)."""
    out = {}
    for layer in LAYERS:
        root = ROOT / layer
        for path in sorted((root / "nefl_edge").rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """Every module ``path`` imports (ours resolved to module names, others by their full dotted name)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)
    return found


def layer_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def violations(mods: dict[str, Path]) -> list[str]:
    """Each import of ours that the allow-list does not grant, as ``module imports target``."""
    bad = []
    for module, path in mods.items():
        allowed = ALLOWED[layer_of(module)]
        for target in imports(path, set(mods)):
            if target.startswith("nefl_edge") and target != "nefl_edge":
                if target in mods and mods[target].name == "__init__.py":
                    target += ".__init__"
                if not any(target == a or target.startswith(a + ".") for a in allowed):
                    bad.append(f"{module} imports {target}")
            elif target == "nefl_edge":
                bad.append(f"{module} imports the bare namespace nefl_edge")
    return sorted(bad)


def third_party_violations(mods: dict[str, Path]) -> list[str]:
    bad = []
    for module, path in mods.items():
        allowed = THIRD_PARTY.get(layer_of(module))
        if allowed is None:
            continue
        for target in imports(path, set(mods)):
            top = target.split(".")[0]
            if top in ("nefl_edge", "__future__") or top in sys.stdlib_module_names:
                continue
            if top not in allowed:
                bad.append(f"{module} imports {target}")
    return sorted(bad)


def graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    return {m: {i for i in imports(p, set(mods)) if i in mods and i != m} for m, p in mods.items()}


def test_the_rules_found_every_layer_and_its_modules() -> None:
    mods = modules()

    per_layer = {layer: sum(1 for m in mods if layer_of(m) == f"nefl_edge.{layer}") for layer in LAYERS}

    assert all(n >= 3 for n in per_layer.values()), f"modules found per layer: {per_layer}"
    assert {"nefl_edge.core.wire", "nefl_edge.edge_client.client", "nefl_edge.coordinator.engine"} <= set(mods)


def test_every_import_of_ours_is_on_the_allow_list() -> None:
    assert violations(modules()) == [], "imports the layer rules (tests/test_layers.py ALLOWED) do not grant"


def test_the_device_layers_import_only_their_third_party_allow_list() -> None:
    assert third_party_violations(modules()) == [], "a device-side module imports a package the device lacks"


def test_a_planted_wrong_import_is_caught(tmp_path: Path) -> None:
    probe = tmp_path / "wire.py"
    probe.write_text("from nefl_edge.coordinator.engine import RoundEngine\nimport torch\n")
    mods = {"nefl_edge.core.planted": probe, "nefl_edge.coordinator.engine": ROOT / "coordinator"}

    found_ours = violations({"nefl_edge.core.planted": probe})
    found_third = third_party_violations({"nefl_edge.core.planted": probe})

    assert found_ours == ["nefl_edge.core.planted imports nefl_edge.coordinator.engine"], found_ours
    assert found_third == ["nefl_edge.core.planted imports torch"], found_third
    assert mods


def test_no_module_imports_itself_back() -> None:
    g = graph(modules())
    cycles = []

    def visit(node: str, path: list[str], seen: set[str]) -> None:
        for nxt in g[node]:
            if nxt == path[0]:
                cycles.append(" -> ".join([*path, nxt]))
            elif nxt not in seen and nxt > path[0]:  # each cycle reported once, from its smallest module
                seen.add(nxt)
                visit(nxt, [*path, nxt], seen)

    for start in g:
        visit(start, [start], {start})
    assert cycles == []


def test_the_rules_see_imports_inside_functions(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from nefl_edge.coordinator import run\n    import torch\n")

    found = imports(probe, {"nefl_edge.coordinator.run"})

    assert {"torch", "nefl_edge.coordinator", "nefl_edge.coordinator.run"} <= found


def test_no_stray_python_file_sits_outside_the_source_roots() -> None:
    """A module next to ``nefl_edge/`` in a source root (or a bare top-level package) would be importable
    under a generic name or not at all."""
    stray = [
        str(p.relative_to(ROOT))
        for layer in LAYERS
        for p in (ROOT / layer).rglob("*.py")
        if (ROOT / layer / "nefl_edge") not in p.parents
    ]
    assert stray == []
    assert not (ROOT / "nefl_edge").exists(), "a top-level nefl_edge/ would shadow the namespace's portions"


@pytest.mark.skipif(shutil.which("mypy") is None and not Path(sys.executable).with_name("mypy").exists(), reason="mypy")
def test_mypy_resolves_first_party_imports_across_source_roots(tmp_path: Path) -> None:
    """A deliberately wrong cross-layer call must be an error: if mypy typed our imports as ``Any`` (the
    import path not resolvable from the files) it would pass silently."""
    probe = ROOT / "coordinator" / "nefl_edge" / "coordinator" / "_mypy_probe.py"
    probe.write_text(
        "from nefl_edge.core.specs import param_layout\n"
        "from nefl_edge.core.wire import Topics\n\n"
        "def probe() -> None:\n"
        '    param_layout("not a config", 3)  # wrong on purpose\n'
        "    reveal_type(Topics)\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", str(tmp_path), str(probe)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        probe.unlink()
    out = result.stdout + result.stderr
    assert 'Argument 1 to "param_layout" has incompatible type "str"' in out, out
    assert "nefl_edge.core.wire.Topics" in out, out


def test_the_package_metadata_tells_which_side_needs_which_python() -> None:
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    coord = [Requirement(r) for r in project["optional-dependencies"]["coord"]]

    assert project["requires-python"] == ">=3.9"
    for requirement in coord:
        assert requirement.marker is not None
        assert not requirement.marker.evaluate({"python_version": "3.10"}), requirement
        assert requirement.marker.evaluate({"python_version": "3.11"}), requirement
    init = ROOT / "coordinator" / "nefl_edge" / "coordinator" / "__init__.py"
    assert "sys.version_info < (3, 11)" in init.read_text()
