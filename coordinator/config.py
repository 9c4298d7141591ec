"""The run configuration, the one source of every run setting: the TOML file, the command-line options of
``serve`` and ``simulate`` (generated from this model by ``coordinator.cli_options``), validation, and what
``--resume`` may change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nefl_edge.coordinator.specs import DEFAULT_GAMMAS
from nefl_edge.edge_client.errors import BadInput
from nefl_edge.edge_client.schemas import NAME_PATTERN, TrainConfig

METHODS = ("nefl-wd", "nefl-w", "nefl-d", "heterofl", "fjord", "depthfl", "fedavg-smallest", "fedavg-full")
"""The federated methods (``coordinator.strategies.STRATEGIES``; a test keeps both lists equal)."""
Method = Literal["nefl-wd", "nefl-w", "nefl-d", "heterofl", "fjord", "depthfl", "fedavg-smallest", "fedavg-full"]
OLD_METHOD_NAMES = {"WD": "nefl-wd", "W": "nefl-w", "D": "nefl-d"}
FIXED_ON_RESUME = frozenset({"method", "model", "dataset", "gammas", "seed"})
"""Keys that define the model, the submodels or the random streams: ``--resume`` refuses to change them."""


class ConfigError(BadInput):
    """A configuration value that is wrong; the message names the key."""


class RunConfig(BaseModel):
    """Every setting of a run. Each key can be set in the TOML file and on the command line."""

    model_config = ConfigDict(extra="forbid")

    run: str = Field("default", pattern=NAME_PATTERN, description="run name: the MQTT topic namespace")
    method: Method = Field("nefl-wd", description="federated method: " + ", ".join(METHODS))
    model: str = Field(
        "resnet-small",
        description="model: resnet-small, resnet18, resnet34 (preact- prefix: pre-activation)",
    )
    dataset: Literal["fmnist", "mnist", "cifar10", "cifar100"] = Field(
        "fmnist", description="data set the model is for: fmnist, mnist, cifar10, cifar100"
    )
    data_dir: Optional[Path] = Field(None, description="data folder (IDX, CIFAR batches or .npz); default Debian's")
    gammas: list[float] = Field(
        default_factory=lambda: list(DEFAULT_GAMMAS),
        description="increasing parameter ratios of the submodels, comma-separated",
    )
    rounds: int = Field(5, ge=1, description="federated rounds in all")
    fraction: float = Field(1.0, gt=0, le=1, description="share of the available clients selected per round")
    min_clients: int = Field(1, ge=1, description="clients that must be available before a round starts")
    min_updates: int = Field(1, ge=1, description="valid updates needed to change the global model")
    policy: Literal["static", "deadline"] = Field(
        "deadline",
        description="device capacity: deadline (measured throughput vs deadline; declared tier without a "
        "profile) or static (declared tier)",
    )
    cover_submodels: bool = Field(True, description="give every submodel a client when the selected ones allow")
    cover_rule: Literal["random", "weakest"] = Field(
        "random",
        description="who moves to an uncovered submodel: a device drawn at random (its parameters see many "
        "devices' data over the rounds) or the weakest that can (fast devices keep the large submodels)",
    )
    deadline_s: float = Field(120.0, gt=0, description="seconds a client has for its task")
    wait_clients_s: float = Field(120.0, gt=0, description="seconds a round waits for min_clients")
    weighting: Literal["samples", "uniform"] = Field("samples", description="NeFedAvg weights: samples or uniform")
    update_norm_bound: float = Field(
        10.0, ge=0, description="reject updates moving the weights by more than this x their norm (0: off)"
    )
    quarantine_strikes: int = Field(3, ge=1, description="rejected updates in a row that quarantine a client")
    quarantine_rounds: int = Field(5, ge=0, description="rounds a quarantined client sits out")
    eval_samples: int = Field(2000, ge=1, description="held-out test samples that evaluate every submodel")
    bn_calibration: int = Field(
        500, ge=0, description="held-out unlabeled samples to re-estimate BatchNorm statistics (0: off)"
    )
    seed: int = Field(0, description="seed of initialisation, selection and local shuffles")
    runs_dir: Path = Field(Path("runs"), description="parent folder of run directories")
    chunk_size: int = Field(1 << 20, ge=1024, description="bytes per MQTT message; larger payloads are chunked")
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("method", mode="before")
    @classmethod
    def _method_name(cls, value: Any) -> Any:
        value = OLD_METHOD_NAMES.get(value, value) if isinstance(value, str) else value
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; choose one of: {', '.join(METHODS)}")
        return value

    @field_validator("gammas", mode="before")
    @classmethod
    def _gammas_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return [float(g) for g in value.split(",") if g.strip()]
            except ValueError:
                raise ValueError(f"gammas must be comma-separated numbers, got {value!r}") from None
        return value

    @field_validator("gammas")
    @classmethod
    def _gammas(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < g <= 1 for g in value) or sorted(value) != value:
            raise ValueError("gammas must be increasing values in (0, 1], e.g. 0.2,0.4,0.6,0.8,1.0")
        return value


def _explain(exc: ValidationError) -> ConfigError:
    lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    return ConfigError("invalid configuration: " + "; ".join(lines))


def _merge(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = {**data, "train": dict(data.get("train", {}))}
    for key, value in overrides.items():
        if value is None:
            continue
        if key.startswith("train."):
            merged["train"][key.removeprefix("train.")] = value
        else:
            merged[key] = value
    return merged


def validate(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc) from None


def load_config(path: Optional[Path], overrides: dict[str, Any]) -> RunConfig:
    """Read a TOML file (optional) and apply command-line overrides (``None`` values are ignored; keys of
    the train table are written ``train.lr``)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return validate(_merge(data, overrides))


def resume_config(run_dir: Path, overrides: dict[str, Any]) -> RunConfig:
    """The configuration of the run in ``run_dir`` with ``overrides`` applied. A key in
    :data:`FIXED_ON_RESUME` may only be repeated with its recorded value; any other key is applied."""
    path = run_dir / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} is not a run directory: {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is damaged ({exc}); start a new run instead of --resume") from None
    recorded = validate(data)
    for key, value in overrides.items():
        if value is None or key not in FIXED_ON_RESUME:
            continue
        if validate(_merge(data, {key: value})).model_dump()[key] != recorded.model_dump()[key]:
            raise ConfigError(
                f"--{key.replace('_', '-')} cannot change on --resume (the run was started with "
                f"{key} = {getattr(recorded, key)!r}); start a new run for a different {key}"
            )
    return validate(_merge(data, overrides))


def parse_gammas(text: Optional[str]) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise ConfigError(f"--gammas must be comma-separated numbers, got {text!r}") from None
