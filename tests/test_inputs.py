"""Issue 22, faults and stale state: every bad command-line input of both CLIs ends with exit 2 and one
``error:`` sentence (no traceback); a missing or damaged coordinator data set is an error, not a silent switch
to federated evaluation; a full disk ends ``serve`` at the round that hit it with its own exit code; the
generated Mosquitto configuration bounds what one account can hold and a real Mosquitto starts on it."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from nefl_edge.coordinator.broker import free_ports, port_open
from nefl_edge.coordinator.broker_config import (
    DEVICE_TOPICS,
    BrokerOptions,
    config_text,
    set_password,
    write_broker_config,
)
from nefl_edge.coordinator.checkpoint import DiskFull
from nefl_edge.coordinator.config import ConfigError
from nefl_edge.coordinator.evaluation import coordinator_data
from nefl_edge.core.errors import ExitCode
from tests.helpers import make_shards, spawn_coordinator, spawn_edge, stop, wait_for

COORD = [sys.executable, "-m", "nefl_edge.coordinator"]
EDGE = [sys.executable, "-m", "nefl_edge.edge_client"]
NO_BROKER = "127.0.0.1:1"  # nothing listens: an input check that comes after connecting would show as exit 3


def run_cli(args: list[str], timeout: float = 120) -> tuple[int, list[str]]:
    """Exit code and the non-empty lines of stdout and stderr together."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})
    return done.returncode, [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def assert_one_sentence(code: int, lines: list[str], *expected: str) -> None:
    shown = "\n".join(lines)
    assert code == ExitCode.BAD_INPUT, f"exit {code}, not 2:\n{shown}"
    assert "Traceback" not in shown, f"a traceback:\n{shown}"
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], f"not one closing error line:\n{shown}"
    for text in expected:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A plain file, a small valid .npz data set and a truncated copy of it."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    npz = tmp_path / "data.npz"
    np.savez(npz, x=np.zeros((8, 28, 28), np.uint8), y=np.zeros(8, np.int64))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    return {"file": a_file, "npz": npz, "cut": cut}


def test_bad_inputs_of_nefl_coord_are_exit_2_with_one_sentence(files: dict[str, Path], tmp_path: Path) -> None:
    f = str(files["file"])
    serve = [*COORD, "serve", "--broker", NO_BROKER, "--runs-dir", str(tmp_path / "runs")]
    cases = [
        ([*COORD, "serve", "--broker", NO_BROKER, "--runs-dir", f], ["--runs-dir", "is a file"]),
        ([*COORD, "serve", "--broker", NO_BROKER, "--runs-dir", f + "/runs"], ["--runs-dir", "a parent of it"]),
        ([*serve, "--enrolment-dir", f], ["--enrolment-dir", "is a file"]),
        ([*serve, "--chunk-size", "2000000000"], ["chunk_size", "less than or equal"]),
        ([*serve, "--chunk-size", "0"], ["chunk_size", "greater than or equal"]),
        ([*serve, "--chunk-size", "-5"], ["chunk_size", "greater than or equal"]),
        ([*COORD, "demo", "--runs-dir", f], ["--runs-dir", "is a file"]),
        ([*COORD, "simulate", "--out", str(tmp_path)], ["--out", "is a folder"]),
        ([*COORD, "simulate", "--out", f + "/result.json"], ["--out's folder", "is a file"]),
        ([*COORD, "simulate", "--data-dir", str(files["cut"])], ["cut.npz", "truncated"]),
    ]
    for args, expected in cases:
        code, lines = run_cli(args)
        assert_one_sentence(code, lines, *expected)


def test_bad_inputs_of_nefl_edge_are_exit_2_with_one_sentence(files: dict[str, Path], tmp_path: Path) -> None:
    f, data = str(files["file"]), ["--data", str(files["npz"])]
    cache = ["--cache", str(tmp_path / "cache")]
    cases = []
    for command in ("join", "agent"):
        device = [*EDGE, command, "--broker", NO_BROKER, "--node-id", "dev1", *data]
        cases += [
            ([*device, "--cache", f], ["--cache", "is a file"]),
            ([*device, *cache, "--cache", f + "/sub"], ["--cache", "a parent of it"]),
            ([*device, *cache, "--state-dir", f], ["--state-dir", "is a file"]),
            ([*device, *cache, "--backend", "bogus"], ["unknown backend 'bogus'"]),
            ([*device, *cache, "--tier", "-1"], ["--tier"]),
            ([*device, *cache, "--threads", "-5"], ["--threads"]),
            ([*device, *cache, "--max-samples", "-3"], ["--max-samples"]),
            ([*EDGE, command, "--broker", NO_BROKER, "--data", str(files["cut"]), *cache], ["cut.npz", "truncated"]),
        ]
    cases.append(([*EDGE, "predict", *data, "--cache", f], ["--cache", "is a file"]))
    for args, expected in cases:
        code, lines = run_cli(args)
        assert_one_sentence(code, lines, *expected)


