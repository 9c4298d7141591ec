"""The long-lived device agent (`nefl-edge agent`) against a real Mosquitto, its pacing rule, its systemd
unit, and the device wheel's dependencies."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from nefl_edge.coordinator.models import initial_consistent
from nefl_edge.core.mqtt import BrokerError
from nefl_edge.core.nested import extract, init_global_state
from nefl_edge.core.schemas import Hello, TrainConfig, Update
from nefl_edge.core.specs import ModelConfig, SubmodelSpec
from nefl_edge.edge_client.agent import Backoff, connect_with_backoff, systemd_unit
from nefl_edge.edge_client.trainer import PACE_MIN_STEPS, Progress, ProgressLog, pace_verdict, projected_seconds
from tests.fakes import StandIn
from tests.helpers import Broker, device_env, make_shards, stop, wait_for

TWO_STEPS = TrainConfig(lr=0.05, batch_size=32, max_steps=2, seed=1)


def spawn_agent(broker: str, data: Path, node: str, folder: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A real `nefl-edge agent` process in which torch and onnx cannot be imported."""
    args = [sys.executable, "-m", "nefl_edge.edge_client", "agent", "--broker", broker, "--data", str(data)]
    args += ["--node-id", node, "--cache", str(folder / f"cache-{node}"), "--threads", "1", *extra]
    log = (folder / f"{node}.log").open("ab")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=device_env(folder), start_new_session=True)


def serve_one_run(broker: Broker, artifacts: Path, run: str, node: str, state_tensors: dict[str, np.ndarray]) -> Update:
    """A stand-in coordinator runs one short run with the device: hello, one task, update, end."""
    stand_in = StandIn(broker, artifacts, run=run)
    try:
        hello, _ = stand_in.expect(Hello)
        assert hello.node == node and hello.run == run
        stand_in.task(node, 1, 1, state_tensors, TWO_STEPS)
        update, _ = stand_in.expect(Update)
    finally:
        stand_in.end()
    return update


# --- the agent with a real broker ---------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("pinned", [False, True], ids=["any-run", "pinned"])
def test_agent_serves_two_runs_in_a_row_without_restarting(
    pinned: bool,
    broker: Broker,
    small_artifacts: Path,
    small_config: ModelConfig,
    small_specs: list[SubmodelSpec],
    tmp_path: Path,
) -> None:
    # Prepare: one agent; without --run it follows announcements, with --run it serves that name again.
    shard = make_shards(tmp_path, [200])[0]
    tensors = extract(init_global_state(small_config, small_specs, initial_consistent(small_config, seed=2)), 1)
    runs = ["lab", "lab"] if pinned else ["alpha", "beta"]
    proc = spawn_agent(broker.address, shard, "pi-a", tmp_path, *(["--run", "lab"] if pinned else []))
    log_path = tmp_path / "pi-a.log"
    try:
        # Execute: two runs, one after the other, each ended by its coordinator.
        updates = []
        for run in runs:
            updates.append(serve_one_run(broker, small_artifacts, run, "pi-a", tensors))
            wait_for(lambda r=run: f"run {r} ended" in log_path.read_text(), 30, f"the end of run {run}")

        # Assert: both runs got an update from the same, still running process; it waits for a third.
        assert [(u.run, u.round, u.metrics.steps) for u in updates] == [(r, 1, 2) for r in runs]
        wait_for(lambda: "served 2 run(s)" in log_path.read_text(), 30, "the agent to wait for the next run")
        assert proc.poll() is None
        latest = json.loads((tmp_path / "cache-pi-a" / "latest" / "submodel-1.json").read_text())
        assert latest["run"] == runs[1] and latest["round"] == 1 and latest["submodel"] == 1
    finally:
        code = stop(proc)
    assert code == 130, f"the agent stopped by SIGTERM exited {code}, not 130"
    assert log_path.read_text().count("joined run") == 2


