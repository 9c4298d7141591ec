"""``nefl-coord``: the coordinator's command line. Heavy imports (torch, onnx) happen inside commands."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any, Optional

import typer
from typing_extensions import Annotated

app = typer.Typer(
    help="nefl-coord: the coordinator of nested federated learning (NeFL) over MQTT.",
    no_args_is_help=True,
    add_completion=False,
)

EXIT_BAD_INPUT = 2
EXIT_BROKER = 3


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="%H:%M:%S",
        handlers=[RichHandler(show_path=False, markup=False)],
    )
    logging.getLogger("paho").setLevel(logging.WARNING)


Model = Annotated[
    str, typer.Option(help="Model shape: resnet-small, resnet18, resnet34 (preact- prefix for pre-activation).")
]
Dataset = Annotated[str, typer.Option(help="Data set the model is for: fmnist, mnist, cifar10, cifar100.")]
Gammas = Annotated[Optional[str], typer.Option(help="Comma-separated parameter ratios, e.g. 0.2,0.4,0.6,0.8,1.0.")]
Method = Annotated[str, typer.Option(help="Scaling: WD (width+depth), W (width), D (depth).")]


@app.command()
def specs(
    models: Annotated[str, typer.Option(help="Comma-separated model names.")] = "resnet-small,resnet18,resnet34",
    gammas: Gammas = None,
    method: Method = "WD",
) -> None:
    """Print the default submodel specs of each model as a Markdown table (width, blocks, params, gamma, MFLOPs)."""
    from nefl_edge.coordinator.config import ConfigError, parse_gammas
    from nefl_edge.coordinator.specs import DEFAULT_GAMMAS, SpecError, get_model_config, make_specs, mflops, param_count

    try:
        wanted = tuple(parse_gammas(gammas) or DEFAULT_GAMMAS)
        lines = [
            "| model | input | gamma (target) | width ratio | kept blocks per stage | parameters | gamma "
            "| MFLOPs/sample |",
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
    except (SpecError, ConfigError) as exc:
        fail(str(exc))
        return
    typer.echo("\n".join(lines))


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="Output folder for the artifacts and manifest.json.")],
    model: Model = "resnet-small",
    dataset: Dataset = "fmnist",
    gammas: Gammas = None,
    method: Method = "WD",
) -> None:
    """Export every submodel as ONNX Runtime training artifacts plus one manifest (cached by architecture)."""
    import time

    from nefl_edge.coordinator.config import ConfigError, parse_gammas
    from nefl_edge.coordinator.specs import DEFAULT_GAMMAS, SpecError, get_model_config, make_specs
    from nefl_edge.edge_client.artifacts import ArtifactError
    from nefl_edge.export.artifacts import export_set

    try:
        config = get_model_config(model, dataset)
        spec_list = make_specs(config, tuple(parse_gammas(gammas) or DEFAULT_GAMMAS), method)  # type: ignore[arg-type]
        start = time.perf_counter()
        manifest = export_set(config, spec_list, out, log=typer.echo)
    except (SpecError, ConfigError, ArtifactError) as exc:
        fail(str(exc))
        return
    typer.echo(f"{len(manifest.submodels)} submodels in {time.perf_counter() - start:.1f} s -> {out}")
    for sub in manifest.submodels:
        sizes = ", ".join(f"{role} {entry.size / 1024:.0f} KiB" for role, entry in sub.files.items())
        typer.echo(f"  submodel {sub.index} gamma {sub.gamma:.2f} width {sub.width:.3f}: {sizes}")


def _security(
    tls_ca: Optional[Path],
    tls_cert: Optional[Path],
    tls_key: Optional[Path],
    username: Optional[str],
    password_file: Optional[Path],
) -> Any:
    from nefl_edge.edge_client.mqtt import Security

    return Security(tls_ca, tls_cert, tls_key, False, username, password_file)


@app.command()
def serve(
    broker: Annotated[str, typer.Option(help="MQTT broker as HOST or HOST:PORT.")],
    config: Annotated[Optional[Path], typer.Option(help="Run configuration (TOML); options below override it.")] = None,
    resume: Annotated[
        Optional[Path], typer.Option(help="Run directory to resume after its last completed round.")
    ] = None,
    run: Annotated[Optional[str], typer.Option(help="Run name (MQTT topic namespace).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model shape.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="fmnist, mnist, cifar10, cifar100.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Test-set folder (default Debian's Fashion-MNIST).")] = None,
    gammas: Gammas = None,
    method: Annotated[Optional[str], typer.Option(help="WD, W or D.")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Number of rounds.")] = None,
    fraction: Annotated[Optional[float], typer.Option(help="Share of online clients per round.")] = None,
    min_clients: Annotated[Optional[int], typer.Option(help="Clients needed before a round starts.")] = None,
    min_updates: Annotated[Optional[int], typer.Option(help="Valid updates needed to change the model.")] = None,
    policy: Annotated[
        Optional[str], typer.Option(help="Submodel assignment: static (device tier) or deadline.")
    ] = None,
    deadline_s: Annotated[Optional[float], typer.Option(help="Seconds a client has per round.")] = None,
    wait_clients_s: Annotated[Optional[float], typer.Option(help="Seconds a round waits for min_clients.")] = None,
    weighting: Annotated[Optional[str], typer.Option(help="NeFedAvg weights: samples or uniform.")] = None,
    eval_samples: Annotated[Optional[int], typer.Option(help="Test samples per evaluation.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    runs_dir: Annotated[Optional[Path], typer.Option(help="Parent folder of run directories.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Local SGD learning rate.")] = None,
    momentum: Annotated[Optional[float], typer.Option(help="Local SGD momentum.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Local SGD weight decay.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Local batch size.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Local epochs per round.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Cap on local steps per round.")] = None,
    chunk_size: Annotated[
        Optional[int], typer.Option(help="Bytes per MQTT message; larger payloads are chunked.")
    ] = None,
    tls_ca: Annotated[Optional[Path], typer.Option(help="CA certificate: connect with TLS.")] = None,
    tls_cert: Annotated[Optional[Path], typer.Option(help="Client certificate.")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="Client certificate key.")] = None,
    username: Annotated[Optional[str], typer.Option(help="Broker user name.")] = None,
    password_file: Annotated[Optional[Path], typer.Option(help="File holding the broker password.")] = None,
    mqtt_version: Annotated[str, typer.Option(help="3.1.1 or 5.")] = "3.1.1",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Coordinate a run over MQTT: rounds with deadlines, NeFedAvg, per-round checkpoints, metrics and a report."""
    from nefl_edge.coordinator.config import ConfigError, load_config, parse_gammas
    from nefl_edge.edge_client.mqtt import BrokerAddress

    setup_logging(verbose)
    overrides: dict[str, Any] = {
        "run": run,
        "model": model,
        "dataset": dataset,
        "data_dir": data_dir,
        "method": method,
        "rounds": rounds,
        "fraction": fraction,
        "min_clients": min_clients,
        "min_updates": min_updates,
        "policy": policy,
        "deadline_s": deadline_s,
        "wait_clients_s": wait_clients_s,
        "weighting": weighting,
        "eval_samples": eval_samples,
        "seed": seed,
        "runs_dir": runs_dir,
        "train.lr": lr,
        "train.momentum": momentum,
        "train.weight_decay": weight_decay,
        "train.batch_size": batch_size,
        "train.epochs": epochs,
        "train.max_steps": max_steps,
        "chunk_size": chunk_size,
    }
    try:
        overrides["gammas"] = parse_gammas(gammas)
        if resume is not None:
            if not (resume / "config.json").is_file():
                fail(f"{resume} is not a run directory (no config.json)")
            base = resume / "config.json"
            import json

            data = json.loads(base.read_text())
            data.update({k: v for k, v in overrides.items() if v is not None and k in ("rounds", "deadline_s")})
            cfg = load_config(None, data)
        else:
            cfg = load_config(config, overrides)
        address = BrokerAddress.parse(broker, 8883 if tls_ca else 1883)
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
        return
    run_coordinator(cfg, address, _security(tls_ca, tls_cert, tls_key, username, password_file), resume, mqtt_version)


