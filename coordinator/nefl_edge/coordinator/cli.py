"""``nefl-coord``: the coordinator's command line. Heavy imports (torch, onnx) happen inside commands;
every run setting of ``serve`` and ``simulate`` is an option generated from ``RunConfig``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nefl_edge.coordinator.cli_options import (
    BROKER_PANEL,
    OUTPUT_PANEL,
    SIMULATE_ONLY,
    config_options,
)
from nefl_edge.coordinator.config import DEMO_DEFAULTS, DEMO_SET, METHODS
from nefl_edge.core.cli import check_folder, event, fail, no_flag_metavars, run_app, setup_logging, source_commit
from nefl_edge.core.errors import ExitCode

log = logging.getLogger("nefl_edge.coordinator")

app = typer.Typer(
    help="nefl-coord: the coordinator of nested federated learning (NeFL) over MQTT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


no_flag_metavars()


def _version(value: bool) -> None:
    """``-V`` / ``--version``: the package and its commit, torch, ONNX Runtime and its training backend."""
    if not value:
        return
    import platform

    import onnxruntime

    from nefl_edge.core import __version__
    from nefl_edge.edge_client.trainer import BackendUnavailable, choose_backend

    try:
        import torch

        torch_version = str(torch.__version__)
    except ImportError:
        torch_version = "not installed (pip install 'nefl-edge[coord]')"
    try:
        backend = choose_backend("auto")
    except BackendUnavailable as exc:
        backend = f"none ({exc})"
    typer.echo(
        f"nefl-coord {__version__} (commit {source_commit()}); torch {torch_version}; ONNX Runtime "
        f"{onnxruntime.__version__}, training backend {backend}; Python {platform.python_version()}"
    )
    raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", callback=_version, is_eager=True, help="Show versions (torch, ONNX Runtime, commit)."
        ),
    ] = False,
) -> None:
    """nefl-coord: the coordinator of nested federated learning (NeFL) over MQTT."""


Model = Annotated[
    str, typer.Option(help="Model shape: resnet-small, resnet18, resnet34 (preact- prefix for pre-activation).")
]
DatasetName = Annotated[str, typer.Option(help="Data set the model is for: fmnist, mnist, cifar10, cifar100.")]
Gammas = Annotated[Optional[str], typer.Option(help="Comma-separated parameter ratios, e.g. 0.2,0.4,0.6,0.8,1.0.")]
Scaling = Annotated[str, typer.Option(help="Scaling: WD (width+depth), W (width), D (depth).")]


COORDINATOR_EXTRA = ("torch", "onnx", "rich", "matplotlib", "amqtt")
SIMULATE_ONLY_METHODS = ("fjord",)  # local training of its own (Strategy.local_train): not on devices
SERVE_METHODS = tuple(m for m in METHODS if m not in SIMULATE_ONLY_METHODS)

LogFormat = Annotated[
    str,
    typer.Option(
        help="Log lines as text, or json: one object per event (round, join, drop, decline, ...) per line.",
        rich_help_panel=OUTPUT_PANEL,
    ),
]
COORDINATOR_EVENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "client %s joined (%d samples, tier %s, %s samples/s)": ("join", ("node", "samples", "tier", "samples_per_s")),
    "client %s went offline (%s)": ("drop", ("node", "how")),
    "client %s restarted (instance %s, before %s)": ("restart", ("node", "instance", "before")),
    "round %d: %d clients, submodels %s": ("selection", ("round", "clients", "submodels")),
    "round %d: %s declined: %s": ("decline", ("round", "node", "reason")),
    "round %d: %s declined to evaluate: %s": ("decline_evaluation", ("round", "node", "reason")),
    "round %d: %s %s": ("drop", ("round", "node", "how")),
    "round %d: deadline passed without answers from %s": ("deadline", ("round", "nodes")),
    "round %d: rejected update from %s: %s": ("rejected", ("round", "node", "reason")),
    "rejected %s": ("rejected", ("detail",)),
    "waiting for devices: %d of min_clients=%d online after %.0f s%s": (
        "waiting", ("online", "min_clients", "seconds", "names"),
    ),
    "resuming %s after round %d": ("resume", ("run_dir", "round")),
}  # fmt: skip
"""The coordinator's log lines that ``--log-format json`` names as events (with the round summary and the
final report, which name themselves): format string -> event and the names of its arguments."""


def coordinator_logging(verbose: bool, log_format: str) -> None:
    setup_logging(verbose, terminal_handler() if log_format == "text" else None, log_format, COORDINATOR_EVENTS)


def main() -> None:
    """``nefl-coord``; on a host without the coordinator's extra (a device) one line says what to install."""
    try:
        run_app(app, "nefl-coord")
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in COORDINATOR_EXTRA:
            raise
        print(
            f"error: nefl-coord needs the coordinator's extra ({exc.name} is missing): pip install 'nefl-edge[coord]' "
            "(Python >= 3.11); a device needs only nefl-edge",
            file=sys.stderr,
        )
        sys.exit(int(ExitCode.BAD_INPUT))


def terminal_handler() -> Optional[logging.Handler]:
    """rich's log handler on a terminal; plain timestamped lines otherwise (systemd, nohup, files)."""
    if not sys.stderr.isatty():
        return None
    from rich.logging import RichHandler

    return RichHandler(show_path=False, markup=False)


