"""The deadline policy's projection (issue 23): a task's planned local steps plus, when the round's tasks carry the
previous round's federated BatchNorm statistics (``Task.bn_stats``), the forward passes of that statistics pass;
and a device that cannot fit even the smallest submodel gets fewer local steps instead of a task it declines.
Every expectation is computed here, naively, from the profile's numbers and ``core.evaluation.stats_batches``."""

from __future__ import annotations

from typing import Any, Optional

import pytest

from nefl_edge.coordinator.assignment import (
    DEADLINE_MARGIN,
    ClientInfo,
    affordable_steps,
    capacity,
    projected_seconds,
    statistics_samples,
    task_mflops,
)
from nefl_edge.coordinator.cadence import run_rounds
from nefl_edge.coordinator.config import RunConfig
from nefl_edge.coordinator.engine import RoundEngine
from nefl_edge.coordinator.grid import InProcessGrid, Instruction, Outcome
from nefl_edge.coordinator.models import initial_consistent
from nefl_edge.coordinator.strategies import get_strategy, train_torch
from nefl_edge.core.data import Dataset, load_dataset
from nefl_edge.core.evaluation import stats_batches
from nefl_edge.core.nested import init_global_state
from nefl_edge.core.schemas import DeviceProfile, TrainConfig
from nefl_edge.core.specs import get_model_config, mflops

GAMMAS = (0.2, 0.6, 1.0)
PROFILE = dict(arch="x", system="y", python="3", cores=1, memory_mb=1, onnxruntime="1", backend="portable")


def naive_seconds(
    speed: float, probe: float, cost: float, n: int, batch: int, steps: int, pass_samples: int, pass_cost: float
) -> float:
    """Seconds of ``steps`` training steps of ``batch`` on a submodel of ``cost`` MFLOPs at ``speed`` samples/s
    measured on a probe of ``probe`` MFLOPs (the throughput scales with the inverse of the cost), plus
    ``pass_samples`` forward passes of a submodel of ``pass_cost``, each a third of a training sample."""
    per_sample = cost / (speed * probe)
    return steps * batch * per_sample + pass_samples * pass_cost / (speed * probe) / 3


def setup() -> tuple[Any, Any, list[float]]:
    strategy = get_strategy("nefl-wd")
    config, plan = strategy.setup(get_model_config("resnet-small", "fmnist"), GAMMAS)
    return config, plan, [mflops(config, s) for s in plan.specs]


@pytest.mark.parametrize("batch", [1, 2, 7, 32])
@pytest.mark.parametrize("max_batches", [None, 1, 3, 16])
def test_the_priced_statistics_samples_are_those_the_device_runs_forward(
    batch: int, max_batches: Optional[int]
) -> None:
    for n in range(0, 130):
        want = sum(len(b) for b in stats_batches(n, batch, max_batches))
        got = statistics_samples(n, batch, max_batches)
        assert got == want, f"{n} samples, batch {batch}, at most {max_batches} batches: priced {got}, runs {want}"