def run_coordinator(cfg: Any, address: Any, security: Any, run_dir: Optional[Path], mqtt_version: str) -> Path:
    """Prepare, connect and serve with a live progress line; print the final table. Used by serve and demo."""
    from nefl_edge.coordinator.report import final_table, read_metrics, summary
    from nefl_edge.coordinator.server import Coordinator
    from nefl_edge.edge_client.artifacts import ArtifactError
    from nefl_edge.edge_client.data import DataError
    from nefl_edge.edge_client.mqtt import BrokerError
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    try:
        coord = Coordinator(cfg, address, security, run_dir, mqtt_version)
        coord.prepare()
        coord.connect()
    except (DataError, ArtifactError, ValueError) as exc:
        fail(str(exc))
        raise
    except BrokerError as exc:
        fail(str(exc), EXIT_BROKER)
        raise

    def interrupt(signum: int, frame: Any) -> None:
        logging.getLogger(__name__).warning("interrupted: finishing after the current round")
        coord.stop_event.set()

    previous = signal.signal(signal.SIGINT, interrupt)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(f"run {cfg.run}", total=cfg.rounds, completed=coord.round)

        def on_round(stats: Any, rows: list[dict[str, Any]]) -> None:
            accs = " ".join(f"{100 * r['accuracy']:.1f}" for r in rows)
            progress.update(
                bar,
                advance=1,
                description=f"round {stats.round}: {stats.updates}/{stats.selected} updates, acc % {accs}",
            )

        coord.on_round = on_round
        coord.on_progress = lambda text: progress.update(bar, description=text)
        try:
            out = coord.serve()
        except TimeoutError as exc:
            fail(str(exc), 4)
            raise
        finally:
            signal.signal(signal.SIGINT, previous)
    rows = final_table(read_metrics(out / "metrics.jsonl"))
    print_table(console, rows, summary(rows))
    console.print(f"report: {out / 'report.html'} (picture: {out / 'report.png'}); metrics: {out / 'metrics.jsonl'}")
    return out


