"""Which submodel each selected client trains: its capacity (a device tier) and the round's assignment.

A client's *capacity* is an index into the run's gammas: the largest parameter ratio it can afford.
``static``: the tier the device declared (``nefl-edge join --tier``; none: the smallest).
``deadline``: the largest tier whose submodel the device can train within ``margin`` of the round deadline,
projected from the throughput the device measured on a probe submodel and scaled by forward MFLOPs. When the
round's tasks carry the previous round's federated BatchNorm statistics (``Task.bn_stats``: the device first
runs forward passes over up to ``bn_max_batches`` batches of its training split), that pass is priced too
(:func:`statistics_samples`, :data:`FORWARD_SHARE`). A device that cannot fit even the smallest submodel's
planned steps is given fewer local steps (:func:`affordable_steps`, ``RunConfig.fit_steps``) rather than a task
it would decline every round.

The strategy then maps a capacity to one of its submodels (``Strategy.assign``). With ``cover`` the
assignment is rebalanced so that every submodel of the method gets at least one client when the selected
clients can afford it: a client may always train a smaller submodel than it can afford, as in the paper,
where each client trains the submodel its tier allows and the tiers cover every submodel.

When the selected clients cannot cover every submodel in one round (six devices, five submodels, two of the
devices limited to the smallest), :func:`assign` spreads the gap over rounds: the uncovered submodel trained
least recently gets the donor first (``last_trained``), and under the deadline policy with ``fit_steps`` a
client with a duplicate on its submodel may train one tier above its capacity, with the local steps that fit
(``stretch``). Nested weights do not make this unnecessary: a submodel's own slice (its widest channels and
deepest blocks) and its BatchNorm and step-size parameters are trained only by the clients that train it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Mapping, Optional

import numpy as np

from nefl_edge.coordinator.strategies import Plan, Strategy
from nefl_edge.core.schedule import planned_steps
from nefl_edge.core.schemas import DeviceProfile, TrainConfig
from nefl_edge.core.specs import ModelConfig, mflops

Policy = Literal["static", "deadline"]
DEADLINE_MARGIN = 0.7
"""Share of the deadline a projected local training may use: the rest absorbs download, upload, the
device's warm-up and the error of projecting from a probe submodel (tested in tests/test_engine.py)."""
FORWARD_SHARE = 1.0 / 3.0
"""A forward pass's share of one training step's compute per sample: the backward pass costs about twice the
forward (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1: 2N FLOPs a token forward,
6N forward and backward). The engine's speed evidence counts a carried statistics pass the same way; the
optimizer update and BatchNorm's statistics outputs are not counted."""


@dataclass(frozen=True)
class ClientInfo:
    """What the coordinator knows of a client when it plans a round."""

    node: str
    num_samples: int
    tier: Optional[int] = None
    profile: Optional[DeviceProfile] = None


def _rate(profile: DeviceProfile) -> Optional[float]:
    """Training MFLOP-samples a second (probe throughput x probe forward MFLOPs); None when the profile has no
    usable throughput. Every number a device sent is checked before use (never a division by it)."""
    speed, probe = profile.samples_per_s, profile.probe_mflops
    if speed is None or probe is None or not (math.isfinite(speed) and math.isfinite(probe)):
        return None
    if speed <= 1e-6 or probe <= 1e-6 or not math.isfinite(speed * probe):
        return None
    return speed * probe


def statistics_samples(num_samples: int, batch_size: int, max_batches: Optional[int]) -> int:
    """Samples a carried statistics pass runs forward on a training split of ``num_samples``: the batches of
    ``core.evaluation.stats_batches`` (consecutive, none smaller than two, at most ``max_batches``), counted
    without building them (the engine prices every client of a round)."""
    if batch_size < 2:  # its first batch already has no variance: no statistics at all
        return 0
    full, rest = divmod(max(0, num_samples), batch_size)
    sizes = full + (rest >= 2)
    if max_batches is not None and sizes > max_batches:
        return max_batches * batch_size
    return full * batch_size + (rest if rest >= 2 else 0)


def projected_seconds(
    profile: DeviceProfile,
    cost_mflops: float,
    num_samples: int,
    train: TrainConfig,
    stats_samples: int = 0,
    stats_mflops: float = 0.0,
) -> float:
    """Seconds a device needs for a task on a submodel of ``cost_mflops``: its planned local steps, plus, when
    the task carries a statistics pass, ``stats_samples`` forward passes of a submodel of ``stats_mflops``
    (:data:`FORWARD_SHARE` of a training sample each); ``inf`` when its profile has no usable throughput."""
    rate = _rate(profile)
    if rate is None or cost_mflops <= 0:
        return math.inf
    samples = planned_steps(num_samples, train) * train.batch_size
    return (samples * cost_mflops + FORWARD_SHARE * max(0, stats_samples) * max(0.0, stats_mflops)) / rate


