"""What an operator reads: `--log-format json` (one object per event, in round order), `predict` on the device
equal to `export-model`, `nefl-coord runs` / `status`, and `serve --help` grouped with serve's options only.
One short real run (real Mosquitto, two real device processes, real ONNX Runtime) feeds most tests."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nefl_edge.coordinator.records import final_rows, read_jsonl
from nefl_edge.core.cli import ROUND_ORDER, JsonLines, RoundOrder, event
from nefl_edge.core.data import load_dataset
from tests.helpers import Broker, make_shards, spawn_edge, stop, wait_for

pytestmark = pytest.mark.integration
RUN = "out"
COMMON = ("--gammas", "0.2,1.0", "--eval-samples", "300", "--lr", "0.05", "--deadline-s", "120")


def coord(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "nefl_edge.coordinator", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def serve(folder: Path, broker: Broker, *extra: str) -> subprocess.Popen[bytes]:
    """`nefl-coord serve --log-format json`: stdout and stderr in files of their own."""
    args = [sys.executable, "-m", "nefl_edge.coordinator", "serve", "--broker", broker.address, "--run", RUN]
    args += ["--runs-dir", str(folder / "runs"), "--log-format", "json", *COMMON, *extra]
    out, err = (folder / "serve.out").open("wb"), (folder / "serve.err").open("wb")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(args, stdout=out, stderr=err, env=env, start_new_session=True)


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of ``path`` as a JSON object; the assertion names the first line that is not one."""
    objects = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"{path.name} line {number} is not JSON: {line[:200]!r}") from None
        assert isinstance(obj, dict), f"{path.name} line {number} is {type(obj).__name__}, not an object"
        objects.append(obj)
    return objects