def test_the_projection_counts_the_training_steps_and_the_carried_statistics_pass() -> None:
    _, _, costs = setup()
    speed, n, batch = 40.0, 480, 32
    profile = DeviceProfile(**PROFILE, samples_per_s=speed, probe_mflops=costs[0])
    train = TrainConfig(batch_size=batch, epochs=2)
    for k, cost in enumerate(costs):
        alone = projected_seconds(profile, cost, n, train)
        want = naive_seconds(speed, costs[0], cost, n, batch, 2 * (n // batch), 0, 0.0)
        assert alone == pytest.approx(want, rel=1e-12), f"submodel {k} without a pass: {alone} s, naive {want} s"
        passing = statistics_samples(n, batch, 16)
        carried = projected_seconds(profile, cost, n, train, passing, cost)
        want = naive_seconds(speed, costs[0], cost, n, batch, 2 * (n // batch), 480, cost)
        assert carried == pytest.approx(want, rel=1e-12), f"submodel {k} with a pass: {carried} s, naive {want} s"
        assert carried > alone, f"submodel {k}: the carried pass costs nothing ({carried} vs {alone} s)"


def test_a_device_that_fits_training_but_not_training_and_the_pass_gets_a_smaller_submodel() -> None:
    config, plan, costs = setup()
    n, batch, deadline = 320, 32, 60.0
    train = TrainConfig(batch_size=batch)
    passing = statistics_samples(n, batch, 16)
    limit = DEADLINE_MARGIN * deadline
    # the speed at which the full model's training alone takes the limit; 5 % faster: it fits alone
    at_limit = naive_seconds(1.0, costs[0], costs[2], n, batch, n // batch, 0, 0.0) / limit
    speed = 1.05 * at_limit
    profile = DeviceProfile(**PROFILE, samples_per_s=speed, probe_mflops=costs[0])
    with_pass = naive_seconds(speed, costs[0], costs[2], n, batch, n // batch, passing, costs[2])
    assert with_pass > limit, f"the test's speed is wrong: training and the pass take {with_pass} s <= {limit} s"
    client = ClientInfo("d", n, profile=profile)

    alone = capacity(client, "deadline", plan, config, train, deadline)
    carried = capacity(client, "deadline", plan, config, train, deadline, stats_samples=passing)

    assert alone == 2, f"training alone fits the full model, but the capacity is {alone}"
    fits = [
        k
        for k in range(3)
        if naive_seconds(speed, costs[0], costs[k], n, batch, n // batch, passing, costs[k]) <= limit
    ]
    assert carried == max(fits) < 2, f"with the pass priced the capacity is {carried}; naive: the largest of {fits}"


def test_a_device_that_cannot_fit_the_smallest_submodel_gets_the_steps_that_fit() -> None:
    _, _, costs = setup()
    n, batch, limit = 480, 32, 10.5
    train = TrainConfig(batch_size=batch)
    passing = statistics_samples(n, batch, 16)
    speed = 0.5 * naive_seconds(1.0, costs[0], costs[0], n, batch, n // batch, 0, 0.0) / limit  # 2x too slow
    profile = DeviceProfile(**PROFILE, samples_per_s=speed, probe_mflops=costs[0])

    for pass_samples, pass_cost in ((0, 0.0), (passing, costs[0])):
        steps = affordable_steps(profile, costs[0], n, train, limit, pass_samples, pass_cost)
        assert steps is not None and steps >= 1, f"pass {pass_samples}: no step count for a device 2x too slow"

        def t(s: int, ps: int = pass_samples, pc: float = pass_cost) -> float:
            return naive_seconds(speed, costs[0], costs[0], n, batch, s, ps, pc)

        assert t(steps) <= limit < t(steps + 1), f"pass {pass_samples}: {steps} steps; naive {t(steps)}, {t(steps + 1)}"
    fast = DeviceProfile(**PROFILE, samples_per_s=1e6, probe_mflops=costs[0])
    assert affordable_steps(fast, costs[0], n, train, limit, passing, costs[0]) is None, "a task that fits is cut"
    assert affordable_steps(None, costs[0], n, train, limit) is None, "no profile, yet a step count"
    broken = DeviceProfile(**PROFILE, samples_per_s=float("nan"), probe_mflops=costs[0])
    assert affordable_steps(broken, costs[0], n, train, limit) is None, "a NaN speed gave a step count"
    crawling = DeviceProfile(**PROFILE, samples_per_s=1e-3, probe_mflops=costs[0])
    assert affordable_steps(crawling, costs[0], n, train, limit, passing, costs[0]) == 1, "not even one step"


def test_the_distillation_projection_prices_its_pass_on_the_teacher_alone() -> None:
    strategy = get_strategy("nefl-wd-distill")
    config, plan = strategy.setup(get_model_config("resnet-small", "fmnist"), GAMMAS)
    costs = [mflops(config, s) for s in plan.specs]
    n, batch, deadline = 320, 32, 60.0
    train = TrainConfig(batch_size=batch)
    passing = statistics_samples(n, batch, 16)
    limit = DEADLINE_MARGIN * deadline
    # the task of the full submodel trains the smallest beside it; its statistics pass is the full one's alone
    assert task_mflops(config, plan, 2) == costs[2] + costs[0]
    step_and_pass = naive_seconds(1.0, costs[0], costs[2] + costs[0], n, batch, n // batch, passing, costs[2])
    speed = 1.01 * step_and_pass / limit  # just fits: training (teacher and student) and the pass
    profile = DeviceProfile(**PROFILE, samples_per_s=speed, probe_mflops=costs[0])
    client = ClientInfo("d", n, profile=profile)
    assert capacity(client, "deadline", plan, config, train, deadline, stats_samples=passing) == 2
    slower = ClientInfo("d", n, profile=profile.model_copy(update={"samples_per_s": 0.98 * step_and_pass / limit}))
    assert capacity(slower, "deadline", plan, config, train, deadline, stats_samples=passing) < 2, (
        "a device 2 % too slow for the distillation step and its pass still gets the full submodel"
    )


class RecordingGrid(InProcessGrid):
    """The in-process grid with device profiles, recording every round's instructions; its clients send back
    the weights they were sent (what they were told is under test, not what training makes of it). Its
    statistics passes are the in-process grid's own (PyTorch)."""

    def __init__(self, shards: dict[str, Dataset], profiles: dict[str, DeviceProfile]) -> None:
        super().__init__(shards, {n: 0 for n in shards}, train_torch)
        self.profiles = profiles
        self.sent: list[list[Instruction]] = []

    def clients(self, minimum: int) -> dict[str, ClientInfo]:
        return {n: ClientInfo(n, len(d), None, self.profiles[n]) for n, d in sorted(self.shards.items())}

    def run(self, round_: int, state: Any, instructions: list[Instruction], extract: Any = None) -> Any:
        self.sent.append(list(instructions))
        for ins in instructions:
            n = len(self.shards[ins.node])
            yield Outcome(ins.node, ins.submodel, "updated", n, extract(state, ins.submodel), seconds=0.0)


# 32 s and 43 s at load 9 on the 2 shared cores (loading the data set, three submodels' statistics in PyTorch)
@pytest.mark.parametrize("fit", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_the_engine_prices_the_carried_pass_and_shortens_the_task_of_a_device_too_slow_for_any(fit: bool) -> None:
    # Prepare: three clients of 160 real images (5 steps of 32): "slow" needs 1.25 x the deadline's margin for
    # the smallest submodel alone; "mid" fits the full model's training alone but not with the statistics pass
    # that round 2's tasks carry (bn federated, every round evaluated); "fast" fits anything.
    strategy = get_strategy("nefl-wd")
    config, plan = strategy.setup(get_model_config("resnet-small", "fmnist"), GAMMAS)
    costs = [mflops(config, s) for s in plan.specs]
    n, batch, deadline = 160, 32, 1e6  # no task takes half of it: the speed evidence never overrides a profile
    limit = DEADLINE_MARGIN * deadline
    passing = statistics_samples(n, batch, 16)
    data = load_dataset(None, "train")
    shards = {name: Dataset(data.x[i * n : (i + 1) * n], data.y[i * n : (i + 1) * n], name) for i, name in
              enumerate(("fast", "mid", "slow"))}  # fmt: skip
    mid = 1.05 * naive_seconds(1.0, costs[0], costs[2], n, batch, n // batch, 0, 0.0) / limit
    slow = 0.8 * naive_seconds(1.0, costs[0], costs[0], n, batch, n // batch, 0, 0.0) / limit  # 4 of 5 steps
    speeds = {"fast": 1e6, "mid": mid, "slow": slow}
    profiles = {k: DeviceProfile(**PROFILE, samples_per_s=v, probe_mflops=costs[0]) for k, v in speeds.items()}
    cfg = RunConfig(
        gammas=list(GAMMAS), bn="federated", evaluation="test", policy="deadline", deadline_s=deadline, rounds=2,
        eval_every=1, fraction=1.0, min_clients=3, cover_submodels=False, fit_steps=fit, bn_device_samples=512,
        train=TrainConfig(lr=0.05, batch_size=batch),
    )  # fmt: skip
    engine = RoundEngine(strategy, cfg, config, plan)
    grid = RecordingGrid(shards, profiles)
    state = init_global_state(config, plan.specs, initial_consistent(config, 3), 3)

    # Execute: two rounds; round 2's tasks carry round 1's statistics pass
    run_rounds(engine, grid, state, 0, lambda *args: None)

    # Assert: per round, the submodel and the step cap each client was given, against the naive projection
    assert len(grid.sent) == 2, f"{len(grid.sent)} rounds of tasks"
    for r, sent in enumerate(grid.sent, start=1):
        got = {i.node: (i.submodel, i.train.max_steps) for i in sent}
        ps = passing if r == 2 else 0

        def fits(v: float, k: int, steps: int = n // batch, ps: int = ps) -> bool:
            return naive_seconds(v, costs[0], costs[k], n, batch, steps, ps, costs[k] if ps else 0.0) <= limit

        assert got["fast"] == (2, None), f"round {r}: the fast client got {got['fast']}"
        want_mid = max([k for k in range(3) if fits(mid, k)], default=0)
        assert got["mid"] == (want_mid, None), f"round {r}: mid got {got['mid']}, naive submodel {want_mid}"
        assert want_mid == (2 if r == 1 else 1), f"round {r}: the test's mid speed is wrong ({want_mid})"
        assert got["slow"][0] == 0, f"round {r}: the slow client got submodel {got['slow'][0]}"
        if not fit:
            assert got["slow"][1] is None, f"round {r}: fit_steps off, yet the slow client's steps were cut"
            continue
        cap = got["slow"][1]
        assert cap is not None, f"round {r}: the slow client got its whole task, which it cannot finish"
        assert fits(slow, 0, cap) and not fits(slow, 0, cap + 1), f"round {r}: slow got {cap} steps"
    if fit:
        first, second = (next(i.train.max_steps for i in s if i.node == "slow") for s in grid.sent)
        assert first is not None and second is not None and second < first, (
            f"the carried pass did not shorten the slow client's task ({first} then {second} steps)"
        )
