"""The device's own decline check prices the statistics pass a task carries (issue 23): the pass runs first, and
the training's budget is what the deadline has left after it (and after the upload margin), so a device declines
on its measured pace a task whose pass and training together miss the deadline, and finishes one that the
coordinator shortened to fit (``max_steps``). The device's real ``run_task`` and ``train_local`` (the real pace
rule) run on a clock of the test's, with a backend whose steps take a fixed time on it; the weights, the
statistics pass and the session are stand-ins, as the budget is what is under test."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import pytest

import nefl_edge.edge_client.client as client_module
import nefl_edge.edge_client.trainer as trainer_module
from nefl_edge.core.data import Dataset, load_dataset
from nefl_edge.core.mqtt import BrokerAddress
from nefl_edge.core.schemas import Task, TrainConfig
from nefl_edge.edge_client.client import UPLOAD_MARGIN_S, ClientOptions, DeviceWork

DEADLINE_S, PASS_S, STEP_S = 15.0, 6.0, 0.8
TRAIN_LOCAL = client_module.train_local


class Clock:
    """``time.monotonic`` of the device modules under test: it moves only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class StepBackend:
    """A trainer backend whose every step takes ``STEP_S`` on the clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.steps = clock, 0

    def load(self, weights: Any, train: Any) -> None:
        pass

    def step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
        self.clock.now += STEP_S
        self.steps += 1
        return 1.0, 0

    def tensors(self) -> dict[str, np.ndarray]:
        return {"w": np.zeros(2, np.float32)}


class Session:
    """Records what the device answers."""

    def __init__(self) -> None:
        sub = SimpleNamespace(index=0, gamma=0.2, key="k0")
        self.manifest = SimpleNamespace(submodels=[sub])
        self.declined: list[str] = []
        self.updates: list[Any] = []

    def weights(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        return {"w": np.zeros(2, np.float32)}

    def status(self, state: str) -> None:
        pass

    def decline(self, task: Task, reason: str) -> None:
        self.declined.append(reason)

    def send_update(self, task: Task, index: int, samples: int, metrics: Any, parts: Any) -> int:
        self.updates.append(metrics)
        return 0


@functools.lru_cache(maxsize=1)
def shard() -> Dataset:
    """480 real Fashion-MNIST images: 15 steps of 32."""
    train = load_dataset(None, "train")
    return Dataset(train.x[:480].copy(), train.y[:480].copy(), "shard")


def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_steps: Optional[int], bn_stats: bool) -> Any:
    clock = Clock()
    monkeypatch.setattr(client_module, "time", clock)
    monkeypatch.setattr(trainer_module, "time", clock)
    passes: list[float] = []

    def carried(self: DeviceWork, task: Task, sub: Any, weights: Any, data: Dataset) -> None:
        passes.append(clock.now)
        clock.now += PASS_S

    monkeypatch.setattr(DeviceWork, "_carried_statistics", carried)
    backend = StepBackend(clock)
    monkeypatch.setattr(DeviceWork, "_backend", lambda self, manifest, sub: backend)
    budgets: list[float] = []

    def train_local(*args: Any, **kwargs: Any) -> Any:
        budgets.append(kwargs["deadline_s"])
        return TRAIN_LOCAL(*args, **kwargs)

    monkeypatch.setattr(client_module, "train_local", train_local)
    data = shard()
    session = Session()
    options = ClientOptions(broker=BrokerAddress("localhost", 1883), node="pi-zero", cache=tmp_path, backend="portable")
    work = DeviceWork(options, data, session, lambda *a: None)  # type: ignore[arg-type]
    task = Task(
        run="r", node="pi-zero", task_id="t1", round=2, submodel=0, weights_sha256="0" * 64,
        train=TrainConfig(batch_size=32, max_steps=max_steps), deadline_s=DEADLINE_S, bn_stats=bn_stats,
        bn_max_batches=16 if bn_stats else None,
    )  # fmt: skip
    work.run_task(task, received=clock.now)
    return SimpleNamespace(session=session, budgets=budgets, passes=passes, steps=backend.steps)


def test_the_training_budget_is_what_the_carried_pass_leaves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    carried = run(tmp_path, monkeypatch, 5, True)
    alone = run(tmp_path, monkeypatch, 5, False)

    assert len(carried.passes) == 1 and not alone.passes, "the statistics pass ran where it was not asked (or not)"
    assert carried.budgets == [pytest.approx(DEADLINE_S - PASS_S - UPLOAD_MARGIN_S)], carried.budgets
    assert alone.budgets == [pytest.approx(DEADLINE_S - UPLOAD_MARGIN_S)], alone.budgets


def test_a_task_whose_pass_and_training_miss_the_deadline_is_declined_and_a_shortened_one_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 15 steps of 0.8 s (12 s) fit the 13 s left without a pass, not the 7 s left after a 6 s pass; 5 steps do.
    assert 15 * STEP_S <= DEADLINE_S - UPLOAD_MARGIN_S and 15 * STEP_S > DEADLINE_S - PASS_S - UPLOAD_MARGIN_S
    whole = run(tmp_path, monkeypatch, None, False)
    late = run(tmp_path, monkeypatch, None, True)
    short = run(tmp_path, monkeypatch, 5, True)

    assert not whole.session.declined and [m.steps for m in whole.session.updates] == [15], "the task alone fits"
    assert len(late.session.declined) == 1 and not late.session.updates, "pass + training miss it, yet no decline"
    assert "deadline" in late.session.declined[0] and late.steps < 15, late.session.declined
    assert not short.session.declined and [m.steps for m in short.session.updates] == [5], short.session.declined
