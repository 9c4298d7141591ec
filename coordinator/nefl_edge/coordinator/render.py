"""What the coordinator's commands show on a terminal: the live progress of a run and the final tables.
Orchestration (``coordinator.run``) logs; this module only draws."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nefl_edge.coordinator.engine import RoundReport
from nefl_edge.coordinator.records import Records, final_rows, summary
from nefl_edge.coordinator.run import ServeRun
from nefl_edge.core.mqtt import MqttLink


def serve_with_progress(run: ServeRun, link: MqttLink, console: Optional[Console] = None) -> Path:
    """``run.serve(link)`` with a progress bar (on a terminal), then the accuracy table."""
    console = console or Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        bar = progress.add_task(f"run {run.cfg.run}", total=run.cfg.rounds, completed=run.round)

        def on_round(report: RoundReport, rows: list[dict[str, Any]]) -> None:
            accs = " ".join(f"{100 * r['accuracy']:.1f}" for r in rows)
            text = f"round {report.round}: {report.updates}/{report.selected} updates, acc % {accs}"
            progress.update(bar, completed=report.round, description=text)  # round 0 and a stop report too

        run.on_round = on_round
        run.on_progress = lambda text: progress.update(bar, description=text)
        out = run.serve(link)
    print_final_table(Console(), Records(out).metrics())
    Console().print(
        f"report: {out / 'report.html'}; metrics: {out / 'metrics.jsonl'}; clients: {out / 'clients.jsonl'}"
    )
    return out


def print_final_table(console: Console, records: list[dict[str, Any]]) -> None:
    rows = final_rows(records)
    table = Table(title="accuracy of every submodel after the last round")
    for column in ("submodel", "gamma", "accuracy %", "loss", "evaluated by", "devices' accuracy %"):
        table.add_column(column, justify="right")
    for r in rows:
        fed = "-" if r.get("fed_accuracy") is None else f"{100 * r['fed_accuracy']:.2f} ({r['fed_samples']} samples)"
        by = r.get("evaluated_by", "test")
        table.add_row(
            str(r["submodel"]), f"{r['gamma']:.2f}", f"{100 * r['accuracy']:.2f}", f"{r['loss']:.3f}", by, fed
        )
    for key, value in summary(rows).items():
        table.add_row(key, "", f"{100 * value:.2f}", "", "", "")
    console.print(table)


def print_simulation(console: Console, title: str, gammas: tuple[float, ...], result: Any) -> None:
    table = Table(title=title)
    for column in ("device tier (gamma)", "submodel gamma", "accuracy %"):
        table.add_column(column, justify="right")
    for tier, (gamma, acc) in enumerate(zip(gammas, result.tier_accuracy())):
        index = result.tier_submodel[tier]
        sub = "-" if index is None else f"{result.submodel_gammas[index]:.3f}"
        table.add_row(f"{gamma}", sub, "no model" if acc is None else f"{100 * acc:.2f}")
    console.print(table)
