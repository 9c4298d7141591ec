"""The path of one update from device to global model, measured on a real run: ``python -m bench.trip``.

Runs a one-round ``nefl-coord demo`` (a real Mosquitto, real ``nefl-edge join`` processes, real ONNX Runtime
training) with a ``sitecustomize`` on ``PYTHONPATH`` that records two call stacks without changing the code under
test: in each device process, the calls from the end of training to the link's ``publish`` of the ``update``; in
the coordinator, the calls on the network thread that take the update's first frame (paho's callback on), and the
calls on the main thread from the update taken out of the inbox to its fold into the aggregate (``add``). Each call
is read as an edge caller module -> callee module among our packages (``core``, ``edge_client``, ``export``,
``coordinator``; frames of other code skipped over); the figures are the distinct edges that **cross packages**,
and those of them that go **upward**, from a lower layer into a higher one (core 0 < edge_client, export 1 <
coordinator 2): a callback of the kernel into an application, the kind of move a layering should not need.

``--python PY`` measures another install (e.g. an older commit installed in its own venv), so that "then" and
"now" are measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LAYER = {"core": 0, "edge_client": 1, "export": 1, "coordinator": 2}

SITECUSTOMIZE = r"""
import importlib.abc, json, os, re, sys

_OUT = os.environ["NEFL_TRIP_OUT"]
_PKG = re.compile(r"nefl_edge[/\\](core|edge_client|export|coordinator)[/\\]([A-Za-z_]+)\.py$")
_seq = {}
_done = set()


def _profile(key):
    calls = _seq.setdefault(key, [])

    def ours(frame):
        while frame is not None:
            m = _PKG.search(frame.f_code.co_filename)
            if m:
                return [m.group(1), m.group(2)]
            frame = frame.f_back
        return None

    def rec(frame, event, arg):
        if event == "call":
            m = _PKG.search(frame.f_code.co_filename)
            if m:
                caller = ours(frame.f_back)
                edge = [caller, [m.group(1), m.group(2)]]
                if caller is not None and caller != edge[1] and edge not in calls:
                    calls.append(edge)
    return rec


def _open(key):
    if key in _done or key in _seq:
        return False
    sys.setprofile(_profile(key))
    return True


def _close(key):
    sys.setprofile(None)
    if key in _done:
        return
    _done.add(key)
    with open(os.path.join(_OUT, f"{key}-{os.getpid()}.json"), "w") as fh:
        json.dump(_seq.get(key, []), fh)


def _patch(module):
    name = module.__name__
    if name.endswith(".trainer") and hasattr(module, "train_local"):
        original = module.train_local

        def train_local(*args, **kwargs):
            result = original(*args, **kwargs)
            _open("device")  # training is over: the update's trip starts here
            return result
        module.train_local = train_local
    for obj in list(vars(module).values()):
        if not isinstance(obj, type) or obj.__module__ != name:
            continue
        if "publish" in vars(obj) and name.endswith((".mqtt", ".link")):
            def publish(self, topic, message, *args, _pub=obj.publish, **kwargs):
                out = _pub(self, topic, message, *args, **kwargs)
                if getattr(message, "kind", None) == "update" and "device" in _seq:
                    _close("device")
                return out
            obj.publish = publish
        if "_on_message" in vars(obj) and name.endswith(".mqtt"):
            def _on_message(self, client, userdata, msg, _on=obj._on_message):
                mine = "/update" in msg.topic and _open("receive")
                try:
                    return _on(self, client, userdata, msg)
                finally:
                    if mine:
                        _close("receive")
            obj._on_message = _on_message
        if obj.__name__ == "Inbox" and ("get" in vars(obj) or "_get" in vars(obj)):
            method = "get" if "get" in vars(obj) else "_get"

            def inbox_get(self, *args, _get=getattr(obj, method), **kwargs):
                item = _get(self, *args, **kwargs)
                message = item[1] if isinstance(item, tuple) and len(item) > 1 else None
                if getattr(message, "kind", None) == "update":
                    _open("aggregate")
                return item
            setattr(obj, method, inbox_get)
        if "add" in vars(obj) and name.endswith((".nefedavg", ".robust")):
            def agg_add(self, *args, _add=obj.add, **kwargs):
                out = _add(self, *args, **kwargs)
                if "aggregate" in _seq:
                    _close("aggregate")
                return out
            obj.add = agg_add


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("nefl_edge."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


sys.meta_path.insert(0, _Finder())
"""


def moves(edges: list[list[list[str]]]) -> tuple[int, int, list[str]]:
    """(calls that cross into another package, those that climb into a higher layer, the crossing edges) of one
    part of the trip; each distinct caller module -> callee module edge counted once."""
    crossing = [(a, b) for a, b in edges if a[0] != b[0]]
    up = [(a, b) for a, b in crossing if LAYER[b[0]] > LAYER[a[0]]]
    path = [f"{a[0]}.{a[1]} -> {b[0]}.{b[1]}{' (up)' if (a, b) in up else ''}" for a, b in crossing]
    return len(crossing), len(up), path


PARTS = (
    ("device", "device: from the end of training to the update's publish"),
    ("receive", "coordinator, network thread: the update's first frame, from paho's callback on"),
    ("aggregate", "coordinator, main thread: from the update taken out of the inbox to its fold into the aggregate"),
)


def measure(python: str, workdir: Path) -> dict[str, object]:
    out = workdir / "calls"
    out.mkdir(parents=True, exist_ok=True)
    site = workdir / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=str(site), NEFL_TRIP_OUT=str(out), NO_COLOR="1")
    command = [
        python, "-m", "nefl_edge.coordinator", "demo", "--clients", "2", "--rounds", "1",
        "--samples-per-client", "200", "--eval-samples", "200", "--runs-dir", str(workdir / "runs"),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"the demo failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    figures: dict[str, object] = {}
    total = climbs_total = 0
    for key, what in PARTS:
        found = sorted(out.glob(f"{key}-*.json"))
        if not found:
            raise SystemExit(f"nothing recorded for {what} in {out}")
        moved, climbs, path = moves(json.loads(found[0].read_text()))
        figures[key] = {"what": what, "moves": moved, "climbs": climbs, "path": path}
        total, climbs_total = total + moved, climbs_total + climbs
    figures["moves"], figures["climbs"] = total, climbs_total
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.trip", description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the interpreter whose nefl-edge install to measure")
    parser.add_argument("--json", action="store_true", help="print the stacks and counts as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nefl-trip-") as tmp:
        figures = measure(args.python, Path(tmp))
    if args.json:
        print(json.dumps(figures, indent=1))
        return
    for key, _ in PARTS:
        part = figures[key]
        assert isinstance(part, dict)
        print(f"{part['what']}: {part['moves']} package crossings ({part['climbs']} upward)")
        for edge in part["path"]:
            print(f"  {edge}")
    print(f"one update's trip: {figures['moves']} package crossings ({figures['climbs']} upward)")


if __name__ == "__main__":
    main()
