"""The import layers (README, "Layout"): the device package imports nothing of ours but itself and never torch
or onnx; export never imports the coordinator's application modules; no module imports itself back through
others. Read from the source (every import statement, also those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "edge_client": "nefl_edge.edge_client",
    "export": "nefl_edge.export",
    "coordinator": "nefl_edge.coordinator",
}
DEVICE_FORBIDDEN = ("torch", "onnx", "nefl_edge.coordinator", "nefl_edge.export", "matplotlib", "rich")
APPLICATION = {"run", "cli", "demo", "render", "records", "report"}  # coordinator modules that may use export


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
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


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {i for i in imports(p, set(mods)) if i in mods and i != m} for m, p in mods.items()}


def test_the_old_top_level_names_are_not_imported_anywhere() -> None:
    stale = [
        f"{path.relative_to(ROOT)}: {name}"
        for folder in ("coordinator", "export", "edge_client", "tests", "bench")
        for path in (ROOT / folder).rglob("*.py")
        for name in imports(path, set())
        if name.split(".")[0] in PACKAGES
    ]
    assert stale == []


def test_the_device_package_imports_neither_torch_onnx_nor_the_coordinator() -> None:
    mods = modules()
    bad = [
        f"{m} imports {i}"
        for m, p in mods.items()
        if m.startswith("nefl_edge.edge_client")
        for i in imports(p, set(mods))
        if any(i == f or i.startswith(f + ".") for f in DEVICE_FORBIDDEN)
    ]
    assert bad == []


def test_export_uses_only_the_model_family_of_the_coordinator() -> None:
    g = graph()
    upward = [
        f"{m} imports {i}"
        for m, targets in g.items()
        if m.startswith("nefl_edge.export")
        for i in targets
        if i.startswith("nefl_edge.coordinator") and i.rsplit(".", 1)[1] in APPLICATION
    ]
    assert upward == []


def test_no_module_imports_itself_back() -> None:
    g = graph()
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
    assert "sys.version_info < (3, 11)" in (ROOT / "coordinator" / "__init__.py").read_text()
