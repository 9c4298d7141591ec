"""Benchmark: local training speed on the device, ONNX Runtime (training build and portable graph) against
PyTorch on the same submodel, weights, batch and thread count, and each as a share of this machine's
float32 GEMM peak.

Every default submodel of resnet-small, batch 32, SGD with momentum 0.9 and the task's weight decay (what a
device runs; PyTorch's ``SGD(weight_decay=...)`` adds the same ``wd * w`` to every gradient that the ORT
trainers add); at 1 and 2 threads (both backends with spin-waiting off, the device default, and at 2 threads
also on: the device's probe picks whichever is faster). PyTorch's thread settings are pinned, never its
defaults, so that a shared host's load cannot change them: its intra-op threads are set to the contender's
count before every call, its inter-op pool to 1 thread (ONNX Runtime's sequential executor uses none), and
its OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``), the counterpart of ONNX Runtime's
spin-waiting off: with OpenMP's default spinning, 2 threads on a loaded 2-core host ran 10x slower than 1
(45 against 456 samples/s, submodel 0, load 6-7), which made a false 2-thread "met". PyTorch fixes the
inter-op pool once per process, before any parallel work, so it cannot follow the contender's count as the
intra-op threads do (an eager training step does not use it); OpenMP reads its wait policy once, when
``import torch`` loads it (:func:`import_torch`).
Contenders run interleaved (A B C A B C ...), each call a few steps, and the medians count. Writes
``bench/results/device.json`` and the ``device`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import SummaryRow, commit, interleaved, write_json, write_section

BATCH = 32
THREADS = (1, 2)
GEMM_N = 1024
GEMM_FLOPS = 2 * GEMM_N**3
"""A GEMM of this size runs interleaved with the training steps, in torch (MKL) and in ONNX Runtime (MLAS):
the faster is the peak a FLOP share is taken against, under the same load (this machine is shared). On this
AMD CPU MKL takes its AVX2 path (about 100 GFLOP/s a core) while MLAS uses AVX-512 (about 200). A
standalone torch peak is reported beside it."""


def gemm_peak(threads: int, seconds: float, n: int = 2048) -> float:
    """Best float32 GEMM rate (FLOP/s) of torch (MKL) and numpy (OpenBLAS, its own thread count) at
    ``threads`` threads, on ``n`` x ``n`` matrices."""
    import torch

    pin_torch_threads(threads)
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    best = 0.0
    for fn in (lambda: ta @ tb, lambda: a @ b) if threads == os.cpu_count() else (lambda: ta @ tb,):
        fn()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            fn()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def training_flops(config: Any, spec: Any) -> float:
    """FLOPs of one training step per sample: forward, weight gradients, and input gradients of every
    convolution and the classifier except the stem (its input needs no gradient); 2 FLOPs per multiply-add.
    BatchNorm and elementwise work are left out (a few per cent)."""
    from nefl_edge.core.specs import mflops, param_layout

    forward = mflops(config, spec) * 1e6
    stem = config.image_size**2 * math.prod(param_layout(config, spec)["stem.conv.weight"].shape)
    return 2 * (3 * forward - stem)


def _mlas_gemm(threads: int, a: np.ndarray, b: np.ndarray) -> Callable[[], Any]:
    """``a @ b`` by ONNX Runtime's MatMul (MLAS) at ``threads`` threads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from nefl_edge.edge_client.runtime import session_options

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape)) for n, v in (("a", a), ("b", b))],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(ort, threads), providers=["CPUExecutionProvider"]
    )
    return partial(session.run, None, {"a": a, "b": b})


def _repeat(fn: Callable[[], Any], steps: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(steps):
            fn()

    return run


def import_torch() -> tuple[Any, bool]:
    """``torch``, imported with ``OMP_WAIT_POLICY=PASSIVE`` for its OpenMP runtime (the variable is set for
    the import only, so that subprocesses of other suites do not inherit it); and whether the policy took
    (False when something had imported torch before, or the caller set the variable otherwise)."""
    if "torch" in sys.modules:
        return sys.modules["torch"], os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    before = os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        import torch
    finally:
        if before is None:
            del os.environ["OMP_WAIT_POLICY"]
        else:
            os.environ["OMP_WAIT_POLICY"] = before
    return torch, before is None or before.upper() == "PASSIVE"


def pin_torch_threads(threads: int) -> None:
    """Set PyTorch's intra-op threads to ``threads`` and check that they took (``torch.set_num_threads``)."""
    import torch

    torch.set_num_threads(threads)
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"PyTorch runs {torch.get_num_threads()} intra-op threads, not the {threads} asked")


