"""What a run writes as it goes: ``metrics.jsonl`` (one line per round and submodel) and ``clients.jsonl``
(one line per client task: who trained which submodel, how it ended, loss, time), both appended durably."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nefl_edge.coordinator.checkpoint import CheckpointError, durable_append
from nefl_edge.coordinator.engine import RoundReport
from nefl_edge.coordinator.strategies import Plan
from nefl_edge.core.files import write_atomic

METRICS, CLIENTS = "metrics.jsonl", "clients.jsonl"
log = logging.getLogger(__name__)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of ``path``. A last line cut short (a crash or a full disk in the middle of an append) is
    dropped with a warning; a damaged line before it raises :class:`CheckpointError` naming it."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    out = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if number == len(lines):
                log.warning("%s: its last line is cut short (%s); dropped", path, exc)
                break
            raise CheckpointError(f"{path} line {number} is damaged ({exc}); repair or remove that line") from None
        out.append(record)
    return out


def final_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per submodel, the metrics row of the last round."""
    if not records:
        return []
    last = max(r["round"] for r in records)
    return sorted((r for r in records if r["round"] == last), key=lambda r: r["submodel"])


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Worst, average and best accuracy of ``rows``."""
    accs = [r["accuracy"] for r in rows]
    return {"worst": min(accs), "average": sum(accs) / len(accs), "best": max(accs)} if accs else {}


class Records:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.run_dir / METRICS)

    def clients(self) -> list[dict[str, Any]]:
        return read_jsonl(self.run_dir / CLIENTS)

    def write_round(
        self, report: RoundReport, accuracies: list[tuple[float, float]], plan: Plan
    ) -> list[dict[str, Any]]:
        """Append the round's lines; return the metrics rows (one per evaluated submodel). ``accuracy`` and
        ``loss`` are the coordinator's test-set numbers, or without them (``accuracies`` empty) the devices'
        federated evaluation (``evaluated_by``); the federated numbers are also in ``fed_*``."""
        shared = {k: v for k, v in asdict(report).items() if k not in ("round", "clients", "untrained", "federated")}
        rows = []
        for k in range(len(plan.specs)):
            fed = report.federated.get(k)
            if k < len(accuracies):
                (acc, loss), by = accuracies[k], "test"
            elif fed is not None:
                acc, loss, by = fed["accuracy"], fed["loss"], "federated"
            else:
                continue
            trained = sum(1 for c in report.clients if c["submodel"] == k and c["status"] == "updated")
            federated = {} if fed is None else {f"fed_{key}": value for key, value in fed.items()}
            rows.append(
                {
                    "round": report.round,
                    "submodel": k,
                    "gamma": plan.specs[k].gamma,
                    "accuracy": acc,
                    "loss": loss,
                    "evaluated_by": by,
                    **federated,
                    "clients": trained,
                    "untrained": report.round > 0 and k in report.untrained,
                    **shared,
                }
            )
        durable_append(self.run_dir / METRICS, [json.dumps(r) for r in rows])
        if report.clients:
            durable_append(self.run_dir / CLIENTS, [json.dumps(c) for c in report.clients])
        return rows

    def truncate(self, last_round: int) -> None:
        """Drop lines of rounds after ``last_round`` (written before a crash, never checkpointed)."""
        for name in (METRICS, CLIENTS):
            path = self.run_dir / name
            kept = [r for r in read_jsonl(path) if r["round"] <= last_round]
            if path.is_file():
                write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept), 0o644)

    @staticmethod
    def summary_line(report: RoundReport, rows: list[dict[str, Any]], rounds: int) -> str:
        """The one log line per round: accuracy of every submodel, answers, and where the time went."""
        accs = " ".join(f"{100 * r['accuracy']:.1f}" for r in rows)
        worst = min(r["accuracy"] for r in rows)
        phases = ", ".join(f"{k} {v:.1f}" for k, v in report.phases.items())
        line = (
            f"round {report.round}/{rounds}: accuracy % {accs} (worst {100 * worst:.1f}); "
            f"{report.updates}/{report.selected} updates, {report.declined} declined, {report.dropped} dropped"
        )
        if report.rejected:
            line += f", rejected {dict(report.rejected)}"
        if report.quarantined:
            line += f", {report.quarantined} quarantined"
        if report.untrained:
            line += f"; no client trained submodels {report.untrained}"
        return line + f"; {report.seconds:.1f} s ({phases} s)"
