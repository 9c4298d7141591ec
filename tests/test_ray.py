"""Simulation on Ray (``simulate --engine ray``, ``coordinator.ray_grid``): the serial state on a local Ray and
on a two-node cluster on loopback, the object store used once per round rather than once per client, and the
command line's checks. Skipped with the reason where Ray is not installed (the ``nefl-edge[ray]`` extra)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nefl_edge.coordinator.config import ConfigError, RunConfig, load_config
from nefl_edge.coordinator.grid import Instruction
from nefl_edge.coordinator.simulate import SimResult, simulate
from nefl_edge.core.data import Dataset, load_dataset

GAMMAS = (0.2, 0.4, 0.6, 0.8, 1.0)
CLIENTS = 10  # two clients per submodel: the submodels' weights are put once per round, not once per client
ROUNDS = 2


def ray_or_skip() -> Any:
    return pytest.importorskip("ray", reason="Ray is not installed here (pip install 'nefl-edge[ray]')")


def small_data(fmnist_dir: Path) -> tuple[list[Dataset], Dataset]:
    data = load_dataset(fmnist_dir, "train")
    shards = [Dataset(data.x[i * 24 : (i + 1) * 24], data.y[i * 24 : (i + 1) * 24], f"s{i}") for i in range(CLIENTS)]
    test = load_dataset(fmnist_dir, "test")
    return shards, Dataset(test.x[:100], test.y[:100], "test")


@pytest.fixture(scope="module")
def small_fmnist(fmnist_dir: Path) -> tuple[list[Dataset], Dataset]:
    return small_data(fmnist_dir)


def run_config() -> RunConfig:
    """The paper protocol, shortened, with the default federated BatchNorm statistics (the evaluation step's
    tasks run on Ray too) after every round."""
    base = {"preset": "paper", "method": "nefl-wd", "rounds": ROUNDS, "fraction": 1.0, "policy": "static"}
    return load_config(None, {**base, "device": "cpu", "train.epochs": 1, "bn": "federated"})


def run(data: tuple[list[Dataset], Dataset], ray: Any = None) -> SimResult:
    shards, test = data
    cfg = run_config()
    tiers = [i % len(GAMMAS) for i in range(CLIENTS)]
    return simulate(cfg, shards, tiers, test, threads=1, ray=ray)  # serial: 1 PyTorch thread, as each Ray task


@pytest.fixture(scope="module")
def serial(small_fmnist: tuple[list[Dataset], Dataset]) -> SimResult:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray task (--client-cpus 1)
    try:
        return run(small_fmnist)
    finally:
        torch.set_num_threads(threads)


def assert_serial(result: SimResult, serial: SimResult, where: str) -> None:
    assert serial.state is not None and result.state is not None
    want, got = serial.state.flat(), result.state.flat()
    assert sorted(got) == sorted(want), f"{where}: the state's tensors differ from the serial run's"
    for name, value in want.items():
        assert np.array_equal(got[name], value), f"{where}: {name} differs from the serial run's"
    assert result.accuracy == serial.accuracy, f"{where}: accuracy {result.accuracy} != serial {serial.accuracy}"
    assert result.updates == serial.updates == [CLIENTS] * ROUNDS, f"{where}: updates {result.updates}"


@pytest.mark.slow  # about 20 s on a quiet host (Ray and its workers start), 50 s at load 10
def test_local_ray_gives_the_serial_state_and_puts_once_per_round(
    small_fmnist: tuple[list[Dataset], Dataset], serial: SimResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    ray_or_skip()
    from nefl_edge.coordinator import ray_grid

    grids: list[ray_grid.RayGrid] = []
    rounds: list[list[Instruction]] = []
    steps: list[int] = []  # requests of each evaluation step of its own
    carried: list[int] = []  # rounds whose tasks carried the previous round's statistics pass
    init, submit, evaluate = ray_grid.RayGrid.__init__, ray_grid.RayGrid._submit, ray_grid.RayGrid.evaluate
    run_carrying = ray_grid.RayGrid.run_carrying

    def keep(self: ray_grid.RayGrid, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        grids.append(self)

    def seen_submit(self: ray_grid.RayGrid, ref: Any, state: Any, instructions: list[Instruction], *a: Any) -> Any:
        rounds.append(instructions)
        return submit(self, ref, state, instructions, *a)

    def seen_evaluate(self: ray_grid.RayGrid, r: int, state: Any, requests: list[Any]) -> Any:
        steps.append(len(requests))
        return evaluate(self, r, state, requests)

    def seen_carrying(self: ray_grid.RayGrid, r: int, *a: Any) -> Any:
        carried.append(r)
        return run_carrying(self, r, *a)

    monkeypatch.setattr(ray_grid.RayGrid, "__init__", keep)
    monkeypatch.setattr(ray_grid.RayGrid, "_submit", seen_submit)
    monkeypatch.setattr(ray_grid.RayGrid, "evaluate", seen_evaluate)
    monkeypatch.setattr(ray_grid.RayGrid, "run_carrying", seen_carrying)

    result = run(small_fmnist, ray_grid.RayOptions())

    assert_serial(result, serial, "local Ray")
    (grid,) = grids
    assert len(rounds) == ROUNDS and all(steps), f"rounds {len(rounds)}, evaluation steps {steps}"
    assert carried == list(range(2, ROUNDS + 1)) and len(steps) == 1, f"carried {carried}, own steps {steps}"
    # shards once per run; per round the state (its carried statistics tasks' too) and each trained
    # submodel's weights; per evaluation step of its own the state
    nodes = {ins.node for instructions in rounds for ins in instructions}
    want = len(nodes) + sum(1 + len({ins.submodel for ins in instructions}) for instructions in rounds) + len(steps)
    per_client = sum(2 * len(instructions) for instructions in rounds)
    assert grid.puts == want < per_client, f"{grid.puts} objects put into Ray's object store, expected {want}"
    assert not grid.started, "the Ray the grid started is still up after the run"
    import ray

    assert not ray.is_initialized(), "simulate left Ray initialised in this process"


@pytest.mark.slow  # a local Ray starts: 3 s on a quiet host, 10-20 s under load
def test_a_local_ray_gets_the_wait_policy_from_the_environment_not_a_runtime_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ray = ray_or_skip()
    from nefl_edge.coordinator.ray_grid import RayGrid, RayOptions
    from nefl_edge.coordinator.training_options import TorchOptions

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    grid = RayGrid({}, {}, "fedavg-full", TorchOptions(), RayOptions())
    try:
        job_env = dict(ray.get_runtime_context().runtime_env)
        policy = ray.remote(num_cpus=1)(lambda: os.environ.get("OMP_WAIT_POLICY"))
        seen = ray.get([policy.remote() for _ in range(2)], timeout=120)
    finally:
        grid.close()

    assert job_env == {}, f"a local Ray's job has a runtime environment {job_env}: its workers start on first use"
    assert seen == ["PASSIVE", "PASSIVE"], f"the workers' OMP_WAIT_POLICY is {seen}, not PASSIVE"
    assert "OMP_WAIT_POLICY" not in os.environ, "starting Ray left OMP_WAIT_POLICY set in the driver's environment"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_node(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.Popen[str]:
    """``ray start ... --block`` in a session of its own: the node's processes (GCS, raylet, workers) are its
    process group, so the test stops exactly them (``ray stop`` would stop every Ray of this user here)."""
    exe = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert exe is not None, "the ray command is not next to this Python"
    node = subprocess.Popen(
        [exe, "start", *args, "--block", "--disable-usage-stats"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline, seen = time.monotonic() + timeout, []
    assert node.stdout is not None
    for line in node.stdout:  # until the node says it runs (or the process ends)
        seen.append(line)
        if "Ray runtime started" in line:
            threading.Thread(target=node.stdout.read, daemon=True).start()  # keep draining its output
            return node
        if time.monotonic() > deadline:
            break
    stop_node(node)
    raise AssertionError(f"ray start {' '.join(args)} did not start: {''.join(seen)[-2000:]}")


def stop_node(node: subprocess.Popen[str]) -> None:
    """SIGTERM to the node's process group (a node drains for up to 30 s), SIGKILL after 40 s; then no process
    of the group may remain."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.wait(40)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGKILL)
    node.wait(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(node.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)  # processes of the group still exiting: nothing to await but their disappearance
    raise AssertionError(f"processes of the Ray node {node.pid} outlived SIGKILL")


CLUSTER_DRIVER = """
import json, sys
import numpy as np
from nefl_edge.coordinator import ray_grid
from nefl_edge.core.data import FASHION_MNIST_DIR
from tests.test_ray import run, small_data

grids = []
init = ray_grid.RayGrid.__init__
def keep(self, *args, **kwargs):
    init(self, *args, **kwargs)
    grids.append(self)
ray_grid.RayGrid.__init__ = keep
result = run(small_data(FASHION_MNIST_DIR), ray_grid.RayOptions(address=sys.argv[1]))
np.savez(sys.argv[2], **result.state.flat())
print("RESULT " + json.dumps({"accuracy": result.accuracy, "updates": result.updates, "nodes": grids[0].nodes}))
"""
"""The driver of the cluster run, in a process of its own: Ray reads its token when it is first imported."""


@pytest.mark.slow
def test_two_node_loopback_cluster_gives_the_serial_state(serial: SimResult, tmp_path: Path) -> None:
    ray_or_skip()
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="nefl-ray-", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": str(temp),
        # the cluster's own token (Ray's token authentication), for both nodes and the driver
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    common = ("--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0")
    nodes: list[subprocess.Popen[str]] = []
    try:
        nodes.append(ray_node("--head", "--port", str(port), "--include-dashboard", "false", *common, env=env))
        nodes.append(ray_node("--address", f"127.0.0.1:{port}", *common, env=env))

        driver = subprocess.run(
            [sys.executable, "-c", CLUSTER_DRIVER, f"127.0.0.1:{port}", str(tmp_path / "state.npz")],
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

        assert driver.returncode == 0, f"the simulate on the cluster failed: {driver.stderr[-3000:]}"
        line = [x for x in driver.stdout.splitlines() if x.startswith("RESULT ")][-1]
        found = json.loads(line.removeprefix("RESULT "))
        with np.load(tmp_path / "state.npz") as npz:
            state = {name: npz[name] for name in npz.files}
        assert serial.state is not None
        want = serial.state.flat()
        assert sorted(state) == sorted(want), "the cluster run's state has other tensors than the serial run's"
        for name, value in want.items():
            assert np.array_equal(state[name], value), f"two-node Ray cluster: {name} differs from the serial run's"
        assert found["accuracy"] == serial.accuracy, f"accuracy {found['accuracy']} != serial {serial.accuracy}"
        assert found["updates"] == serial.updates, f"updates {found['updates']} != serial {serial.updates}"
        assert len(found["nodes"]) == 2, f"clients trained on {found['nodes']}: not on both nodes of the cluster"
    finally:
        for node in reversed(nodes):
            stop_node(node)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_options_refuse_a_share_of_nothing() -> None:
    from nefl_edge.coordinator.ray_grid import RayOptions

    with pytest.raises(ConfigError, match="client_cpus"):
        RayOptions(client_cpus=0)
    with pytest.raises(ConfigError, match="client_gpus"):
        RayOptions(client_gpus=-1)
    assert RayOptions(client_cpus=2.5).threads == 2 and RayOptions(client_cpus=0.5).threads == 1


def test_an_address_where_no_cluster_listens_is_refused_at_once() -> None:
    ray_or_skip()
    port = free_port()  # nothing listens there any more
    start = time.monotonic()

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "nefl_edge.coordinator",
            "simulate",
            "--engine",
            "ray",
            "--ray-address",
            f"127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert run.returncode == 2, f"exited {run.returncode}: {run.stderr[-1000:]}"
    assert "no Ray cluster answers there" in run.stderr, run.stderr
    assert time.monotonic() - start < 60, "refusing an address took Ray's own minutes of retries"


def test_without_ray_the_message_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from nefl_edge.coordinator.ray_grid import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError

    with pytest.raises(ConfigError, match=r"nefl-edge\[ray\]"):
        import_ray()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--engine", "spark"], "--engine must be local or ray"),
        (["--ray-address", "127.0.0.1:1"], "go with --engine ray"),
        (["--client-cpus", "2"], "go with --engine ray"),
        (["--engine", "ray", "--workers", "2"], "drop --trainer and --workers"),
        (["--engine", "ray", "--client-cpus", "0"], "client_cpus must be above 0"),
    ],
)
def test_simulate_refuses_wrong_engine_options(args: list[str], says: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "nefl_edge.coordinator", "simulate", "--rounds", "1", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert run.returncode == 2, f"simulate {' '.join(args)} exited {run.returncode}: {run.stderr[-1000:]}"
    assert says in run.stderr, f"simulate {' '.join(args)} said {run.stderr!r}, not {says!r}"
    assert len(run.stderr.strip().splitlines()) == 1, f"more than one line: {run.stderr!r}"