@app.command()
def specs(
    models: Annotated[str, typer.Option(help="Comma-separated model names.")] = "resnet-small,resnet18,resnet34",
    gammas: Gammas = None,
    method: Scaling = "WD",
) -> None:
    """Print the default submodel specs of each model as a Markdown table (width, blocks, params, gamma, MFLOPs)."""
    from nefl_edge.coordinator.config import parse_gammas
    from nefl_edge.core.specs import DEFAULT_GAMMAS, get_model_config, make_specs, mflops, param_count

    wanted = tuple(parse_gammas(gammas) or DEFAULT_GAMMAS)
    lines = [
        "| model | input | gamma (target) | width ratio | kept blocks per stage | parameters | gamma | MFLOPs/sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in models.split(","):
        dataset = "fmnist" if "small" in name else "cifar10"
        config = get_model_config(name.strip(), dataset)
        for target, spec in zip(wanted, make_specs(config, wanted, method)):  # type: ignore[arg-type]
            lines.append(
                f"| {config.name} | {config.in_channels}x{config.image_size}x{config.image_size} | {target} | "
                f"{spec.width:.4f} | {spec.describe()} | {param_count(config, spec):,} | {spec.gamma:.3f} | "
                f"{mflops(config, spec):.2f} |"
            )
    typer.echo("\n".join(lines))


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="Output folder for the artifacts and manifest.json.")],
    model: Model = "resnet-small",
    dataset: DatasetName = "fmnist",
    gammas: Gammas = None,
    method: Annotated[str, typer.Option(help="Federated method whose submodels to export.")] = "nefl-wd",
) -> None:
    """Export every submodel of a method as ONNX Runtime training artifacts plus one manifest (cached)."""
    import time

    from nefl_edge.coordinator.config import parse_gammas
    from nefl_edge.coordinator.strategies import get_strategy
    from nefl_edge.core.specs import DEFAULT_GAMMAS, get_model_config
    from nefl_edge.export.artifacts import export_set

    strategy = get_strategy(method)
    config, plan = strategy.setup(get_model_config(model, dataset), tuple(parse_gammas(gammas) or DEFAULT_GAMMAS))
    start = time.perf_counter()
    manifest = export_set(config, plan.specs, out, log=typer.echo, distill=plan.distill_smallest)
    typer.echo(f"{len(manifest.submodels)} submodels in {time.perf_counter() - start:.1f} s -> {out}")
    for sub in manifest.submodels:
        sizes = ", ".join(f"{role} {entry.size / 1024:.0f} KiB" for role, entry in sub.files.items())
        typer.echo(f"  submodel {sub.index} gamma {sub.gamma:.2f} width {sub.width:.3f}: {sizes}")


