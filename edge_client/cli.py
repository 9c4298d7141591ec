"""``nefl-edge``: the device's command line."""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from typing_extensions import Annotated

app = typer.Typer(
    help="nefl-edge: the device side of nested federated learning (ONNX Runtime + MQTT).",
    no_args_is_help=True,
    add_completion=False,
)

EXIT_BAD_INPUT = 2
EXIT_BROKER = 3


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("paho").setLevel(logging.WARNING)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def join(
    broker: Annotated[str, typer.Option(help="MQTT broker as HOST or HOST:PORT.")],
    data: Annotated[Path, typer.Option(help="Local data: an IDX or CIFAR folder, or an .npz file with x and y.")],
    node_id: Annotated[
        Optional[str], typer.Option(help="This device's id (letters, digits, . _ -). Default: host name.")
    ] = None,
    run: Annotated[str, typer.Option(help="The run to join (the coordinator's --run).")] = "default",
    tier: Annotated[
        Optional[int],
        typer.Option(help="Declared device tier for the coordinator's static policy (0 = smallest submodel)."),
    ] = None,
    cache: Annotated[Path, typer.Option(help="Folder for cached artifacts.")] = Path.home() / ".cache" / "nefl-edge",
    tls_ca: Annotated[Optional[Path], typer.Option(help="CA certificate file: connect with TLS.")] = None,
    tls_cert: Annotated[Optional[Path], typer.Option(help="Client certificate for TLS client authentication.")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="Key of the client certificate.")] = None,
    username: Annotated[Optional[str], typer.Option(help="Broker user name.")] = None,
    password_file: Annotated[Optional[Path], typer.Option(help="File holding the broker password.")] = None,
    mqtt_version: Annotated[str, typer.Option(help="MQTT protocol version: 3.1.1 or 5.")] = "3.1.1",
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads (0: all cores).")] = 0,
    max_samples: Annotated[Optional[int], typer.Option(help="Use only the first N samples of the data.")] = None,
    max_message_size: Annotated[
        int, typer.Option(help="Bytes per MQTT message; larger payloads are chunked.")
    ] = 1048576,
    backend: Annotated[
        str, typer.Option(help="Training backend: auto, ort-training (training build) or portable (stock onnxruntime).")
    ] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Join a run: announce this device, take training tasks, train with ONNX Runtime, upload the weights."""
    from nefl_edge.edge_client.client import ClientOptions, EdgeClient
    from nefl_edge.edge_client.data import DataError, load_dataset
    from nefl_edge.edge_client.mqtt import BrokerAddress, BrokerError, Security
    from nefl_edge.edge_client.schemas import NAME_PATTERN
    from nefl_edge.edge_client.trainer import BackendUnavailable

    setup_logging(verbose)
    node = node_id or socket.gethostname().split(".")[0]
    if not re.match(NAME_PATTERN, node):
        fail(f"node id {node!r} must be 1-64 letters, digits, '.', '_' or '-'; pass --node-id")
    if not re.match(NAME_PATTERN, run):
        fail(f"run {run!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if mqtt_version not in ("3.1.1", "5"):
        fail(f"--mqtt-version must be 3.1.1 or 5, got {mqtt_version!r}")
    try:
        address = BrokerAddress.parse(broker, 8883 if tls_ca else 1883)
        dataset = load_dataset(data, "train")
    except (ValueError, DataError) as exc:
        fail(str(exc))
        return
    if max_samples is not None:
        dataset.x, dataset.y = dataset.x[:max_samples], dataset.y[:max_samples]
    security = Security(tls_ca, tls_cert, tls_key, False, username, password_file)
    if max_message_size < 1024:
        fail("--max-message-size must be at least 1024 bytes")
    options = ClientOptions(
        address, node, run, cache, security, mqtt_version, tier, threads, chunk_size=max_message_size, backend=backend
    )
    try:
        client = EdgeClient(options, dataset)
    except (BrokerError, BackendUnavailable, ValueError) as exc:
        fail(str(exc))
        return

    def leave(signum: int, frame: Any) -> None:
        logging.getLogger(__name__).info("interrupted; leaving the run cleanly")
        client.stop()

    signal.signal(signal.SIGINT, leave)
    signal.signal(signal.SIGTERM, leave)
    try:
        client.run()
    except BrokerError as exc:
        fail(str(exc), EXIT_BROKER)
    except DataError as exc:
        fail(str(exc))


@app.command()
def profile(
    artifacts: Annotated[
        Optional[Path], typer.Option(help="An export folder: also time training of its smallest submodel.")
    ] = None,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads (0: all cores).")] = 0,
    backend: Annotated[str, typer.Option(help="auto, ort-training or portable.")] = "auto",
) -> None:
    """Print this device's profile (JSON): hardware, ONNX Runtime, training backend, throughput."""
    from nefl_edge.edge_client.artifacts import ArtifactError, load_manifest, submodel_paths
    from nefl_edge.edge_client.profile import device_profile, measure_throughput
    from nefl_edge.edge_client.trainer import BACKEND_FILES, BackendUnavailable, choose_backend, create_backend

    speed = probe = None
    try:
        kind = choose_backend(backend)
        if artifacts is not None:
            manifest = load_manifest(artifacts)
            sub = min(manifest.submodels, key=lambda s: s.mflops)
            paths = submodel_paths(artifacts, sub, BACKEND_FILES[kind])
            trainer = create_backend(kind, paths, sub.params, manifest.train, threads)
            speed = measure_throughput(trainer, manifest.input_shape, manifest.num_classes)
            probe = sub.mflops
    except (ArtifactError, BackendUnavailable, ValueError) as exc:
        fail(str(exc))
        return
    typer.echo(json.dumps(device_profile(kind, speed, probe).model_dump(), indent=1))


def main() -> None:  # pragma: no cover
    sys.exit(app())
