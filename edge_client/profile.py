"""What a device tells the coordinator about itself: hardware, ONNX Runtime, and measured throughput."""

from __future__ import annotations

import os
import platform
import time
from typing import Optional, Tuple

import numpy as np

from nefl_edge.edge_client.schemas import DeviceProfile
from nefl_edge.edge_client.trainer import TrainerBackend


def memory_mb() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)
    except (ValueError, OSError, AttributeError):
        return 0


def measure_throughput(
    backend: TrainerBackend, input_shape: Tuple[int, ...], num_classes: int, batch: int = 32, seconds: float = 2.0
) -> float:
    """Training samples per second on random data: one warm-up step, then steps until ``seconds`` pass
    (at least three). The backend's weights change; reload them before real training."""
    rng = np.random.default_rng(0)
    x = rng.random((batch, *input_shape), dtype=np.float32)
    y = rng.integers(0, num_classes, batch).astype(np.int64)
    backend.step(x, y)
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < seconds:
        backend.step(x, y)
        steps += 1
    return steps * batch / (time.perf_counter() - start)


def device_profile(
    backend: str, samples_per_s: Optional[float] = None, probe_mflops: Optional[float] = None
) -> DeviceProfile:
    import onnxruntime

    return DeviceProfile(
        arch=platform.machine(),
        system=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        cores=os.cpu_count() or 1,
        memory_mb=memory_mb(),
        onnxruntime=onnxruntime.__version__,
        backend=backend,
        samples_per_s=None if samples_per_s is None else round(samples_per_s, 2),
        probe_mflops=probe_mflops,
    )
