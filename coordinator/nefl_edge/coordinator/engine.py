"""The round engine: one federated round, the same for ``serve`` (devices over MQTT) and ``simulate``.

A round, in order: the grid lists the available clients; each gets a capacity (``assignment.capacity``);
the strategy selects clients and maps capacities to its submodels (``assignment.assign``, which can make
sure every submodel is trained); every selected client gets an instruction with its own seed; the grid
delivers them (the strategy's ``extract`` of the round makes each client's weights) and yields outcomes;
each update is screened (``screening.screen``) and folded into the strategy's aggregator (NeFedAvg by default);
with at least ``min_updates`` valid updates the aggregate replaces the global state. BatchNorm statistics
are re-estimated on the held-out calibration samples where the model is evaluated (``coordinator.cadence``).

On an evaluation round (``evaluate_at``) the round ends with the grid's evaluation step
(:meth:`RoundEngine.evaluation_step`): with ``bn = "federated"`` the round's clients first send the
BatchNorm batch statistics of the aggregated weights on their training split and the engine sets every
submodel's statistics to their exact combination; with federated evaluation the clients then evaluate every
submodel they can run on their held-out split (``eval_fraction`` of their data, never trained on), and
``report.federated`` holds the sample-weighted result per submodel.

Statistics carried by the next round (``carry_statistics``, set by ``cadence.run_rounds``, the loop of
``serve`` and ``simulate``): with ``bn = "federated"``, evaluation on the coordinator's side and a strategy
whose training weights are its deployed submodels (``Strategy.tracked_bn``), an evaluated round other than the
last sends no statistics round trip of its own. Round r+1's training tasks carry the request instead: each
device computes the statistics of the weights it received (state r's submodel it is about to train) on its
training split before training and sends them before its update (:meth:`Grid.run_carrying`; an in-process grid
answers the same requests with its :meth:`Grid.evaluate` before the round's training). State r gets them once round
r+1 has collected (:meth:`RoundEngine.owes` says a round waits for that) and before round r+1 aggregates, so
the state r+1 aggregates from carries them, as before. Round r's report gets the phase
``bn_statistics_carried``: from round r+1's tasks going out to the last statistics in (it overlaps round r+1's
training). Departures from the step after aggregation: the statistics of state r come from round r+1's
devices, each on the submodel it is assigned there (a submodel no device of round r+1 trains keeps its
previous statistics); the last round keeps its own round trip. Robust aggregation (a majority per submodel)
and federated evaluation (on the re-estimated statistics, a trip after them) keep the step after
aggregation.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

import numpy as np

from nefl_edge.coordinator.assignment import (
    DEADLINE_MARGIN,
    FORWARD_SHARE,
    ClientInfo,
    affordable_steps,
    assign,
    capacity,
    statistics_samples,
    task_mflops,
)
from nefl_edge.coordinator.config import ConfigError, RunConfig, evaluates
from nefl_edge.coordinator.grid import EvalOutcome, EvalRequest, Grid, Instruction, Outcome
from nefl_edge.coordinator.screening import MAX_SAMPLES, Quarantine, SpeedEvidence, UpdateRejected, screen
from nefl_edge.coordinator.strategies import Aggregator, Plan, Strategy
from nefl_edge.core.evaluation import BnStats, EvalResult, bn_channels
from nefl_edge.core.nested import GlobalState
from nefl_edge.core.schedule import planned_steps
from nefl_edge.core.schemas import TrainConfig
from nefl_edge.core.specs import ModelConfig, mflops, param_layout

log = logging.getLogger(__name__)


@dataclass
class Owed:
    """An evaluated round whose BatchNorm statistics the next round's tasks carry: its state and report (both
    completed in place by the next :meth:`RoundEngine.run_round`)."""

    round: int
    state: GlobalState
    report: RoundReport


@dataclass
class RoundReport:
    """What happened in one round; one line per submodel of it goes to ``metrics.jsonl``."""

    round: int
    selected: int = 0
    updates: int = 0
    declined: int = 0
    dropped: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0
    quarantined_nodes: list[str] = field(default_factory=list)
    """The clients sitting out this round (strikes: rejected updates, unanswered tasks, left-out updates)."""
    robust: dict[str, Any] = field(default_factory=dict)
    """``aggregation = "robust"``: clients clipped (factor), left out for disagreeing, weight-capped."""
    bn_rejected: dict[int, list[str]] = field(default_factory=dict)
    distrusted: dict[str, str] = field(default_factory=dict)
    """Devices whose declared speed their answers contradicted this round (capacity from delivered speed)."""
    """Robust BatchNorm statistics: per submodel, the devices whose statistics were far from the rest."""
    untrained: list[int] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    aggregated: bool = False
    seconds: float = 0.0
    started_at: float = 0.0  # wall-clock (Unix) time the round started and ended
    ended_at: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    clients: list[dict[str, Any]] = field(default_factory=list)
    federated: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Federated evaluation per submodel: accuracy, loss, samples, devices (empty when not evaluated)."""
    bn_batches: dict[int, int] = field(default_factory=dict)
    """Federated BatchNorm re-estimation: batches combined per submodel."""


