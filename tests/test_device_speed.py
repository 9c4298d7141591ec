"""Device training speed: the graph rewrites the export applies, the thread probe, and a device process
that never loads torch even where torch is installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from nefl_edge.core.artifacts import load_manifest, submodel_paths
from nefl_edge.edge_client.portable import PortableBackend
from nefl_edge.edge_client.profile import (
    choose_threads,
    load_thread_choice,
    probe_threads,
    thread_candidates,
)
from nefl_edge.edge_client.trainer import BACKEND_FILES, TrainerBackend

DEVICE_CHECK = """
import json, sys
sys.argv = ["nefl-edge", "profile", "--artifacts", sys.argv[1], "--backend", "ort-training", "--threads", "1"]
from nefl_edge.edge_client.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "loaded": sorted(m for m in ("torch", "onnx") if m in sys.modules),
                  "training_api": "onnxruntime.training.api" in sys.modules}))
"""


def test_a_device_command_that_trains_with_the_training_build_never_loads_torch(small_artifacts: Path) -> None:
    assert importlib.util.find_spec("torch") is not None, "torch must be installed for this test to mean anything"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    out = subprocess.run(
        [sys.executable, "-c", DEVICE_CHECK, str(small_artifacts)], capture_output=True, text=True, env=env, timeout=120
    )

    *profile_lines, last = out.stdout.strip().splitlines()
    result = json.loads(last)
    assert result["code"] in (0, None), out.stderr
    assert json.loads("\n".join(profile_lines))["samples_per_s"] > 0  # it trained
    assert result["training_api"]
    assert result["loaded"] == []


def test_the_exported_graphs_use_the_fast_gradient_forms(small_artifacts: Path) -> None:
    for sub in load_manifest(small_artifacts).submodels:
        training = onnx.load(str(small_artifacts / sub.files["training"].name)).graph.node
        portable_graph = onnx.load(str(small_artifacts / sub.files["portable"].name)).graph
        portable = portable_graph.node
        constants = {i.name: numpy_helper.to_array(i) for i in portable_graph.initializer}

        assert not [n for n in training if n.op_type == "ReluGrad"]
        for node in training:
            strides = next((list(a.ints) for a in node.attribute if a.name == "strides"), [1, 1])
            if node.op_type == "ConvGrad" and strides == [1, 1]:
                assert not node.output[0], f"{node.name}: a stride-1 ConvGrad still computes dX"
        assert not [n for n in portable if n.op_type in ("Where", "ReluGrad")]
        steps = [constants.get(n.input[4], 1) for n in portable if n.op_type == "Slice" and len(n.input) > 4]
        strided_slices = [s for s in steps if np.any(np.abs(s) > 1)]
        assert not strided_slices, "strided weight gradients read their windows through the one-hot Conv im2col"
        assert sum(n.op_type == "ConvTranspose" for n in portable) < sum(n.op_type == "Conv" for n in portable) / 2


def test_the_thread_probe_keeps_the_fastest_setting() -> None:
    speeds = {(1, False): 100.0, (2, False): 150.0, (2, True): 120.0}

    choice = choose_threads(
        lambda t, spin: (t, spin),  # type: ignore[arg-type,return-value]
        (1, 28, 28),
        10,
        cores=2,
        measure=lambda backend, *_, **__: speeds[backend],
    )

    assert (choice.threads, choice.spin, choice.samples_per_s) == (2, False, 150.0)
    assert choice.tried == {"1": 100.0, "2": 150.0, "2+spin": 120.0}
    assert thread_candidates(1) == [(1, False)]
    assert thread_candidates(8) == [(1, False), *[(t, s) for t in (2, 4, 8) for s in (False, True)]]


def test_the_probe_caches_its_choice_and_an_explicit_thread_count_wins(small_artifacts: Path, tmp_path: Path) -> None:
    manifest = load_manifest(small_artifacts)
    sub = manifest.submodels[0]
    paths = submodel_paths(small_artifacts, sub, BACKEND_FILES["portable"])
    made: list[tuple[int, bool]] = []

    def make(threads: int, spin: bool) -> TrainerBackend:
        made.append((threads, spin))
        return PortableBackend(paths, sub.params, manifest.train, threads, spin)

    cache = tmp_path / "threads.json"
    first = probe_threads(make, manifest.input_shape, manifest.num_classes, 0, cache, "key")
    tried_first = len(made)
    again = probe_threads(make, manifest.input_shape, manifest.num_classes, 0, cache, "key")
    explicit = probe_threads(make, manifest.input_shape, manifest.num_classes, 1, cache, "key")

    assert tried_first == len(thread_candidates(os.cpu_count() or 1))
    assert load_thread_choice(cache, "key") is not None and load_thread_choice(cache, "other device") is None
    assert made[tried_first] == (first.threads, first.spin) and (again.threads, again.spin) == made[tried_first]
    assert made[-1] == (1, False) and explicit.threads == 1
    assert min(first.samples_per_s, again.samples_per_s, explicit.samples_per_s) > 0
