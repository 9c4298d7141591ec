"""What a device tells the coordinator about itself: hardware, ONNX Runtime, and measured throughput; and
the thread setting it trains with, chosen by measurement."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from nefl_edge.core.files import write_atomic
from nefl_edge.core.schemas import DeviceProfile
from nefl_edge.edge_client.trainer import TrainerBackend

log = logging.getLogger(__name__)


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


@dataclass
class ThreadChoice:
    """The fastest ONNX Runtime thread setting measured on this device."""

    threads: int
    spin: bool
    samples_per_s: float
    tried: Dict[str, float] = field(default_factory=dict)
    """Samples/s of every setting tried, keyed ``"<threads>"`` or ``"<threads>+spin"``."""

    @property
    def label(self) -> str:
        return f"{self.threads}+spin" if self.spin else str(self.threads)


def thread_candidates(cores: int) -> List[Tuple[int, bool]]:
    """1 thread, then 2, 4 and all cores, each with spin-waiting off and on (spinning only matters with a
    thread pool, i.e. more than one thread)."""
    counts = sorted({c for c in (2, 4, cores) if 1 < c <= cores})
    return [(1, False)] + [(t, spin) for t in counts for spin in (False, True)]


def choose_threads(
    make_backend: Callable[[int, bool], TrainerBackend],
    input_shape: Tuple[int, ...],
    num_classes: int,
    cores: Optional[int] = None,
    seconds: float = 0.5,
    rounds: int = 2,
    measure: Optional[Callable[..., float]] = None,
) -> ThreadChoice:
    """Time training with every :func:`thread_candidates` setting (``rounds`` interleaved runs of
    ``seconds`` each, best run counts) and keep the fastest. On 2 cores ORT's default (one thread per core)
    was up to 2x slower than 1 thread for small submodels, and spin-waiting cost 3x under load, so neither
    is assumed."""
    timer = measure or measure_throughput
    candidates = thread_candidates(cores or os.cpu_count() or 1)
    backends = {c: make_backend(*c) for c in candidates}
    speeds: Dict[Tuple[int, bool], float] = {c: 0.0 for c in candidates}
    for _ in range(rounds):
        for c, backend in backends.items():
            speeds[c] = max(speeds[c], timer(backend, input_shape, num_classes, seconds=seconds))
    (threads, spin), best = max(speeds.items(), key=lambda kv: kv[1])
    tried = {(f"{t}+spin" if s else str(t)): round(v, 1) for (t, s), v in speeds.items()}
    return ThreadChoice(threads, spin, best, tried)


def load_thread_choice(path: Path, key: str) -> Optional[ThreadChoice]:
    """A choice saved by :func:`save_thread_choice` under the same ``key`` (device, backend, probe
    submodel), or ``None``."""
    try:
        record = json.loads(Path(path).read_text())
        if record.get("key") != key:
            return None
        return ThreadChoice(
            int(record["threads"]), bool(record["spin"]), float(record["samples_per_s"]), dict(record["tried"])
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def save_thread_choice(path: Path, key: str, choice: ThreadChoice) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(path), json.dumps({"key": key, **asdict(choice)}).encode())
    except OSError as exc:
        log.warning("cannot cache the thread choice in %s: %s", path, exc)


def probe_threads(
    make_backend: Callable[[int, bool], TrainerBackend],
    input_shape: Tuple[int, ...],
    num_classes: int,
    threads: int = 0,
    cache_file: Optional[Path] = None,
    key: str = "",
) -> ThreadChoice:
    """The thread setting to train with and the training speed with it. ``threads`` > 0: that many threads
    without spin-waiting (the user's choice), timed for 1 s. 0: the choice cached in ``cache_file`` under
    ``key`` (re-timed for 1 s), else :func:`choose_threads`, which is then cached."""
    cached = None if threads or cache_file is None else load_thread_choice(cache_file, key)
    if threads or cached is not None:
        setting = (threads, False) if threads else (cached.threads, cached.spin)  # type: ignore[union-attr]
        speed = measure_throughput(make_backend(*setting), input_shape, num_classes, seconds=1.0)
        choice = ThreadChoice(setting[0], setting[1], speed, {} if cached is None else cached.tried)
        choice.tried[choice.label] = round(speed, 1)
        return choice
    choice = choose_threads(make_backend, input_shape, num_classes, seconds=0.3)
    if cache_file is not None:
        save_thread_choice(cache_file, key, choice)
    return choice


def thread_choice_key(backend: str, probe_key: str) -> str:
    import onnxruntime

    return f"{platform.machine()}/{os.cpu_count()}/{onnxruntime.__version__}/{backend}/{probe_key}"


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


def version_text(program: str) -> str:
    """What ``--version`` prints: the package, its commit, ONNX Runtime and the backend it gives, Python."""
    import onnxruntime

    from nefl_edge.core import __version__
    from nefl_edge.core.cli import source_commit
    from nefl_edge.edge_client.trainer import BackendUnavailable, choose_backend

    try:
        backend = choose_backend("auto")
    except BackendUnavailable as exc:
        backend = f"none ({exc})"
    return (
        f"{program} {__version__} (commit {source_commit()}); ONNX Runtime {onnxruntime.__version__}, "
        f"training backend {backend}; Python {platform.python_version()} on {platform.machine()}"
    )