@app.command("export-model")
def export_model(
    run_dir: Annotated[Path, typer.Option(help="A run directory (runs/<run>-<time>) with its checkpoint.")],
    out: Annotated[Path, typer.Option(help="Output folder for <run>-submodel-<k>.onnx.")],
    submodel: Annotated[
        Optional[list[int]], typer.Option(help="Submodel index; repeat for several. Default: all.")
    ] = None,
) -> None:
    """Write trained submodels of a run as plain ONNX inference models (image batch -> logits, eval-mode
    BatchNorm, stock onnxruntime >= 1.17) with their gamma, round and accuracy in the metadata."""
    from nefl_edge.export.inference import export_run

    for path in export_run(run_dir, out, submodel or None):
        typer.echo(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


@app.command()
@config_options(
    exclude=SIMULATE_ONLY,
    helps={"method": "federated method a device can train: " + ", ".join(SERVE_METHODS)},
)
def serve(
    broker: Annotated[
        Optional[str],
        typer.Option(
            help="MQTT broker as HOST or HOST:PORT (with --resume: the recorded one).", rich_help_panel=BROKER_PANEL
        ),
    ] = None,
    config: Annotated[Optional[Path], typer.Option(help="Run configuration (TOML); options below override it.")] = None,
    resume: Annotated[
        Optional[Path],
        typer.Option(help="Run directory to resume after its last completed round (with its recorded security)."),
    ] = None,
    tls_ca: Annotated[
        Optional[Path], typer.Option(help="CA certificate: connect with TLS.", rich_help_panel=BROKER_PANEL)
    ] = None,
    tls_cert: Annotated[Optional[Path], typer.Option(help="Client certificate.", rich_help_panel=BROKER_PANEL)] = None,
    tls_key: Annotated[
        Optional[Path], typer.Option(help="Client certificate key.", rich_help_panel=BROKER_PANEL)
    ] = None,
    username: Annotated[Optional[str], typer.Option(help="Broker user name.", rich_help_panel=BROKER_PANEL)] = None,
    password_file: Annotated[
        Optional[Path], typer.Option(help="File holding the broker password.", rich_help_panel=BROKER_PANEL)
    ] = None,
    mqtt_version: Annotated[
        Optional[str],
        typer.Option(help="MQTT protocol version: 3.1.1 (default) or 5.", rich_help_panel=BROKER_PANEL),
    ] = None,
    enrolment_dir: Annotated[
        Optional[Path],
        typer.Option(
            help="Enrolment folder (add-device): sign every message, accept only enrolled devices.",
            rich_help_panel=BROKER_PANEL,
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Allow a broker that is not on loopback without TLS and enrolment.",
            rich_help_panel=BROKER_PANEL,
        ),
    ] = False,
    log_format: LogFormat = "text",
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging.", rich_help_panel=OUTPUT_PANEL)
    ] = False,
    overrides: Optional[dict[str, Any]] = None,
) -> None:
    """Coordinate a run over MQTT: rounds with deadlines, NeFedAvg, per-round checkpoints, metrics and a report.
    Against a broker that is not on loopback it runs signed and over TLS unless --insecure."""
    import signal

    from nefl_edge.coordinator.config import load_config, resume_config
    from nefl_edge.coordinator.mqtt_grid import NotEnoughClients
    from nefl_edge.coordinator.render import serve_with_progress
    from nefl_edge.coordinator.run import (
        RunSecurity,
        ServeRun,
        check_servable,
        coordinator_link,
        probe_broker,
        require_security,
    )
    from nefl_edge.coordinator.runs import running_marker

    coordinator_logging(verbose, log_format)

    def say(text: str, name: str, err: bool = True, **fields: Any) -> None:
        """A closing message: a line of text, or with ``--log-format json`` an event like every other line."""
        if log_format == "json":
            log.warning(text, extra=event(name, **fields))
        else:
            typer.echo(text, err=err)

    overrides = overrides or {}
    if resume is not None and config is not None:
        fail("--config and --resume exclude each other: a resumed run keeps its own config.json")
    if config is not None and not config.is_file():
        fail(f"--config {config}: no such file")
    if mqtt_version not in (None, "3.1.1", "5"):
        fail(f"--mqtt-version must be 3.1.1 or 5, got {mqtt_version!r}")
    if overrides.get("preset") == "paper" and overrides.get("stem_pool") is None:
        overrides["stem_pool"] = False  # the devices' training graphs have no max-pool gradient (simulate has)

    def absolute(path: Optional[Path]) -> Optional[str]:
        return str(path.resolve()) if path is not None else None

    given: dict[str, Any] = {
        "broker": broker, "tls_ca": absolute(tls_ca), "tls_cert": absolute(tls_cert), "tls_key": absolute(tls_key),
        "username": username, "password_file": absolute(password_file), "enrolment_dir": absolute(enrolment_dir),
        "mqtt_version": mqtt_version, "insecure": insecure,
    }  # fmt: skip
    recorded = RunSecurity.load(resume) if resume is not None else None
    if recorded is not None:
        sec = recorded.resumed(given)
    elif broker is None:
        fail("pass --broker HOST[:PORT]" + (" (this run directory records none)" if resume is not None else ""))
    else:
        sec = RunSecurity(**{**given, "mqtt_version": mqtt_version or "3.1.1"})
    cfg = resume_config(resume, overrides) if resume is not None else load_config(config, overrides)
    if resume is None:
        check_folder(cfg.runs_dir, "--runs-dir")
    if sec.enrolment_dir is not None:
        check_folder(Path(sec.enrolment_dir), "--enrolment-dir")
    if resume is not None:
        from nefl_edge.coordinator import checkpoint

        done = checkpoint.load(resume).round  # a missing or damaged checkpoint: exit 2 before any connection
        if done >= cfg.rounds:
            say(
                f"{resume} finished all {cfg.rounds} rounds already; nothing to resume (pass --rounds N, more than "
                f"{done}, to train on)",
                "finished",
                err=False,
                run_dir=str(resume),
                round=done,
            )
            return
    check_servable(cfg)
    require_security(sec)
    probe_broker(sec)
    from nefl_edge.coordinator.bridge import check_chunk_size  # a broker that refuses our chunks: exit 2, not a stall

    check_chunk_size(sec.broker, sec.security(), cfg.chunk_size, cfg.run, sec.mqtt_version)
    link = coordinator_link(
        cfg, sec.broker, sec.security(), sec.mqtt_version, Path(sec.enrolment_dir) if sec.enrolment_dir else None
    )
    run = ServeRun(cfg, resume, resume=resume is not None)
    sec.save(run.run_dir)
    how_to_resume = f"resume it with `nefl-coord serve --resume {run.run_dir}`"
    stopped_fields: dict[str, Any] = {"run_dir": str(run.run_dir), "resumable": True}

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        with running_marker(run.run_dir):  # `nefl-coord runs` / `status` see it running
            run.prepare()
            serve_with_progress(run, link, json_lines=log_format == "json")
    except KeyboardInterrupt:
        if run.round == 0:
            say(
                f"stopped before a round was recorded; start the run again (not --resume {run.run_dir})",
                "stopped",
                run_dir=str(run.run_dir),
                round=0,
                resumable=False,
            )
        else:
            say(f"stopped after round {run.round}; {how_to_resume}", "stopped", round=run.round, **stopped_fields)
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except NotEnoughClients:
        if run.stopped_by is None:
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if run.stopped_by is not None:
        text = f"stopped by {run.stopped_by} after round {run.round}; {how_to_resume}"
        say(text, "stopped", signal=run.stopped_by, round=run.round, **stopped_fields)
        raise typer.Exit(ExitCode.INTERRUPTED)