class RoundEngine:
    """Runs rounds of ``strategy`` under ``cfg`` over any grid; owns the selection generator and the
    quarantine (both are saved in checkpoints)."""

    def __init__(
        self,
        strategy: Strategy,
        cfg: RunConfig,
        config: ModelConfig,
        plan: Plan,
        calibration: Optional[np.ndarray] = None,
    ) -> None:
        if cfg.bn == "tracked" and not strategy.tracked_bn:
            raise ConfigError(
                f"bn = tracked: {strategy.name} moves its channel window every round, so the devices' running "
                "statistics would not fit its deployed submodels; use --bn federated or --bn server"
            )
        self.strategy, self.cfg, self.config, self.plan = strategy, cfg, config, plan
        self.calibration = calibration
        self.rng = np.random.default_rng(cfg.seed)
        self.quarantine = Quarantine(cfg.quarantine_strikes, cfg.quarantine_rounds)
        self.evidence = SpeedEvidence()
        """Declared speeds against delivered ones: a device's capacity follows what it delivers."""
        self._profiles: dict[str, Any] = {}
        self.shapes = [{n: p.shape for n, p in param_layout(config, spec).items()} for spec in plan.specs]
        self.bn_channels = [bn_channels(shapes) for shapes in self.shapes]
        self.update_shapes = [strategy.update_shapes(config, plan, k) for k in range(len(plan.specs))]
        self.mflops = [task_mflops(config, plan, k) for k in range(len(plan.specs))]
        """Forward MFLOPs per submodel (the speed evidence of every answer needs them; computed once)."""
        self.pass_mflops = [mflops(config, spec) for spec in plan.specs]
        """Forward MFLOPs of a carried statistics pass per submodel (the submodel alone, without a student)."""
        self._task_train: dict[str, TrainConfig] = {}
        """This round's clients whose task has fewer local steps than planned (``fit_steps``): their train."""
        self.declared: dict[str, int] = {}
        """Samples each client of the current round declared (its hello): what its evaluation may claim."""
        self.federated_eval = cfg.evaluation in ("federated", "both")
        """Whether clients evaluate on held-out splits (the caller resolves ``evaluation = "auto"``)."""
        self.evaluate_at: Callable[[int], bool] = lambda r: evaluates(cfg, r)
        """Whether round ``r`` ends with the evaluation step (the caller's evaluation cadence)."""
        self.carry_statistics = False
        """Whether an evaluated round's ``bn = "federated"`` statistics may come with the next round's tasks
        (see the module docstring; ``cadence.run_rounds`` sets it, the caller then finishes a round that
        :meth:`owes` them after the next one)."""
        self.owed: Optional[Owed] = None
        self.last_trained: dict[int, int] = {}
        """The last round in which an update of each submodel was kept (the cover rule serves the submodel
        trained least recently first: ``assignment.assign``)."""

    @property
    def carries(self) -> bool:
        """Whether this run's federated statistics can ride on the next round's tasks (module docstring)."""
        cfg = self.cfg
        return (
            self.carry_statistics
            and cfg.bn == "federated"
            and self.strategy.tracked_bn
            and cfg.aggregation != "robust"
            and not self.federated_eval
        )

    def owes(self, r: int) -> bool:
        """Whether round ``r``'s statistics are still to come, with the next round's tasks."""
        return self.owed is not None and self.owed.round == r

    @property
    def bn_max_batches(self) -> Optional[int]:
        """The most batches a device sums statistics over (``bn_device_samples``; None: all)."""
        batch = self.cfg.train.batch_size
        return -(-self.cfg.bn_device_samples // batch) if self.cfg.bn_device_samples else None

    def run_round(
        self, r: int, state: GlobalState, grid: Grid, stop: Optional[threading.Event] = None
    ) -> tuple[GlobalState, RoundReport]:
        cfg, report = self.cfg, RoundReport(r, started_at=time.time())
        started = time.monotonic()
        clients = grid.clients(cfg.min_clients)
        self.declared = {n: c.num_samples for n, c in clients.items()}
        self._profiles = {n: c.profile for n, c in clients.items()}
        clients = {n: replace(c, profile=self.evidence.profile(n, c.profile)) for n, c in clients.items()}
        report.phases["waiting"] = time.monotonic() - started
        # this round's tasks carry the last round's statistics pass: the deadline projection prices it
        carried = self.owed is not None and self.owed.state is state
        batch, max_batches = cfg.train.batch_size, self.bn_max_batches
        passes = {
            n: statistics_samples(c.num_samples, batch, max_batches) if carried else 0 for n, c in clients.items()
        }
        caps = {
            n: capacity(c, cfg.policy, self.plan, self.config, cfg.train, cfg.deadline_s, stats_samples=passes[n])
            for n, c in clients.items()
        }
        blocked = self.quarantine.active(r)
        report.quarantined, report.quarantined_nodes = len(blocked), blocked
        pool = [n for n in caps if n not in blocked and self.strategy.assign(self.plan, caps[n]) is not None]
        selected = self.strategy.select(self.rng, pool, cfg.fraction, cfg.min_clients)
        speeds = {n: c.profile.samples_per_s or 0.0 for n, c in clients.items() if c.profile is not None}
        rotate = self.rng if cfg.cover_rule == "random" else None
        unreliable = frozenset(n for n in selected if self.quarantine.dropped_recently(n, r))
        robust = cfg.aggregation == "robust"  # robust mode also gives an unproven only cover a second client
        unproven = frozenset(n for n in selected if robust and not self.quarantine.proven(n))
        assignment = assign(
            self.strategy,
            self.plan,
            caps,
            selected,
            cfg.cover_submodels,
            speeds,
            rotate,
            cfg.tier_window,
            self.rng,
            unreliable,
            unproven,
            self.last_trained,
            cfg.policy == "deadline" and cfg.fit_steps,  # one tier up for an uncovered submodel, its steps fit
        )
        lr, holdout = cfg.lr_at(r), self.holdout  # once a round, not once per client (10,000 at scale)
        instructions = [
            Instruction(
                n,
                assignment[n],
                cfg.train.model_copy(
                    update={"seed": int(self.rng.integers(1 << 31)), "lr": lr, "eval_fraction": holdout}
                ),
            )
            for n in selected
        ]
        self._task_train = {}
        if cfg.policy == "deadline" and cfg.fit_steps:
            instructions = [self._fit_steps(i, clients[i.node], passes[i.node]) for i in instructions]
            if self._task_train:
                log.info("round %d: %d clients get fewer local steps to fit the deadline", r, len(self._task_train))
        report.selected = len(instructions)
        if len(assignment) <= 50:
            log.info("round %d: %d clients, submodels %s", r, len(instructions), dict(sorted(assignment.items())))
        else:  # a fleet's whole map is a line of 200 KB at 10,000 devices, every round: clients per submodel
            shares = dict(sorted(Counter(assignment.values()).items()))
            log.info("round %d: %d clients, by submodel %s (clients.jsonl: who)", r, len(instructions), shares)
        out_before = grid.bytes_out
        agg = self.strategy.aggregator(state, cfg.weighting, r, cfg.robust_options())
        extract = functools.partial(self.strategy.extract, round_=r)
        references = {k: extract(state, k) for k in sorted(set(assignment.values()))} if cfg.update_norm_bound else {}
        collecting = time.monotonic()
        owed, self.owed = self.owed, None
        if owed is not None and owed.state is not state:  # the caller went on from another state: not these
            owed = None
        parts: dict[int, list[tuple[str, BnStats]]] = {}
        outcomes: Iterator[Union[Outcome, EvalOutcome]] = iter(())
        if owed is None:
            outcomes = grid.run(r, state, instructions, extract)
        else:
            outcomes = grid.run_carrying(r, state, instructions, extract, self.bn_max_batches)
        for outcome in outcomes:
            if isinstance(outcome, EvalOutcome):
                assert owed is not None
                for k, stats in self._screen_evaluation(r, outcome, owed.report, self.bn_max_batches)[1].items():
                    parts.setdefault(k, []).append((outcome.node, stats))
                owed.report.phases["bn_statistics_carried"] = time.monotonic() - collecting
            else:
                self._fold(r, outcome, clients[outcome.node].num_samples, references, agg, report, owed is not None)
            if stop is not None and stop.is_set():
                break
        if grid.publish_s is not None:  # seconds to publish the weights and tasks (MQTT)
            report.phases["publish"] = grid.publish_s
        if owed is not None:  # before aggregating: the next state starts from these statistics, as before
            self._apply_statistics(owed.round, owed.state, parts, owed.report)
        report.bytes_out = grid.bytes_out - out_before
        for reason, count in grid.rejections().items():
            report.rejected[reason] = report.rejected.get(reason, 0) + count
        for node in grid.offenders():  # refused traffic over budget (MQTT grids)
            self.quarantine.block(node, r, "refused traffic over budget")
            report.rejected["over_budget"] = report.rejected.get("over_budget", 0) + 1
        report.phases["training"] = time.monotonic() - collecting
        aggregating = time.monotonic()
        trained = Counter(c["submodel"] for c in report.clients if c["status"] == "updated")
        report.untrained = [k for k in range(len(self.plan.specs)) if not trained[k]]
        self.last_trained.update({k: r for k in trained})
        if report.updates >= cfg.min_updates:
            state = agg.result()
            report.aggregated = True
            self._robust_outcome(r, agg, report)
        else:
            log.warning(
                "round %d: %d valid updates < min_updates=%d; keeping the previous global model",
                r,
                report.updates,
                cfg.min_updates,
            )
            state = self.strategy.keep(state, r)
        report.phases["aggregation"] = time.monotonic() - aggregating
        if report.aggregated and self.evaluate_at(r) and not (stop is not None and stop.is_set()):
            if self.carries and r < cfg.rounds:
                self.owed = Owed(r, state, report)
            else:
                answered = [c["node"] for c in report.clients if c["status"] != "dropped"]
                self.evaluation_step(r, state, grid, {n: caps[n] for n in answered}, report)
        report.seconds = time.monotonic() - started
        report.ended_at = time.time()
        return state, report

    def _robust_outcome(self, r: int, agg: Aggregator, report: RoundReport) -> None:
        """Record what the robust aggregation did; a left-out update is a strike for its client."""
        done = agg.robust_report
        if self.cfg.aggregation == "robust":
            report.robust = {
                "clipped": {n: round(f, 4) for n, f in sorted(done.clipped.items())},
                "left_out": list(done.disagreeing),
                "capped": list(done.capped),
            }
        for node in done.disagreeing:
            log.warning("round %d: robust aggregation left out the update of %s (it disagrees with the rest)", r, node)
            self.quarantine.strike(node, r, "update left out by robust aggregation", instead_of_good=True)

    @property
    def holdout(self) -> float:
        """The share of each client's data held out for evaluation (0 without federated evaluation)."""
        return self.cfg.eval_fraction if self.federated_eval else 0.0

    def evaluation_step(
        self, r: int, state: GlobalState, grid: Grid, caps: dict[str, int], report: RoundReport
    ) -> None:
        """Federated BatchNorm re-estimation (``bn = "federated"``: sets ``state``'s statistics) and federated
        evaluation of ``state`` by the clients of ``caps`` (node -> capacity). Statistics: each client on the
        submodel it trained this round, and on any submodel nobody trained that it can run (so the step costs
        a client about ``bn_device_samples`` forward passes); with ``aggregation = "robust"`` on every submodel
        it can run, so that each submodel's statistics have a majority to screen a liar against
        (``evaluation.robust_bn_parts``; up to one such pass per submodel). Evaluation: each client on every
        submodel up to the one it can run (``evaluation.federated_summary``: spread and disagreeing devices).
        Fills ``report.federated``, ``report.bn_batches`` and ``report.bn_rejected``."""
        # imported here: coordinator.evaluation imports torch, which the engine itself does not need
        from nefl_edge.coordinator.evaluation import federated_summary, recalibrate

        cfg = self.cfg
        runnable = {}
        for node, cap in sorted(caps.items()):
            top = self.strategy.assign(self.plan, cap)
            if top is not None:
                runnable[node] = tuple(range(top + 1))
        if not runnable:
            return
        started = time.monotonic()
        batch = cfg.train.batch_size
        max_batches = -(-cfg.bn_device_samples // batch) if cfg.bn_device_samples else None
        if cfg.bn == "federated":
            trained = {c["node"]: c["submodel"] for c in report.clients if c["status"] == "updated"}
            covered = set(trained.values())
            robust = self.cfg.aggregation == "robust"  # every device on every submodel it runs: a majority
            wanted = {
                n: tuple(k for k in subs if robust or k == trained.get(n) or k not in covered)
                for n, subs in runnable.items()
            }
            requests = [
                EvalRequest(n, subs, False, True, self.holdout, batch, max_batches)
                for n, subs in wanted.items()
                if subs
            ]
            parts: dict[int, list[tuple[str, BnStats]]] = {}
            for outcome in grid.evaluate(r, state, requests):
                for k, stats in self._screen_evaluation(r, outcome, report, max_batches)[1].items():
                    parts.setdefault(k, []).append((outcome.node, stats))
            self._apply_statistics(r, state, parts, report)
            report.phases["bn_statistics"] = time.monotonic() - started
        if not self.federated_eval:
            return
        evaluating = time.monotonic()
        model = state
        if cfg.bn == "server" and self.calibration is not None and len(self.calibration):
            model = state.copy()
            recalibrate(model, self.calibration)
        requests = [EvalRequest(n, subs, True, False, self.holdout, max(batch, 256)) for n, subs in runnable.items()]
        evaluations: dict[int, list[tuple[str, EvalResult]]] = {}
        for outcome in grid.evaluate(r, model, requests):
            for k, result in self._screen_evaluation(r, outcome, report)[0].items():
                evaluations.setdefault(k, []).append((outcome.node, result))
        for k, answers in sorted(evaluations.items()):
            summary = federated_summary(answers, cfg.aggregation == "robust", cfg.robust_max_weight)
            if summary["samples"]:
                report.federated[k] = summary
        report.phases["federated_evaluation"] = time.monotonic() - evaluating

    def _apply_statistics(
        self, r: int, state: GlobalState, parts: dict[int, list[tuple[str, BnStats]]], report: RoundReport
    ) -> None:
        """Set every submodel's BatchNorm statistics in ``state`` (round ``r``'s) to the exact combination of the
        devices' ``parts`` (robust aggregation: without the devices far from the rest); fills
        ``report.bn_batches`` and ``report.bn_rejected``."""
        from nefl_edge.coordinator.evaluation import apply_bn_stats, robust_bn_parts

        for k, found in sorted(parts.items()):
            if self.cfg.aggregation == "robust":
                kept, liars = robust_bn_parts(found, self.cfg.robust_max_weight)
                if liars:
                    report.bn_rejected[k] = liars
                    log.warning("round %d: BatchNorm statistics of %s for submodel %d left out", r, liars, k)
            else:
                kept = [stats for _, stats in found]
            report.bn_batches[k] = apply_bn_stats(state, k, kept)
        missing = [k for k in range(len(self.plan.specs)) if k not in report.bn_batches]
        if missing:
            log.warning("round %d: no BatchNorm statistics for submodels %s; they keep their previous ones", r, missing)

    def _fit_steps(self, instruction: Instruction, client: ClientInfo, stats_samples: int) -> Instruction:
        """``instruction`` with fewer local steps (``TrainConfig.max_steps``) when the client's projection
        cannot fit its submodel's planned steps, after the carried statistics pass, within the deadline's
        margin (``assignment.affordable_steps``); unchanged otherwise."""
        k = instruction.submodel
        steps = affordable_steps(
            client.profile,
            self.mflops[k],
            client.num_samples,
            instruction.train,
            DEADLINE_MARGIN * self.cfg.deadline_s,
            stats_samples,
            self.pass_mflops[k],
        )
        if steps is None:
            return instruction
        train = instruction.train.model_copy(update={"max_steps": steps})
        self._task_train[instruction.node] = train
        return replace(instruction, train=train)

    def _statistics_samples(self, outcome: Outcome) -> int:
        """The training samples a device's statistics pass runs over (at most ``bn_device_samples``)."""
        samples = outcome.num_samples or self.declared.get(outcome.node, 0)
        return min(samples, self.cfg.bn_device_samples) if self.cfg.bn_device_samples else samples

    def _screen_evaluation(
        self, r: int, outcome: EvalOutcome, report: RoundReport, max_batches: Optional[int] = None
    ) -> tuple[dict[int, EvalResult], dict[int, BnStats]]:
        """The valid parts of an evaluation outcome; a hostile or broken one is rejected whole and counted
        (``eval_<reason>`` in ``report.rejected``). A device may not claim more batches than it was asked for
        (``max_batches``) nor more held-out samples than its share (``eval_fraction``) of what it declared."""
        report.bytes_in += outcome.bytes_in
        if outcome.status != "evaluated":
            if outcome.status == "rejected":
                report.rejected["eval_rejected"] = report.rejected.get("eval_rejected", 0) + 1
            log.warning("round %d: evaluation by %s %s: %s", r, outcome.node, outcome.status, outcome.reason)
            return {}, {}
        limit = min(self.declared.get(outcome.node, MAX_SAMPLES), MAX_SAMPLES)
        held = int(np.ceil(self.holdout * limit)) + 1 if self.holdout > 0 else limit
        try:
            if any(b > limit or (max_batches is not None and b > max_batches) for b in outcome.bn_batches.values()):
                raise ValueError(f"batch count beyond the {limit} samples the client declared or {max_batches} asked")
            for k, result in outcome.results.items():
                if not 0 <= k < len(self.plan.specs):
                    raise ValueError(f"submodel {k} does not exist")
                if not (0 <= result.correct <= result.count <= held and np.isfinite(result.loss_sum)):
                    raise ValueError(f"submodel {k}: implausible counts {result} (at most {held} held out)")
                if result.loss_sum < 0:
                    raise ValueError(f"submodel {k}: negative loss")
            stats = {
                k: BnStats.from_tensors(outcome.bn_tensors.get(k, {}), outcome.bn_batches[k], self.bn_channels[k])
                for k in outcome.bn_batches
                if 0 <= k < len(self.plan.specs)
            }
            if set(outcome.bn_batches) - set(stats) or set(outcome.bn_tensors) - set(outcome.bn_batches):
                raise ValueError("statistics for submodels that do not exist or without a batch count")
        except ValueError as exc:
            report.rejected["eval_invalid"] = report.rejected.get("eval_invalid", 0) + 1
            log.warning("round %d: rejected the evaluation from %s: %s", r, outcome.node, exc)
            return {}, {}
        return outcome.results, stats

    def _fold(
        self,
        r: int,
        outcome: Outcome,
        declared: int,
        references: dict[int, Any],
        agg: Aggregator,
        report: RoundReport,
        carried: bool = False,
    ) -> None:
        """Screen and fold one outcome; record it and the speed it shows (``carried``: the task also asked for
        statistics before training, a forward pass over up to ``bn_device_samples`` samples, counted as a third
        of a training step per sample: forward and backward cost about three forward passes)."""
        status, reason = outcome.status, outcome.reason
        if status == "updated":
            assert outcome.tensors is not None
            try:
                screen(
                    outcome.tensors,
                    self.update_shapes[outcome.submodel],
                    references.get(outcome.submodel, {}),
                    outcome.num_samples,
                    declared,
                    self.cfg.update_norm_bound,
                )
            except UpdateRejected as exc:
                status, reason = "rejected", str(exc)
                log.warning("round %d: rejected update from %s: %s", r, outcome.node, exc)
            else:
                agg.add(outcome.submodel, outcome.tensors, outcome.num_samples, outcome.node)
        if status == "rejected":
            key = reason.split(":", 1)[0]
            report.rejected[key] = report.rejected.get(key, 0) + 1
        self.quarantine.record(
            outcome.node, status == "rejected", r, dropped=status == "dropped", updated=status == "updated"
        )
        if status in ("updated", "dropped"):
            doubt = self.evidence.observe(
                outcome.node,
                self._profiles.get(outcome.node),
                self.mflops[outcome.submodel],
                planned_steps(
                    outcome.num_samples or self.declared.get(outcome.node, 0),
                    self._task_train.get(outcome.node, self.cfg.train),
                )
                * self.cfg.train.batch_size
                + (self._statistics_samples(outcome) // round(1 / FORWARD_SHARE) if carried else 0),
                outcome.seconds,
                self.cfg.deadline_s,
                status == "updated",
            )
            if doubt:
                report.distrusted[outcome.node] = doubt
                log.warning("round %d: %s: %s", r, outcome.node, doubt)
        report.updates += status == "updated"
        report.declined += status == "declined"
        report.dropped += status == "dropped"
        report.bytes_in += outcome.bytes_in
        metrics = outcome.metrics.model_dump() if outcome.metrics is not None else {}
        report.clients.append(
            {
                "round": r,
                "node": outcome.node,
                "submodel": outcome.submodel,
                "status": status,
                "reason": reason,
                "num_samples": outcome.num_samples,
                "seconds": round(outcome.seconds, 3),
                **metrics,
            }
        )
