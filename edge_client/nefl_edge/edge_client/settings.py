"""The device's settings, declared once: :class:`DeviceArgs` (with their options: types, help, defaults) is
what `nefl-edge join` takes, what `nefl-edge agent` takes beside :class:`AgentOnlyArgs`, what
`install-service` passes on (:func:`setting`), and how the unit's ExecStart spells them (:func:`device_flag`,
used by ``edge_client.agent.systemd_unit``). The command signatures are built from the fields
(:func:`declared`); a flag is the field name with dashes, as typer makes it.

Departure from the settings' other home: ``edge_client.client.ClientOptions`` (what a running client needs)
keeps its own names for two of them (``protocol`` for ``mqtt_version``, ``chunk_size`` for
``max_message_size``); ``edge_client.cli`` maps them in one place."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

StateDir = Annotated[
    Optional[Path],
    typer.Option(help="Identity folder (default $NEFL_STATE_DIR or ~/.local/state/nefl-edge)."),
]
BrokerOption = Annotated[
    Optional[str], typer.Option(help="MQTT broker as HOST or HOST:PORT. Default: the enrolment's broker.")
]
NodeIdOption = Annotated[
    Optional[str],
    typer.Option(
        help="This device's id (letters, digits, . _ -). Default: the enrolled name, else the identity's generated "
        "id. Without --state-dir and enrolment, an explicit id uses no identity (demos, tests)."
    ),
]


DEFAULT_CACHE = Path.home() / ".cache" / "nefl-edge"


@dataclass(frozen=True)
class DeviceArgs:
    """The device's settings, declared once. The fields, with their types, option help and defaults, are the
    options of `join` (its signature is built from them) and of `agent` (the same, with its own ``--run`` and
    :class:`AgentOnlyArgs` added); `install-service` takes the ones it passes on from here, and the unit it
    writes spells them with :func:`device_flag`. A setting renamed here is renamed everywhere."""

    data: Annotated[Path, typer.Option(help="Local data: an IDX or CIFAR folder, or an .npz file with x and y.")]
    broker: BrokerOption = None
    node_id: NodeIdOption = None
    state_dir: StateDir = None
    run: Annotated[str, typer.Option(help="The run to join (the coordinator's --run).")] = "default"
    tier: Annotated[
        Optional[int],
        typer.Option(help="Declared device tier for the coordinator's static policy (0 = smallest submodel)."),
    ] = None
    cache: Annotated[Path, typer.Option(help="Folder for cached artifacts and the latest trained weights.")] = (
        DEFAULT_CACHE
    )
    tls_ca: Annotated[Optional[Path], typer.Option(help="CA certificate file: connect with TLS.")] = None
    tls_cert: Annotated[Optional[Path], typer.Option(help="Client certificate for TLS client authentication.")] = None
    tls_key: Annotated[Optional[Path], typer.Option(help="Key of the client certificate.")] = None
    username: Annotated[Optional[str], typer.Option(help="Broker user name.")] = None
    password_file: Annotated[Optional[Path], typer.Option(help="File holding the broker password.")] = None
    mqtt_version: Annotated[str, typer.Option(help="MQTT protocol version: 3.1.1 or 5.")] = "3.1.1"
    threads: Annotated[
        int, typer.Option(help="Training threads (0: the fastest setting, measured at the first join and cached).")
    ] = 0
    max_samples: Annotated[Optional[int], typer.Option(help="Use only the first N samples of the data.")] = None
    max_message_size: Annotated[int, typer.Option(help="Bytes per MQTT message; larger payloads are chunked.")] = (
        1048576
    )
    backend: Annotated[
        str, typer.Option(help="Training backend: auto, ort-training (training build) or portable (stock onnxruntime).")
    ] = "auto"
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False
    log_format: Annotated[
        str, typer.Option(help="Log lines as text, or json: one object per event (joined, task, update, decline).")
    ] = "text"


@dataclass(frozen=True)
class AgentOnlyArgs:
    """The options only `agent` takes (how it lives), beside :class:`DeviceArgs`."""

    once: Annotated[bool, typer.Option("--once", help="Exit after one run (as `join`).")] = False
    broker_wait: Annotated[
        Optional[float], typer.Option(help="Give up (exit 3) if the broker is not reached within S seconds.")
    ] = None
    backoff_max: Annotated[float, typer.Option(help="Longest wait between broker connection attempts (s).")] = 60.0


def declared(cls: type, **changed: tuple[Any, Any]) -> list[inspect.Parameter]:
    """The fields of the dataclass ``cls`` as keyword-only parameters of a command, annotated with their
    options; ``changed``: name -> (annotation, default) for a command whose option differs."""
    hints = typing.get_type_hints(cls, include_extras=True)
    params = []
    for f in dataclasses.fields(cls):
        default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        annotation, default = changed.get(f.name, (hints[f.name], default))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return params


def device_flag(name: str) -> str:
    """The command-line flag of the device setting ``name`` (a :class:`DeviceArgs` field): the first name its
    option declares, else typer's ``--name-with-dashes``. ``KeyError`` for a name that is not a setting."""
    option = _option(typing.get_type_hints(DeviceArgs, include_extras=True)[name])
    flags = [d for d in option.param_decls or () if d.startswith("--")]
    return flags[0] if flags else "--" + name.replace("_", "-")


def setting(name: str, help: Optional[str] = None, optional: bool = False) -> inspect.Parameter:
    """The device setting ``name`` as a keyword-only parameter of a command that passes it on (``install-service``):
    its declared flag, type and default, with another ``help`` text, or ``optional`` (default ``None``: not
    passed on)."""
    hint = typing.get_type_hints(DeviceArgs, include_extras=True)[name]
    option = copy.copy(_option(hint))
    if help is not None:
        option.help = help
    field = next(f for f in dataclasses.fields(DeviceArgs) if f.name == name)
    default: Any = inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default
    base = hint.__origin__
    if optional:
        base, default = Optional[base], None
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[base, option])


def _option(hint: Any) -> typer.models.OptionInfo:
    return next(m for m in hint.__metadata__ if isinstance(m, typer.models.OptionInfo))
