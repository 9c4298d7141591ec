"""NeFedAvg throughput against a memory copy, its working memory, and float32 against float64.

100 updates of ResNet18 (CIFAR-10) submodels at the default gammas (random tensors of the real layout,
client ``i`` trains submodel ``i % 5`` on 100-600 samples) are folded and averaged by the project's
:class:`NeFedAvg` and, interleaved, by the float64 implementation it replaced (kept here as
:class:`Float64NeFedAvg`). Throughput is update bytes folded per second (``add`` of every update and
``result``) as a fraction of ``numpy.copyto`` of a 256 MiB array (bytes copied per second), interleaved
with the folds so that load on the machine hits both alike. Working memory
is the tracemalloc peak of one round (aggregator and result, not the updates) over the global model's bytes.

Robust aggregation (``aggregation = "robust"``, ``core.robust``) is timed against exact NeFedAvg on
``ROBUST_CLIENTS`` honest updates (:func:`honest_round`: distinct, sharing a direction, so that robust
aggregation keeps them all), interleaved, same repeats; its working memory is measured the same way. Its
coordinate-wise trimmed mean needs every covering client's value of an element at once, so it is compared
at a round size where that stays within the suite's time.
"""

from __future__ import annotations

import functools
import os
import tracemalloc
from typing import Any

import numpy as np

from bench.common import SummaryRow, interleaved, write_json, write_section
from nefl_edge.core.nefedavg import NeFedAvg
from nefl_edge.core.nested import GlobalState, Tensors, extract, init_global_state, prefix_slice
from nefl_edge.core.robust import BLOCK_VALUES, RobustOptions
from nefl_edge.core.specs import get_model_config, make_specs, param_layout

MODEL, DATASET = "resnet18", "cifar10"
VARIANTS = 2  # distinct random updates per submodel, reused round-robin (keeps memory down)
ROBUST_CLIENTS = 10
RobustNeFedAvg = functools.partial(NeFedAvg, robust=RobustOptions())


class Float64NeFedAvg:
    """The implementation before issue 15: float64 sums plus a float64 coverage array per element."""

    def __init__(self, state: GlobalState, uniform: bool = False) -> None:
        self._state, self._uniform = state, uniform
        self._sums = {k: np.zeros(v.shape, np.float64) for k, v in state.consistent.items()}
        self._cover = {k: np.zeros(v.shape, np.float64) for k, v in state.consistent.items()}
        self._sub_sums: list[Tensors | None] = [None] * len(state.specs)
        self._sub_weight = [0.0] * len(state.specs)

    def add(self, index: int, tensors: Tensors, num_samples: int) -> None:
        weight = 1.0 if self._uniform else float(num_samples)
        layout = param_layout(self._state.config, self._state.specs[index])
        sub_sums = self._sub_sums[index]
        if sub_sums is None:
            sub_sums = self._sub_sums[index] = {
                k: np.zeros(info.shape, np.float64) for k, info in layout.items() if info.kind == "inconsistent"
            }
        for name, info in layout.items():
            value = tensors[name]
            if info.kind == "consistent":
                where = prefix_slice(info.shape)
                self._sums[name][where] += weight * value
                self._cover[name][where] += weight
            else:
                sub_sums[name] += weight * value
        self._sub_weight[index] += weight

    def result(self) -> GlobalState:
        out = self._state.copy()
        for name, old in out.consistent.items():
            cover = self._cover[name]
            covered = cover > 0
            old[covered] = (self._sums[name][covered] / cover[covered]).astype(np.float32)
        for i, sums in enumerate(self._sub_sums):
            if sums is not None:
                out.inconsistent[i] = {k: (v / self._sub_weight[i]).astype(np.float32) for k, v in sums.items()}
        return out


