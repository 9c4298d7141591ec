"""Test harness: a real Mosquitto on a free loopback port (plain, password and TLS listeners), shards of
real Fashion-MNIST, and real `nefl-edge` / `nefl-coord` processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from nefl_edge.coordinator.broker import LocalBroker, free_ports, port_open
from nefl_edge.core.data import load_dataset


class Broker(LocalBroker):
    """A real Mosquitto for one test; ``start(with_auth=True)`` adds a password and a TLS listener."""

    def __init__(self, folder: Path) -> None:
        super().__init__("mosquitto", folder)
        self.password_port: Optional[int] = None
        self.tls_port: Optional[int] = None

    def start(self, with_auth: bool = False) -> Broker:  # type: ignore[override]
        if with_auth:
            self.password_port, self.tls_port = free_ports(2)
            passwd = self.folder / "passwd"
            passwd.write_text("")
            subprocess.run(["mosquitto_passwd", "-b", str(passwd), "device", "s3cret-pw"], check=True)
            make_certs(self.folder)
            self.extra_config = (
                f"listener {self.password_port} 127.0.0.1",
                "allow_anonymous false",
                f"password_file {passwd}",
                f"listener {self.tls_port} 127.0.0.1",
                "allow_anonymous true",
                f"cafile {self.folder / 'ca.crt'}",
                f"certfile {self.folder / 'server.crt'}",
                f"keyfile {self.folder / 'server.key'}",
            )
        super().start()
        return self


class EnrolledBroker:
    """A deployment's broker as ``nefl-coord broker-config`` and ``add-device`` make it: the generated folder
    (TLS, password file, ACL; ``settings``), the enrolment folder ``enrol`` with ``devices`` enrolled, each with
    its own installed identity (``states[name]``, what ``nefl-edge join --state-dir`` reads) and broker password
    (``passwords[name]``, the coordinator's under ``settings.coordinator_user``); :meth:`start` runs Mosquitto
    on it (TLS on ``tls_port``, plain MQTT on loopback ``plain_port``, both with passwords and the ACL)."""

    def __init__(self, folder: Path, devices: Sequence[str], persistence: bool = False) -> None:
        from nefl_edge.coordinator.broker_config import BrokerOptions, write_broker_config
        from nefl_edge.coordinator.enrolment import add_device
        from nefl_edge.core.identity import install_bundle, open_identity

        self.folder = folder
        self.tls_port, self.plain_port = free_ports(2)
        opts = BrokerOptions(
            folder / "broker",
            ("127.0.0.1",),
            self.tls_port,
            self.plain_port,
            bind="127.0.0.1",
            persistence=persistence,
            user="root" if os.geteuid() == 0 else None,  # as root Mosquitto would drop to a user who can't read
        )
        self.settings = write_broker_config(opts)
        self.enrol = folder / "enrol"
        self.passwords = {self.settings.coordinator_user: self.settings.coordinator_password_file.read_text().strip()}
        self.states: dict[str, Path] = {}
        for name in devices:
            state = folder / "state" / name
            with open_identity(state) as ident:
                public = ident.public_key
            bundle = add_device(self.enrol, name, public, self.settings.folder).bundle
            self.passwords[name] = str(json.loads(bundle.read_text())["password"])
            install_bundle(state, bundle).close()
            bundle.unlink()
            self.states[name] = state
        self.log = folder / "mosquitto.log"
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def address(self) -> str:
        """The TLS listener, as devices and the coordinator are given it."""
        return f"127.0.0.1:{self.tls_port}"

    def add_account(self, user: str, password: str, acl: Sequence[str]) -> None:
        """Another broker account with its own ACL lines (e.g. an attacker's), before :meth:`start`."""
        from nefl_edge.coordinator.broker_config import set_password

        set_password(self.settings.password_file, user, password)
        with (self.settings.folder / "acl").open("a") as out:
            out.write("\n".join(["", f"user {user}", *acl]) + "\n")

    def start(self) -> EnrolledBroker:
        with self.log.open("ab") as log:
            conf = str(self.settings.folder / "mosquitto.conf")
            self.proc = subprocess.Popen(["mosquitto", "-c", conf], stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: port_open(self.tls_port) and port_open(self.plain_port), 10, "mosquitto to listen", 0.05)
        return self

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its password file and ACL."""
        assert self.proc is not None, "the broker was not started"
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def make_certs(folder: Path) -> None:
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=nefl-test-ca",
        "-keyout",
        str(folder / "ca.key"),
        "-out",
        str(folder / "ca.crt"),
    )
    ssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        str(folder / "server.key"),
        "-out",
        str(folder / "server.csr"),
    )
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ssl(
        "x509",
        "-req",
        "-in",
        str(folder / "server.csr"),
        "-CA",
        str(folder / "ca.crt"),
        "-CAkey",
        str(folder / "ca.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        str(folder / "server.crt"),
        "-extfile",
        str(ext),
    )


def make_shards(folder: Path, sizes: list[int], offset: int = 0) -> list[Path]:
    """Disjoint slices of the real Fashion-MNIST training set, saved as .npz shards."""
    data = load_dataset(None, "train")
    out, lo = [], offset
    for i, n in enumerate(sizes):
        path = folder / f"shard{i}.npz"
        np.savez(path, x=np.round(data.x[lo : lo + n, 0] * 255).astype(np.uint8), y=data.y[lo : lo + n])
        out.append(path)
        lo += n
    return out


BLOCKER = """
import importlib.abc, os, sys
_extra = tuple(p for p in os.environ.get("NEFL_TEST_BLOCK", "").split(",") if p)
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx") or any(name == p or name.startswith(p + ".") for p in _extra):
            raise ImportError(f"{name} is blocked on the device path (test guard)")
        return None
sys.meta_path.insert(0, _Block())
"""


def device_env(folder: Path) -> dict[str, str]:
    """Environment in which importing torch or onnx fails (a sitecustomize import blocker)."""
    site = folder / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)  # importable also from a venv without nefl-edge installed
    env["PYTHONPATH"] = os.pathsep.join([str(site), repo, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env["NEFL_THREADS"] = "1"
    env["NEFL_STATE_DIR"] = str(folder / "device-state")  # never the developer's own enrolled identity
    return env


def spawn_edge(
    broker: str,
    data: Path,
    node: str,
    folder: Path,
    *extra: str,
    tier: Optional[int] = None,
    run: str = "default",
    python: str = sys.executable,
    block: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    """A real `nefl-edge join` process in which torch, onnx and the modules in ``block`` cannot be imported."""
    args = [python, "-m", "nefl_edge.edge_client", "join", "--broker", broker, "--data", str(data), "--node-id", node]
    args += ["--run", run, "--cache", str(folder / f"cache-{node}"), "--threads", "1", *extra]
    if tier is not None:
        args += ["--tier", str(tier)]
    log = (folder / f"{node}.log").open("ab")
    env = {**device_env(folder), "NEFL_TEST_BLOCK": ",".join(block)}
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def spawn_coordinator(broker: str, folder: Path, *extra: str) -> subprocess.Popen[bytes]:
    args = [
        sys.executable,
        "-m",
        "nefl_edge.coordinator",
        "serve",
        "--broker",
        broker,
        "--runs-dir",
        str(folder / "runs"),
        *extra,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="120")
    log = (folder / "coordinator.log").open("ab")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def serve_until_done(broker: str, folder: Path, shards: Sequence[Path], *options: str, timeout: float) -> None:
    """A real `serve` with ``options`` and one real device per shard (``dev{i}`` of tier ``i``): waits up to
    ``timeout`` s for the coordinator to exit 0 (its log's tail otherwise), then stops every process."""
    coord = spawn_coordinator(broker, folder, *options)
    edges = [spawn_edge(broker, shard, f"dev{i}", folder, tier=i) for i, shard in enumerate(shards)]
    try:
        assert coord.wait(timeout) == 0, (folder / "coordinator.log").read_text()[-3000:]
    finally:
        for p in [coord, *edges]:
            stop(p)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15) -> Optional[int]:
    """Signal the process group, wait, then SIGKILL; the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def build_wheel(out: Path) -> Path:
    """The project's own wheel (the device install a user gets from `pip install nefl-edge`)."""
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(repo)], check=True)
    return next(out.glob("*.whl"))


def write_step_inputs(work: Path, config, specs, data_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """Inputs of tests/arm64/one_step.py: one batch and every submodel's weights (the artifacts are the caller's)."""
    from nefl_edge.coordinator.models import initial_consistent
    from nefl_edge.core.nested import extract, init_global_state

    state = init_global_state(config, specs, initial_consistent(config, seed=5))
    data = load_dataset(data_dir, "train")
    np.savez(work / "batch.npz", x=data.x[:32], y=data.y[:32])
    for sub in range(len(specs)):
        np.savez(work / f"weights-{sub}.npz", **extract(state, sub))


def step_differences(a, b) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Largest absolute difference per tensor (and loss) between two results of one_step.py."""
    return {
        key: float(np.abs(np.asarray(a[key]) - np.asarray(b[key])).max())
        for key in b
        if not key.endswith("/seconds") and key != "onnxruntime"
    }
