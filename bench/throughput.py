"""Benchmark: local-training throughput of the device backend (ONNX Runtime training build) vs PyTorch on
the same submodel, batch and thread count, and the export time of the default submodels.

Run with `./dev bench`. Writes bench/results/throughput.json and the throughput section of
docs/benchmarks.md. Timings interleave the backends (A B A B ...) and report medians, because this
machine is shared and noisy; compare ratios, not absolute numbers.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from nefl_edge.coordinator.models import SubmodelNet, initial_consistent
from nefl_edge.coordinator.nested import extract, init_global_state
from nefl_edge.coordinator.specs import get_model_config, make_specs
from nefl_edge.edge_client.artifacts import submodel_paths
from nefl_edge.edge_client.schemas import TrainConfig
from nefl_edge.edge_client.trainer import BACKEND_FILES, create_backend
from nefl_edge.export.artifacts import export_set

ROOT = Path(__file__).resolve().parent.parent
BATCH, STEPS, REPEATS = 32, 10, 5


def time_steps(step, steps: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - start)


def measure(config, specs, state, folder: Path, sub, threads: int, x: np.ndarray, y: np.ndarray) -> dict:  # type: ignore[no-untyped-def]
    """Samples/s of one SGD step (momentum 0.9) for each backend, interleaved, median of REPEATS runs."""
    torch.set_num_threads(threads)
    cfg = TrainConfig(lr=0.01, momentum=0.9)
    steppers = {}
    for kind in ("ort-training", "portable"):
        backend = create_backend(kind, submodel_paths(folder, sub, BACKEND_FILES[kind]), sub.params, cfg, threads)
        backend.load(extract(state, sub.index))
        steppers[kind] = partial(backend.step, x, y)
    net = SubmodelNet(config, specs[sub.index]).train()
    net.load_tensors(extract(state, sub.index))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def torch_step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(tx), ty).backward()
        opt.step()

    steppers["pytorch"] = torch_step
    runs: dict[str, list[float]] = {k: [] for k in steppers}
    for step in steppers.values():
        step()
    for _ in range(REPEATS):
        for kind, step in steppers.items():
            runs[kind].append(time_steps(step, STEPS))
    row = {"submodel": sub.index, "gamma": sub.gamma, "params": sub.param_count, "threads": threads}
    row.update({f"{k}_samples_per_s": statistics.median(v) for k, v in runs.items()})
    return row


def main() -> None:
    config = get_model_config("resnet-small")
    specs = make_specs(config)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = export_set(config, specs, Path(tmp))
        export_s = time.perf_counter() - start
        state = init_global_state(config, specs, initial_consistent(config, 0))
        rng = np.random.default_rng(0)
        x = rng.random((BATCH, 1, 28, 28), dtype=np.float32)
        y = rng.integers(0, 10, BATCH).astype(np.int64)
        rows = []
        for sub in (manifest.submodels[0], manifest.submodels[-1]):
            for threads in (1, 2):
                rows.append(measure(config, specs, state, Path(tmp), sub, threads, x, y))
                print(json.dumps(rows[-1]))
        sizes = {s.index: sum(f.size for f in s.files.values()) for s in manifest.submodels}
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    result = {
        "command": "./dev bench",
        "commit": commit,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads max",
        "batch": BATCH,
        "steps_per_run": STEPS,
        "runs": REPEATS,
        "export_seconds_5_submodels": export_s,
        "artifact_bytes": sizes,
        "throughput": rows,
    }
    out = ROOT / "bench" / "results" / "throughput.json"
    out.write_text(json.dumps(result, indent=1))
    lines = [
        "## Local training throughput: ONNX Runtime training build, portable graph, PyTorch",
        "",
        f"`./dev bench` at commit `{commit}` ({platform.machine()}, batch {BATCH}, median of {REPEATS} interleaved "
        f"runs of {STEPS} SGD steps with momentum; resnet-small on 1x28x28; samples/s). "
        f"The portable graph runs in a plain `InferenceSession` of onnxruntime {onnxruntime.__version__} (the "
        "same call a stock-onnxruntime device makes). Raw numbers: `bench/results/throughput.json`.",
        "",
        "| submodel | gamma | parameters | threads | ORT training build | portable | PyTorch "
        "| training build / PyTorch | portable / PyTorch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ort_, port, ref = r["ort-training_samples_per_s"], r["portable_samples_per_s"], r["pytorch_samples_per_s"]
        lines.append(
            f"| {r['submodel']} | {r['gamma']:.2f} | {r['params']:,} | {r['threads']} | {ort_:.0f} | {port:.0f} | "
            f"{ref:.0f} | {ort_ / ref:.2f} | {port / ref:.2f} |"
        )
    lines += [
        "",
        f"Export of the 5 default submodels (fresh folder): {export_s:.1f} s; artifact sizes "
        "(all files of a submodel, both flavours) "
        + ", ".join(f"submodel {k}: {v / 1024:.0f} KiB" for k, v in sizes.items())
        + ".",
        "",
    ]
    write_section(ROOT / "docs" / "benchmarks.md", "throughput", "\n".join(lines))


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the section between `<!-- name:begin -->` and `<!-- name:end -->` (or append it)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = (
        path.read_text()
        if path.exists()
        else "# Benchmarks\n\nEvery number here was written by the command it names.\n"
    )
    block = f"{begin}\n{text}\n{end}"
    if begin in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


if __name__ == "__main__":
    main()