@app.command()
@config_options(
    exclude=("run", "policy", "deadline_s", "wait_clients_s", "chunk_size", "runs_dir", "min_clients"),
    defaults={"fraction": 0.1, "rounds": 10},
)
def simulate(
    clients: Annotated[int, typer.Option(help="Number of simulated devices (tiers assigned round-robin).")] = 100,
    scheme: Annotated[str, typer.Option(help="Partition: iid, dirichlet or shards.")] = "iid",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration.")] = 0.5,
    trainer: Annotated[
        str, typer.Option(help="Local training: torch, or ort (the exported ONNX Runtime artifacts).")
    ] = "torch",
    out: Annotated[Optional[Path], typer.Option(help="Write the result as JSON here.")] = None,
    workers: Annotated[
        int, typer.Option(help="Processes that train a round's clients at once (CPU, torch trainer).", min=1)
    ] = 1,
    threads: Annotated[
        Optional[int],
        typer.Option(help="PyTorch threads of each training process (default: this machine's cores / workers).", min=1),
    ] = None,
    engine: Annotated[
        str, typer.Option(help="Clients trained locally (this process, --workers) or on ray (extra nefl-edge\\[ray]).")
    ] = "local",
    ray_address: Annotated[
        Optional[str],
        typer.Option(help="--engine ray: an existing cluster (host:port, or auto); default: a local Ray for the run."),
    ] = None,
    client_cpus: Annotated[float, typer.Option(help="--engine ray: CPUs each client task reserves.")] = 1.0,
    client_gpus: Annotated[float, typer.Option(help="--engine ray: GPUs each client task reserves (>0: CUDA).")] = 0.0,
    log_format: LogFormat = "text",
    overrides: Optional[dict[str, Any]] = None,
) -> None:
    """Simulate a federated method in this process (no broker): the round engine of serve, in-process clients."""
    import json
    import os
    import tempfile

    from nefl_edge.coordinator.grid import wait_policy  # imports no torch: OpenMP reads the policy at its import

    os.environ.setdefault("OMP_WAIT_POLICY", wait_policy(workers, engine, trainer))
    from rich.console import Console

    from nefl_edge.coordinator.evaluation import held_out
    from nefl_edge.coordinator.partition import make_partitioner, split_dataset
    from nefl_edge.coordinator.render import print_simulation
    from nefl_edge.coordinator.simulate import fleet_config
    from nefl_edge.coordinator.simulate import simulate as run_simulation
    from nefl_edge.coordinator.strategies import get_strategy
    from nefl_edge.core.data import load_dataset

    json_lines = log_format == "json"
    if json_lines:  # as text: the rounds (in order, from the evaluator) and warnings, not the engine's INFO lines
        coordinator_logging(False, log_format)
        logging.getLogger("nefl_edge.coordinator.engine").setLevel(logging.WARNING)
    elif log_format != "text":
        fail(f"--log-format must be text or json, got {log_format!r}")
    if trainer not in ("torch", "ort"):
        fail(f"--trainer must be torch or ort, got {trainer!r}")
    ray = None
    if engine == "ray":
        from nefl_edge.coordinator.ray_grid import RayOptions, check_reachable, import_ray

        if trainer != "torch" or workers > 1:
            fail("--engine ray trains with the PyTorch trainer and Ray runs the clients: drop --trainer and --workers")
        ray = RayOptions(ray_address, client_cpus, client_gpus)  # a wrong share: ConfigError, exit 2
        import_ray()  # not installed: exit 2, saying how to install it
        if ray_address is not None:
            check_reachable(ray_address)  # before the data is loaded: Ray itself retries for minutes
    elif engine != "local":
        fail(f"--engine must be local or ray, got {engine!r}")
    elif ray_address is not None or client_cpus != 1.0 or client_gpus != 0.0:
        fail("--ray-address, --client-cpus and --client-gpus go with --engine ray")
    if out is not None:
        if out.is_dir():
            fail(f"--out {out} is a folder; give the file to write the result to")
        check_folder(out.parent, "--out's folder")
    cfg = fleet_config(overrides or {})
    strategy = get_strategy(cfg.method)
    if trainer == "ort" and not strategy.device_trainable:
        fail(f"{cfg.method} trains locally in its own way, not as the device does; use --trainer torch")
    gammas = tuple(cfg.gammas)
    train_data, test_data = load_dataset(cfg.data_dir, "train"), load_dataset(cfg.data_dir, "test")
    cfg = cfg.with_input_stats(train_data.x)  # normalize: the training data's per-channel statistics
    config = cfg.network()
    train_data.check_for((config.in_channels, config.image_size, config.image_size), config.num_classes)
    parts = make_partitioner(scheme, clients, alpha, cfg.seed).split(train_data.y)
    shards = split_dataset(train_data, parts)
    test, calibration = held_out(test_data, cfg.eval_samples, cfg.bn_calibration if cfg.bn == "server" else 0)
    tiers = [i % len(gammas) for i in range(clients)]
    artifacts = None
    if trainer == "ort":
        from nefl_edge.export.artifacts import export_set

        configured, plan = strategy.setup(config, gammas)
        artifacts = Path(tempfile.mkdtemp(prefix="nefl-sim-artifacts-"))
        export_set(configured, plan.specs, artifacts, distill=plan.distill_smallest)
    if not json_lines:
        typer.echo(f"{strategy.name}: {strategy.reference}")

    def progress(r: int, accuracy: list[float]) -> None:
        line = f"round {r}/{cfg.rounds}: " + " ".join(f"{100 * a:.1f}" for a in accuracy)
        if json_lines:
            log.info(line, extra=event("round", round=r, rounds=cfg.rounds, accuracy=[round(a, 6) for a in accuracy]))
        else:
            typer.echo(line)

    result = run_simulation(
        cfg, shards, tiers, test, calibration, trainer=trainer, artifacts=artifacts,  # type: ignore[arg-type]
        on_round=progress, workers=workers, threads=threads, ray=ray,
    )  # fmt: skip
    title = f"{strategy.name}, {scheme}, {cfg.rounds} rounds ({result.seconds:.0f} s)"
    if json_lines:
        tiers_out = [
            {"tier": t, "gamma": g, "submodel": result.tier_submodel[t], "accuracy": a}
            for t, (g, a) in enumerate(zip(gammas, result.tier_accuracy()))
        ]
        log.info(title, extra=event("result", method=strategy.name, seconds=result.seconds, tiers=tiers_out))
    else:
        print_simulation(Console(), title, gammas, result)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in result.__dict__.items() if k != "state"}
        out.write_text(json.dumps(data, indent=2) + "\n")
        typer.echo(f"result written to {out}")