@pytest.mark.integration
def test_agent_waits_for_a_broker_that_comes_up_after_it(
    small_artifacts: Path, small_config: ModelConfig, small_specs: list[SubmodelSpec], tmp_path: Path
) -> None:
    # Prepare: a broker that is not running yet, and an agent started against its port.
    shard = make_shards(tmp_path, [100])[0]
    broker = Broker(tmp_path / "broker")
    proc = spawn_agent(broker.address, shard, "pi-late", tmp_path, "--run", "late", "--backoff-max", "2")
    log_path = tmp_path / "pi-late.log"
    try:
        wait_for(lambda: "retrying in" in log_path.read_text(), 60, "the agent to back off")

        # Execute: the broker comes up; a coordinator stand-in opens the run.
        broker.start()
        tensors = extract(init_global_state(small_config, small_specs, initial_consistent(small_config, seed=4)), 1)
        update = serve_one_run(broker, small_artifacts, "late", "pi-late", tensors)

        # Assert: the agent joined and trained without having been restarted.
        assert update.run == "late" and update.metrics.steps == 2
        assert proc.poll() is None
    finally:
        stop(proc)
        broker.stop()
    log = log_path.read_text()
    assert "reached broker" in log and "attempt 1 failed" in log


def test_predict_runs_the_kept_weights_like_pytorch_in_eval_mode(
    small_artifacts: Path, small_config: ModelConfig, small_specs: list[SubmodelSpec], tmp_path: Path
) -> None:
    import shutil

    import torch

    from nefl_edge.coordinator.models import SubmodelNet
    from nefl_edge.core.artifacts import load_manifest
    from nefl_edge.core.schemas import Metrics
    from nefl_edge.edge_client.latest import LatestStore

    # Prepare: weights kept after a task (BatchNorm statistics away from their initial values), the eval graph
    # in the artifact cache, as the device leaves them.
    manifest = load_manifest(small_artifacts)
    sub = manifest.submodels[2]
    tensors = extract(init_global_state(small_config, small_specs, initial_consistent(small_config, seed=9)), 2)
    rng = np.random.default_rng(0)
    for name in tensors:
        if name.endswith("running_mean"):
            tensors[name] = rng.normal(0, 0.3, tensors[name].shape).astype(np.float32)
    cache = tmp_path / "cache"
    (cache / "artifacts").mkdir(parents=True)
    shutil.copy(small_artifacts / sub.files["eval"].name, cache / "artifacts" / sub.files["eval"].sha256)
    LatestStore(cache / "latest").save("lab", 7, manifest, sub, tensors, Metrics(**dict.fromkeys(
        ("loss_first", "loss_last", "accuracy", "seconds"), 0.0), steps=1))  # fmt: skip
    shard = make_shards(tmp_path, [50], offset=100)[0]

    # Execute: the device command.
    out = tmp_path / "pred.npz"
    args = ["predict", "--data", str(shard), "--cache", str(cache), "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "nefl_edge.edge_client", *args],
        capture_output=True,
        text=True,
        env=device_env(tmp_path),
    )

    # Assert: the logits of the kept submodel, in eval mode, and the summary says which model it was.
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["submodel"], summary["run"], summary["round"], summary["samples"]) == (2, "lab", 7, 50)
    data = np.load(shard)
    net = SubmodelNet(small_config, small_specs[2])
    net.load_tensors(tensors)
    with torch.no_grad():
        want = net.eval()(torch.from_numpy(data["x"][:, None].astype(np.float32) / 255)).numpy()
    got = np.load(out)["logits"]
    assert np.abs(got - want).max() <= 1e-5
    assert summary["accuracy"] == pytest.approx(float((want.argmax(1) == data["y"]).mean()), abs=1e-4)


# --- pacing: the decline rule as a pure function ------------------------------------------------------------


