"""The deadline policy's projection (issue 23): a task's planned local steps plus, when the round's tasks carry the
previous round's federated BatchNorm statistics (``Task.bn_stats``), the forward passes of that statistics pass;
and a device that cannot fit even the smallest submodel gets fewer local steps instead of a task it declines.
Every expectation is computed here, naively, from the profile's numbers and ``core.evaluation.stats_batches``."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pytest

from nefl_edge.coordinator.assignment import (
    DEADLINE_MARGIN,
    ClientInfo,
    affordable_steps,
    assign,
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


# The bench-device fleet (tests/hil/fleets/bench-device.toml) as the second fleet run saw it with the pass
# priced (docs/benchmarks.md, device-correlated section): capacities per device, and its class speeds.
FLEET_SPEEDS = {"pi-zero-2w-0": 1.0, "pi-zero-2w-1": 1.0, "pi4-0": 3.5, "pi4-1": 3.5, "pi5-0": 9.0, "orin-nano-0": 10.0}
FLEET_CAPACITIES = {
    "nefl-wd": {"pi-zero-2w-0": 0, "pi-zero-2w-1": 0, "pi4-0": 1, "pi4-1": 1, "pi5-0": 4, "orin-nano-0": 4},
    "nefl-wd-distill": {"pi-zero-2w-0": 0, "pi-zero-2w-1": 0, "pi4-0": 0, "pi4-1": 0, "pi5-0": 4, "orin-nano-0": 4},
}


def naive_cover(caps: dict[str, int], last: dict[int, int], stretch: bool, subs: int = 5) -> dict[str, int]:
    """The cover rule written out for a method whose tier t is submodel t (nefl-wd, 5 gammas), every client
    reliable and proven, the ``weakest`` rule: each uncovered submodel, least recently trained first (ties: the
    larger first), goes to the weakest client on a larger submodel that another client shares; failing that,
    with ``stretch``, to the strongest client one tier below it or further whose submodel another client
    shares and whose capacity + 1 reaches it."""
    out = dict(caps)
    for m in sorted(range(subs), key=lambda k: (last.get(k, -1), -k)):
        if m in out.values():
            continue
        shared = [n for n in sorted(out) if list(out.values()).count(out[n]) >= 2]
        down = [n for n in shared if out[n] > m]
        up = [n for n in shared if out[n] < m <= caps[n] + 1] if stretch else []
        if down:
            out[min(down, key=lambda n: (caps[n], FLEET_SPEEDS[n]))] = m
        elif up:
            out[max(up, key=lambda n: (caps[n], FLEET_SPEEDS[n]))] = m
    return out


@pytest.mark.parametrize("stretch", [True, False])
@pytest.mark.parametrize("method", ["nefl-wd", "nefl-wd-distill"])
def test_on_the_bench_device_fleet_every_submodel_is_trained_every_few_rounds(method: str, stretch: bool) -> None:
    # Prepare: the fleet's capacities; 6 devices for 5 submodels, two or four of them limited to submodel 0
    strategy = get_strategy(method)
    _, plan = strategy.setup(get_model_config("resnet-small", "fmnist"), (0.2, 0.4, 0.6, 0.8, 1.0))
    caps = FLEET_CAPACITIES[method]
    last: dict[int, int] = {}
    rounds: list[dict[str, int]] = []

    # Execute: 30 rounds, every assigned client's update kept (the engine's last_trained)
    for r in range(1, 31):
        got = assign(strategy, plan, caps, sorted(caps), True, FLEET_SPEEDS, None, 0, None,
                     last_trained=last, stretch=stretch)  # fmt: skip
        want = naive_cover(caps, last, stretch)
        assert got == want, f"{method}, stretch {stretch}, round {r}: {got}; naive {want}"
        rounds.append(got)
        last.update({k: r for k in got.values()})

    # Assert: the longest run of rounds without each submodel, and nobody beyond its capacity (+ 1 stretched)
    k_max = {("nefl-wd", True): 1, ("nefl-wd", False): 2, ("nefl-wd-distill", True): 2}
    k_max[("nefl-wd-distill", False)] = 3
    for k in range(5):
        trained_in = [r for r, got in enumerate(rounds, start=1) if k in got.values()]
        gaps = [b - a for a, b in zip([0, *trained_in], [*trained_in, len(rounds) + 1])]
        assert max(gaps) <= k_max[method, stretch], (
            f"{method}, stretch {stretch}: submodel {k} trained in rounds {trained_in}, a gap of {max(gaps)} "
            f"rounds > {k_max[method, stretch]}"
        )
    for got in rounds:
        over = {n: k for n, k in got.items() if k > caps[n] + (1 if stretch else 0)}
        assert not over, f"{method}, stretch {stretch}: clients beyond their capacity: {over} ({caps})"
    # the old order (lowest uncovered submodel first, no history, no stretch) leaves one submodel untrained
    old = assign(strategy, plan, caps, sorted(caps), True, FLEET_SPEEDS)
    assert len(set(old.values())) < 5, f"{method}: the old rule already covered every submodel: {old}"


def test_a_stretched_client_is_the_strongest_that_reaches_and_keeps_its_submodel_covered() -> None:
    strategy = get_strategy("nefl-wd")
    _, plan = strategy.setup(get_model_config("resnet-small", "fmnist"), (0.2, 0.4, 0.6, 0.8, 1.0))
    speeds = {"a": 1.0, "b": 2.0, "c": 3.0}
    # a and b share submodel 1, c is alone on 0: submodel 2 goes to b (faster of the two), never to c
    got = assign(strategy, plan, {"a": 1, "b": 1, "c": 0}, ["a", "b", "c"], True, speeds, stretch=True)
    assert got == {"a": 1, "b": 2, "c": 0}, f"stretch to submodel 2: {got}"
    # three on submodel 1: the weakest goes down to 0, the fastest up to 2; 3 and 4 are beyond one tier
    got = assign(strategy, plan, {"a": 1, "b": 1, "c": 1}, ["a", "b", "c"], True, speeds, stretch=True)
    assert got == {"a": 0, "b": 1, "c": 2}, f"down to 0 (weakest) and up to 2 (fastest), nothing further: {got}"
    # a random cover rule does not draw the stretched client: it is still the fastest
    rng = np.random.default_rng(0)
    fast_a = {"a": 5.0, "b": 2.0, "c": 3.0}
    for _ in range(10):
        got = assign(strategy, plan, {"a": 1, "b": 1, "c": 0}, ["a", "b", "c"], True, fast_a, rng, stretch=True)
        assert got == {"a": 2, "b": 1, "c": 0}, f"random rule: the stretched client was drawn: {got}"
    # an unreliable client is never stretched; without stretch nothing moves up
    caps = {"a": 1, "b": 1, "c": 0}
    got = assign(strategy, plan, caps, ["a", "b", "c"], True, speeds, stretch=True, unreliable=frozenset("b"))
    assert got == caps, f"an unreliable client stretched, or its partner left alone: {got}"
    assert assign(strategy, plan, caps, ["a", "b", "c"], True, speeds) == caps, "moved up without stretch"


def test_the_engine_stretches_a_shared_client_to_the_uncovered_submodel_with_the_steps_that_fit() -> None:
    # Prepare: "a" and "b" fit submodel 0's planned steps but not submodel 1's (b is the faster); "c" fits all.
    # Without the stretch submodel 1 has no donor (c is alone on 2) and stays untrained every round.
    strategy = get_strategy("nefl-wd")
    config, plan = strategy.setup(get_model_config("resnet-small", "fmnist"), GAMMAS)
    costs = [mflops(config, s) for s in plan.specs]
    n, batch, deadline = 160, 32, 1e6
    limit = DEADLINE_MARGIN * deadline
    data = load_dataset(None, "train")
    shards = {name: Dataset(data.x[i * n : (i + 1) * n], data.y[i * n : (i + 1) * n], name) for i, name in
              enumerate(("a", "b", "c"))}  # fmt: skip
    at_one = naive_seconds(1.0, costs[0], costs[1], n, batch, n // batch, 0, 0.0) / limit  # submodel 1 just fits
    speeds = {"a": 0.7 * at_one, "b": 0.8 * at_one, "c": 1e6}
    profiles = {k: DeviceProfile(**PROFILE, samples_per_s=v, probe_mflops=costs[0]) for k, v in speeds.items()}
    for k in ("a", "b"):
        assert naive_seconds(speeds[k], costs[0], costs[0], n, batch, n // batch, 0, 0.0) <= limit, f"{k}: no fit"
    cfg = RunConfig(
        gammas=list(GAMMAS), bn="tracked", evaluation="test", policy="deadline", deadline_s=deadline, rounds=3,
        eval_every=100, fraction=1.0, min_clients=3, cover_submodels=True, cover_rule="weakest",
        train=TrainConfig(lr=0.05, batch_size=batch),
    )  # fmt: skip
    engine = RoundEngine(strategy, cfg, config, plan)
    grid = RecordingGrid(shards, profiles)
    state = init_global_state(config, plan.specs, initial_consistent(config, 3), 3)

    # Execute: three rounds
    run_rounds(engine, grid, state, 0, lambda *args: None)

    # Assert: every round b (the faster of the two sharing submodel 0) trains submodel 1 with the steps that fit
    assert len(grid.sent) == 3, f"{len(grid.sent)} rounds of tasks"
    for r, sent in enumerate(grid.sent, start=1):
        got = {i.node: (i.submodel, i.train.max_steps) for i in sent}
        steps = got["b"][1]
        assert got["a"] == (0, None) and got["c"] == (2, None), f"round {r}: {got}"
        assert got["b"][0] == 1 and steps is not None, f"round {r}: b was not stretched to submodel 1: {got}"

        def t(s: int) -> float:
            return naive_seconds(speeds["b"], costs[0], costs[1], n, batch, s, 0, 0.0)

        assert t(steps) <= limit < t(steps + 1), f"round {r}: b got {steps} steps; naive {t(steps)}, {t(steps + 1)}"
    assert engine.last_trained == {0: 3, 1: 3, 2: 3}, f"the engine's record of trained rounds: {engine.last_trained}"