def affordable_steps(
    profile: Optional[DeviceProfile],
    cost_mflops: float,
    num_samples: int,
    train: TrainConfig,
    limit_s: float,
    stats_samples: int = 0,
    stats_mflops: float = 0.0,
) -> Optional[int]:
    """The local steps a device can take within ``limit_s`` (the deadline's margin) after its carried
    statistics pass, when that is fewer than the task's planned steps; None when the whole task fits or the
    profile has no usable throughput (nothing to go on). At least one step: the device's own pace check still
    declines a task it cannot finish.

    This is FedProx's "variable amount of local work" (Li et al., MLSys 2020, arXiv 1812.06127, sec. 3): a
    straggler sends a partial solution instead of being dropped. As in FedProx, and unlike FedNova (Wang et al.,
    NeurIPS 2020, arXiv 2007.07481), the update keeps its sample-count weight in the aggregation: FedNova
    divides each update by its local steps to remove the objective inconsistency that unequal local work
    brings; we depart from it so that a slow device's data is not discounted for its hardware (the data that
    only slow devices hold would otherwise weigh less than its share)."""
    if profile is None:
        return None
    rate = _rate(profile)
    if rate is None or cost_mflops <= 0:
        return None
    planned = planned_steps(num_samples, train)
    if projected_seconds(profile, cost_mflops, num_samples, train, stats_samples, stats_mflops) <= limit_s:
        return None
    step_s = train.batch_size * cost_mflops / rate
    left = limit_s - FORWARD_SHARE * max(0, stats_samples) * max(0.0, stats_mflops) / rate
    return max(1, min(planned - 1, math.floor(left / step_s)))


def task_mflops(config: ModelConfig, plan: Plan, index: int) -> float:
    """Forward MFLOPs that price a task on submodel ``index``: the submodel's, plus the smallest submodel's
    when the method also trains it in the same step (``Plan.distill_smallest``; its forward and backward
    scale like any submodel's; the teacher's logits are the forward already counted)."""
    cost = mflops(config, plan.specs[index])
    if plan.distill_smallest and index != 0:
        cost += mflops(config, plan.specs[0])
    return cost


def capacity(
    client: ClientInfo,
    policy: Policy,
    plan: Plan,
    config: ModelConfig,
    train: TrainConfig,
    deadline_s: float,
    margin: float = DEADLINE_MARGIN,
    stats_samples: int = 0,
) -> int:
    """The client's capacity tier (an index into the run's gammas) under ``policy``: under ``deadline`` the
    largest whose task fits ``margin * deadline_s``, a carried statistics pass of ``stats_samples`` on that
    submodel included (:func:`projected_seconds`); the smallest when none fits."""
    tiers = len(plan.tier_submodel)
    if policy == "static" or client.profile is None:
        return min(client.tier, tiers - 1) if client.tier is not None else 0
    best = 0
    for tier, index in enumerate(plan.tier_submodel):
        if index is None:
            continue
        cost = task_mflops(config, plan, index)
        pass_cost = mflops(config, plan.specs[index]) if stats_samples else 0.0  # the task's submodel alone
        seconds = projected_seconds(client.profile, cost, client.num_samples, train, stats_samples, pass_cost)
        if seconds <= margin * deadline_s:
            best = tier
    return best


def window_tiers(plan: Plan, tier: int, window: int) -> list[int]:
    """The tiers a client of capacity ``tier`` may train this round under a tier window: ``tier - window``
    .. ``tier + window``, clipped to the run's tiers, keeping those the method gives a submodel (the client's
    own tier alone when none of them has one)."""
    last = len(plan.tier_submodel) - 1
    tier = min(max(tier, 0), last)
    tiers = [t for t in range(max(0, tier - window), min(last, tier + window) + 1) if plan.tier_submodel[t] is not None]
    return tiers or [tier]


