"""The round engine: one federated round, the same for ``serve`` (devices over MQTT) and ``simulate``.

A round, in order: the grid lists the available clients; each gets a capacity (``assignment.capacity``);
the strategy selects clients and maps capacities to its submodels (``assignment.assign``, which can make
sure every submodel is trained); every selected client gets an instruction with its own seed; the grid
delivers them and yields outcomes; each update is screened (``screening.screen``) and folded into NeFedAvg;
with at least ``min_updates`` valid updates the aggregate replaces the global state and every submodel's
BatchNorm statistics are re-estimated on the held-out calibration samples.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from nefl_edge.coordinator.assignment import assign, capacity
from nefl_edge.coordinator.config import RunConfig
from nefl_edge.coordinator.evaluation import calibrate_bn
from nefl_edge.coordinator.grid import Grid, Instruction, Outcome
from nefl_edge.coordinator.nefedavg import NeFedAvg
from nefl_edge.coordinator.nested import GlobalState, extract
from nefl_edge.coordinator.screening import Quarantine, UpdateRejected, screen
from nefl_edge.coordinator.specs import ModelConfig, param_layout
from nefl_edge.coordinator.strategies import Plan, Strategy

log = logging.getLogger(__name__)


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
    untrained: list[int] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    aggregated: bool = False
    seconds: float = 0.0
    started_at: float = 0.0  # wall-clock (Unix) time the round started and ended
    ended_at: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    clients: list[dict[str, Any]] = field(default_factory=list)


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
        self.strategy, self.cfg, self.config, self.plan = strategy, cfg, config, plan
        self.calibration = calibration
        self.rng = np.random.default_rng(cfg.seed)
        self.quarantine = Quarantine(cfg.quarantine_strikes, cfg.quarantine_rounds)
        self.shapes = [{n: p.shape for n, p in param_layout(config, spec).items()} for spec in plan.specs]

    def run_round(
        self, r: int, state: GlobalState, grid: Grid, stop: Optional[threading.Event] = None
    ) -> tuple[GlobalState, RoundReport]:
        cfg, report = self.cfg, RoundReport(r, started_at=time.time())
        started = time.monotonic()
        clients = grid.clients(cfg.min_clients)
        report.phases["waiting"] = time.monotonic() - started
        caps = {
            n: capacity(c, cfg.policy, self.plan, self.config, cfg.train, cfg.deadline_s) for n, c in clients.items()
        }
        blocked = self.quarantine.active(r)
        report.quarantined = len(blocked)
        pool = [n for n in caps if n not in blocked and self.strategy.assign(self.plan, caps[n]) is not None]
        selected = self.strategy.select(self.rng, pool, cfg.fraction, cfg.min_clients)
        speeds = {n: c.profile.samples_per_s or 0.0 for n, c in clients.items() if c.profile is not None}
        rotate = self.rng if cfg.cover_rule == "random" else None
        assignment = assign(
            self.strategy, self.plan, caps, selected, cfg.cover_submodels, speeds, rotate, cfg.tier_window, self.rng
        )
        instructions = [
            Instruction(
                n,
                assignment[n],
                cfg.train.model_copy(update={"seed": int(self.rng.integers(1 << 31)), "lr": cfg.lr_at(r)}),
            )
            for n in selected
        ]
        report.selected = len(instructions)
        log.info("round %d: %d clients, submodels %s", r, len(instructions), dict(sorted(assignment.items())))
        out_before = grid.bytes_out
        agg = NeFedAvg(state, cfg.weighting)
        references = {k: extract(state, k) for k in sorted(set(assignment.values()))} if cfg.update_norm_bound else {}
        collecting = time.monotonic()
        for outcome in grid.run(r, state, instructions):
            self._fold(r, outcome, clients[outcome.node].num_samples, references, agg, report)
            if stop is not None and stop.is_set():
                break
        report.bytes_out = grid.bytes_out - out_before
        for reason, count in grid.rejections().items():
            report.rejected[reason] = report.rejected.get(reason, 0) + count
        report.phases["training"] = time.monotonic() - collecting
        aggregating = time.monotonic()
        trained = Counter(c["submodel"] for c in report.clients if c["status"] == "updated")
        report.untrained = [k for k in range(len(self.plan.specs)) if not trained[k]]
        if report.updates >= cfg.min_updates:
            state = agg.result()
            report.aggregated = True
            if self.calibration is not None and len(self.calibration):
                for k in range(len(self.plan.specs)):
                    calibrate_bn(state, k, self.calibration)
        else:
            log.warning(
                "round %d: %d valid updates < min_updates=%d; keeping the previous global model",
                r,
                report.updates,
                cfg.min_updates,
            )
        report.phases["aggregation"] = time.monotonic() - aggregating
        report.seconds = time.monotonic() - started
        report.ended_at = time.time()
        return state, report

    def _fold(
        self,
        r: int,
        outcome: Outcome,
        declared: int,
        references: dict[int, Any],
        agg: NeFedAvg,
        report: RoundReport,
    ) -> None:
        status, reason = outcome.status, outcome.reason
        if status == "updated":
            assert outcome.tensors is not None
            try:
                screen(
                    outcome.tensors,
                    self.shapes[outcome.submodel],
                    references.get(outcome.submodel, {}),
                    outcome.num_samples,
                    declared,
                    self.cfg.update_norm_bound,
                )
            except UpdateRejected as exc:
                status, reason = "rejected", str(exc)
                log.warning("round %d: rejected update from %s: %s", r, outcome.node, exc)
            else:
                agg.add(outcome.submodel, outcome.tensors, outcome.num_samples)
        if status == "rejected":
            key = reason.split(":", 1)[0]
            report.rejected[key] = report.rejected.get(key, 0) + 1
        self.quarantine.record(outcome.node, status == "rejected", r)
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
