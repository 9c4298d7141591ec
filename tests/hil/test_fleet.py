"""Hardware-in-the-loop on an emulated fleet: real ``nefl-edge`` processes in network namespaces behind
rate-limited links, under CPU quotas, against a real Mosquitto and the real ``nefl-coord serve``."""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from typing import Any, Callable

import paho.mqtt.client as mqtt
import pytest

from nefl_edge.core.wire import Topics
from tests.helpers import wait_for
from tests.hil.fleet import Fleet, FleetSpec, Group, assignments, load_classes, read_jsonl, run_dir

pytestmark = [pytest.mark.hil, pytest.mark.integration]
MakeFleet = Callable[[Any], Fleet]

SPEED_PROBE = """
import json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
start, cpu0 = time.monotonic(), time.process_time()
while time.monotonic() - start < 2.0:
    sum(range(1000))
share = (time.process_time() - cpu0) / (time.monotonic() - start)
s = socket.create_connection((host, port))
t0 = time.monotonic(); s.sendall(b"x" * 1_000_000); s.shutdown(socket.SHUT_WR)
s.recv(1); up = time.monotonic() - t0
got, t0 = 0, time.monotonic()
while got < 1_000_000:
    got += len(s.recv(65536))
print(json.dumps({"cpu_share": share, "up_s": up, "down_s": time.monotonic() - t0}))
"""


def test_an_emulated_device_gets_its_cpu_quota_and_link_rate(make_fleet: MakeFleet) -> None:
    # Prepare: one device at a quarter of a core behind an 8 Mbit/s link; a sink/source in the root namespace.
    pi4 = load_classes()["pi4"]
    fleet = make_fleet(FleetSpec("probe", [Group(pi4, 1, 32, rate_mbit=8.0)], core_per_speed=0.25 / pi4.speed))
    server = socket.create_server((fleet.gateway, 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        while conn.recv(65536):
            pass
        conn.sendall(b"k" + b"y" * 1_000_000)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()

    # Execute
    fleet.start("pi4-0", command=[sys.executable, "-c", SPEED_PROBE, fleet.gateway, str(port)])
    result = wait_for(lambda: re.search(r"\{.*\}", fleet.log("pi4-0")), 60, "the probe's result")

    # Assert: 1 MB at 8 Mbit/s takes about 1 s each way; the process gets about 25 % of a core.
    figures = json.loads(result.group(0))
    assert 0.1 < figures["cpu_share"] < 0.3, figures
    assert 0.8 < figures["up_s"] < 1.6 and 0.8 < figures["down_s"] < 1.6, figures


def test_deadline_policy_gives_the_slow_class_a_smaller_submodel_and_aggregates_every_device(
    make_fleet: MakeFleet,
) -> None:
    # Prepare: 2 Raspberry Pi Zero 2 W + 2 Raspberry Pi 5 (9x apart), a 9 s deadline.
    fleet = make_fleet("small")
    deadline = 9.0
    fleet.start_all("hil")

    # Execute
    coord = fleet.spawn_coordinator(
        "--run", "hil", "--policy", "deadline", "--rounds", "2", "--min-clients", "4", "--deadline-s", str(deadline),
        "--gammas", "0.2,0.6,1.0", "--eval-samples", "500", "--wait-clients-s", "120", "--cover-rule", "weakest",
    )  # fmt: skip
    assert coord.wait(240) == 0, fleet.log()[-3000:]

    # Assert: per round, every selected device's update was aggregated, and each slow device trained a
    # smaller submodel than each fast one.
    out = run_dir(fleet.workdir / "runs", "hil")
    assert out is not None
    rounds = [r for r in read_jsonl(out / "metrics.jsonl") if r["round"] > 0 and r["submodel"] == 0]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["selected"] == 4 and r["updates"] == 4 and r["aggregated"] for r in rounds), rounds
    given = assignments(out, fleet.log())
    assert sorted(given) == [1, 2], fleet.log()[-3000:]
    for r, nodes in given.items():
        slow = [k for n, k in nodes.items() if n.startswith("pi-zero-2w")]
        fast = [k for n, k in nodes.items() if n.startswith("pi5")]
        assert len(slow) == 2 and len(fast) == 2 and max(slow) < min(fast), (r, nodes)
    records = read_jsonl(out / "clients.jsonl")  # per-device records, where the coordinator writes them
    if records:
        assert len(records) == 8 and all(c["status"] == "updated" and c["seconds"] < deadline for c in records)
    else:  # each device finished training and upload before its deadline, by its own log
        for node in fleet.devices:
            times = [float(s) for s in re.findall(r"uploaded .* in ([0-9.]+) s", fleet.log(node))]
            assert len(times) == 2 and max(times) < deadline, (node, fleet.log(node)[-2000:])


class Observer:
    """An MQTT client in the root namespace that records what one device publishes (frame headers only)."""

    def __init__(self, broker: str, run: str, node: str) -> None:
        self.topics = Topics(run)
        self.node = node
        self.update_frames: list[tuple[int, int]] = []
        self.offline = threading.Event()
        host, port = broker.rsplit(":", 1)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"hil-observer-{node}")
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.subscribe(self.topics.node(node, "#"), qos=1)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        if msg.topic == self.topics.node(self.node, "update") and payload[:4] == b"NFLC":
            size = int.from_bytes(payload[4:8], "big")
            header = json.loads(payload[8 : 8 + size])
            self.update_frames.append((header["i"], header["n"]))
        elif "/status" in msg.topic and re.search(rb'"state"\s*:\s*"(offline|lost)"', payload):
            self.offline.set()  # its Last Will ("lost"; "offline" before the states were split)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.slow