def assign(
    strategy: Strategy,
    plan: Plan,
    capacities: dict[str, int],
    selected: list[str],
    cover: bool,
    speeds: Optional[dict[str, float]] = None,
    rng: Optional[np.random.Generator] = None,
    window: int = 0,
    window_rng: Optional[np.random.Generator] = None,
    unreliable: frozenset[str] = frozenset(),
    unproven: frozenset[str] = frozenset(),
    last_trained: Optional[Mapping[int, int]] = None,
    stretch: bool = False,
) -> dict[str, int]:
    """Submodel per selected client. With ``window`` (and its generator ``window_rng``), a client of capacity
    ``t`` trains the submodel of a tier drawn uniformly from :func:`window_tiers`, as the paper's code does
    every round (its tiers are nominal: the draw may exceed the capacity). With ``cover``, a submodel no
    client got goes to a client that can afford it and is not the only one on its own submodel: the weakest
    (lowest capacity, then lowest measured speed, ``speeds``), so fast devices keep the large submodels; or,
    with ``rng``, one drawn at random, so that over the rounds every submodel's own parameters see the data
    of many devices. A client of ``unreliable`` (one that left a task unanswered lately) is never the only
    cover of a submodel: where it is, a reliable client that is not the only one on its own submodel and can
    afford it trains that submodel too. A client of ``unproven`` (no update of it kept yet: new to the run, or
    its last one was rejected or left out) is never the only cover either: a second client joins it, a proven
    one where there is one (the engine passes ``unproven`` with ``aggregation = "robust"``: a device that
    claims a tier nobody else has and then never answers would otherwise take that submodel's first round,
    issue 22). This departs from the paper, where every client trains the submodel of its tier.

    When the donors cannot cover every submodel at once, the rule spreads the gap over rounds. The uncovered
    submodels are served in the order of ``last_trained`` (submodel -> the last round a client's update of it
    was kept; never trained first; among equals the larger first, the one fewer clients can move down to;
    without it, the lowest index first as before), so the one trained least recently gets the donor. With
    ``stretch`` (the engine passes it under the deadline policy with ``fit_steps``), a submodel that no donor
    can take goes to a client that shares a smaller submodel with another client and whose tier one above its
    capacity reaches it (the highest capacity, then the fastest; never drawn, even with ``rng``); the engine
    gives that client the local steps that fit its deadline (:func:`affordable_steps`, FedProx's partial
    work). Where this departs from NeFL (Kang et al. 2023, arXiv 2308.07761): the paper assigns each client
    the submodel its capacity allows; the authors' code (``honggkang/nested-federated-learning``) draws each
    client's submodel every round from a window around its tier, which may exceed the capacity (``window``
    here), so that over the rounds every submodel is drawn. The recency order and the one-tier stretch are
    ours: they give every submodel a client every few rounds on a fleet too small or too slow to cover them
    all, without drawing tiers a slow device cannot meet (tests/test_assignment.py models the rule naively on
    the bench-device fleet's capacities)."""
    if window and window_rng is not None:
        drawn = {n: int(window_rng.choice(window_tiers(plan, capacities[n], window))) for n in sorted(selected)}
        afford = {n: strategy.assign(plan, drawn[n]) for n in selected}
    else:
        afford = {n: strategy.assign(plan, capacities[n]) for n in selected}
    out = {n: k for n, k in afford.items() if k is not None}
    if not cover and not unreliable and not unproven:
        return out
    speeds = speeds or {}
    order = list(range(len(plan.specs)))
    if last_trained is not None:  # the least recently trained first (never: first of all), then the larger
        order.sort(key=lambda k: (last_trained.get(k, -1), -k))
    last_tier = len(plan.tier_submodel) - 1
    for missing in order:
        covers = [n for n, k in out.items() if k == missing]
        trusted = [n for n in covers if n not in unreliable]
        if trusted and (len(trusted) > 1 or trusted[0] not in unproven):
            continue
        if not covers and not cover:
            continue
        counts = Counter(k for n, k in out.items() if n not in unreliable)
        donors = [n for n, k in out.items() if k > missing and counts[k] > 1 and n not in unreliable]
        donors = [n for n in donors if n not in unproven] or donors
        if not donors and stretch and cover and not covers:
            donors = _stretch_donors(strategy, plan, capacities, out, counts, missing, last_tier)
            donors = [n for n in donors if n not in unreliable and n not in unproven]
            if donors:  # the strongest, never a draw: the stretched task loses the fewest of its steps
                out[max(sorted(donors), key=lambda n: (capacities[n], speeds.get(n, 0.0)))] = missing
            continue
        if not donors:
            continue
        if rng is not None:
            node = str(rng.choice(sorted(donors)))
        else:
            node = min(sorted(donors), key=lambda n: (capacities[n], speeds.get(n, 0.0)))
        out[node] = missing
    return out


def _stretch_donors(
    strategy: Strategy,
    plan: Plan,
    capacities: dict[str, int],
    out: dict[str, int],
    counts: Counter[int],
    missing: int,
    last_tier: int,
) -> list[str]:
    """Clients that may train submodel ``missing`` one tier above their capacity: another client shares their
    current submodel, which is smaller than ``missing``, and the submodel of their capacity's next tier is at
    least ``missing``."""
    found = []
    for n, k in out.items():
        if k >= missing or counts[k] < 2 or capacities[n] >= last_tier:
            continue
        reach = strategy.assign(plan, capacities[n] + 1)
        if reach is not None and reach >= missing:
            found.append(n)
    return found
