"""The coordinator's run configuration: TOML file, command-line overrides, validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import tomllib
from nefl_edge.coordinator.specs import DEFAULT_GAMMAS
from nefl_edge.edge_client.schemas import NAME_PATTERN, TrainConfig
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A configuration value that is wrong; the message names the key."""


class RunConfig(BaseModel):
    """Everything a ``nefl-coord serve`` run needs. Every key can also be given on the command line."""

    model_config = ConfigDict(extra="forbid")

    run: str = Field("default", pattern=NAME_PATTERN, description="run name: namespaces the MQTT topics")
    model: str = "resnet-small"
    dataset: Literal["fmnist", "mnist", "cifar10", "cifar100"] = "fmnist"
    data_dir: Optional[Path] = Field(None, description="test-set folder; default Debian's Fashion-MNIST")
    gammas: list[float] = Field(default_factory=lambda: list(DEFAULT_GAMMAS))
    method: Literal["WD", "W", "D"] = "WD"
    rounds: int = Field(5, ge=1)
    fraction: float = Field(1.0, gt=0, le=1, description="share of online clients selected per round")
    min_clients: int = Field(1, ge=1, description="clients that must be online before a round starts")
    min_updates: int = Field(1, ge=1, description="valid updates needed to change the global model")
    policy: Literal["static", "deadline"] = "static"
    deadline_s: float = Field(120.0, gt=0, description="seconds a client has for its task")
    wait_clients_s: float = Field(120.0, gt=0, description="how long a round waits for min_clients")
    weighting: Literal["samples", "uniform"] = "samples"
    eval_samples: int = Field(2000, ge=1, description="test samples used to evaluate every submodel")
    bn_calibration: int = Field(
        500,
        ge=0,
        description="unlabeled held-out samples to re-estimate BatchNorm statistics after aggregation (0: off)",
    )
    seed: int = 0
    runs_dir: Path = Path("runs")
    chunk_size: int = Field(1 << 20, ge=1024)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("gammas")
    @classmethod
    def _gammas(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < g <= 1 for g in value) or sorted(value) != value:
            raise ValueError("gammas must be increasing values in (0, 1], e.g. 0.2,0.4,0.6,0.8,1.0")
        return value


def _explain(exc: ValidationError) -> ConfigError:
    lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    return ConfigError("invalid configuration: " + "; ".join(lines))


def load_config(path: Optional[Path], overrides: dict[str, Any]) -> RunConfig:
    """Read a TOML file (optional) and apply command-line overrides (``None`` values are ignored)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    for key, value in overrides.items():
        if value is None:
            continue
        if key.startswith("train."):
            data.setdefault("train", {})[key.removeprefix("train.")] = value
        else:
            data[key] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc) from None


def parse_gammas(text: Optional[str]) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise ConfigError(f"--gammas must be comma-separated numbers, got {text!r}") from None