def test_a_link_that_goes_down_mid_upload_closes_the_round_at_its_deadline_and_the_device_rejoins(
    make_fleet: MakeFleet,
) -> None:
    # Prepare: 2 Pi 5 and one Pi 4 (the victim); 3 rounds that each need all three devices online.
    fleet = make_fleet("linkdown")
    victim, deadline = "pi4-0", 20.0
    observer = Observer(fleet.local_broker, "hil", victim)
    fleet.set_rate(victim, up=0.5)  # its update (about 700 KiB) takes about 11 s to upload
    fleet.start_all("hil", "--max-message-size", "16384")
    coord = fleet.spawn_coordinator(
        "--run", "hil", "--policy", "deadline", "--rounds", "3", "--min-clients", "3", "--deadline-s", str(deadline),
        "--gammas", "0.2,0.6,1.0", "--eval-samples", "500", "--wait-clients-s", "240",
    )  # fmt: skip
    try:
        # Execute: cut the victim's link when its first update chunk reached the broker, and bring it back
        # once the broker has published its Last Will.
        wait_for(lambda: observer.update_frames, 120, "the victim's first update chunk at the broker")
        fleet.link_down(victim)
        cut = time.monotonic()
        assert observer.offline.wait(120), "no Last Will for the victim within 120 s of the link going down"
        seen_offline_after = time.monotonic() - cut
        chunks_before_link_up = list(observer.update_frames)
        fleet.set_rate(victim, fleet.devices[victim].rate_mbit)
        fleet.link_up(victim)
        assert coord.wait(400) == 0, fleet.log()[-3000:]
    finally:
        observer.close()

    # Assert: the upload was cut part-way (the rest arrives after the reconnect, too late); round 1 closed at
    # its deadline with the two other updates; the victim was seen offline; it trained and was aggregated in a
    # later round.
    frames = chunks_before_link_up
    assert frames and len({i for i, _ in frames}) < frames[0][1], frames
    out = run_dir(fleet.workdir / "runs", "hil")
    assert out is not None
    rows = {r["round"]: r for r in read_jsonl(out / "metrics.jsonl") if r["submodel"] == 0}
    assert rows[1]["selected"] == 3 and rows[1]["updates"] == 2 and rows[1]["aggregated"], rows[1]
    assert deadline <= rows[1]["seconds"] < deadline + 30, rows[1]
    assert seen_offline_after < 90
    assert rows[3]["updates"] == 3, rows[3]
    given = assignments(out, fleet.log())
    assert victim in given[3], given
    status = {(c["round"], c["node"]): c.get("status") for c in read_jsonl(out / "clients.jsonl")}
    if status:  # per-device records, where the coordinator writes them
        assert status.get((1, victim)) not in (None, "updated") and status.get((3, victim)) == "updated", status
    assert "round 3: uploaded" in fleet.log(victim), fleet.log(victim)[-2000:]
