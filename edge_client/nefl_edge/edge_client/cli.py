"""``nefl-edge``: the device's command line."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from nefl_edge.core.cli import check_folder, event, fail, no_flag_metavars, run_app, setup_logging
from nefl_edge.core.errors import ExitCode
from nefl_edge.edge_client.runtime import keep_torch_out
from nefl_edge.edge_client.settings import (
    DEFAULT_CACHE,
    AgentOnlyArgs,
    DeviceArgs,
    StateDir,
    declared,
    device_flag,
    setting,
)

if TYPE_CHECKING:
    from nefl_edge.core.data import Dataset
    from nefl_edge.core.identity import Identity

app = typer.Typer(
    help="nefl-edge: the device side of nested federated learning (ONNX Runtime + MQTT).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
keep_torch_out()  # before any command imports onnxruntime


no_flag_metavars()


def _version(value: bool) -> None:
    if value:
        from nefl_edge.edge_client.profile import version_text

        typer.echo(version_text("nefl-edge"))
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", callback=_version, is_eager=True, help="Show versions (ONNX Runtime, backend, commit)."
        ),
    ] = False,
) -> None:
    """nefl-edge: the device side of nested federated learning (ONNX Runtime + MQTT)."""


def _open_identity(state_dir: Optional[Path], node_id: Optional[str]) -> Optional[Identity]:
    """The device's identity, locked for the life of the process; ``None`` for an explicit ``--node-id``
    without ``--state-dir`` and without an enrolment in the default state dir (demos and tests)."""
    from nefl_edge.core.identity import IdentityError, default_state_dir, open_identity

    folder = state_dir or default_state_dir()
    if node_id is not None and state_dir is None and not (folder / "enrolment.json").exists():
        return None
    try:
        identity = open_identity(folder, lock=True)
    except (IdentityError, OSError) as exc:
        fail(str(exc))
    return identity


DEVICE_EVENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "joined run %s as %s with %d samples; waiting for tasks": ("joined", ("run", "node", "samples")),
    "run %s ended: %s": ("run_end", ("run", "reason")),
    "left run %s: %s": ("left", ("run", "reason")),
    "round %d: training submodel %d (gamma %.2f) for at most %.0f s": (
        "task", ("round", "submodel", "gamma", "deadline_s"),
    ),
    "round %d: uploaded %d KiB; loss %.3f -> %.3f, accuracy %.3f in %.1f s": (
        "update", ("round", "kib", "loss_first", "loss_last", "accuracy", "seconds"),
    ),
    "round %d: evaluated submodels %s (%s) in %.1f s": ("evaluation", ("round", "submodels", "accuracy", "seconds")),
    "round %d: declining task %s: %s": ("decline", ("round", "task", "reason")),
    "refused task %s of round %d: %s; not training it": ("refused", ("task", "round", "reason")),
    "reached %s after %d failed attempts": ("connected", ("broker", "attempts")),
    "%s; attempt %d failed, retrying in %.0f s": ("retry", ("error", "attempt", "delay_s")),
    "run %s is announced": ("announced", ("run",)),
    "serving run %s": ("serving", ("run",)),
    "cannot take part in run %s: %s": ("cannot_take_part", ("run", "reason")),
}  # fmt: skip
"""The device's log lines that ``--log-format json`` names as events: format string -> event and the names
of its arguments (``core.cli.JsonLines``)."""


def _device(args: DeviceArgs, pinned: bool, agent_options: Any) -> None:
    """`join` (one run, ``agent_options`` None) and `agent` (long-lived): same options, one code path. The
    identity (when one is used) stays locked until the process ends: a second process gets a clear error."""
    from nefl_edge.core.data import DataError, load_dataset
    from nefl_edge.core.schemas import NAME_PATTERN
    from nefl_edge.edge_client.trainer import BackendUnavailable, choose_backend

    setup_logging(args.verbose, log_format=args.log_format, templates=DEVICE_EVENTS)
    if args.node_id is not None and not re.match(NAME_PATTERN, args.node_id):
        fail(f"node id {args.node_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if not re.match(NAME_PATTERN, args.run):
        fail(f"run {args.run!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if args.mqtt_version not in ("3.1.1", "5"):
        fail(f"--mqtt-version must be 3.1.1 or 5, got {args.mqtt_version!r}")
    if args.max_message_size < 1024:
        fail("--max-message-size must be at least 1024 bytes")
    if args.tier is not None and args.tier < 0:
        fail(f"--tier must be 0 or more, got {args.tier}")
    if args.threads < 0:
        fail(f"--threads must be 0 (the fastest setting) or more, got {args.threads}")
    if args.max_samples is not None and args.max_samples < 1:
        fail(f"--max-samples must be at least 1, got {args.max_samples}")
    check_folder(args.cache, "--cache")
    if args.state_dir is not None:
        check_folder(args.state_dir, "--state-dir")
    try:
        dataset = load_dataset(args.data, "train")
        choose_backend(args.backend)
    except (DataError, BackendUnavailable, ValueError) as exc:  # ValueError: an unknown --backend
        fail(str(exc))
    if args.max_samples is not None:
        dataset.x, dataset.y = dataset.x[: args.max_samples], dataset.y[: args.max_samples]
    identity = _open_identity(args.state_dir, args.node_id)
    try:
        _serve_device(identity, args, dataset, pinned, agent_options)
    finally:
        if identity is not None:
            identity.close()


def _serve_device(
    identity: Optional[Identity], args: DeviceArgs, dataset: Dataset, pinned: bool, agent_options: Any
) -> None:
    """Resolve node id, broker, credentials and keys (from the enrolment unless given), then serve."""
    from nefl_edge.core.data import DataError
    from nefl_edge.core.mqtt import BrokerAddress, BrokerError, Security
    from nefl_edge.edge_client.agent import Agent, AgentOptions
    from nefl_edge.edge_client.client import ClientOptions
    from nefl_edge.edge_client.trainer import BackendUnavailable

    log = logging.getLogger(__name__)
    node_id, broker, tls_ca, username, password_file = (
        args.node_id, args.broker, args.tls_ca, args.username, args.password_file,
    )  # fmt: skip
    signer = keyring = None
    key_id = "coordinator"
    if identity is not None and identity.enrolment is not None:
        enrolment = identity.enrolment
        if node_id is not None and node_id != enrolment.node:
            fail(
                f"this device is enrolled as {enrolment.node!r} (in {identity.state_dir}); --node-id {node_id} "
                "conflicts with it: leave --node-id out, or pass another --state-dir"
            )
        node = enrolment.node
        broker = broker or enrolment.broker
        tls_ca = tls_ca or enrolment.ca_cert
        if username is None and password_file is None:
            username, password_file = enrolment.username, enrolment.password_file
        signer, keyring, key_id = identity.signer(), identity.keyring(), enrolment.coordinator_key_id
        log.info(
            "enrolled as %s (key %s): signing what this device sends; taking only messages signed by the "
            "coordinator's key %s",
            node,
            identity.fingerprint,
            identity.describe()["coordinator_fingerprint"],
        )
    else:
        node = node_id or (identity.node if identity is not None else "")
        log.warning(
            "UNAUTHENTICATED DEVICE: not enrolled, so it accepts unsigned tasks, weights and control messages "
            "from anyone who can publish on the broker, and signs nothing. Use it on a trusted network only; "
            "to enrol: `nefl-edge identity`, `nefl-coord add-device`, `nefl-edge enrol BUNDLE` (README: "
            "'Deploying to real devices')."
        )
    if broker is None:
        fail("pass --broker HOST[:PORT] (an enrolled device takes it from its enrolment: `nefl-edge enrol`)")
    try:
        address = BrokerAddress.parse(broker, 8883 if tls_ca else 1883)
    except ValueError as exc:
        fail(str(exc))
    security = Security(tls_ca, args.tls_cert, args.tls_key, False, username, password_file)
    for path in (tls_ca, args.tls_cert, args.tls_key, password_file):
        if path is not None and not path.is_file():
            fail(f"file {path} does not exist; check the TLS / password options")
    options = ClientOptions(
        address,
        node,
        args.run,
        args.cache,
        security,
        args.mqtt_version,
        args.tier,
        args.threads,
        chunk_size=args.max_message_size,
        backend=args.backend,
        signer=signer,
        keyring=keyring,
        coordinator_key_id=key_id,
    )
    device = Agent(options, dataset, agent_options or AgentOptions(once=True, broker_wait_s=15.0), pinned=pinned)

    signalled: list[str] = []

    def leave(signum: int, frame: Any) -> None:
        signalled.append(signal.Signals(signum).name)
        logging.getLogger(__name__).info("%s: leaving the run cleanly", signalled[-1])
        device.stop()

    signal.signal(signal.SIGINT, leave)
    signal.signal(signal.SIGTERM, leave)
    try:
        device.run()
    except BrokerError as exc:
        fail(str(exc), ExitCode.BROKER)
    except (DataError, BackendUnavailable, ValueError) as exc:
        fail(str(exc))
    if signalled:
        text = f"stopped by {signalled[0]}; start it again to rejoin the run"
        if args.log_format == "json":  # every line an event, the last one too
            logging.getLogger(__name__).warning(text, extra=event("stopped", signal=signalled[0]))
        else:
            typer.echo(text, err=True)
        raise typer.Exit(ExitCode.INTERRUPTED)


def agent(**options: Any) -> None:
    """The long-lived device agent (what the systemd service runs): waits for the broker with backoff, serves
    run after run (the pinned --run, or any run announced on nefl/+/manifest), reconnects forever."""
    from nefl_edge.edge_client.agent import AgentOptions

    only = AgentOnlyArgs(**{f.name: options.pop(f.name) for f in dataclasses.fields(AgentOnlyArgs)})
    if only.broker_wait is not None and only.broker_wait <= 0:
        fail("--broker-wait must be positive")
    if only.backoff_max < 1:
        fail("--backoff-max must be at least 1 s")
    run: Optional[str] = options.pop("run")
    life = AgentOptions(once=only.once, broker_wait_s=only.broker_wait, backoff_max_s=only.backoff_max)
    _device(DeviceArgs(run=run or "default", **options), pinned=run is not None, agent_options=life)


def _agent_signature() -> inspect.Signature:
    """:class:`DeviceArgs` with a ``--run`` that is optional (any announced run), then :class:`AgentOnlyArgs`."""
    run_option = typer.Option(
        help="Serve only this run, again after each end. Default: any run announced on the broker."
    )
    params = declared(DeviceArgs, run=(Annotated[Optional[str], run_option], None))
    at = next(i for i, p in enumerate(params) if p.name == "run") + 1
    return inspect.Signature(params[:at] + declared(AgentOnlyArgs) + params[at:])


agent.__signature__ = _agent_signature()  # type: ignore[attr-defined]
app.command()(agent)


def join(**options: Any) -> None:
    """Join one run: announce this device, take training tasks, train with ONNX Runtime, upload the weights;
    exit when the run ends (exit 3 if the broker does not answer within 15 s). For a device that stays up,
    run after run, use `nefl-edge agent`. An enrolled device (`nefl-edge enrol`) signs what it sends and
    takes only what the coordinator signed."""
    _device(DeviceArgs(**options), pinned=True, agent_options=None)


join.__signature__ = inspect.Signature(declared(DeviceArgs))  # type: ignore[attr-defined]
app.command()(join)


@app.command()
def predict(
    data: Annotated[Path, typer.Option(help="Samples: an .npz file with x (and y for accuracy), or an IDX folder.")],
    cache: Annotated[Path, typer.Option(help="The device's --cache folder.")] = DEFAULT_CACHE,
    submodel: Annotated[
        Optional[int], typer.Option(help="Which kept submodel (default: the most recently trained).")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write logits and predictions to this .npz file.")] = None,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads (0: all cores).")] = 0,
) -> None:
    """Local inference with the latest weights this device trained (kept after each task)."""
    import numpy as np

    from nefl_edge.core.data import DataError, load_dataset
    from nefl_edge.edge_client.latest import LatestStore, LocalModel, NoLatestWeights

    check_folder(cache, "--cache")
    try:
        info = LatestStore(cache / "latest").get(submodel)
        model = LocalModel(info, cache / "artifacts", threads)
        samples = load_dataset(data, "test")
        samples.check_for(tuple(info.input_shape), info.num_classes)
    except (NoLatestWeights, DataError) as exc:
        fail(str(exc))
        return
    logits = model.logits(samples.x)
    predictions = logits.argmax(axis=1)
    accuracy = float((predictions == samples.y).mean()) if len(samples) else 0.0
    if out is not None:
        np.savez(out, logits=logits, predictions=predictions)
    summary = {
        "submodel": info.submodel,
        "gamma": info.gamma,
        "run": info.run,
        "round": info.round,
        "samples": len(samples),
        "accuracy": round(accuracy, 4),
    }
    typer.echo(json.dumps(summary))


@dataclass(frozen=True)
class ServiceArgs:
    """The options of `install-service` beside the device settings it passes on (:data:`SERVICE_SETTINGS`)."""

    user: Annotated[str, typer.Option(help="The dedicated system user the service runs as.")] = "nefl-edge"
    extra: Annotated[
        Optional[str], typer.Option(help="More agent options, e.g. '--tls-ca /etc/nefl-edge/ca.crt --threads 2'.")
    ] = None
    output: Annotated[Path, typer.Option(help="Where to write the unit.")] = Path(
        "/etc/systemd/system/nefl-edge.service"
    )
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the unit instead of writing it.")] = False


SERVICE_SETTINGS = (
    setting("data", "The device's data (readable by the service user)."),
    setting("broker"),
    setting("run", "Pin the agent to this run (default: any run).", optional=True),
    setting("password_file", "Root-only file with the broker password (passed as a systemd credential)."),
)
"""The device settings (``edge_client.settings.DeviceArgs``) that `install-service` writes into the unit."""


def install_service(**options: Any) -> None:
    """Write a systemd unit that runs `nefl-edge agent` as a dedicated user and restarts it always."""
    import shlex
    import shutil

    from nefl_edge.edge_client.agent import systemd_unit

    own = ServiceArgs(**{f.name: options.pop(f.name) for f in dataclasses.fields(ServiceArgs)})
    data: Path = options["data"]
    password_file: Optional[Path] = options["password_file"]
    exe = shutil.which("nefl-edge") or str(Path(sys.executable).with_name("nefl-edge"))
    extra_args = shlex.split(own.extra) if own.extra else []
    if any(a in ("--password", device_flag("password_file")) for a in extra_args):
        fail(f"pass the broker password with {device_flag('password_file')} here; it becomes a systemd credential")
    if not data.exists():
        fail(f"{device_flag('data')} {data}: no such file or folder (the service reads it as {own.user})")
    secret = password_file.resolve() if password_file is not None else None  # LoadCredential needs an absolute path
    exe = str(Path(exe).resolve())
    unit = systemd_unit(exe, options["broker"], data.resolve(), own.user, options["run"], extra_args, secret)
    if own.dry_run:
        typer.echo(unit, nl=False)
        return
    try:
        own.output.write_text(unit)
    except OSError as exc:
        fail(f"cannot write {own.output}: {exc} (run as root, or pass --output FILE / --dry-run)")
    typer.echo(f"wrote {own.output}. Then, as root:")
    typer.echo(f"  useradd --system --home-dir /var/lib/nefl-edge --shell /usr/sbin/nologin {own.user}")
    typer.echo("  systemctl daemon-reload && systemctl enable --now nefl-edge")
    typer.echo("  journalctl -u nefl-edge -f     # the agent's log")


_user, *_own = declared(ServiceArgs)
install_service.__signature__ = inspect.Signature([*SERVICE_SETTINGS[:3], _user, SERVICE_SETTINGS[3], *_own])  # type: ignore[attr-defined]
app.command("install-service")(install_service)


@app.command()
def profile(
    artifacts: Annotated[
        Optional[Path], typer.Option(help="An export folder: also time training of its smallest submodel.")
    ] = None,
    threads: Annotated[int, typer.Option(help="Training threads (0: the fastest setting, measured).")] = 0,
    backend: Annotated[str, typer.Option(help="auto, ort-training or portable.")] = "auto",
) -> None:
    """Print this device's profile (JSON): hardware, ONNX Runtime, training backend, throughput."""
    from nefl_edge.core.artifacts import ArtifactError, load_manifest, submodel_paths
    from nefl_edge.edge_client.profile import device_profile, probe_threads
    from nefl_edge.edge_client.trainer import BACKEND_FILES, BackendUnavailable, choose_backend, create_backend

    speed = probe = None
    try:
        kind = choose_backend(backend)
        if artifacts is not None:
            manifest = load_manifest(artifacts)
            sub = min(manifest.submodels, key=lambda s: s.mflops)
            paths = submodel_paths(artifacts, sub, BACKEND_FILES[kind])
            choice = probe_threads(
                lambda t, spin: create_backend(kind, paths, sub.params, manifest.train, t, spin),
                manifest.input_shape,
                manifest.num_classes,
                threads,
            )
            speed, probe = choice.samples_per_s, sub.mflops
            typer.echo(f"training threads: {choice.label} (samples/s tried: {choice.tried})", err=True)
    except (ArtifactError, BackendUnavailable, ValueError) as exc:
        fail(str(exc))
        return
    typer.echo(json.dumps(device_profile(kind, speed, probe).model_dump(), indent=1))