@app.command()
def partition(
    out: Annotated[Path, typer.Option(help="Output folder: one client-XXX.npz per device, plus labels.png.")],
    clients: Annotated[int, typer.Option(help="Number of devices.")] = 10,
    dataset: Annotated[
        Optional[Path], typer.Option(help="Data folder (IDX or CIFAR) or .npz; default Debian's Fashion-MNIST.")
    ] = None,
    scheme: Annotated[str, typer.Option(help="iid, dirichlet or shards.")] = "iid",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration (smaller: more skewed).")] = 0.5,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    max_samples: Annotated[Optional[int], typer.Option(help="Cap on samples per device.")] = None,
) -> None:
    """Split a data set into one shard per device and print each device's label histogram."""
    from nefl_edge.coordinator.partition import (
        label_histogram,
        label_skew,
        make_partitioner,
        plot_histogram,
        write_shards,
    )
    from nefl_edge.core.data import load_dataset

    data = load_dataset(dataset, "train")
    parts = make_partitioner(scheme, clients, alpha, seed).split(data.y)
    paths = write_shards(data, parts, out, max_samples)
    classes = int(data.y.max()) + 1
    hist = label_histogram(data.y, [p[:max_samples] if max_samples else p for p in parts], classes)
    typer.echo("client  samples  " + " ".join(f"{c:>5}" for c in range(classes)))
    for i, row in enumerate(hist):
        typer.echo(f"{i:>6}  {row.sum():>7}  " + " ".join(f"{v:>5}" for v in row))
    plot_histogram(hist, out / "labels.png", f"{scheme} partition of {data.name}, {clients} devices")
    typer.echo(f"label skew {label_skew(hist):.3f} (0 = uniform labels); {len(paths)} shards and labels.png in {out}")


@app.command()
@config_options(
    exclude=(*DEMO_SET, *SIMULATE_ONLY),
    defaults=DEMO_DEFAULTS,
    helps={"method": "federated method a device can train: " + ", ".join(SERVE_METHODS)},
)
def demo(
    clients: Annotated[int, typer.Option(help="Number of edge devices (real nefl-edge processes).", min=1)] = 5,
    broker: Annotated[Optional[str], typer.Option(help="Use this broker (HOST:PORT) instead of starting one.")] = None,
    embedded_broker: Annotated[
        bool, typer.Option(help="Use the embedded amqtt broker even if Mosquitto is installed.")
    ] = False,
    samples_per_client: Annotated[int, typer.Option(help="Training samples per device.", min=2)] = 2000,
    scheme: Annotated[str, typer.Option(help="Partition: iid, dirichlet or shards.")] = "iid",
    alpha: Annotated[float, typer.Option(help="Dirichlet alpha.")] = 0.5,
    log_format: LogFormat = "text",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    overrides: Optional[dict[str, Any]] = None,
) -> None:
    """Run a whole federated job on this machine: broker, N devices, R rounds, accuracy table and report. Every
    run setting of serve is an option here too (defaults: serve's, but --rounds 8 and --deadline-s 180)."""
    from nefl_edge.coordinator.demo import DemoOptions, demo_config, run_demo

    coordinator_logging(verbose, log_format)
    cfg = demo_config(clients, overrides or {})
    check_folder(cfg.runs_dir, "--runs-dir")
    options = DemoOptions(
        cfg=cfg,
        clients=clients,
        broker=broker,
        broker_kind="amqtt" if embedded_broker else "auto",
        samples_per_client=samples_per_client,
        scheme=scheme,
        alpha=alpha,
        log_format=log_format,
    )
    if run_demo(options) is None:
        raise typer.Exit(ExitCode.INTERRUPTED)