def pin_torch_interop(threads: int = 1) -> int:
    """Set PyTorch's inter-op pool to ``threads`` where it is still possible (once per process, before any
    inter-op work); return the count in effect."""
    import torch

    with contextlib.suppress(RuntimeError):  # already set or started in this process: report what is there
        torch.set_num_interop_threads(threads)
    return int(torch.get_num_interop_threads())


def measure(quick: bool) -> dict[str, Any]:
    torch, passive = import_torch()

    from nefl_edge.coordinator.models import SubmodelNet, initial_consistent
    from nefl_edge.core.artifacts import submodel_paths
    from nefl_edge.core.nested import extract, init_global_state
    from nefl_edge.core.schemas import TrainConfig
    from nefl_edge.core.specs import get_model_config, make_specs
    from nefl_edge.edge_client.profile import choose_threads
    from nefl_edge.edge_client.trainer import BACKEND_FILES, create_backend
    from nefl_edge.export.artifacts import export_set

    steps, repeats = (2, 2) if quick else (3, 5)
    interop = pin_torch_interop(1)
    load_before = os.getloadavg()
    config = get_model_config("resnet-small")
    specs = make_specs(config)
    state = init_global_state(config, specs, initial_consistent(config, 0))
    cfg = TrainConfig(lr=0.01, momentum=0.9, batch_size=BATCH)
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, config.in_channels, config.image_size, config.image_size), dtype=np.float32)
    y = rng.integers(0, config.num_classes, BATCH).astype(np.int64)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    peaks = {t: gemm_peak(t, 0.2 if quick else 1.0) for t in THREADS}
    ga, gb = (torch.rand(GEMM_N, GEMM_N), torch.rand(GEMM_N, GEMM_N))
    mlas = {t: _mlas_gemm(t, ga.numpy(), gb.numpy()) for t in THREADS}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        chosen = [0, len(specs) - 1] if quick else list(range(len(specs)))
        manifest = export_set(config, [specs[i] for i in chosen], folder, cfg)
        for index, sub in zip(chosen, manifest.submodels):
            weights = extract(state, index)
            flops = training_flops(config, specs[index]) * BATCH
            for threads in THREADS:
                pin_torch_threads(threads)
                contenders: dict[str, Callable[[], None]] = {}
                for kind in ("ort-training", "portable"):
                    for spin in (False, True) if threads > 1 else (False,):
                        paths = submodel_paths(folder, sub, BACKEND_FILES[kind])
                        backend = create_backend(kind, paths, sub.params, cfg, threads, spin)
                        backend.load(weights)
                        contenders[kind + ("+spin" if spin else "")] = _repeat(partial(backend.step, x, y), steps)
                net = SubmodelNet(config, specs[index]).train()
                net.load_tensors(weights)
                opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

                def torch_step(net: Any = net, opt: Any = opt, threads: int = threads) -> None:
                    pin_torch_threads(threads)
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(net(tx), ty).backward()
                    opt.step()

                contenders["pytorch"] = _repeat(torch_step, steps)

                def torch_gemm(threads: int = threads) -> None:
                    pin_torch_threads(threads)
                    ga @ gb

                contenders["gemm"] = _repeat(torch_gemm, steps)
                contenders["gemm-mlas"] = _repeat(mlas[threads], steps)
                seconds = interleaved(contenders, repeats)
                gemm_rates = {k: GEMM_FLOPS * steps / seconds.pop(k) for k in ("gemm", "gemm-mlas")}
                peak = max(gemm_rates.values())
                speed = {k: steps * BATCH / s for k, s in seconds.items()}
                row: dict[str, Any] = {
                    "submodel": index,
                    "gamma": sub.gamma,
                    "params": sub.param_count,
                    "threads": threads,
                    "train_mflop_per_sample": flops / BATCH / 1e6,
                    "gemm_peak_gflops": peak / 1e9,
                    "gemm_gflops": {"torch-mkl": gemm_rates["gemm"] / 1e9, "ort-mlas": gemm_rates["gemm-mlas"] / 1e9},
                    "samples_per_s": speed,
                }
                for kind in ("ort-training", "portable"):
                    best = max(v for k, v in speed.items() if k.split("+")[0] == kind)
                    row[f"{kind}_best"] = best
                    row[f"{kind}_vs_pytorch"] = best / speed["pytorch"]
                    row[f"{kind}_peak_fraction"] = best * flops / BATCH / peak
                row["pytorch_peak_fraction"] = speed["pytorch"] * flops / BATCH / peak
                row["fastest_vs_pytorch"] = max(row["ort-training_vs_pytorch"], row["portable_vs_pytorch"])
                rows.append(row)
                print(
                    f"submodel {index} threads {threads}: "
                    + ", ".join(f"{k} {v:.0f}" for k, v in speed.items())
                    + f" samples/s; fastest/PyTorch {row['fastest_vs_pytorch']:.2f}, "
                    f"portable/PyTorch {row['portable_vs_pytorch']:.2f}",
                    flush=True,
                )
        probe = min(manifest.submodels, key=lambda s: s.mflops)
        choices = {}
        for kind in ("ort-training", "portable"):
            paths = submodel_paths(folder, probe, BACKEND_FILES[kind])
            choice = choose_threads(
                lambda t, spin, p=paths, k=kind: create_backend(k, p, probe.params, cfg, t, spin),
                manifest.input_shape,
                manifest.num_classes,
                seconds=0.1 if quick else 0.3,
            )
            choices[kind] = {"threads": choice.label, "tried": choice.tried}
    return {
        "batch": BATCH,
        "weight_decay": cfg.weight_decay,
        "torch_threads": {
            "intra_op": "the contender's, set before every call",
            "inter_op": interop,
            "omp_wait_policy": "PASSIVE" if passive else os.environ.get("OMP_WAIT_POLICY", "default (spinning)"),
        },
        "steps_per_call": steps,
        "repeats": repeats,
        "gemm_peak_gflops": {t: p / 1e9 for t, p in peaks.items()},
        "probe_choice": choices,
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "rows": rows,
    }