def print_table(console: Any, rows: list[dict[str, Any]], stats: dict[str, float]) -> None:
    from rich.table import Table

    table = Table(title="accuracy of every submodel after the last round")
    for column in ("submodel", "gamma", "accuracy %", "loss"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["submodel"]), f"{r['gamma']:.2f}", f"{100 * r['accuracy']:.2f}", f"{r['loss']:.3f}")
    for key, value in stats.items():
        table.add_row(key, "", f"{100 * value:.2f}", "")
    console.print(table)


@app.command()
def simulate(
    method: Annotated[
        str,
        typer.Option(help="nefl-wd, nefl-w, nefl-d, heterofl, fjord, depthfl, fedavg-smallest or fedavg-full."),
    ] = "nefl-wd",
    dataset: Dataset = "fmnist",
    data_dir: Annotated[
        Optional[Path], typer.Option(help="IDX or CIFAR folder (or .npz); default Debian's Fashion-MNIST.")
    ] = None,
    model: Model = "resnet-small",
    gammas: Gammas = None,
    clients: Annotated[int, typer.Option(help="Number of simulated devices (tiers assigned round-robin).")] = 100,
    fraction: Annotated[float, typer.Option(help="Share of the able devices that trains each round.")] = 0.1,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 10,
    scheme: Annotated[str, typer.Option(help="Partition: iid, dirichlet or shards.")] = "iid",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration.")] = 0.5,
    epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 1,
    lr: Annotated[float, typer.Option(help="Local learning rate.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Random seed (partition, selection, initialisation).")] = 0,
    test_samples: Annotated[int, typer.Option(help="Test samples evaluated (0: all).")] = 0,
    eval_every: Annotated[int, typer.Option(help="Evaluate every N rounds (0: only at the end).")] = 0,
    trainer: Annotated[
        str, typer.Option(help="Local training: torch, or ort (the exported ONNX Runtime artifacts).")
    ] = "torch",
    out: Annotated[Optional[Path], typer.Option(help="Write the result as JSON here.")] = None,
) -> None:
    """Simulate a federated method in this process (no broker): same specs, extraction and NeFedAvg as serve."""
    import json
    import tempfile

    from nefl_edge.coordinator.config import ConfigError, parse_gammas
    from nefl_edge.coordinator.partition import make_partitioner, split_dataset
    from nefl_edge.coordinator.simulate import simulate as run_simulation
    from nefl_edge.coordinator.specs import DEFAULT_GAMMAS, SpecError, get_model_config
    from nefl_edge.coordinator.strategies import get_strategy
    from nefl_edge.edge_client.data import DataError, load_dataset
    from nefl_edge.edge_client.data import Dataset as Data
    from nefl_edge.edge_client.schemas import TrainConfig
    from rich.console import Console
    from rich.table import Table

    if trainer not in ("torch", "ort"):
        fail(f"--trainer must be torch or ort, got {trainer!r}")
    try:
        strategy = get_strategy(method)
        if trainer == "ort" and not strategy.device_trainable:
            raise ValueError(f"{method} trains locally in its own way, not as the device does; use --trainer torch")
        config = get_model_config(model, dataset)
        wanted = tuple(parse_gammas(gammas) or DEFAULT_GAMMAS)
        train_data, test_data = load_dataset(data_dir, "train"), load_dataset(data_dir, "test")
        train_data.check_for((config.in_channels, config.image_size, config.image_size), config.num_classes)
        parts = make_partitioner(scheme, clients, alpha, seed).split(train_data.y)
    except (ValueError, SpecError, DataError, ConfigError) as exc:
        fail(str(exc))
        return
    shards = split_dataset(train_data, parts)
    n = test_samples or len(test_data)
    calibration = test_data.x[n : n + 500] if n + 500 <= len(test_data) else test_data.x[-500:]
    test = Data(test_data.x[:n], test_data.y[:n], "test")
    tiers = [i % len(wanted) for i in range(clients)]
    artifacts = None
    if trainer == "ort":
        from nefl_edge.export.artifacts import export_set

        plan = strategy.plan(strategy.configure(config), wanted)
        artifacts = Path(tempfile.mkdtemp(prefix="nefl-sim-artifacts-"))
        export_set(strategy.configure(config), plan.specs, artifacts)
    typer.echo(f"{strategy.name}: {strategy.reference}")

    def progress(r: int, accuracy: list[float]) -> None:
        typer.echo(f"round {r}/{rounds}: " + " ".join(f"{100 * a:.1f}" for a in accuracy))

    result = run_simulation(
        strategy,
        config,
        wanted,
        shards,
        tiers,
        test,
        rounds,
        TrainConfig(epochs=epochs, lr=lr),
        fraction,
        seed=seed,
        calibration=calibration,
        eval_every=eval_every,
        trainer=trainer,  # type: ignore[arg-type]
        artifacts=artifacts,
        on_round=progress,
    )
    table = Table(title=f"{strategy.name}, {scheme}, {rounds} rounds ({result.seconds:.0f} s)")
    for column in ("device tier (gamma)", "submodel gamma", "accuracy %"):
        table.add_column(column, justify="right")
    for tier, (gamma, acc) in enumerate(zip(wanted, result.tier_accuracy())):
        index = result.tier_submodel[tier]
        sub = "—" if index is None else f"{result.submodel_gammas[index]:.3f}"
        table.add_row(f"{gamma}", sub, "no model" if acc is None else f"{100 * acc:.2f}")
    Console().print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.__dict__, indent=2) + "\n")
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
    from nefl_edge.edge_client.data import DataError, load_dataset

    try:
        data = load_dataset(dataset, "train")
        parts = make_partitioner(scheme, clients, alpha, seed).split(data.y)
    except (DataError, ValueError) as exc:
        fail(str(exc))
        return
    paths = write_shards(data, parts, out, max_samples)
    classes = int(data.y.max()) + 1
    hist = label_histogram(data.y, [p[:max_samples] if max_samples else p for p in parts], classes)
    typer.echo("client  samples  " + " ".join(f"{c:>5}" for c in range(classes)))
    for i, row in enumerate(hist):
        typer.echo(f"{i:>6}  {row.sum():>7}  " + " ".join(f"{v:>5}" for v in row))
    plot_histogram(hist, out / "labels.png", f"{scheme} partition of {data.name}, {clients} devices")
    typer.echo(f"label skew {label_skew(hist):.3f} (0 = uniform labels); {len(paths)} shards and labels.png in {out}")