def truncated_copy(source: Path, folder: Path, name: str) -> Path:
    """``source`` (an IDX data set) copied to ``folder`` with ``name`` cut to half its size."""
    shutil.copytree(source, folder)
    path = folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return folder


def test_missing_or_truncated_data_is_an_error_unless_evaluation_is_federated(fmnist_dir: Path, tmp_path: Path) -> None:
    cut = truncated_copy(fmnist_dir, tmp_path / "cut", "t10k-images-idx3-ubyte.gz")
    for folder, says in ((tmp_path / "nothing", "no data at"), (cut, "truncated gzip")):
        for evaluation in ("auto", "test", "both"):
            with pytest.raises(ConfigError, match=f"{says}.*--evaluation federated"):
                coordinator_data(evaluation, "federated", folder, 100, 0)
        # what an operator who wants the devices' evaluation only says: no data is read at all
        assert coordinator_data("federated", "federated", folder, 100, 0) == (None, None, True)
    test, _, federated = coordinator_data("auto", "federated", fmnist_dir, 100, 0)
    assert test is not None and len(test) == 100 and not federated, "the intact data set must be the test set"


@pytest.mark.integration
def test_serve_with_a_missing_data_dir_exits_2_before_any_round(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    coord = spawn_coordinator(broker.address, tmp_path, "--data-dir", str(tmp_path / "no-data"), "--rounds", "1")
    try:
        code = coord.wait(120)
    finally:
        stop(coord)
    lines = [line for line in (tmp_path / "coordinator.log").read_text().splitlines() if line.strip()]
    assert_one_sentence(code, lines, "no data at", "--evaluation federated")
    assert not list((tmp_path / "runs").glob("*/metrics.jsonl")), "a round was recorded without test data"


def test_a_full_disk_has_its_own_exit_code_and_one_line(tmp_path: Path) -> None:
    from nefl_edge.coordinator.checkpoint import durable_append

    assert ExitCode.DISK_FULL not in (ExitCode.FAILURE, ExitCode.BAD_INPUT) and DiskFull("x").exit_code == 5
    with pytest.raises(DiskFull, match=r"no space left.*--resume") as caught:
        durable_append(Path("/dev/full"), ['{"round": 1}'])  # /dev/full answers every write with ENOSPC
    assert str(caught.value).count("\n") == 0, "the message must be one line"


def test_a_full_disk_anywhere_else_ends_either_cli_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from nefl_edge.core.cli import run_app

    app = typer.Typer()

    @app.command()
    def write(out: Path, size: int = 1) -> None:
        out.write_bytes(b"x" * size)  # /dev/full: ENOSPC, as a full disk answers

    @app.command()
    def other() -> None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/nowhere")

    with pytest.raises(SystemExit) as exited:
        run_app(app, "prog", ["write", "/dev/full"])
    err = capsys.readouterr().err
    assert exited.value.code == ExitCode.DISK_FULL, f"exit {exited.value.code}: {err}"
    assert err.splitlines() == [err.strip()] and err.startswith("error: no space left on the disk"), err
    with pytest.raises(FileNotFoundError):  # another OSError stays a bug with its traceback
        run_app(app, "prog", ["other"])


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def _fill(folder: Path) -> None:
    """Write zeros under ``folder`` until its file system is full (1 MiB blocks, then pages)."""
    with (folder / "filler").open("wb", buffering=0) as fh:
        for size in (1 << 20, 4096):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, f"filling the disk failed otherwise: {exc}"


@pytest.mark.integration
@pytest.mark.slow
def test_serve_on_a_full_disk_stops_at_the_round_that_hit_it(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the run directory on a small file system of its own (a tmpfs: needs root), one device.
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "256m"):
        pytest.skip("mounting a tmpfs needs root")
    coord = edge = None
    try:
        shards = make_shards(tmp_path, [300])
        coord = spawn_coordinator(
            broker.address, tmp_path, "--runs-dir", str(disk / "runs"), "--rounds", "6", "--min-clients", "1",
            "--policy", "static", "--max-steps", "4", "--deadline-s", "20", "--wait-clients-s", "300",
            "--eval-samples", "200",
        )  # fmt: skip
        edge = spawn_edge(broker.address, shards[0], "dev0", tmp_path)

        def recorded() -> bool:
            return any('"round": 1' in p.read_text() for p in (disk / "runs").glob("*/metrics.jsonl"))

        wait_for(recorded, 240, "round 1 to be recorded")
        # Execute: the disk fills and the device goes away, so that the next round can only end by its deadline
        # and the one after it only by wait_clients_s (300 s): an error raised one round late shows as minutes.
        _fill(disk)
        stop(edge, timeout=5)
        filled = time.monotonic()
        try:
            code: Optional[int] = coord.wait(20 + 60)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - filled
    finally:
        for proc in (coord, edge):
            if proc is not None:
                stop(proc)
        subprocess.run(["umount", "-l", str(disk)], check=False)

    # Assert: its own exit code, one error line naming the disk and --resume, no traceback, within the round.
    lines = [line for line in (tmp_path / "coordinator.log").read_text().splitlines() if line.strip()]
    shown = "\n".join(lines[-15:])
    assert code is not None, f"the coordinator still ran {took:.0f} s after the disk filled:\n{shown}"
    assert code == ExitCode.DISK_FULL, f"exit {code}, not {int(ExitCode.DISK_FULL)}:\n{shown}"
    assert not any("Traceback" in line for line in lines), f"a traceback:\n{shown}"
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "no space left" in errors[0] and "--resume" in errors[0], shown


def _client(user: str, password: str, port: int):  # type: ignore[no-untyped-def]
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user)
    client.username_pw_set(user, password)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, reason, p: connected.set() if not reason.is_failure else None
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert connected.wait(10), f"{user} could not connect"
    return client