OutputFormat = Annotated[str, typer.Option("--format", help="text (a table) or json.")]


def _check_format(output: str) -> None:
    if output not in ("text", "json"):
        fail(f"--format must be text or json, got {output!r}")


def _percent(accuracy: list[float]) -> str:
    return " ".join(f"{100 * a:.1f}" for a in accuracy) or "-"


@app.command("runs")
def runs_command(
    runs_dir: Annotated[Path, typer.Option(help="The folder of run directories (serve's --runs-dir).")] = Path("runs"),
    output: OutputFormat = "text",
) -> None:
    """The runs in a folder: state (running, stopped, finished), last recorded round, accuracy of every
    submodel at the last evaluated round, and how the run is secured."""
    from nefl_edge.coordinator.runs import list_runs

    _check_format(output)
    found = list_runs(runs_dir)
    if output == "json":
        typer.echo(json.dumps(found, indent=1))
        return
    typer.echo(f"{'run directory':<36} {'state':<11} {'round':>7}  {'secured':<10} accuracy % by submodel")
    for r in found:
        done = "-" if r["round"] is None else f"{r['round']}/{r['rounds']}"
        typer.echo(
            f"{Path(r['run_dir']).name:<36} {r['state']:<11} {done:>7}  {r['secured']:<10} {_percent(r['accuracy'])}"
        )
    typer.echo(f"{len(found)} run(s) in {runs_dir}")


@app.command("status")
def status_command(
    run: Annotated[str, typer.Argument(help="A run directory, or a run name (its newest directory in --runs-dir).")],
    runs_dir: Annotated[Path, typer.Option(help="Where to look up a run name.")] = Path("runs"),
    output: OutputFormat = "text",
    no_broker: Annotated[bool, typer.Option("--no-broker", help="Read only the run directory.")] = False,
) -> None:
    """One run now: state, the round in progress, and every device with its state (a running run: the
    coordinator's registry; else the devices' retained status on an anonymous broker) and its last task."""
    from nefl_edge.coordinator.runs import find_run, run_status

    _check_format(output)
    found = run_status(find_run(run, runs_dir), from_broker=not no_broker)
    if output == "json":
        typer.echo(json.dumps(found, indent=1))
        return
    done = "-" if found["round"] is None else f"{found['round']}/{found['rounds']}"
    typer.echo(
        f"{found['run_dir']}: run {found['run']} ({found['method']}), {found['state']}"
        + (f" (pid {found['pid']})" if found["pid"] else "")
        + f", round {done} recorded, secured: {found['secured']}"
    )
    typer.echo(f"accuracy % by submodel (round {found['evaluated_round']}): {_percent(found['accuracy'])}")
    if found["progress"]:
        typer.echo(f"now: {found['progress']}")
    if found["source_note"]:
        typer.echo(f"device states {found['source_note']}")
    typer.echo(f"online: {len(found['online'])} ({', '.join(found['online']) or 'none'}; from: {found['source']})")
    for d in found["devices"]:
        task = (
            "-" if d["last_round"] is None else f"submodel {d['submodel']} in round {d['last_round']} ({d['outcome']})"
        )
        typer.echo(f"  {d['node']:<24} {d['state']:<9} last task: {task}")


def _default_broker_user() -> Optional[str]:
    """``mosquitto`` when run as root and that user exists (Mosquitto drops to it), else None."""
    import os
    import pwd

    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        return None
    return "mosquitto"


@app.command("broker-config")
def broker_config(
    out: Annotated[Path, typer.Option(help="Folder for mosquitto.conf, acl, passwd, certificates (used in place).")],
    hostname: Annotated[
        Optional[list[str]], typer.Option(help="Broker host name or IP devices connect to (repeatable).")
    ] = None,
    tls_port: Annotated[int, typer.Option(help="Port of the TLS listener.")] = 8883,
    plain_port: Annotated[Optional[int], typer.Option(help="Also a plain MQTT listener, on 127.0.0.1 only.")] = None,
    bind: Annotated[Optional[str], typer.Option(help="Address of the TLS listener (default: all).")] = None,
    max_packet_size: Annotated[int, typer.Option(help="Largest MQTT packet the broker accepts.")] = 1114112,
    coordinator_user: Annotated[str, typer.Option(help="Broker account of the coordinator.")] = "nefl-coord",
    ca_cert: Annotated[Optional[Path], typer.Option(help="Your CA certificate (with --server-cert).")] = None,
    server_cert: Annotated[Optional[Path], typer.Option(help="Your server certificate.")] = None,
    server_key: Annotated[Optional[Path], typer.Option(help="Its key.")] = None,
    ca_dir: Annotated[
        Optional[Path], typer.Option(help="Where the generated CA's private key goes (default: <out>-ca).")
    ] = None,
    broker_user: Annotated[
        Optional[str],
        typer.Option(help="User Mosquitto drops to when started as root (default: mosquitto, when run as root)."),
    ] = None,
) -> None:
    """Write a Mosquitto configuration: TLS, passwords, per-device ACL, size limits (see README). Start it
    with `nefl-coord broker --broker-dir OUT`."""
    from nefl_edge.coordinator.broker_config import BrokerConfigError, BrokerOptions, write_broker_config

    hosts = tuple(hostname or ["localhost"])
    opts = BrokerOptions(
        out, hosts, tls_port, plain_port, bind, coordinator_user, max_packet_size, server_cert, server_key, ca_cert,
        user=broker_user or _default_broker_user(), ca_dir=ca_dir,
    )  # fmt: skip
    try:
        settings = write_broker_config(opts)
    except (BrokerConfigError, OSError) as exc:
        fail(str(exc))
        return
    typer.echo(f"broker configuration in {out}: start it with `nefl-coord broker --broker-dir {out}`")
    typer.echo(
        f"coordinator: nefl-coord serve --broker {settings.address} --tls-ca {settings.ca_cert} "
        f"--username {settings.coordinator_user} --password-file {settings.coordinator_password_file}"
    )
    typer.echo(f"enrol devices: nefl-coord add-device NAME --public-key KEY --broker-dir {out} --enrolment-dir DIR")