@app.command()
def identity(
    state_dir: StateDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show this device's identity (made on first use): node id, public key for `nefl-coord add-device`, enrolment."""
    from nefl_edge.core.identity import IdentityError, open_identity

    try:
        info = open_identity(state_dir, lock=False).describe()
    except (IdentityError, OSError) as exc:
        fail(str(exc))
        return
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    for key in ("node", "public_key", "fingerprint", "state_dir"):
        typer.echo(f"{key:<12} {info[key]}")
    if info["enrolled"]:
        typer.echo(f"enrolled     yes: broker {info['broker']} as {info['username']}, TLS CA {info['tls_ca']}")
        typer.echo(f"coordinator  {info['coordinator_fingerprint']}")
    else:
        typer.echo("enrolled     no: give the public key to `nefl-coord add-device`, then run `nefl-edge enrol BUNDLE`")


@app.command()
def enrol(
    bundle: Annotated[Path, typer.Argument(help="The bundle file made by `nefl-coord add-device`.")],
    state_dir: StateDir = None,
) -> None:
    """Install an enrolment bundle: broker account, coordinator public key, CA certificate."""
    from nefl_edge.core.identity import IdentityError, install_bundle

    try:
        with install_bundle(state_dir, bundle) as ident:
            info = ident.describe()
    except (IdentityError, OSError) as exc:
        fail(str(exc))
        return
    typer.echo(f"enrolled as {info['node']} on broker {info['broker']} (state in {info['state_dir']}).")
    typer.echo(f"The bundle {bundle} holds the broker password: delete it now that it is installed.")


def main() -> None:
    run_app(app, "nefl-edge")