def test_generated_broker_config_bounds_queues_and_mosquitto_starts_on_it(tmp_path: Path) -> None:
    port, plain = free_ports(2)
    root = "root" if os.geteuid() == 0 else None  # as root Mosquitto would drop to a user who cannot read tmp
    opts = BrokerOptions(tmp_path / "broker", ("127.0.0.1",), port, plain, bind="127.0.0.1", user=root)
    settings = write_broker_config(opts)
    conf = settings.folder / "mosquitto.conf"
    lines = conf.read_text().splitlines()
    for key, value in (
        ("max_queued_messages", str(opts.max_queued_messages)),
        ("max_queued_bytes", str(opts.max_queued_bytes)),
        ("persistent_client_expiration", "1d"),
        ("max_packet_size", str(opts.max_packet_size)),
    ):
        found = [line for line in lines if line.split(" ", 1)[0] == key]
        assert found == [f"{key} {value}"], f"{key}: expected one line '{key} {value}', found {found}"
    assert config_text(opts).splitlines() == lines

    set_password(settings.password_file, "pi-a", "pw-of-pi-a")
    log = (tmp_path / "mosquitto.log").open("ab")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: port_open(plain) or proc.poll() is not None, 10, "mosquitto to listen or exit", 0.05)
        assert proc.poll() is None and port_open(plain), (tmp_path / "mosquitto.log").read_text()[-2000:]
        # Retained storage per account and run name (README threat model): a device account retains 1 MiB
        # messages on 32 topics below its own and on the four it may write; the coordinator reads back the four.
        topics, size = 32, 1 << 20
        allowed = [f"nefl/r1/node/pi-a/{t}" for t in DEVICE_TOPICS]
        device = _client("pi-a", "pw-of-pi-a", plain)
        sent = [
            device.publish(topic, os.urandom(size), qos=1, retain=True)
            for topic in [f"nefl/r1/node/pi-a/status/x{i}" for i in range(topics)] + allowed
        ]
        for info in sent:
            info.wait_for_publish(60)
        device.disconnect()
        device.loop_stop()
        coordinator_password = settings.coordinator_password_file.read_text().strip()
        got: dict[str, int] = {}
        reader = _client(settings.coordinator_user, coordinator_password, plain)
        reader.on_message = lambda c, u, m: got.__setitem__(m.topic, len(m.payload)) if m.retain else None
        reader.subscribe("nefl/r1/node/pi-a/#", qos=1)
        wait_for(lambda: len(got) >= len(allowed), 30, "the retained messages to come back")
        more = time.monotonic() + 1.0  # the bounded wait of a negative check: nothing beyond the four comes
        while time.monotonic() < more and len(got) == len(allowed):
            time.sleep(0.02)
        reader.disconnect()
        reader.loop_stop()
        assert sorted(got) == sorted(allowed), f"retained on {sorted(got)}, expected only {allowed}"
    finally:
        proc.terminate()
        proc.wait(10)
    assert "Error" not in (tmp_path / "mosquitto.log").read_text(), (tmp_path / "mosquitto.log").read_text()[-2000:]