def test_a_slow_first_step_does_not_cause_a_decline() -> None:
    # Prepare: the portable backend's real case: the first step 0.4 s, then 0.15 s per step, 374 steps,
    # 117 s budget (the task alone finished in 56 s).
    first, pace, total, budget = 0.4, 0.15, 374, 117.0

    # Execute: the verdict after every step.
    verdicts = [pace_verdict(k, total, first + (k - 1) * pace, first, budget) for k in range(1, total + 1)]

    # Assert: never a decline; the projection after 1 step (what the old rule used) would have said 150 s.
    assert verdicts == [None] * total
    assert projected_seconds(1, total, first, first) is None
    assert projected_seconds(PACE_MIN_STEPS + 1, total, first + PACE_MIN_STEPS * pace, first) == pytest.approx(
        first + (total - 1) * pace
    )


def test_a_truly_too_slow_pace_declines_once_measured() -> None:
    # Prepare: 0.5 s per step after a 0.5 s first step, 374 steps: 187 s against a 117 s budget.
    first, pace, total, budget = 0.5, 0.5, 374, 117.0

    # Execute
    verdicts = [pace_verdict(k, total, first + (k - 1) * pace, first, budget) for k in range(1, 20)]

    # Assert: no verdict before the pace is measured (2 s of steps after the first here: 4 steps), then a
    # decline that names the projection.
    first_decline = next(k for k, v in enumerate(verdicts, start=1) if v is not None)
    assert first_decline == 5
    assert "projected 187 s exceed the deadline of 117 s" in str(verdicts[first_decline - 1])


def test_pace_within_the_safety_margin_trains_on_and_a_pace_that_worsens_later_declines() -> None:
    total, budget, first = 100, 100.0, 1.0
    # 5 % over the budget at the measured pace: within the 10 % margin, keep training.
    assert pace_verdict(10, total, first + 9 * 1.04, first, budget) is None
    # The pace worsens later (e.g. another process takes the CPU): re-checked every step, it declines.
    assert pace_verdict(50, total, first + 49 * 1.3, first, budget) is not None
    # Time alone already past the budget and its margin: decline even without a pace.
    assert "missed" in str(pace_verdict(1, total, 120.0, 120.0, budget))
    # The last step never declines.
    assert pace_verdict(total, total, 500.0, first, budget) is None


def test_progress_lines_come_once_measured_then_every_few_seconds_and_at_the_end() -> None:
    lines: list[str] = []
    log = ProgressLog(lines.append, every_s=5.0)
    for k in range(1, 41):
        elapsed = 0.5 * k
        log(Progress(k, 40, 1.0, elapsed, projected_seconds(k, 40, elapsed, 0.5)))
    assert [line.split(",")[0] for line in lines] == [
        "step 5/40",
        "step 15/40",
        "step 25/40",
        "step 35/40",
        "step 40/40",
    ]
    assert "projected 20 s" in lines[0]


