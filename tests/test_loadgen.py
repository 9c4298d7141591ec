"""The load generator against a real Mosquitto and a real ``nefl-coord serve``: every virtual device gets a
task each round and its update is taken in, and answers the federated BatchNorm statistics tasks; the
evaluation cadence shows in the run's records."""

from __future__ import annotations

from pathlib import Path

from bench.loadgen import LoadGen, measure, read_jsonl
from nefl_edge.core.errors import ExitCode
from tests.helpers import Broker, spawn_coordinator, stop, wait_for


def test_a_small_virtual_fleet_runs_a_served_run_with_evaluation_every_second_round(tmp_path: Path) -> None:
    # Six virtual devices in two load-generator processes (three each); rounds 2 and 3 evaluated.
    devices, rounds = 6, 3

    result = measure(
        devices, rounds, connections=2, eval_every=2, extra=("--eval-samples", "200"), folder=tmp_path,
        timeout_s=240, processes=2,
    )  # fmt: skip

    assert [t["tasks"] for t in result["timings"]] == [devices] * rounds, "tasks counted over both processes"
    assert result["updates_sent"] == devices * rounds
    assert result["loadgen_rejected"] == {}
    run_dir = next((tmp_path / "runs").iterdir())
    metric_rounds = [r["round"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert metric_rounds == sorted(metric_rounds) and sorted(set(metric_rounds)) == [0, 2, 3]
    clients = read_jsonl(run_dir / "clients.jsonl")
    assert [sum(c["round"] == r and c["status"] == "updated" for c in clients) for r in (1, 2, 3)] == [devices] * 3
    assert sorted({c["node"] for c in clients}) == [f"lg-{i}" for i in range(devices)], "each device once"
    assert result["overhead_s"] is not None and result["overhead_s"] > 0
    rows = read_jsonl(run_dir / "metrics.jsonl")
    for r in (2, 3):  # default bn = federated: round 2's statistics came with round 3's tasks, round 3's by a trip
        evaluated = [row for row in rows if row["round"] == r]
        assert all(sorted(row["bn_batches"]) == ["0", "1", "2", "3", "4"] for row in evaluated), (r, evaluated)
        phase = "bn_statistics_carried" if r == 2 else "bn_statistics"
        assert all(phase in row["phases"] for row in evaluated), (r, [row["phases"] for row in evaluated])
    second, timing, third = result["rounds"][1], result["timings"][1], result["timings"][2]
    assert timing["first_eval_task_at"] == 0, "round 2 sent evaluate tasks: its statistics were not carried"
    assert third["first_eval_task_at"] > 0, "the last round sent no evaluate task for its own statistics"
    assert "bn_s" not in second and result["rounds"][2]["bn_s"] > 0, (second, result["rounds"][2])
    assert 0 < second["handed_out_s"] <= second["overhead_s"] + 0.5, (
        f"tasks handed to paho {second['handed_out_s']:.3f} s after collecting, arriving {second['overhead_s']:.3f} s"
    )
    assert second["handed_out_s"] <= second["acked_s"] + 0.5 <= second["overhead_s"] + 1.0, (
        f"handed to paho {second['handed_out_s']:.3f} s, acknowledged by the broker {second.get('acked_s')} s, "
        f"arrived {second['overhead_s']:.3f} s after collecting (the session's log line read by the load generator)"
    )
    assert second["broker_overhead_cpu_s"] >= 0 and second["loadgen_overhead_cpu_s"] > 0, second
    assert result["coordinator_cpu_s_per_round"] is not None and result["peak_rss_mb"] > 50


def test_a_stopped_run_evaluates_and_checkpoints_its_last_round(broker: Broker, tmp_path: Path) -> None:
    from nefl_edge.coordinator import checkpoint

    args = ("--run", "stopped", "--rounds", "6", "--eval-every", "6", "--min-clients", "4", "--policy", "static")
    coord = spawn_coordinator(broker.address, tmp_path, *args, "--eval-samples", "200", "--bn", "server")
    gen = LoadGen(broker.address, "stopped", 4, connections=1, delay_s=0.5)
    try:
        gen.start(timeout_s=120, alive=lambda: coord.poll() is None)
        wait_for(lambda: 2 in gen.rounds, 60, "round 2's tasks")

        # a stop waits for the evaluations in flight (round 0's and the stopped run's own): 52 s at load 14
        assert stop(coord, timeout=180) == ExitCode.INTERRUPTED
    finally:
        gen.close()
        stop(coord)

    run_dir = next((tmp_path / "runs").iterdir())
    last = checkpoint.load(run_dir)
    assert last is not None and last.round in (1, 2)
    assert sorted({r["round"] for r in read_jsonl(run_dir / "metrics.jsonl")}) == [0, last.round]


def _burst(backpressure_s: float, answers: int = 24, inbox: int = 4) -> tuple[int, int, float]:
    """``answers`` updates of tasked devices published at once into a coordinator link whose inbox holds
    ``inbox`` messages, taken by a consumer slower than the burst: (taken, refused as inbox_full, seconds)."""
    import threading
    import time

    import numpy as np

    from nefl_edge.core.link import MemoryBroker, MemoryLink
    from nefl_edge.core.schemas import Metrics, Update
    from nefl_edge.core.wire import Topics, pack_tensors

    broker, topics = MemoryBroker(), Topics("burst")
    coordinator = MemoryLink(broker, "burst", inbox_size=inbox)
    coordinator.backpressure_s = backpressure_s
    coordinator.favoured = lambda sender: True  # every device has a pending task
    coordinator.subscribe(topics.all_nodes("update"))
    coordinator.connect()
    devices = MemoryLink(broker, "burst")
    devices.connect()
    body = pack_tensors({"w": np.ones(1000, np.float32)})
    taken: list[str] = []

    def consume() -> None:
        while len(taken) + coordinator.rejections["inbox_full"] < answers:
            item = coordinator.next(0.2)
            if item is not None:
                taken.append(item[1].node)  # type: ignore[union-attr]
                time.sleep(0.01)  # the coordinator screens and folds each update

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    started = time.monotonic()
    metrics = Metrics(loss_first=1.0, loss_last=1.0, accuracy=0.5, steps=1, seconds=1.0)
    for i in range(answers):
        node = f"d{i}"
        update = Update(run="burst", node=node, task_id="t", round=1, submodel=0, num_samples=10, metrics=metrics)
        devices.publish(topics.node(node, "update"), update, body)
    consumer.join(30)
    return len(taken), coordinator.rejections["inbox_full"], time.monotonic() - started


def test_a_burst_of_awaited_updates_beyond_the_inbox_waits_for_room_instead_of_being_dropped() -> None:
    taken, refused, seconds = _burst(backpressure_s=5.0)
    assert (taken, refused) == (24, 0), f"with backpressure {taken} of 24 updates taken, {refused} dropped"
    assert seconds < 5.0, f"the burst took {seconds:.1f} s: the transport waited longer than the consumer needed"

    taken, refused, _ = _burst(backpressure_s=0.0)  # the link as it was: a full inbox drops
    assert refused > 0 and taken + refused == 24, f"without backpressure {taken} taken, {refused} dropped"