def make_round(clients: int, seed: int = 0) -> tuple[GlobalState, list[tuple[int, Tensors, int]]]:
    """A ResNet18 global state and ``clients`` updates (index, tensors, samples) sharing a few tensor sets."""
    config = get_model_config(MODEL, DATASET)
    specs = make_specs(config)
    state = init_global_state(config, specs, {}, seed)
    rng = np.random.default_rng(seed)
    pool = [
        [
            {k: v + rng.standard_normal(v.shape, np.float32) * np.float32(0.01) for k, v in extract(state, i).items()}
            for _ in range(VARIANTS)
        ]
        for i in range(len(specs))
    ]
    updates = [
        (c % len(specs), pool[c % len(specs)][(c // len(specs)) % VARIANTS], int(rng.integers(100, 601)))
        for c in range(clients)
    ]
    return state, updates


def honest_round(clients: int, seed: int = 0) -> tuple[GlobalState, list[tuple[int, Tensors, int]]]:
    """A ResNet18 global state and ``clients`` distinct updates that, like trained ones, share a direction:
    ``sent + 0.01 (D + noise)`` with one random ``D`` per tensor (the nested prefix of it for a submodel),
    so that robust aggregation keeps every one (independent noise alone would have half of them left out
    for disagreeing, and time a smaller round). Client ``i`` trains submodel ``i % 5`` on 100-600 samples."""
    config = get_model_config(MODEL, DATASET)
    specs = make_specs(config)
    state = init_global_state(config, specs, {}, seed)
    rng = np.random.default_rng(seed + 1)
    common = {k: rng.standard_normal(v.shape, np.float32) for k, v in state.consistent.items()}
    own = [{k: rng.standard_normal(v.shape, np.float32) for k, v in sub.items()} for sub in state.inconsistent]
    updates = []
    for c in range(clients):
        index = c % len(specs)
        tensors = {}
        for name, value in extract(state, index).items():
            direction = common[name][prefix_slice(value.shape)] if name in common else own[index][name]
            noise = rng.standard_normal(value.shape, np.float32)
            tensors[name] = value + np.float32(0.01) * (direction + noise)
        updates.append((index, tensors, int(rng.integers(100, 601))))
    return state, updates


def fold(cls: Any, state: GlobalState, updates: list[tuple[int, Tensors, int]]) -> GlobalState:
    agg = cls(state)
    for index, tensors, n in updates:
        agg.add(index, tensors, n)
    return agg.result()  # type: ignore[no-any-return]


def state_bytes(state: GlobalState) -> int:
    return sum(v.nbytes for v in state.flat().values())


def peak_ratio(state: GlobalState, updates: list[tuple[int, Tensors, int]], cls: Any = NeFedAvg) -> float:
    tracemalloc.start()
    try:
        fold(cls, state, updates)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / state_bytes(state)


COPY_ELEMENTS = 64 << 20  # a 256 MiB float32 array
COPIES = 4


def memcpy(src: np.ndarray, dst: np.ndarray) -> None:
    for _ in range(COPIES):
        np.copyto(dst, src)


def max_abs_diff(a: GlobalState, b: GlobalState) -> float:
    fa, fb = a.flat(), b.flat()
    return max(float(np.max(np.abs(fa[k] - fb[k]))) if fa[k].size else 0.0 for k in fa)


def run(quick: bool) -> list[SummaryRow]:
    clients = 20 if quick else 100
    repeats = 1 if quick else 3
    state, updates = make_round(clients)
    update_bytes = sum(v.nbytes for _, tensors, _ in updates for v in tensors.values())
    src = np.ones(COPY_ELEMENTS, np.float32)
    dst = np.empty_like(src)
    times = interleaved(
        {
            "nefedavg": lambda: fold(NeFedAvg, state, updates),
            "float64": lambda: fold(Float64NeFedAvg, state, updates),
            "memcpy": lambda: memcpy(src, dst),
        },
        repeats,
    )
    copy_bw = COPIES * src.nbytes / times["memcpy"]
    new_bw, old_bw = update_bytes / times["nefedavg"], update_bytes / times["float64"]
    diff = max_abs_diff(fold(NeFedAvg, state, updates), fold(Float64NeFedAvg, state, updates))
    peaks = {n: peak_ratio(state, updates[:n]) for n in sorted({10, clients})}
    honest_state, few = honest_round(min(clients, ROBUST_CLIENTS))
    few_bytes = sum(v.nbytes for _, tensors, _ in few for v in tensors.values())
    robust_times = interleaved(
        {
            "exact": lambda: fold(NeFedAvg, honest_state, few),
            "robust": lambda: fold(RobustNeFedAvg, honest_state, few),
        },
        repeats,
    )
    exact_few_bw, robust_bw = few_bytes / robust_times["exact"], few_bytes / robust_times["robust"]
    check = RobustNeFedAvg(honest_state)
    for index, tensors, n in few:
        check.add(index, tensors, n, node=f"c{check.updates}")
    check.result()
    left_out = len(check.robust_report.disagreeing)
    exact_few_peak = peak_ratio(honest_state, few)
    robust_peaks = {len(few): peak_ratio(honest_state, few, RobustNeFedAvg)}
    model_mb = state_bytes(honest_state) / 2**20
    record = {
        "model": MODEL,
        "dataset": DATASET,
        "clients": clients,
        "update_bytes": update_bytes,
        "global_model_bytes": state_bytes(state),
        "memcpy_GBps": copy_bw / 1e9,
        "nefedavg_GBps": new_bw / 1e9,
        "float64_GBps": old_bw / 1e9,
        "nefedavg_s": times["nefedavg"],
        "float64_s": times["float64"],
        "fraction_of_memcpy": new_bw / copy_bw,
        "float64_fraction_of_memcpy": old_bw / copy_bw,
        "peak_over_model": peaks,
        "max_abs_diff_float32_vs_float64": diff,
        "robust_clients": len(few),
        "robust_s": robust_times["robust"],
        "exact_few_s": robust_times["exact"],
        "robust_GBps": robust_bw / 1e9,
        "exact_few_GBps": exact_few_bw / 1e9,
        "robust_peak_over_model": robust_peaks,
        "exact_few_peak_over_model": exact_few_peak,
        "robust_left_out": left_out,
        "robust_block_values": BLOCK_VALUES,
        "quick": quick,
    }
    write_json("aggregation-quick" if quick else "aggregation", record)
    if not quick:
        peak_text = ", ".join(f"{p:.2f}x with {n} updates" for n, p in peaks.items())
        write_section(
            "aggregation",
            "## Aggregation (NeFedAvg)\n\n"
            f"`python -m bench aggregation`: {clients} updates of {MODEL} ({DATASET}) submodels at the default "
            f"gammas, {update_bytes / 1e9:.2f} GB of update tensors, folded and averaged; median of {repeats} "
            f"interleaved runs (load average {os.getloadavg()[0]:.1f} on this shared machine: absolute GB/s move "
            "with it, the ratios less).\n\n"
            "| implementation | GB/s | fraction of memcpy |\n|---|---|---|\n"
            f"| memcpy (numpy copy of 256 MiB, bytes copied) | {copy_bw / 1e9:.1f} | 1 |\n"
            f"| NeFedAvg (float32 sums, prefix regions) | {new_bw / 1e9:.2f} | {new_bw / copy_bw:.3f} |\n"
            f"| before issue 15 (float64 sums, coverage arrays) | {old_bw / 1e9:.2f} | {old_bw / copy_bw:.3f} |\n\n"
            f"Working memory (tracemalloc peak over the global model's {state_bytes(state) / 1e6:.1f} MB): "
            f"{peak_text}. Largest difference of the float32 result from the float64 one: {diff:.2e}.\n\n"
            f'Robust aggregation (`aggregation = "robust"`: clipping, agreement with the median, capped weights, '
            f"coordinate-wise trimmed mean per nested region) against exact NeFedAvg on {len(few)} honest updates "
            f"of the same submodels ({few_bytes / 1e9:.2f} GB; distinct, sharing a direction as trained updates "
            f"do, so that robust aggregation keeps every one: {left_out} left out), median of {repeats} "
            "interleaved runs:\n\n"
            "| mode | seconds | GB/s | fraction of memcpy | working memory / model |\n|---|---|---|---|---|\n"
            f"| exact | {robust_times['exact']:.2f} | {exact_few_bw / 1e9:.2f} | {exact_few_bw / copy_bw:.3f} | "
            f"{exact_few_peak:.2f} |\n"
            f"| robust | {robust_times['robust']:.2f} | {robust_bw / 1e9:.3f} | {robust_bw / copy_bw:.4f} | "
            + ", ".join(f"{p:.2f} ({n} updates)" for n, p in robust_peaks.items())
            + f" |\n\nRobust is {robust_times['robust'] / robust_times['exact']:.1f}x the time of exact here. "
            "Memory bound of the robust mode: the round's updates are kept until the round ends (their own "
            "bytes, references to what the grid delivered: the sum of the round's update sizes, against none "
            "for the streaming exact mode), plus one copy of the global model (the result) and scratch for one "
            f"block of at most {BLOCK_VALUES:,} clipped delta values (clients x elements; about "
            f"{BLOCK_VALUES * 4 / 2**20:.0f} MiB of float32, a few times that with the sorting network's rows and "
            "the float64 sums), whatever the model size or the number of clients: measured, "
            + ", ".join(f"{(p - 1) * model_mb:.0f} MiB beyond the result" for p in robust_peaks.values())
            + f" (the model is {model_mb:.1f} MiB).\n",
        )
    peak = max(peaks.values())
    return [
        SummaryRow("aggregation", "NeFedAvg throughput", new_bw / copy_bw, "memcpy bandwidth", 0.40),
        SummaryRow("aggregation", "NeFedAvg working memory", peak, "global model size", 3.0, higher_is_better=False),
        SummaryRow("aggregation", "float32 vs float64 max abs diff", diff / 1e-6, "1e-6", 1.0, higher_is_better=False),
        SummaryRow("aggregation", "robust throughput", robust_bw / exact_few_bw, "exact NeFedAvg, same updates"),
    ]
