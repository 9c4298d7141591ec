"""What the coordinator's commands show on a terminal: the live progress of a run and the final tables.
Orchestration (``coordinator.run``) logs; this module only draws."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nefl_edge.coordinator.engine import RoundReport
from nefl_edge.coordinator.records import Records, final_rows, summary
from nefl_edge.coordinator.run import ServeRun
from nefl_edge.coordinator.runs import PROGRESS_EVERY_S, write_progress
from nefl_edge.core.cli import event
from nefl_edge.core.mqtt import MqttLink

log = logging.getLogger(__name__)


def serve_with_progress(
    run: ServeRun, link: MqttLink, console: Optional[Console] = None, json_lines: bool = False
) -> Path:
    """``run.serve(link)`` with a progress bar (on a terminal), then the accuracy table and where the
    report is; with ``json_lines`` (``--log-format json``) no bar and no table: a ``report`` event instead."""
    console = console or Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar_off = json_lines or not console.is_terminal
    with Progress(*columns, console=console, transient=False, disable=bar_off) as progress:
        bar = progress.add_task(f"run {run.cfg.run}", total=run.cfg.rounds, completed=run.round)

        def on_round(report: RoundReport, rows: list[dict[str, Any]]) -> None:
            accs = " ".join(f"{100 * r['accuracy']:.1f}" for r in rows)
            text = f"round {report.round}: {report.updates}/{report.selected} updates, acc % {accs}"
            progress.update(bar, completed=report.round, description=text)  # round 0 and a stop report too

        latest = {"text": "starting"}

        def on_progress(text: str) -> None:
            progress.update(bar, description=text)
            latest["text"] = text

        run.on_round = on_round
        run.on_progress = on_progress
        with _progress_file(run, latest):
            out = run.serve(link)
    paths = {"report": out / "report.html", "metrics": out / "metrics.jsonl", "clients": out / "clients.jsonl"}
    line = "; ".join(f"{k}: {v}" for k, v in paths.items())
    if json_lines:
        rows = [
            {k: r.get(k) for k in ("submodel", "gamma", "accuracy", "loss")} for r in final_rows(Records(out).metrics())
        ]
        log.info(line, extra=event("report", run_dir=str(out), submodels=rows, **{k: str(v) for k, v in paths.items()}))
        return out
    print_final_table(Console(), Records(out).metrics())
    print(line, flush=True)  # not through rich: a path must not wrap on a narrow or absent terminal
    return out


@contextmanager
def _progress_file(run: ServeRun, latest: dict[str, str]) -> Iterator[None]:
    """Rewrite ``progress.json`` (the round's progress line, every device's last status in the registry)
    every ``PROGRESS_EVERY_S`` while the block runs, for ``nefl-coord status``."""
    done = threading.Event()

    def write() -> None:
        while not done.wait(PROGRESS_EVERY_S):
            try:
                devices = {n: info.state for n, info in list(run.registry.nodes.items())}
            except RuntimeError:  # the registry changed while it was read; next time
                continue
            write_progress(run.run_dir, latest["text"], devices)

    thread = threading.Thread(target=write, name="nefl-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(5)


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
