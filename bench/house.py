"""Figures of the code's structure, as issue 20's review measured them: ``python -m bench.house`` (``just house``).

- coordinator -> device imports: distinct names the coordinator imports from ``nefl_edge.edge_client``, and how
  many coordinator files do;
- the share of the device package's lines that the coordinator imports (lines of the device modules it imports);
- coordinator modules that load torch when imported (each imported in a fresh interpreter);
- public definitions (modules' functions and classes, public classes' methods) without a docstring;
- the largest classes (lines);
- the path of one update from the device's upload to the global model: the call stacks at the device's
  ``publish`` of an update and at the coordinator's fold into the aggregate, read from a broker-free run over the
  in-memory link when one exists (``--trip``), as package moves (a call into another top-level package) and how many
  of those climb back up (into a package of a higher layer: core < edge_client, export < coordinator).

Prints a Markdown table; ``--json`` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "edge_client", "export", "coordinator")


def modules() -> dict[str, Path]:
    out = {}
    for layer in LAYERS:
        root = ROOT / layer
        for path in sorted((root / "nefl_edge").rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported_names(path: Path, prefix: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(prefix):
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith(prefix))
    return names


def device_imports(mods: dict[str, Path]) -> dict[str, object]:
    coordinator = {m: p for m, p in mods.items() if m.startswith("nefl_edge.coordinator")}
    per_file = {m: _imported_names(p, "nefl_edge.edge_client") for m, p in coordinator.items()}
    names = set().union(*per_file.values())
    device_modules = {n.rsplit(".", 1)[0] if n.rsplit(".", 1)[0] in mods else n for n in names}
    device_lines = sum(
        len(p.read_text().splitlines()) for m, p in mods.items() if m.startswith("nefl_edge.edge_client")
    )
    used_lines = sum(len(mods[m].read_text().splitlines()) for m in device_modules if m in mods)
    return {
        "names": len(names),
        "files": sum(1 for v in per_file.values() if v),
        "coordinator_files": len(coordinator),
        "device_line_share": used_lines / device_lines if device_lines else 0.0,
        "which": sorted(names),
    }


def torch_importers(mods: dict[str, Path]) -> list[str]:
    names = [m for m in mods if m.startswith("nefl_edge.coordinator") and not m.endswith("__main__")]
    probe = (
        "import importlib, json, sys\n"
        "out = []\n"
        "for name in sys.argv[1:]:\n"
        "    for m in [k for k in sys.modules if k == 'torch' or k.startswith('torch.')]: del sys.modules[m]\n"
        "    for m in [k for k in sys.modules if k.startswith('nefl_edge')]: del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
        "    out.append([name, 'torch' in sys.modules])\n"
        "print(json.dumps(out))\n"
    )
    loaded = []
    for name in names:  # a fresh interpreter per module: a module imported before would hide its imports
        result = subprocess.run([sys.executable, "-c", probe, name], capture_output=True, text=True, check=True)
        loaded += [n for n, torch in json.loads(result.stdout) if torch]
    return sorted(loaded)


def docstrings(mods: dict[str, Path]) -> dict[str, object]:
    public = missing = 0
    lacking: list[str] = []
    for module, path in mods.items():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith(
                "_"
            ):
                public += 1
                if ast.get_docstring(node) is None:
                    missing += 1
                    lacking.append(f"{module}.{node.name}")
                if isinstance(node, ast.ClassDef):
                    for item in node.body:
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                            public += 1
                            if ast.get_docstring(item) is None:
                                missing += 1
                                lacking.append(f"{module}.{node.name}.{item.name}")
    return {"public": public, "missing": missing, "share": missing / public if public else 0.0, "which": lacking}


def largest_classes(mods: dict[str, Path], top: int = 5) -> list[tuple[str, int]]:
    sizes = []
    for module, path in mods.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                sizes.append(
                    (f"{module.rsplit('.', 1)[1]}.{node.name}", (node.end_lineno or node.lineno) - node.lineno + 1)
                )
    return sorted(sizes, key=lambda x: -x[1])[:top]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.house", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    mods = modules()
    figures = {
        "modules": len(mods),
        "device_imports": device_imports(mods),
        "torch_importers": torch_importers(mods),
        "docstrings": docstrings(mods),
        "largest_classes": largest_classes(mods),
    }
    if args.json:
        print(json.dumps(figures, indent=1))
        return
    d, doc = figures["device_imports"], figures["docstrings"]
    assert isinstance(d, dict) and isinstance(doc, dict)
    torch = figures["torch_importers"]
    assert isinstance(torch, list)
    coordinator_modules = sum(1 for m in mods if m.startswith("nefl_edge.coordinator") and not m.endswith("__main__"))
    rows = [
        ("modules (four source roots)", str(len(mods))),
        (
            "coordinator -> edge_client imports (distinct names; coordinator files that import it)",
            f"{d['names']} ({d['files']} of {d['coordinator_files']})",
        ),
        ("share of edge_client lines the coordinator also imports", f"{100 * float(d['device_line_share']):.0f} %"),
        (
            "coordinator modules that import torch when imported",
            f"{len(torch)} of {coordinator_modules}: {', '.join(m.rsplit('.', 1)[1] for m in torch)}",
        ),
        (
            "public definitions without a docstring",
            f"{100 * float(doc['share']):.0f} % ({doc['missing']} of {doc['public']})",
        ),
        ("largest classes", ", ".join(f"`{n}` {s}" for n, s in figures["largest_classes"])),  # type: ignore[union-attr]
    ]
    print("| measure | now |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
