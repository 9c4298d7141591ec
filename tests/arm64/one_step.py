"""One portable training step per submodel, the same on the emulated Pi and on this machine.

Usage: python one_step.py WORK. Reads WORK/artifacts, WORK/weights-<i>.npz and WORK/batch.npz; writes
WORK/result-<machine>.npz with every updated tensor, the loss, and the seconds each step took. Imports only
the installed edge client (no torch, no onnx), so it runs wherever `pip install nefl-edge` does."""

import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime

from nefl_edge.core.artifacts import load_manifest, submodel_paths
from nefl_edge.core.schemas import TrainConfig
from nefl_edge.edge_client.portable import PortableBackend
from nefl_edge.edge_client.trainer import BACKEND_FILES

work = Path(sys.argv[1])
manifest = load_manifest(work / "artifacts")
batch = np.load(work / "batch.npz")
cfg = TrainConfig(lr=0.01, momentum=0.9, weight_decay=5e-4)
out = {"onnxruntime": np.array(onnxruntime.__version__)}
for sub in manifest.submodels:
    backend = PortableBackend(
        submodel_paths(work / "artifacts", sub, BACKEND_FILES["portable"]), sub.params, cfg, threads=1
    )
    backend.load(dict(np.load(work / f"weights-{sub.index}.npz")))
    start = time.perf_counter()
    loss, _ = backend.step(batch["x"], batch["y"])
    out[f"{sub.index}/seconds"] = np.array(time.perf_counter() - start)
    out[f"{sub.index}/loss"] = np.array(loss)
    for name, value in backend.tensors().items():
        out[f"{sub.index}/{name}"] = value
    print(f"submodel {sub.index}: loss {loss:.6f} in {float(out[f'{sub.index}/seconds']):.2f} s", flush=True)
np.savez(work / f"result-{platform.machine()}.npz", **out)