def _docs(record: dict[str, Any]) -> str:
    peaks = record["gemm_peak_gflops"]
    lines = [
        "## Device training speed: ONNX Runtime (training build, portable graph) vs PyTorch",
        "",
        f"`just bench device` at commit `{commit()}`: resnet-small's 5 default submodels, batch {record['batch']}, "
        f"SGD with momentum 0.9 and weight decay {record.get('weight_decay', 0):g} in every contender; PyTorch's "
        "intra-op threads pinned to the contender's count before every call, its inter-op pool to "
        f"{record.get('torch_threads', {}).get('inter_op', '-')}, its OpenMP wait policy "
        f"{record.get('torch_threads', {}).get('omp_wait_policy', '-')} (ORT's spin-waiting off); "
        "the same weights and batch for every contender; "
        f"medians of {record['repeats']} "
        f"interleaved calls of {record['steps_per_call']} steps (samples/s). ORT runs with spin-waiting off (the "
        "device default) and, at 2 threads, also with it on; the ratios take the faster, which "
        "the device's probe picks by measurement. FLOP share: training FLOPs (forward, weight and input "
        "gradients of every conv and "
        f"the classifier) per second over the float32 GEMM rate at the same thread count of a {GEMM_N}-square "
        "matmul, the faster of torch (MKL: its AVX2 path on this AMD CPU) and ONNX Runtime (MLAS: AVX-512, about "
        "twice as fast), run interleaved with the contenders, so under the same load (`gemm_gflops` per row in "
        "the JSON; torch standalone before the run: "
        f"{', '.join(f'{t} thread(s) {p:.0f} GFLOP/s' for t, p in peaks.items())}).",
        "",
        "| submodel | gamma | threads | ORT training | ORT training, spin | portable | portable, spin | PyTorch "
        "| fastest / PyTorch | portable / PyTorch | FLOP share ORT / portable / PyTorch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        s = r["samples_per_s"]

        def cell(key: str, speeds: dict[str, float] = s) -> str:
            return f"{speeds[key]:.0f}" if key in speeds else "-"

        lines.append(
            f"| {r['submodel']} | {r['gamma']:.1f} | {r['threads']} | {cell('ort-training')} | "
            f"{cell('ort-training+spin')} | {cell('portable')} | {cell('portable+spin')} | {cell('pytorch')} | "
            f"{r['fastest_vs_pytorch']:.2f} | {r['portable_vs_pytorch']:.2f} | "
            f"{r['ort-training_peak_fraction']:.2f} / {r['portable_peak_fraction']:.2f} / "
            f"{r['pytorch_peak_fraction']:.2f} |"
        )
    choice = record["probe_choice"]
    lines += [
        "",
        "The device's thread probe (smallest submodel, `nefl-edge join` with the default `--threads 0`) chose: "
        + "; ".join(f"{k}: {v['threads']} (samples/s tried {v['tried']})" for k, v in choice.items())
        + ". Raw numbers: `bench/results/device.json`. This machine is shared: its 1-minute load average was "
        f"{record['load_average_1min']['before']:.1f} before and {record['load_average_1min']['after']:.1f} after "
        "the run (2 cores), which hits the 2-thread figures hardest.",
    ]
    return "\n".join(lines)


def run(quick: bool) -> list[SummaryRow]:
    record = measure(quick)
    record["quick"] = quick
    write_json("device-quick" if quick else "device", record)
    if not quick:
        write_section("device", _docs(record))
    rows: list[SummaryRow] = []
    by_threads = {t: [r for r in record["rows"] if r["threads"] == t] for t in THREADS}
    for t, group in by_threads.items():
        worst = min(group, key=lambda r: r["fastest_vs_pytorch"])
        rows.append(
            SummaryRow(
                "device",
                f"fastest backend / PyTorch, {t} thread(s), worst submodel",
                worst["fastest_vs_pytorch"],
                "PyTorch, same submodel and batch",
                1.0,
                note=f"submodel {worst['submodel']}",
            )
        )
    for t, group in by_threads.items():
        worst = min(group, key=lambda r: r["portable_vs_pytorch"])
        rows.append(
            SummaryRow(
                "device",
                f"portable / PyTorch, {t} thread(s), worst submodel",
                worst["portable_vs_pytorch"],
                "PyTorch, same submodel and batch",
                0.9,
                note=f"submodel {worst['submodel']}",
            )
        )
    best_of: dict[int, tuple[float, float]] = {}
    for r in record["rows"]:
        mine = max(r["ort-training_best"], r["portable_best"])
        old_mine, old_torch = best_of.get(r["submodel"], (0.0, 0.0))
        best_of[r["submodel"]] = (max(old_mine, mine), max(old_torch, r["samples_per_s"]["pytorch"]))
    worst_sub, (mine, theirs) = min(best_of.items(), key=lambda kv: kv[1][0] / kv[1][1])
    rows.append(
        SummaryRow(
            "device",
            "fastest backend / PyTorch, each at its best thread count, worst submodel",
            mine / theirs,
            "PyTorch at its best of 1 and 2 threads",
            1.0,
            note=f"submodel {worst_sub}",
        )
    )
    largest = max(by_threads[1], key=lambda r: r["submodel"])
    for kind in ("ort-training", "portable", "pytorch"):
        rows.append(
            SummaryRow(
                "device",
                f"{kind} training FLOP rate, submodel {largest['submodel']}, 1 thread",
                largest[f"{kind}_peak_fraction"],
                "float32 GEMM, 1 thread, interleaved",
            )
        )
    return rows


if __name__ == "__main__":
    from bench.common import summary_table

    print(summary_table(run(quick=False)))