@app.command()
def demo(
    clients: Annotated[int, typer.Option(help="Number of edge devices (real nefl-edge processes).")] = 5,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 8,
    gammas: Gammas = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Data folder; default Debian's Fashion-MNIST.")] = None,
    broker: Annotated[Optional[str], typer.Option(help="Use this broker (HOST:PORT) instead of starting one.")] = None,
    embedded_broker: Annotated[
        bool, typer.Option(help="Use the embedded amqtt broker even if Mosquitto is installed.")
    ] = False,
    samples_per_client: Annotated[int, typer.Option(help="Training samples per device.")] = 2000,
    scheme: Annotated[str, typer.Option(help="Partition: iid, dirichlet or shards.")] = "iid",
    alpha: Annotated[float, typer.Option(help="Dirichlet alpha.")] = 0.5,
    runs_dir: Annotated[Path, typer.Option(help="Where the run directory goes.")] = Path("runs"),
    eval_samples: Annotated[int, typer.Option(help="Test samples per evaluation.")] = 2000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a whole federated job on this machine: broker, N devices, R rounds, accuracy table and report."""
    from nefl_edge.coordinator.config import ConfigError, parse_gammas
    from nefl_edge.coordinator.demo import DemoOptions, run_demo
    from nefl_edge.coordinator.specs import DEFAULT_GAMMAS
    from nefl_edge.edge_client.data import DataError

    setup_logging(verbose)
    try:
        options = DemoOptions(
            clients=clients,
            rounds=rounds,
            gammas=tuple(parse_gammas(gammas) or DEFAULT_GAMMAS),
            data_dir=data_dir,
            broker=broker,
            broker_kind="amqtt" if embedded_broker else "auto",
            samples_per_client=samples_per_client,
            scheme=scheme,
            alpha=alpha,
            runs_dir=runs_dir,
            eval_samples=eval_samples,
            seed=seed,
        )
        if clients < 1 or rounds < 1 or samples_per_client < 2:
            fail("--clients and --rounds must be at least 1, --samples-per-client at least 2")
        run_demo(options)
    except (ConfigError, DataError, ValueError, RuntimeError) as exc:
        fail(str(exc))