# --- backoff ------------------------------------------------------------------------------------------------


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(1.0, 60.0)
    assert [backoff.next() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_connect_with_backoff_retries_until_the_attempt_succeeds_or_gives_up() -> None:
    calls: list[float] = []

    def flaky(timeout: float) -> None:
        calls.append(timeout)
        if len(calls) < 3:
            raise BrokerError("broker down")

    assert connect_with_backoff(flaky, "broker", threading.Event(), Backoff(0.01, 0.02)) is True
    assert len(calls) == 3

    def down(timeout: float) -> None:
        raise BrokerError("broker down")

    with pytest.raises(BrokerError):
        connect_with_backoff(down, "broker", threading.Event(), Backoff(0.01, 0.02), give_up_s=0.1)
    stopped = threading.Event()
    stopped.set()
    assert connect_with_backoff(down, "broker", stopped) is False


# --- the systemd unit and the device wheel ------------------------------------------------------------------


def test_install_service_writes_a_unit_without_secrets(tmp_path: Path) -> None:
    # Execute: the CLI as a user would call it, into a file instead of /etc.
    unit_path = tmp_path / "nefl-edge.service"
    pw = tmp_path / "broker-password"
    shard = tmp_path / "shard.npz"
    shard.write_bytes(b"")  # install-service refuses a --data that does not exist
    result = subprocess.run(
        [
            *(sys.executable, "-m", "nefl_edge.edge_client", "install-service", "--broker", "coord.lan:8883"),
            *("--data", str(shard), "--password-file", str(pw), "--output", str(unit_path)),
            *("--extra", "--tls-ca /etc/nefl-edge/ca.crt --username pi-7"),
        ],
        capture_output=True,
        text=True,
        env=device_env(tmp_path),
    )

    # Assert
    assert result.returncode == 0, result.stderr
    unit = unit_path.read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert f" agent --broker coord.lan:8883 --data {shard} --cache /var/cache/nefl-edge" in exec_start
    assert "--password-file %d/broker-password --tls-ca /etc/nefl-edge/ca.crt --username pi-7" in exec_start
    for line in ("Restart=always", "User=nefl-edge", "StateDirectory=nefl-edge", "CacheDirectory=nefl-edge"):
        assert line in unit.splitlines()
    assert f"LoadCredential=broker-password:{pw}" in unit
    assert "useradd --system" in result.stdout


def test_systemd_unit_quotes_arguments_with_spaces() -> None:
    unit = systemd_unit("/opt/nefl/bin/nefl-edge", "b:1883", Path("/srv/my data"), run="lab")
    assert 'ExecStart=/opt/nefl/bin/nefl-edge agent --broker b:1883 --data "/srv/my data"' in unit
    assert "--run lab" in unit and "LoadCredential" not in unit


def test_join_agent_and_the_unit_take_the_device_settings_from_one_declaration() -> None:
    import dataclasses

    import typer.main

    from nefl_edge.edge_client.cli import SERVICE_SETTINGS, app
    from nefl_edge.edge_client.settings import AgentOnlyArgs, DeviceArgs, device_flag

    commands = {c.name: c for c in typer.main.get_command(app).commands.values()}  # type: ignore[attr-defined]

    def options(name: str) -> dict[str, list[str]]:
        return {p.name: sorted(p.opts) for p in commands[name].params}

    settings = [f.name for f in dataclasses.fields(DeviceArgs)]
    join, agent, service = options("join"), options("agent"), options("install-service")

    assert list(join) == settings, f"join's options {list(join)} are not the declared settings {settings}"
    assert set(agent) == set(settings) | {f.name for f in dataclasses.fields(AgentOnlyArgs)}, f"agent: {list(agent)}"
    for name in settings:
        assert join[name] == agent[name] and device_flag(name) in join[name], f"{name}: {join[name]} / {agent[name]}"
    passed_on = [p.name for p in SERVICE_SETTINGS]
    assert all(service[n] == agent[n] for n in passed_on), f"install-service renames a setting: {service}"
    unit = systemd_unit("/x/nefl-edge", "b:1", Path("/d"), run="r", extra_args=[], password_file=Path("/pw"))
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    flags = {a for a in exec_start.split() if a.startswith("--")}
    accepted = {o for opts in agent.values() for o in opts}
    assert flags and flags <= accepted, f"the unit passes flags the agent does not take: {sorted(flags - accepted)}"


def test_device_wheel_requires_only_device_packages(tmp_path: Path) -> None:
    from email.parser import Parser
    from zipfile import ZipFile

    from packaging.requirements import Requirement

    from tests.helpers import build_wheel

    # Prepare: the wheel `just wheel` builds.
    wheel = build_wheel(tmp_path)
    with ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        names = zf.namelist()
    requires = [Requirement(r) for r in Parser().parsestr(meta).get_all("Requires-Dist")]

    # Execute: the requirements a plain `pip install` takes on a Raspberry Pi (aarch64, Python 3.11).
    pi = {"sys_platform": "linux", "platform_machine": "aarch64", "python_version": "3.11", "extra": ""}
    on_pi = {r.name for r in requires if r.marker is None or r.marker.evaluate(pi)}

    # Assert
    assert on_pi == {"numpy", "paho-mqtt", "typer", "pydantic", "safetensors", "cryptography", "onnxruntime"}
    assert "nefl_edge/edge_client/agent.py" in names and "nefl_edge/edge_client/latest.py" in names
