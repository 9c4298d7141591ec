"""What an operator meets outside the happy path: the broker that `nefl-coord broker` runs (access check with
the commands that fix it, reload on enrolment, its unit, the CA key out of its folder), secure by default
(`serve` off loopback, the security record and `--resume`), and early, truthful failures (refused, wrong
password, missing files, signals, a finished run). Real Mosquitto, real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nefl_edge.coordinator.broker import free_port, free_ports, port_open
from nefl_edge.coordinator.broker_config import BrokerOptions, make_ca, write_broker_config
from nefl_edge.coordinator.run import Downgrade, RunSecurity, is_loopback
from nefl_edge.core.identity import public_key_text
from tests.helpers import stop, wait_for

pytestmark = pytest.mark.integration
AS_ROOT = os.geteuid() == 0


def coord(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nefl_edge.coordinator", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


@pytest.fixture
def site() -> Iterator[Path]:
    """A private folder (0700) directly under /tmp, which every user may traverse."""
    folder = Path(tempfile.mkdtemp(prefix="nefl-operator-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def broker_config(site: Path, port: int) -> Path:
    made = coord(
        "broker-config", "--out", str(site / "broker"), "--hostname", "127.0.0.1", "--tls-port", str(port),
        "--bind", "127.0.0.1",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return site / "broker"


def start_broker(site: Path, port: int) -> subprocess.Popen[bytes]:
    log = (site / "broker.log").open("ab")
    args = [sys.executable, "-m", "nefl_edge.coordinator", "broker", "--broker-dir", str(site / "broker")]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: port_open(port) or proc.poll() is not None, 20, "the broker to listen", 0.05)
    assert proc.poll() is None, f"nefl-coord broker exited {proc.returncode}: {(site / 'broker.log').read_text()}"
    return proc


def connack(port: int, user: str, password: str, ca: Path) -> str:
    """The broker's answer to one TLS connection with these credentials."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user)
    client.username_pw_set(user, password)
    client.tls_set(ca_certs=str(ca))
    answer: list[str] = []
    done = threading.Event()

    def on_connect(c: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        answer.append(str(reason))
        done.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert done.wait(10), "no CONNACK within 10 s"
    finally:
        client.disconnect()
        client.loop_stop()
    return answer[0]


# --- the broker ----------------------------------------------------------------------------------------------


def test_the_ca_key_stays_out_of_the_broker_folder_and_an_old_one_moves(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    out.mkdir()
    make_ca(out, out)  # a folder as older versions wrote it: ca.key next to ca.crt
    write_broker_config(BrokerOptions(out, ("127.0.0.1",)))

    assert not (out / "ca.key").exists(), "ca.key was left in the broker's folder"
    assert (tmp_path / "broker-ca" / "ca.key").is_file(), "ca.key did not move to <out>-ca"
    assert oct((tmp_path / "broker-ca").stat().st_mode & 0o777) == "0o700", "the CA folder is not private"


@pytest.mark.skipif(not AS_ROOT, reason="Mosquitto drops to its own user only when started as root")
def test_the_broker_says_how_to_fix_what_its_user_cannot_read_and_then_runs(site: Path) -> None:
    port = free_port()
    folder = broker_config(site, port)
    os.chmod(folder / "passwd", 0o600)  # as a `cp -r` by root leaves it
    os.chown(folder / "passwd", 0, 0)

    refused = coord("broker", "--broker-dir", str(folder))

    assert refused.returncode == 2, f"exit {refused.returncode}: {refused.stderr}"
    message = refused.stderr.strip()
    assert message.count("\n") == 0, f"more than one line: {message}"
    assert f"chmod o+x {site}" in message, f"the parent the broker's user cannot traverse is not named: {message}"
    assert f"chown :mosquitto {folder / 'passwd'}" in message, f"the unreadable password file is not named: {message}"
    fix = message.split("`")[1]
    subprocess.run(["sh", "-c", fix], check=True)
    broker = start_broker(site, port)
    stop(broker)


def test_enrolling_reloads_the_running_broker_and_wrong_passwords_are_reported_at_once(site: Path) -> None:
    if AS_ROOT:
        site.chmod(0o711)
    port = free_port()
    folder = broker_config(site, port)
    broker = start_broker(site, port)
    try:
        assert int((folder / "broker.pid").read_text()) == broker.pid, "broker.pid is not the broker's pid"
        key = public_key_text(Ed25519PrivateKey.generate().public_key())
        added = coord("add-device", "pi-z", "--public-key", key, "--enrolment-dir", str(site / "enrol"),
                      "--broker-dir", str(folder))  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert f"The broker (pid {broker.pid}) re-read its password file." in added.stdout, added.stdout
        password = json.loads((site / "enrol" / "bundles" / "pi-z.json").read_text())["password"]
        assert "Success" in connack(port, "pi-z", password, folder / "ca.crt"), "the new device was not let in"

        (site / "wrong").write_text("not-the-password\n")
        started = time.monotonic()
        wrong = coord(
            "serve", "--broker", f"127.0.0.1:{port}", "--tls-ca", str(folder / "ca.crt"), "--username", "nefl-coord",
            "--password-file", str(site / "wrong"), "--enrolment-dir", str(site / "enrol"), "--runs-dir",
            str(site / "runs"),
        )  # fmt: skip
        seconds = time.monotonic() - started
        assert wrong.returncode == 3, f"exit {wrong.returncode}: {wrong.stderr[-2000:]}"
        assert "refused the connection" in wrong.stderr and "password" in wrong.stderr, wrong.stderr[-2000:]
        assert not (site / "runs").exists(), "serve exported or evaluated before it knew the broker let it in"
        assert seconds < 30, f"the wrong password took {seconds:.0f} s to report"

        removed = coord("remove-device", "pi-z", "--enrolment-dir", str(site / "enrol"), "--broker-dir", str(folder))
        assert removed.returncode == 0, removed.stderr
        assert "Not authorized" in connack(port, "pi-z", password, folder / "ca.crt"), "a removed device got in"
    finally:
        stop(broker)


def test_the_broker_unit_runs_nefl_coord_broker_on_the_absolute_folder(tmp_path: Path) -> None:
    write_broker_config(BrokerOptions(tmp_path / "broker", ("127.0.0.1",)))

    shown = coord("broker", "--broker-dir", "broker", "--install-service", "--dry-run", cwd=tmp_path)

    assert shown.returncode == 0, shown.stderr
    lines = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
    exe, command, flag, folder = lines["ExecStart"].split()
    assert Path(exe).is_absolute() and Path(exe).name == "nefl-coord", f"ExecStart: {lines['ExecStart']}"
    assert (command, flag, folder) == ("broker", "--broker-dir", str((tmp_path / "broker").resolve()))
    assert lines["ExecReload"] == "/bin/kill -HUP $MAINPID", f"ExecReload: {lines.get('ExecReload')}"


# --- secure by default -------------------------------------------------------------------------------------


def test_serve_off_loopback_refuses_to_run_unsecured() -> None:
    started = time.monotonic()
    refused = coord("serve", "--broker", "192.0.2.7:1883")  # TEST-NET-1: nothing is contacted

    assert refused.returncode == 2, f"exit {refused.returncode}: {refused.stderr}"
    assert "not on loopback" in refused.stderr and "--insecure" in refused.stderr, refused.stderr
    assert time.monotonic() - started < 30


def test_loopback_is_told_apart_from_other_hosts() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("192.0.2.7") and not is_loopback("broker.invalid")


def test_resume_reuses_the_recorded_security_and_refuses_to_downgrade(tmp_path: Path) -> None:
    recorded = RunSecurity(
        "broker.lan:8883",
        tls_ca="/etc/nefl/broker/ca.crt",
        username="nefl-coord",
        password_file="/etc/nefl/broker/coordinator.password",
        enrolment_dir="/etc/nefl/enrol",
    )
    recorded.save(tmp_path)
    loaded = RunSecurity.load(tmp_path)

    assert loaded == recorded, f"the record did not read back: {loaded}"
    assert recorded.resumed({"broker": None, "tls_ca": None, "insecure": False}) == recorded
    moved = recorded.resumed({"broker": "10.0.0.2:8883", "insecure": False})
    assert moved.broker == "10.0.0.2:8883" and moved.enrolment_dir == "/etc/nefl/enrol" and moved.tls
    with pytest.raises(Downgrade):
        recorded.resumed({"insecure": True})
    assert oct((tmp_path / "security.json").stat().st_mode & 0o777) == "0o600"


def test_serve_resume_with_insecure_is_refused_in_one_sentence(tmp_path: Path) -> None:
    from nefl_edge.coordinator.config import RunConfig

    (tmp_path / "config.json").write_text(RunConfig(run="lab").model_dump_json())
    RunSecurity("broker.lan:8883", tls_ca="/x/ca.crt", enrolment_dir="/x/enrol").save(tmp_path)

    refused = coord("serve", "--resume", str(tmp_path), "--insecure")

    assert refused.returncode == 2, f"exit {refused.returncode}: {refused.stderr}"
    assert refused.stderr.strip() == (
        "error: this run was started signed, over TLS; --resume keeps that, so drop --insecure"
    ), refused.stderr


# --- failing early and truthfully --------------------------------------------------------------------------


def test_a_refused_connection_says_refused_and_a_missing_file_is_exit_2(tmp_path: Path) -> None:
    refused = coord("serve", "--broker", f"127.0.0.1:{free_port()}", "--runs-dir", str(tmp_path / "runs"))
    missing = coord("serve", "--broker", "127.0.0.1", "--username", "u", "--password-file", str(tmp_path / "none"))
    no_config = coord("serve", "--broker", "127.0.0.1", "--config", str(tmp_path / "run.toml"))

    assert refused.returncode == 3 and "refused" in refused.stderr, refused.stderr
    assert not (tmp_path / "runs").exists(), "serve prepared a run before it reached the broker"
    assert missing.returncode == 2 and "no such file" in missing.stderr, missing.stderr
    assert no_config.returncode == 2 and "no such file" in no_config.stderr, no_config.stderr


def test_sigint_while_waiting_for_devices_exits_130_and_says_how_to_resume(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "coordinator.log"
    args = [sys.executable, "-m", "nefl_edge.coordinator", "serve", "--broker", broker.address, "--run", "lonely",
            "--runs-dir", str(tmp_path / "runs"), "--min-clients", "1", "--eval-samples", "200"]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "waiting for devices: 0 of min_clients=1" in log.read_text(), 240, "the waiting line")
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(60)
    finally:
        stop(proc)
    text = log.read_text()
    assert code == 130, f"exit {code}: {text[-2000:]}"
    assert "nefl-coord serve --resume" in text, f"nothing says how to resume: {text[-2000:]}"


# --- a device that cannot take part -------------------------------------------------------------------------


def publish_manifest(broker_address: str, run: str, manifest: bytes, signed: bool, security: object = None) -> None:
    """A coordinator's retained manifest of ``run`` (signed with a fresh coordinator key, or not)."""
    from nefl_edge.core.mqtt import BrokerAddress, MqttLink, Security
    from nefl_edge.core.schemas import ManifestMessage
    from nefl_edge.core.signing import Signer
    from nefl_edge.core.wire import Topics

    signer = Signer(Ed25519PrivateKey.generate(), "coordinator") if signed else None
    sec = security if isinstance(security, Security) else Security()
    link = MqttLink("nefl-coord", BrokerAddress.parse(broker_address), run, sec, clean=True, signer=signer)
    link.connect()
    try:
        link.publish(Topics(run).manifest, ManifestMessage(run=run), manifest, retain=True)
        assert link.flush(10), "the broker did not take the manifest"
    finally:
        link.close()


def join_once(folder: Path, broker_address: str, run: str, data: Path, *extra: str) -> tuple[int, str, float]:
    """`nefl-edge join` until it exits (at most 60 s): exit code, output, seconds."""
    from tests.helpers import device_env

    args = [sys.executable, "-m", "nefl_edge.edge_client", "join", "--broker", broker_address, "--run", run,
            "--data", str(data), "--cache", str(folder / "cache"), *extra]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(args, capture_output=True, text=True, env=device_env(folder), timeout=60)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    from tests.helpers import make_shards

    return make_shards(tmp_path, [64])[0]


def test_an_unenrolled_device_stops_at_once_in_a_signed_run(
    broker, tmp_path: Path, shard: Path, small_artifacts: Path
) -> None:  # type: ignore[no-untyped-def]
    publish_manifest(broker.address, "signed", (small_artifacts / "manifest.json").read_bytes(), signed=True)

    code, out, seconds = join_once(tmp_path, broker.address, "signed", shard, "--node-id", "stranger")

    assert code == 2, f"exit {code}: {out[-2000:]}"
    assert "is signed by its coordinator and this device is not enrolled" in out, out[-2000:]
    assert seconds < 30, f"it took {seconds:.0f} s to stop"


def test_an_enrolled_device_stops_at_once_when_the_run_is_not_its_coordinators(
    tmp_path: Path, shard: Path, small_artifacts: Path
) -> None:
    from nefl_edge.coordinator.enrolment import add_device
    from nefl_edge.core.identity import install_bundle, open_identity
    from nefl_edge.core.mqtt import Security

    tls_port, plain_port = free_ports(2)
    options = BrokerOptions(tmp_path / "broker", ("127.0.0.1",), tls_port, plain_port, bind="127.0.0.1",
                            persistence=False, user="root" if AS_ROOT else None)  # fmt: skip
    settings = write_broker_config(options)
    state = tmp_path / "state"
    with open_identity(state) as ident:
        public = ident.public_key
    install_bundle(state, add_device(tmp_path / "enrol", "pi-q", public, settings.folder).bundle).close()
    with (tmp_path / "mosquitto.log").open("ab") as log:
        mosquitto = subprocess.Popen(["mosquitto", "-c", str(settings.folder / "mosquitto.conf")], stdout=log,
                                     stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(lambda: port_open(tls_port) and port_open(plain_port), 10, "mosquitto to listen", 0.05)
        coordinator = Security(username="nefl-coord", password_file=settings.coordinator_password_file)
        manifest = (small_artifacts / "manifest.json").read_bytes()
        publish_manifest(f"127.0.0.1:{plain_port}", "other", manifest, signed=False, security=coordinator)
        args = [sys.executable, "-m", "nefl_edge.edge_client", "join", "--state-dir", str(state), "--run", "other",
                "--data", str(shard), "--cache", str(tmp_path / "cache")]  # fmt: skip
        from tests.helpers import device_env

        started = time.monotonic()
        done = subprocess.run(args, capture_output=True, text=True, env=device_env(tmp_path), timeout=60)
        seconds, out = time.monotonic() - started, done.stdout + done.stderr
    finally:
        mosquitto.terminate()
        mosquitto.wait(10)

    assert done.returncode == 2, f"exit {done.returncode}: {out[-2000:]}"
    assert "is not signed by the coordinator this device is enrolled with" in out, out[-2000:]
    assert seconds < 30, f"it took {seconds:.0f} s to stop"


def test_a_device_stops_at_once_in_a_run_of_another_model(broker, tmp_path: Path, small_artifacts: Path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    colour = tmp_path / "colour.npz"  # 3 x 32 x 32 images: not the Fashion-MNIST model of the manifest
    np.savez(colour, x=np.zeros((16, 3, 32, 32), np.uint8), y=np.zeros(16, np.int64))
    publish_manifest(broker.address, "fmnist", (small_artifacts / "manifest.json").read_bytes(), signed=False)

    code, out, seconds = join_once(tmp_path, broker.address, "fmnist", colour, "--node-id", "colour-cam")

    assert code == 2, f"exit {code}: {out[-2000:]}"
    assert "trains a model this device's data does not fit" in out, out[-2000:]
    assert seconds < 30, f"it took {seconds:.0f} s to stop"


@pytest.mark.slow  # about 35 s: serve exports and evaluates before it announces the run
def test_a_device_started_before_a_signed_run_it_is_not_enrolled_in_stops_when_the_run_is_announced(
    broker, tmp_path: Path, shard: Path
) -> None:  # type: ignore[no-untyped-def]
    from nefl_edge.coordinator.enrolment import add_device
    from nefl_edge.coordinator.session import HEARTBEAT_S
    from nefl_edge.core.mqtt import BrokerAddress, MqttLink
    from nefl_edge.core.schemas import ManifestMessage
    from nefl_edge.core.wire import Topics
    from tests.helpers import spawn_coordinator, spawn_edge

    # Prepare: an enrolment folder without this device; the device waits for a run nobody serves yet; a
    # listener notes when the run's manifest is retained.
    settings = write_broker_config(BrokerOptions(tmp_path / "broker-files", ("127.0.0.1",)))
    add_device(tmp_path / "enrol", "pi-other", Ed25519PrivateKey.generate().public_key(), settings.folder)
    bound = 3 * HEARTBEAT_S  # a device that waits for ever is the failure; it reacts within 1-2 s here
    log = tmp_path / "early.log"
    edge = spawn_edge(broker.address, shard, "early", tmp_path, run="late")
    watcher = MqttLink("watcher", BrokerAddress.parse(broker.address), "late", clean=True)
    watcher.subscribe(Topics("late").manifest)
    watcher.connect()
    coordinator = None
    try:
        wait_for(lambda: "waiting for the run's manifest" in log.read_text(), 60, "the device to wait for its run")
        assert edge.poll() is None, f"the device exited {edge.returncode} before the run existed: {log.read_text()}"

        # Execute: a signed coordinator (an enrolment folder in which this device is not) announces the run.
        coordinator = spawn_coordinator(
            broker.address, tmp_path, "--run", "late", "--enrolment-dir", str(tmp_path / "enrol"),
            "--min-clients", "1", "--wait-clients-s", "300", "--eval-samples", "200",
        )  # fmt: skip
        item = wait_for(lambda: coordinator.poll() is not None or watcher.next(1.0), 240, "the run's manifest", 0)
        assert coordinator.poll() is None, f"serve exited: {(tmp_path / 'coordinator.log').read_text()[-2000:]}"
        announced = time.monotonic()
        assert isinstance(item[1], ManifestMessage), f"the listener got a {item[1].kind}"
        try:
            code: int | None = edge.wait(bound)
        except subprocess.TimeoutExpired:
            code = None  # still waiting: the failure this test is for
        seconds = time.monotonic() - announced
    finally:
        watcher.close()
        stop(edge)
        if coordinator is not None:
            stop(coordinator)

    # Assert: exit 2 soon after the announcement, with the reason.
    out = log.read_text()
    assert code == 2, f"exit {code} ({seconds:.0f} s after the announcement): {out[-2000:]}"
    assert "is signed by its coordinator and this device is not enrolled" in out, out[-2000:]
    assert seconds < bound, f"the device stopped {seconds:.1f} s after the run was announced (bound {bound:.0f} s)"
    print(f"the device stopped {seconds:.2f} s after the signed run's manifest was retained")


def test_an_agent_without_run_skips_a_run_it_cannot_take_part_in_and_waits_for_the_next(
    broker, tmp_path: Path, shard: Path, small_artifacts: Path
) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import device_env

    # Prepare: a discovering agent that is not enrolled
    log = tmp_path / "roamer.log"
    args = [sys.executable, "-m", "nefl_edge.edge_client", "agent", "--broker", broker.address, "--data", str(shard),
            "--node-id", "roamer", "--cache", str(tmp_path / "cache"), "--log-format", "json"]  # fmt: skip
    with log.open("ab") as out:
        agent = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=device_env(tmp_path),
                                 start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: "waiting for a run to be announced" in log.read_text(), 60, "the agent to wait for runs")

        # Execute: a signed run is announced
        publish_manifest(broker.address, "signed", (small_artifacts / "manifest.json").read_bytes(), signed=True)

        def events(name: str) -> list[dict[str, object]]:
            lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
            return [e for e in lines if e["event"] == name or str(e["message"]).startswith(name)]

        skipped = wait_for(lambda: events("cannot_take_part"), 30, "the skip event")
        wait_for(lambda: len(events("waiting for a run to be announced")) == 2, 30, "the agent to wait again")
        alive = agent.poll() is None
    finally:
        stop(agent)

    # Assert: the event names the run and why; the agent lived on
    assert alive, f"the agent exited {agent.returncode}: {log.read_text()[-2000:]}"
    assert skipped[0]["run"] == "signed", f"skip event: {skipped[0]}"
    assert "is signed by its coordinator and this device is not enrolled" in skipped[0]["reason"], skipped[0]


# --- the device's unit ---------------------------------------------------------------------------------------


def test_install_service_makes_the_credential_path_absolute_and_refuses_missing_data(tmp_path: Path) -> None:
    from tests.helpers import device_env

    (tmp_path / "shard.npz").write_bytes(b"")
    (tmp_path / "pw").write_text("secret\n")
    base = [sys.executable, "-m", "nefl_edge.edge_client", "install-service", "--broker", "coord.lan:1883", "--dry-run"]

    shown = subprocess.run([*base, "--data", "shard.npz", "--password-file", "pw"], capture_output=True, text=True,
                           env=device_env(tmp_path), cwd=tmp_path)  # fmt: skip
    missing = subprocess.run([*base, "--data", "nowhere.npz"], capture_output=True, text=True,
                             env=device_env(tmp_path), cwd=tmp_path)  # fmt: skip

    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert f"LoadCredential=broker-password:{(tmp_path / 'pw').resolve()}" in lines, shown.stdout
    assert "StateDirectoryMode=0700" in lines and "SuccessExitStatus=130" in lines, shown.stdout
    assert missing.returncode == 2 and "nowhere.npz: no such file" in missing.stderr, missing.stderr


def test_resuming_a_finished_run_says_so_and_announces_nothing(tmp_path: Path) -> None:
    import numpy as np

    from nefl_edge.coordinator import checkpoint
    from nefl_edge.coordinator.config import RunConfig

    (tmp_path / "config.json").write_text(RunConfig(run="lab", rounds=2).model_dump_json())
    checkpoint.save(tmp_path, checkpoint.Checkpoint(2, {"w": np.zeros(1, np.float32)}, {}, {}))

    # a closed port: any attempt to announce the run again would fail with exit 3
    done = coord("serve", "--resume", str(tmp_path), "--broker", f"127.0.0.1:{free_port()}")

    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert "finished all 2 rounds already; nothing to resume" in done.stdout, done.stdout


def test_a_device_stopped_by_sigterm_exits_130(broker, tmp_path: Path, shard: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import spawn_edge

    edge = spawn_edge(broker.address, shard, "pi-t", tmp_path, run="nobody-serves-this")
    try:
        wait_for(lambda: "waiting for the run's manifest" in (tmp_path / "pi-t.log").read_text(), 60, "the device")
        os.killpg(edge.pid, signal.SIGTERM)
        code = edge.wait(30)
    finally:
        stop(edge)
    assert code == 130, f"exit {code}: {(tmp_path / 'pi-t.log').read_text()[-2000:]}"
    assert "stopped by SIGTERM" in (tmp_path / "pi-t.log").read_text()


def test_nefl_coord_without_the_coordinator_extra_says_what_to_install(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class _Absent(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'onnx'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Absent())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    export = [sys.executable, "-m", "nefl_edge.coordinator", "export", "--out", str(tmp_path / "artifacts")]
    done = subprocess.run(export, capture_output=True, text=True, env=env)

    assert done.returncode == 2, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stderr.strip().count("\n") == 0, f"not one line: {done.stderr}"
    assert "pip install 'nefl-edge[coord]'" in done.stderr, done.stderr


@pytest.mark.parametrize("package", ["nefl_edge.edge_client", "nefl_edge.coordinator"])
def test_version_names_onnx_runtime_backend_and_commit(package: str) -> None:
    import onnxruntime

    done = subprocess.run([sys.executable, "-m", package, "-V"], capture_output=True, text=True)

    assert done.returncode == 0, done.stderr
    assert f"ONNX Runtime {onnxruntime.__version__}" in done.stdout, done.stdout
    assert "training backend " in done.stdout and "(commit " in done.stdout, done.stdout


def test_config_errors_name_the_file_and_the_nearest_key(tmp_path: Path) -> None:
    from nefl_edge.coordinator.config import ConfigError, load_config

    toml = tmp_path / "run.toml"
    toml.write_text("roudns = 3\n[train]\nlrr = 0.1\n")

    with pytest.raises(ConfigError) as caught:
        load_config(toml, {})

    text = str(caught.value)
    assert str(toml) in text, f"the file is not named: {text}"
    assert "roudns: unknown key (did you mean 'rounds'?)" in text, text
    assert "train.lrr: unknown key (did you mean 'lr'?)" in text, text
