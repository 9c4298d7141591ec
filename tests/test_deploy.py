"""The README's "Deploying to real devices", command by command, over loopback.

What differs from the README, and why: one host plays the coordinator and three devices; `nefl-coord broker`
runs in the foreground instead of under systemd (its unit is checked in tests/test_operator.py); the TLS
listener binds 127.0.0.1 on a free port (`--bind`, `--tls-port`) instead of 8883 on every interface; the
devices run the installed CLI (`python -m nefl_edge.edge_client`, with torch and onnx made unimportable)
instead of the wheel in a venv of their own (tests/test_pythons.py installs the wheel), as the test's user
instead of `nefl-edge`, with their own --state-dir and --cache under the test's folder; the run is short
(2 rounds, small shards, 500 test samples) and waits for all three devices (`--min-clients 3`), so that the
third one, enrolled while the broker and `serve` already run, has to be heard for the run to start. Run as
root, the broker folder lives under a folder that the `mosquitto` user may traverse, as /etc/nefl would be.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nefl_edge.coordinator.broker import free_port, port_open
from nefl_edge.core.data import load_dataset
from tests.helpers import device_env, make_shards, stop, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN = "lab"


def coord(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nefl_edge.coordinator", *args], capture_output=True, text=True, timeout=timeout
    )


def edge(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "nefl_edge.edge_client", *args]
    return subprocess.run(command, capture_output=True, text=True, env=device_env(folder), timeout=120)


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.fixture
def site() -> Iterator[Path]:
    """A folder the broker's user can reach (pytest's tmp folders are 0700 root's)."""
    folder = Path(tempfile.mkdtemp(prefix="nefl-deploy-", dir="/tmp"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def enrol(site: Path, name: str) -> Path:
    """README steps 2-4 for one device: `identity`, `add-device` (reloads the broker), `enrol`, delete the bundle."""
    state = site / "state" / name
    shown = edge(site, "identity", "--state-dir", str(state))
    assert shown.returncode == 0, shown.stderr
    public_key = re.search(r"^public_key\s+(\S+)$", shown.stdout, re.M)
    assert public_key, f"`nefl-edge identity` printed no public_key line: {shown.stdout!r}"
    bundle = site / f"{name}.json"
    added = coord(
        "add-device", name, "--public-key", public_key.group(1), "--enrolment-dir", str(site / "enrol"),
        "--broker-dir", str(site / "broker"), "--bundle", str(bundle),
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "re-read its password file" in added.stdout, f"add-device did not reload the broker: {added.stdout}"
    installed = edge(site, "enrol", str(bundle), "--state-dir", str(state))
    assert installed.returncode == 0, installed.stderr
    bundle.unlink()
    return state


def join(site: Path, name: str, state: Path, shard: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "nefl_edge.edge_client", "join", "--state-dir", str(state), "--data", str(shard)]
    args += ["--run", RUN, "--cache", str(site / f"cache-{name}"), "--threads", "1"]
    return spawn(args, site / f"{name}.log", device_env(site))


def test_the_readme_deploy_section_over_loopback(site: Path) -> None:
    started = time.monotonic()
    port = free_port()
    broker_dir = site / "broker"
    # 1. the broker's folder, used in place, and the broker that runs on it
    made = coord(
        "broker-config", "--out", str(broker_dir), "--hostname", "127.0.0.1", "--tls-port", str(port),
        "--bind", "127.0.0.1",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert not (broker_dir / "ca.key").exists(), "the CA's private key is in the broker's folder"
    assert (site / "broker-ca" / "ca.key").is_file(), "the CA's private key is not in <out>-ca"
    broker = spawn([sys.executable, "-m", "nefl_edge.coordinator", "broker", "--broker-dir", str(broker_dir)],
                   site / "broker.log")  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    try:
        wait_for(lambda: port_open(port) or broker.poll() is not None, 20, "the broker to listen", 0.05)
        assert broker.poll() is None, (
            f"nefl-coord broker exited {broker.returncode}: {(site / 'broker.log').read_text()}"
        )
        pid = int((broker_dir / "broker.pid").read_text())
        assert pid == broker.pid, f"broker.pid holds {pid}, the broker runs as {broker.pid}"

        # 2-4. two devices enrolled while the broker runs
        shards = make_shards(site, [500, 500, 500])
        states = {name: enrol(site, name) for name in ("pi-a", "pi-b")}

        # 5. the signed run; 6. the devices join it
        serve = spawn(
            [
                sys.executable, "-m", "nefl_edge.coordinator", "serve", "--broker", f"127.0.0.1:{port}",
                "--tls-ca", str(broker_dir / "ca.crt"), "--username", "nefl-coord",
                "--password-file", str(broker_dir / "coordinator.password"), "--enrolment-dir", str(site / "enrol"),
                "--run", RUN, "--min-clients", "3", "--rounds", "2", "--runs-dir", str(site / "runs"),
                "--eval-samples", "500", "--wait-clients-s", "300",
            ],
            site / "coordinator.log",
        )  # fmt: skip
        procs.append(serve)
        procs += [join(site, name, states[name], shards[i]) for i, name in enumerate(states)]
        # a third device, enrolled now: no reload, no restart by hand
        states["pi-c"] = enrol(site, "pi-c")
        procs.append(join(site, "pi-c", states["pi-c"], shards[2]))

        assert serve.wait(600) == 0, f"serve failed: {(site / 'coordinator.log').read_text()[-3000:]}"
        log = (site / "coordinator.log").read_text()
        for name in states:
            assert re.search(rf"client {name} joined", log), f"the coordinator never heard {name}"
        assert "UNAUTHENTICATED" not in log, "the run was not signed"
        for p in procs[1:]:
            assert p.wait(60) == 0, f"a device exited {p.returncode}"

        # 7. the trained model, exported and on each device
        run_dir = next((site / "runs").glob(f"{RUN}-*"))
        exported = coord("export-model", "--run-dir", str(run_dir), "--out", str(site / "models"))
        assert exported.returncode == 0, exported.stderr
        test = load_dataset(None, "test")
        samples = site / "samples.npz"
        np.savez(samples, x=np.round(test.x[:300, 0] * 255).astype(np.uint8), y=test.y[:300])
        import onnxruntime as ort

        for name in states:
            out = site / f"predict-{name}.npz"
            predicted = edge(site, "predict", "--cache", str(site / f"cache-{name}"), "--data", str(samples),
                             "--out", str(out))  # fmt: skip
            assert predicted.returncode == 0, predicted.stderr
            summary = json.loads(predicted.stdout)
            assert summary["round"] == 2, f"{name} keeps round {summary['round']}, not the final model of round 2"
            model = site / "models" / f"{RUN}-submodel-{summary['submodel']}.onnx"
            session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
            x = load_dataset(samples, "test").x
            reference = session.run(["logits"], {"input": x})[0]
            device = np.load(out)["logits"]
            gap = float(np.abs(device - reference).max())
            assert gap <= 1e-5, f"{name}: predict differs from the exported submodel {summary['submodel']} by {gap}"
    finally:
        for p in procs:
            stop(p)
        stop(broker)
    print(f"deploy section over loopback: {time.monotonic() - started:.0f} s")