@app.command("broker")
def broker_command(
    broker_dir: Annotated[Path, typer.Option(help="The folder written by `nefl-coord broker-config --out`.")],
    install_service: Annotated[
        bool, typer.Option("--install-service", help="Write a systemd unit that runs this broker instead.")
    ] = False,
    output: Annotated[Path, typer.Option(help="Where --install-service writes the unit.")] = Path(
        "/etc/systemd/system/nefl-broker.service"
    ),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --install-service: print the unit.")] = False,
) -> None:
    """Run Mosquitto in the foreground on the broker folder, in place: check that its user can read the
    folder (else say how to fix it, exit 2), record its pid for `add-device` / `remove-device` (they reload
    it), then become Mosquitto (same pid; SIGHUP reloads, SIGTERM stops)."""
    import os
    import shutil

    from nefl_edge.coordinator.broker_config import (
        BrokerConfigError,
        BrokerSettings,
        access_problems,
        broker_unit,
        pid_file,
        point_at,
        running_pid,
    )
    from nefl_edge.core.files import write_atomic

    folder = broker_dir.resolve()
    try:
        BrokerSettings.load(folder)
        if not (folder / "mosquitto.conf").is_file():
            raise BrokerConfigError(f"{folder / 'mosquitto.conf'} is missing; run `nefl-coord broker-config --out`")
    except BrokerConfigError as exc:
        fail(str(exc))
    if install_service:
        exe = shutil.which("nefl-coord") or str(Path(sys.executable).with_name("nefl-coord"))
        unit = broker_unit(str(Path(exe).resolve()), folder)
        if dry_run:
            typer.echo(unit, nl=False)
            return
        try:
            output.write_text(unit)
        except OSError as exc:
            fail(f"cannot write {output}: {exc} (run as root, or pass --output FILE / --dry-run)")
        typer.echo(f"wrote {output}. Then, as root: systemctl daemon-reload && systemctl enable --now nefl-broker")
        return
    mosquitto = shutil.which("mosquitto")
    if mosquitto is None:
        fail("mosquitto is not installed: `sudo apt-get install mosquitto`")
    other = running_pid(folder)
    if other is not None and other != os.getpid():
        fail(f"a broker already runs on {folder} (pid {other}); stop it first (or `kill -HUP {other}` to reload)")
    if point_at(folder):
        typer.echo(f"mosquitto.conf now points at the files in {folder}", err=True)
    problems = access_problems(folder)
    if problems:
        fail(
            f"Mosquitto drops to its user and could not read {folder}; as root, run: `{' && '.join(problems)}`, "
            "then start the broker again"
        )
    write_atomic(pid_file(folder), f"{os.getpid()}\n", 0o644)
    conf = str(folder / "mosquitto.conf")
    typer.echo(f"starting {mosquitto} -c {conf} (pid {os.getpid()})", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(mosquitto, ["mosquitto", "-c", conf])


def _reload_note(broker_dir: Path) -> str:
    """Reload the broker running on ``broker_dir`` (after the password file changed); what to tell the user."""
    from nefl_edge.coordinator.broker_config import reload_broker

    pid = reload_broker(broker_dir)
    if pid is None:
        return f"No broker runs on {broker_dir} now; `nefl-coord broker --broker-dir {broker_dir}` will read it."
    return f"The broker (pid {pid}) re-read its password file."


EnrolmentDir = Annotated[Path, typer.Option(help="The coordinator's enrolment folder (keys, devices.json).")]
BrokerDir = Annotated[Path, typer.Option(help="The folder written by `nefl-coord broker-config --out`.")]


@app.command("add-device")
def add_device(
    name: Annotated[str, typer.Argument(help="The device's node id (e.g. the dev-... id it shows).")],
    public_key: Annotated[str, typer.Option(help="The device's public key (ed25519:... or PEM), or a file with it.")],
    enrolment_dir: EnrolmentDir,
    broker_dir: BrokerDir,
    broker: Annotated[Optional[str], typer.Option(help="HOST:PORT devices use (default from broker.json).")] = None,
    replace: Annotated[bool, typer.Option(help="Give the name to a new key (a re-flashed device).")] = False,
    bundle: Annotated[Optional[Path], typer.Option(help="Where to write the bundle.")] = None,
) -> None:
    """Enrol a device: broker account, entry in devices.json, and a bundle for `nefl-edge enrol`."""
    from nefl_edge.coordinator.broker_config import BrokerConfigError
    from nefl_edge.coordinator.enrolment import EnrolmentError, read_public_key
    from nefl_edge.coordinator.enrolment import add_device as enrol_device

    try:
        done = enrol_device(enrolment_dir, name, read_public_key(public_key), broker_dir, broker, replace, bundle)
    except (EnrolmentError, BrokerConfigError, OSError) as exc:
        fail(str(exc))
        return
    verb = "re-enrolled with a new key" if done.replaced else "enrolled"
    typer.echo(f"{name} {verb} ({done.device.fingerprint}).")
    typer.echo(f"Bundle: {done.bundle} (holds the broker password): copy it to the device, run")
    typer.echo(f"`nefl-edge enrol {done.bundle.name}` there, then delete it here.")
    typer.echo(_reload_note(broker_dir))


@app.command("remove-device")
def remove_device(
    name: Annotated[str, typer.Argument(help="The device's node id.")],
    enrolment_dir: EnrolmentDir,
    broker_dir: BrokerDir,
) -> None:
    """Withdraw a device: its broker account, its public key and its bundle."""
    from nefl_edge.coordinator.broker_config import BrokerConfigError
    from nefl_edge.coordinator.enrolment import EnrolmentError
    from nefl_edge.coordinator.enrolment import remove_device as withdraw

    try:
        known = withdraw(enrolment_dir, name, broker_dir)
    except (EnrolmentError, BrokerConfigError, OSError) as exc:
        fail(str(exc))
        return
    if not known:
        fail(f"{name} is not enrolled in {enrolment_dir}")
    typer.echo(f"{name} removed. {_reload_note(broker_dir)}")


@app.command()
def devices(enrolment_dir: EnrolmentDir) -> None:
    """List the enrolled devices."""
    from nefl_edge.coordinator.enrolment import EnrolmentError, list_devices

    try:
        found = list_devices(enrolment_dir)
    except EnrolmentError as exc:
        fail(str(exc))
        return
    for d in found.values():
        typer.echo(f"{d.name:<24} {d.fingerprint}  enrolled {d.enrolled_at}")
    typer.echo(f"{len(found)} device(s)")


@app.command("site-broker-config")
def site_broker_config(
    out: Annotated[Path, typer.Option(help="Folder of the site broker (as broker-config's, plus the bridge).")],
    site: Annotated[str, typer.Option(help="Name of the site (letters, digits, '_', '-').")],
    upstream: Annotated[str, typer.Option(help="The coordinator's broker as HOST:PORT (its TLS port off loopback).")],
    upstream_dir: Annotated[
        Optional[Path], typer.Option(help="The coordinator's broker folder: its CA, and the bridge account made there.")
    ] = None,
    upstream_ca: Annotated[Optional[Path], typer.Option(help="CA of the upstream (without --upstream-dir).")] = None,
    bridge_password_file: Annotated[
        Optional[Path], typer.Option(help="Password of the account nefl-site-SITE upstream (without --upstream-dir).")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow a plain, anonymous bridge to an upstream off loopback.")
    ] = False,
    hostname: Annotated[
        Optional[list[str]], typer.Option(help="Site broker host name or IP its devices connect to (repeatable).")
    ] = None,
    tls_port: Annotated[int, typer.Option(help="Port of the site broker's TLS listener.")] = 8883,
    plain_port: Annotated[Optional[int], typer.Option(help="Also a plain MQTT listener, on 127.0.0.1 only.")] = None,
    bind: Annotated[Optional[str], typer.Option(help="Address of the TLS listener (default: all).")] = None,
    max_packet_size: Annotated[int, typer.Option(help="Largest MQTT packet the site broker accepts.")] = 1114112,
    broker_user: Annotated[
        Optional[str], typer.Option(help="User Mosquitto drops to when started as root (as broker-config).")
    ] = None,
) -> None:
    """Write a site broker (a broker-config folder) bridged to the coordinator's broker (README: brokers)."""
    from nefl_edge.coordinator.bridge import SiteOptions, write_site_config
    from nefl_edge.coordinator.broker_config import BrokerConfigError, BrokerOptions

    broker = BrokerOptions(
        out, hostnames=tuple(hostname or ["localhost"]), tls_port=tls_port, plain_port=plain_port, bind=bind,
        max_packet_size=max_packet_size, user=broker_user or _default_broker_user(),
    )  # fmt: skip
    try:
        write_site_config(
            SiteOptions(site, upstream, broker, upstream_dir, upstream_ca, bridge_password_file, insecure)
        )
    except (BrokerConfigError, OSError) as exc:
        fail(str(exc))
        return
    typer.echo(f"site broker {site} in {out}, bridged to {upstream}: `nefl-coord broker --broker-dir {out}`")
    if upstream_dir is not None:
        typer.echo(f"bridge account nefl-site-{site} added to {upstream_dir}. {_reload_note(upstream_dir)}")
    typer.echo(f"enrol the site's devices: nefl-coord add-device NAME --broker-dir {out} --enrolment-dir DIR")