@dataclass
class Served:
    folder: Path
    broker: Broker
    run_dir: Path
    nodes: tuple[str, ...]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A finished 2-round run of two devices, coordinator and devices logging JSON."""
    folder = tmp_path_factory.mktemp("served")
    broker = Broker(folder / "broker").start()
    nodes = ("pi-a", "pi-b")
    shards = make_shards(folder, [300, 300])
    procs = [serve(folder, broker, "--rounds", "2", "--min-clients", "2", "--wait-clients-s", "90")]
    procs += [
        spawn_edge(broker.address, shard, node, folder, "--log-format", "json", run=RUN)
        for node, shard in zip(nodes, shards)
    ]
    try:
        assert procs[0].wait(300) == 0, f"serve failed: {(folder / 'serve.err').read_text()[-3000:]}"
        for node, p in zip(nodes, procs[1:]):
            assert p.wait(60) == 0, (
                f"device {node} exited {p.returncode}: {(folder / f'{node}.log').read_text()[-2000:]}"
            )
        run_dir = next((folder / "runs").glob(f"{RUN}-*"))
        yield Served(folder, broker, run_dir, nodes)
    finally:
        for p in procs:
            stop(p)
        broker.stop()


def test_predict_on_the_device_equals_the_exported_model(served: Served) -> None:
    import onnxruntime as ort

    # Prepare: the run's trained submodels as plain ONNX models, 300 test samples the devices never trained on.
    models = served.folder / "models"
    exported = coord("export-model", "--run-dir", str(served.run_dir), "--out", str(models))
    assert exported.returncode == 0, exported.stderr
    test = load_dataset(None, "test")
    samples = served.folder / "samples.npz"
    np.savez(samples, x=np.round(test.x[-300:, 0] * 255).astype(np.uint8), y=test.y[-300:])
    x = load_dataset(samples, "test").x

    for node in served.nodes:
        # Execute: the device's own command, without torch or onnx importable.
        out = served.folder / f"predict-{node}.npz"
        args = ["predict", "--cache", str(served.folder / f"cache-{node}"), "--data", str(samples), "--out", str(out)]
        from tests.helpers import device_env

        predicted = subprocess.run(
            [sys.executable, "-m", "nefl_edge.edge_client", *args],
            capture_output=True,
            text=True,
            env=device_env(served.folder),
            timeout=120,
        )

        # Assert: the final global submodel (round 2), logits within 1e-5 of export-model's.
        assert predicted.returncode == 0, predicted.stderr
        summary = json.loads(predicted.stdout)
        assert summary["round"] == 2, f"{node} keeps round {summary['round']}, not the final model of round 2"
        model = models / f"{RUN}-submodel-{summary['submodel']}.onnx"
        reference = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[
            0
        ]
        device = np.load(out)["logits"]
        assert device.shape == reference.shape == (300, 10), f"logits shapes {device.shape} vs {reference.shape}"
        gap = float(np.abs(device - reference).max())
        assert gap <= 1e-5, f"{node}: predict differs from exported submodel {summary['submodel']} by {gap}"
        want = float((reference.argmax(1) == test.y[-300:]).mean())
        assert summary["accuracy"] == pytest.approx(want, abs=1e-4), f"{node}: accuracy {summary['accuracy']} vs {want}"


def test_json_logs_parse_and_name_the_events(served: Served) -> None:
    # Execute: read what the processes wrote.
    coordinator = json_lines(served.folder / "serve.err")
    devices = {node: json_lines(served.folder / f"{node}.log") for node in served.nodes}

    # Assert: the coordinator's events, with their fields.
    names = [o["event"] for o in coordinator]
    assert all({"time", "level", "logger", "event", "message"} <= set(o) for o in coordinator), "a line lacks a key"
    joins = {o["node"] for o in coordinator if o["event"] == "join"}
    assert joins == set(served.nodes), f"join events for {joins}, devices {served.nodes}"
    rounds = [o for o in coordinator if o["event"] == "round"]
    assert [o["round"] for o in rounds] == [0, 1, 2], f"round events {[o['round'] for o in rounds]}"
    for o in rounds[1:]:
        assert (o["updates"], o["selected"], o["declined"], o["dropped"]) == (2, 2, 0, 0), f"round event {o}"
    recorded = read_jsonl(served.run_dir / "metrics.jsonl")
    for o in rounds:
        want = [r["accuracy"] for r in sorted(recorded, key=lambda r: r["submodel"]) if r["round"] == o["round"]]
        assert o["accuracy"] == pytest.approx(want, abs=1e-6), f"round {o['round']}: {o['accuracy']} vs {want}"
    assert names.count("selection") == 2 and names[-1] == "report", f"events: {names}"
    assert (served.folder / "serve.out").read_text() == "", "json mode printed a table on stdout"

    # Assert: lines in round order. With bn = federated an evaluated round is finished once the next round's
    # tasks have brought its statistics back, so round r's line comes after round r+1's selection, before
    # round r+1's own line; round 0 (the initial state) before round 1's selection.
    position = {(o["event"], o.get("round")): i for i, o in enumerate(coordinator)}
    assert position[("round", 0)] < position[("selection", 1)], "round 0's line after round 1's selection"
    for r in (0, 1):
        assert position[("round", r)] < position[("round", r + 1)], f"round {r}'s line after round {r + 1}'s"
        assert position[("selection", r + 1)] < position[("round", r + 1)], f"round {r + 1}'s line before its selection"

    # Assert: each device's events.
    for node, lines in devices.items():
        kinds = [o["event"] for o in lines]
        assert kinds.count("joined") == 1 and kinds.count("task") == 2 and kinds.count("update") == 2, (
            f"{node}: {kinds}"
        )
        assert all(o["round"] in (1, 2) and 0 <= o["accuracy"] <= 1 for o in lines if o["event"] == "update"), node


def test_runs_lists_state_round_accuracy_and_security(served: Served) -> None:
    # Execute
    listed = coord("runs", "--runs-dir", str(served.folder / "runs"), "--format", "json")
    text = coord("runs", "--runs-dir", str(served.folder / "runs"))

    # Assert: the one run, finished, with the last evaluated accuracy of each submodel, unsecured (loopback).
    assert listed.returncode == 0, listed.stderr
    (run,) = json.loads(listed.stdout)
    want = [round(r["accuracy"], 4) for r in final_rows(read_jsonl(served.run_dir / "metrics.jsonl"))]
    got = {k: run[k] for k in ("run", "state", "round", "rounds", "secured", "accuracy", "pid")}
    assert got == {"run": RUN, "state": "finished", "round": 2, "rounds": 2, "secured": "no", "accuracy": want,
                   "pid": None}, f"runs --format json: {got}"  # fmt: skip
    assert text.returncode == 0 and served.run_dir.name in text.stdout and "finished" in text.stdout, text.stdout


def test_status_of_a_finished_run_reads_the_broker_and_the_records(served: Served) -> None:
    # Execute: by run name, looked up in --runs-dir.
    result = coord("status", RUN, "--runs-dir", str(served.folder / "runs"), "--format", "json")

    # Assert: the devices left (their retained status says offline); their last tasks are round 2's.
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert (found["state"], found["source"], found["source_note"]) == ("finished", "broker", None), f"{found}"
    devices = {d["node"]: d for d in found["devices"]}
    assert set(devices) == set(served.nodes), f"devices {sorted(devices)}"
    for node, d in devices.items():
        assert (d["state"], d["last_round"], d["outcome"]) == ("offline", 2, "updated"), f"{node}: {d}"
    assert found["online"] == [], f"online after the run: {found['online']}"


def test_status_of_a_live_run_shows_who_is_online(tmp_path: Path, broker: Broker) -> None:
    # Prepare: a coordinator that waits for 3 devices; two have joined.
    shards = make_shards(tmp_path, [100, 100])
    coordinator = serve(tmp_path, broker, "--rounds", "1", "--min-clients", "3", "--wait-clients-s", "120")
    edges = [
        spawn_edge(broker.address, s, f"dev{i}", tmp_path, "--log-format", "json", run=RUN)
        for i, s in enumerate(shards)
    ]
    try:
        wait_for(lambda: '"online": 2' in (tmp_path / "serve.err").read_text(), 150, "the coordinator to see 2 devices")
        progress = lambda: next((tmp_path / "runs").glob(f"{RUN}-*/progress.json"), None)  # noqa: E731
        wait_for(lambda: progress() is not None and '"dev1": "online"' in progress().read_text(), 30, "progress.json")

        # Execute
        result = coord("status", RUN, "--runs-dir", str(tmp_path / "runs"), "--format", "json")
        text = coord("status", RUN, "--runs-dir", str(tmp_path / "runs"))

        # Execute: a device leaves while the coordinator waits.
        stop(edges[1])
        drop = '"event": "drop", "message": "client dev1 went offline (left)"'
        wait_for(lambda: drop in (tmp_path / "serve.err").read_text(), 30, "the coordinator's drop event")
    finally:
        coordinator.send_signal(signal.SIGINT)
        code = coordinator.wait(60)
        for p in edges:
            stop(p)

    # Assert: running (the coordinator's pid), both devices online on the broker, nothing recorded yet.
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert (found["state"], found["pid"], found["round"]) == ("running", coordinator.pid, 0), f"status: {found}"
    assert (found["online"], found["source"]) == (["dev0", "dev1"], "coordinator"), f"status: {found}"
    assert "online: 2 (dev0, dev1; from: coordinator)" in text.stdout, text.stdout
    assert code == 130, f"serve exited {code} on SIGINT"
    lines = json_lines(tmp_path / "serve.err")
    (dropped,) = [o for o in lines if o["event"] == "drop"]
    assert (dropped["node"], dropped["how"]) == ("dev1", "left"), f"drop event: {dropped}"
    assert lines[-1]["event"] == "stopped" and lines[-1]["signal"] == "SIGINT", f"last line: {lines[-1]}"
    left = json_lines(tmp_path / "dev1.log")
    assert (left[-1]["event"], left[-1]["signal"]) == ("stopped", "SIGTERM"), f"dev1's last line: {left[-1]}"
    after = json.loads(coord("runs", "--runs-dir", str(tmp_path / "runs"), "--format", "json").stdout)
    assert after[0]["state"] == "stopped" and after[0]["pid"] is None, f"after SIGINT: {after}"


# --- ordering and formatting, in this process ------------------------------------------------------------------


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_lines_of_the_next_round_wait_for_the_evaluated_round(monkeypatch: pytest.MonkeyPatch) -> None:
    from nefl_edge.core import cli

    # Prepare: the ordered handler, a fresh gate, the evaluator as a thread named like the real one.
    order = RoundOrder()
    monkeypatch.setattr(cli, "ROUND_ORDER", order)
    sink = Collect()
    ordered = cli._Ordered(sink)
    logger = logging.getLogger("test.round_order")
    logger.propagate, logger.level = False, logging.INFO
    logger.handlers = [ordered]
    go = [threading.Event(), threading.Event()]

    def evaluator() -> None:
        for r, (mark, gate) in enumerate(zip(marks, go), start=1):
            gate.wait(10)
            logger.info(f"round {r} accuracy")
            order.release(mark)

    # Execute: rounds 1 and 2 handed over; the main thread logs round 2's and 3's selection before either
    # evaluation is done.
    marks = [order.hold()]
    logger.info("round 2 selection")
    marks.append(order.hold())
    logger.info("round 3 selection")
    worker = threading.Thread(target=evaluator, name="nefl-eval_0")
    worker.start()
    held = list(sink.lines)
    go[0].set()
    wait_for(lambda: len(sink.lines) >= 2, 10, "round 1's line and what waited behind it")
    after_first = list(sink.lines)
    go[1].set()
    worker.join(10)

    # Assert: nothing before round 1's line; each round's selection after the previous round's accuracy.
    assert held == [], f"lines passed while round 1 was evaluated: {held}"
    assert after_first == ["round 1 accuracy", "round 2 selection"], f"after round 1: {after_first}"
    assert sink.lines == ["round 1 accuracy", "round 2 selection", "round 2 accuracy", "round 3 selection"], sink.lines
    logger.info("no round pending")
    assert sink.lines[-1] == "no round pending", "a line was held with no round pending"
    assert ROUND_ORDER is not order  # the module's gate was only patched


def test_json_lines_name_template_events_and_keep_plain_lines() -> None:
    formatter = JsonLines({"client %s joined (%d samples)": ("join", ("node", "samples"))})

    def line(msg: str, *args: Any, **extra: Any) -> dict[str, Any]:
        record = logging.LogRecord("nefl", logging.INFO, __file__, 1, msg, args, None)
        record.__dict__.update(extra)
        return json.loads(formatter.format(record))

    joined = line("client %s joined (%d samples)", "pi-a", 300)
    named = line("round 1/2: accuracy", **event("round", round=1, accuracy=[0.5]))
    plain = line("something %s", "else")
    diverged = line("round %d: loss %s", 3, float("nan"), **event("update", loss=float("nan"), worst=[float("inf")]))
    assert (joined["event"], joined["node"], joined["samples"], joined["message"]) == (
        "join", "pi-a", 300, "client pi-a joined (300 samples)",
    ), joined  # fmt: skip
    assert (named["event"], named["round"], named["accuracy"]) == ("round", 1, [0.5]), named
    assert (plain["event"], plain["message"]) == ("log", "something else"), plain
    assert (diverged["loss"], diverged["worst"]) == ("nan", ["inf"]), diverged
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", plain["time"]), plain["time"]


# --- serve --help -----------------------------------------------------------------------------------------------


def test_serve_help_shows_serve_options_grouped_and_no_simulate_only_ones() -> None:
    from nefl_edge.coordinator.cli import SERVE_METHODS
    from nefl_edge.coordinator.strategies import STRATEGIES

    # Execute
    serve_help = coord("serve", "--help").stdout
    simulate_help = coord("simulate", "--help").stdout

    # Assert: the groups, in order; no simulate-only option; fjord (simulate only) not offered.
    panels = re.findall(r"╭─ ([A-Za-z ]+?) ─", serve_help)
    want = ["Options", "Broker and security", "Rounds", "Method and local training", "Evaluation", "Output"]
    assert panels == want, f"serve --help groups: {panels}"
    for option in ("--augment", "--device", "--workers", "--trainer", "--clients", "--scheme"):
        assert option not in serve_help, f"serve --help offers the simulate-only {option}"
        assert option in simulate_help, f"simulate --help lacks {option}"
    assert not re.search(r"\bfjord\b(?!-)", serve_help), "serve --help offers fjord, which serve refuses"
    assert "<bool>" not in serve_help, "a flag shows a <bool> metavar"
    assert set(SERVE_METHODS) == {k for k, s in STRATEGIES.items() if s.device_trainable}, SERVE_METHODS
    broker_panel = serve_help.split("Broker and security")[1].split("╰")[0]
    for option in ("--broker", "--tls-ca", "--password-file", "--enrolment-dir", "--insecure"):
        assert option in broker_panel, f"{option} is not in the broker and security group"


def test_the_readme_run_toml_shows_the_real_defaults() -> None:
    import tomllib

    from nefl_edge.coordinator.config import RunConfig

    # Prepare: the README's run.toml block.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("A run configuration for `serve` (`run.toml`)")
    block = readme[
        readme.index("```toml", start) + len("```toml") : readme.index("```\n", readme.index("```toml", start) + 7)
    ]

    # Execute
    shown = tomllib.loads(block)
    defaults = RunConfig().model_dump(mode="json")

    # Assert: every key it shows has its default value.
    train = shown.pop("train")
    wrong = {k: (v, defaults[k]) for k, v in shown.items() if v != defaults[k]}
    wrong |= {f"train.{k}": (v, defaults["train"][k]) for k, v in train.items() if v != defaults["train"][k]}
    assert wrong == {}, f"README run.toml values that are not the defaults (shown, default): {wrong}"


def test_simulate_json_lines_are_the_rounds_in_order_and_the_result(tmp_path: Path) -> None:
    # Execute: a tiny simulation (4 clients, 2 rounds of at most 3 steps).
    result = coord(
        "simulate", "--clients", "4", "--rounds", "2", "--fraction", "0.5", "--eval-samples", "200",
        "--gammas", "0.2,1.0", "--max-steps", "3", "--log-format", "json", timeout=300,
    )  # fmt: skip
    (tmp_path / "simulate.err").write_text(result.stderr)

    # Assert: nothing on stdout; on stderr only JSON: the rounds in order, then the result per tier.
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "", f"simulate --log-format json printed text: {result.stdout[:300]!r}"
    lines = json_lines(tmp_path / "simulate.err")
    events = [(o["event"], o.get("round")) for o in lines]
    assert events == [("round", 1), ("round", 2), ("result", None)], f"events: {events}"
    assert [t["gamma"] for t in lines[-1]["tiers"]] == [0.2, 1.0], lines[-1]
    assert lines[-1]["tiers"][-1]["accuracy"] == lines[1]["accuracy"][1], "the result is not the last round's"


def test_every_event_template_is_a_log_call_in_the_source() -> None:
    from nefl_edge.coordinator.cli import COORDINATOR_EVENTS
    from nefl_edge.edge_client.cli import DEVICE_EVENTS

    # Prepare: the source the templates must match verbatim (a reworded log line would lose its event).
    root = Path(__file__).resolve().parents[1]
    coordinator = "".join(p.read_text() for p in (root / "coordinator").rglob("*.py"))
    device = "".join(p.read_text() for p in (root / "edge_client").rglob("*.py"))

    # Execute: how often each template occurs as a string literal: once in its table, once per log call.
    uses = {t: coordinator.count(f'"{t}"') for t in COORDINATOR_EVENTS}
    uses |= {t: device.count(f'"{t}"') for t in DEVICE_EVENTS}

    # Assert
    lost = sorted(t for t, n in uses.items() if n < 2)
    assert lost == [], f"event templates that no log call uses any more: {lost}"


def test_the_report_line_is_one_line_without_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from types import SimpleNamespace

    from nefl_edge.coordinator.registry import Registry
    from nefl_edge.coordinator.render import serve_with_progress

    # Prepare: a run whose directory has a path far longer than a terminal is wide; serve returns at once.
    run_dir = tmp_path / ("a-long-folder-name-" * 8) / "lab-20261207-120000"
    run_dir.mkdir(parents=True)
    run = SimpleNamespace(cfg=SimpleNamespace(run="lab", rounds=1), round=0, registry=Registry(), run_dir=run_dir)
    run.serve = lambda link: run_dir

    # Execute: stdout is pytest's capture, not a terminal.
    serve_with_progress(run, link=None)  # type: ignore[arg-type]

    # Assert: the report, metrics and clients paths on one line, unbroken.
    (line,) = [t for t in capsys.readouterr().out.splitlines() if t.startswith("report:")]
    want = (
        f"report: {run_dir / 'report.html'}; metrics: {run_dir / 'metrics.jsonl'}; clients: {run_dir / 'clients.jsonl'}"
    )
    assert line == want, f"report line: {line!r}"


@pytest.mark.slow  # about 30 s: serve exports and evaluates before the round
def test_a_declined_task_is_a_json_decline_event_on_both_sides(tmp_path: Path) -> None:
    # Prepare: one device whose task cannot end in time on any host (1000 local epochs of 320 samples:
    # 10,000 steps, which would need < 3 ms a step to fit 30 s); it declines on its measured pace after a few
    # steps, well within the deadline and its grace
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    documented = [set(fields.split(", ")) for fields in re.findall(r"`decline` \(([a-z_, ]+)\)", readme)]
    assert len(documented) == 2, (
        f"the README documents the decline fields {documented}, not the coordinator's and the device's"
    )
    broker = Broker(tmp_path / "broker").start()
    (shard,) = make_shards(tmp_path, [320])
    procs = [
        serve(tmp_path, broker, "--rounds", "1", "--min-clients", "1", "--wait-clients-s", "120", "--policy", "static",
              "--epochs", "1000", "--deadline-s", "30"),
        spawn_edge(broker.address, shard, "pi-slow", tmp_path, "--log-format", "json", run=RUN),
    ]  # fmt: skip
    try:
        # Execute: the run of one round, to its end
        assert procs[0].wait(300) == 0, f"serve failed: {(tmp_path / 'serve.err').read_text()[-3000:]}"
        assert procs[1].wait(60) == 0, f"the device failed: {(tmp_path / 'pi-slow.log').read_text()[-3000:]}"
    finally:
        for p in procs:
            stop(p)
        broker.stop()

    # Assert: one decline event on each side, with the README's fields, about the same task and reason
    coordinator = [o for o in json_lines(tmp_path / "serve.err") if o["event"] == "decline"]
    device = [o for o in json_lines(tmp_path / "pi-slow.log") if o["event"] == "decline"]
    assert len(coordinator) == 1 and len(device) == 1, f"decline events: coordinator {coordinator}, device {device}"
    (theirs,), (mine,) = coordinator, device
    for side, obj, fields in (("coordinator", theirs, documented[0]), ("device", mine, documented[1])):
        assert fields <= set(obj), f"the {side}'s decline event lacks {sorted(fields - set(obj))}: {obj}"
    assert (theirs["round"], theirs["node"], mine["round"]) == (1, "pi-slow", 1), f"{theirs} / {mine}"
    assert "deadline" in mine["reason"] and theirs["reason"] == mine["reason"], f"reasons: {theirs} / {mine}"
    assert isinstance(mine["task"], str) and mine["task"], f"the device's decline names no task: {mine}"
    (round_1,) = [o for o in json_lines(tmp_path / "serve.err") if o["event"] == "round" and o["round"] == 1]
    assert (round_1["updates"], round_1["declined"]) == (0, 1), f"round 1 event: {round_1}"
