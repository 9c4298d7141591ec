"""The load generator against a real Mosquitto and a real ``nefl-coord serve``: every virtual device gets a
task each round and its update is taken in, and answers the federated BatchNorm statistics tasks; the
evaluation cadence shows in the run's records."""

from __future__ import annotations

from pathlib import Path

from bench.loadgen import LoadGen, measure, read_jsonl
from nefl_edge.core.errors import ExitCode
from tests.helpers import Broker, spawn_coordinator, stop, wait_for


def test_a_small_virtual_fleet_runs_a_served_run_with_evaluation_every_second_round(tmp_path: Path) -> None:
    devices, rounds = 6, 3

    result = measure(
        devices, rounds, connections=2, eval_every=2, extra=("--eval-samples", "200"), folder=tmp_path, timeout_s=240
    )

    assert [t["tasks"] for t in result["timings"]] == [devices] * rounds
    assert result["updates_sent"] == devices * rounds
    assert result["loadgen_rejected"] == {}
    run_dir = next((tmp_path / "runs").iterdir())
    metric_rounds = [r["round"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert metric_rounds == sorted(metric_rounds) and sorted(set(metric_rounds)) == [0, 2, 3]
    clients = read_jsonl(run_dir / "clients.jsonl")
    assert [sum(c["round"] == r and c["status"] == "updated" for c in clients) for r in (1, 2, 3)] == [devices] * 3
    assert result["overhead_s"] is not None and result["overhead_s"] > 0
    evaluated = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["round"] == 2]
    assert all(sorted(r["bn_batches"]) == ["0", "1", "2", "3", "4"] for r in evaluated)  # default bn = federated
    # the overhead runs from the end of collecting, before the statistics round trip, which it includes
    second, timing = result["rounds"][1], result["timings"][1]
    assert timing["first_eval_task_at"] > 0, "no evaluate task reached the virtual devices in round 2"
    assert second["collected_at"] <= timing["first_eval_task_at"], (
        f"round 2 counted as collected at {second['collected_at']:.3f}, after its statistics tasks arrived "
        f"({timing['first_eval_task_at']:.3f}): the overhead leaves out the statistics round trip"
    )
    assert second["overhead_s"] >= second["bn_s"] > 0, f"overhead {second['overhead_s']} < bn {second['bn_s']}"
    assert 0 < second["handed_out_s"] <= second["overhead_s"] + 0.5, (
        f"tasks handed to paho {second['handed_out_s']:.3f} s after collecting, arriving {second['overhead_s']:.3f} s"
    )
    assert result["coordinator_cpu_s_per_round"] is not None and result["peak_rss_mb"] > 50


def test_a_stopped_run_evaluates_and_checkpoints_its_last_round(broker: Broker, tmp_path: Path) -> None:
    from nefl_edge.coordinator import checkpoint

    args = ("--run", "stopped", "--rounds", "6", "--eval-every", "6", "--min-clients", "4", "--policy", "static")
    coord = spawn_coordinator(broker.address, tmp_path, *args, "--eval-samples", "200", "--bn", "server")
    gen = LoadGen(broker.address, "stopped", 4, connections=1, delay_s=0.5)
    try:
        gen.start(timeout_s=120, alive=lambda: coord.poll() is None)
        wait_for(lambda: 2 in gen.rounds, 60, "round 2's tasks")

        assert stop(coord) == ExitCode.INTERRUPTED
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
