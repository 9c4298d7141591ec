"""The run configuration, the one source of every run setting: the TOML file, the command-line options of
``serve`` and ``simulate`` (generated from this model by ``coordinator.cli_options``), validation, and what
``--resume`` may change."""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Optional, get_args

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nefl_edge.core.data import channel_stats
from nefl_edge.core.errors import BadInput
from nefl_edge.core.robust import RobustOptions
from nefl_edge.core.schemas import NAME_PATTERN, TrainConfig
from nefl_edge.core.specs import DEFAULT_GAMMAS, ModelConfig, SpecError, get_model_config

Method = Literal[
    "nefl-wd",
    "nefl-wd-distill",
    "nefl-w",
    "nefl-d",
    "heterofl",
    "fedrolex",
    "fjord",
    "fjord-paper",
    "depthfl",
    "scalefl",
    "fedavg-smallest",
    "fedavg-full",
]
METHODS: tuple[str, ...] = get_args(Method)
"""The federated methods (``coordinator.strategies.STRATEGIES``; a test keeps both lists equal)."""
OLD_METHOD_NAMES = {"WD": "nefl-wd", "W": "nefl-w", "D": "nefl-d"}
FIXED_ON_RESUME = frozenset(
    {
        "method",
        "model",
        "dataset",
        "gammas",
        "seed",
        "stem_pool",
        "step_init",
        "specs",
        "normalize",
        "input_mean",
        "input_std",
    }
)
"""Keys that define the model, the submodels or the random streams: ``--resume`` refuses to change them."""


PRESETS: dict[str, dict[str, Any]] = {
    # The protocol of the NeFL paper's code (Kang et al., arXiv 2308.07761; the README's "paper protocol"):
    # SGD lr 0.1 without momentum or weight decay, x0.1 at T/2 and 3T/4, 5 local epochs of batch 32,
    # uniform NeFedAvg weights, tier-window assignment, step sizes from 1, max-pool stem, tracked BatchNorm,
    # the paper's submodel specs.
    "paper": {
        "fraction": 0.1,
        "weighting": "uniform",
        "tier_window": 2,
        "cover_submodels": False,
        "step_init": "one",
        "stem_pool": True,
        "specs": "paper",
        "normalize": True,
        "lr_decay_at": [0.5, 0.75],
        "lr_decay": 0.1,
        "lr_decay_round": "at",
        "bn": "tracked",
        "bn_calibration": 0,
        "train": {
            "lr": 0.1,
            "momentum": 0.0,
            "weight_decay": 0.0,
            "epochs": 5,
            "batch_size": 32,
            "partial_batch": True,
        },
    },
}
"""Named protocols (``--preset``): their values apply where the TOML file and the options set nothing."""


DEMO_DEFAULTS: dict[str, Any] = {"rounds": 8, "deadline_s": 180.0}
"""Where ``nefl-coord demo``'s run departs from the defaults of :class:`RunConfig`: more rounds, and a longer
deadline for devices that share the coordinator's cores (``coordinator.demo.demo_config``)."""
DEMO_SET = ("run", "min_clients", "min_updates")
"""Run settings ``nefl-coord demo`` sets itself (run ``demo``, every device awaited), not options of it."""


class ConfigError(BadInput):
    """A configuration value that is wrong; the message names the key."""


MAX_CHUNK_SIZE = (1 << 28) - (1 << 16)
"""The largest ``chunk_size``: an MQTT packet's remaining length is at most 268,435,455 bytes (MQTT 3.1.1
section 2.2.3), less room for the frame header, the topic and the properties."""


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
    fit_steps: bool = Field(
        True,
        description="deadline policy: a device whose projection cannot fit even its submodel's planned local "
        "steps within the deadline's margin trains as many as fit (FedProx's partial work) instead of declining "
        "(off: it gets the whole task, declines or misses it, and is dropped from the round)",
    )
    wait_clients_s: float = Field(120.0, gt=0, description="seconds a round waits for min_clients")
    weighting: Literal["samples", "uniform"] = Field("samples", description="NeFedAvg weights: samples or uniform")
    update_norm_bound: float = Field(
        10.0, ge=0, description="reject updates moving the weights by more than this x their norm (0: off)"
    )
    quarantine_strikes: int = Field(3, ge=1, description="rejected updates in a row that quarantine a client")
    quarantine_rounds: int = Field(5, ge=0, description="rounds a quarantined client sits out")
    aggregation: Literal["exact", "robust"] = Field(
        "exact",
        description="exact NeFedAvg, or robust (clipped updates, agreement with the median, capped weights, "
        "coordinate-wise trimmed mean per nested region; median-screened BatchNorm statistics and evaluations)",
    )
    robust_trim: float = Field(0.25, ge=0, lt=0.5, description="robust: share trimmed from each side per element")
    robust_clip: float = Field(2.0, gt=0, description="robust: clip updates to this x the round's median norm")
    robust_agree: float = Field(
        0.0,
        ge=-1,
        le=1,
        description="robust: leave out outlier updates whose cosine with the median update is below this",
    )
    robust_agree_z: float = Field(
        3.0,
        ge=0,
        description="robust: ... and more than this many robust standard deviations (1.4826 MAD) below the round's "
        "median cosine (0: every cosine below robust_agree)",
    )
    robust_max_weight: float = Field(
        2.0, ge=1, description="robust: cap each client's weight at this x the round's median weight"
    )
    eval_samples: int = Field(2000, ge=1, description="held-out test samples that evaluate every submodel")
    bn: Literal["tracked", "federated", "server"] = Field(
        "federated",
        description="BatchNorm statistics: federated (devices re-estimate them for the aggregated weights on "
        "evaluation rounds, combined exactly; needs no coordinator data), tracked (devices' running statistics "
        "averaged per submodel: the paper's) or server (re-estimated on bn_calibration held-out samples of the "
        "coordinator)",
    )
    bn_calibration: int = Field(
        500, ge=0, description="bn server: the coordinator's held-out unlabeled samples that re-estimate BatchNorm"
    )
    bn_device_samples: int = Field(
        512, ge=0, description="bn federated: at most this many training samples per device and submodel (0: all)"
    )
    evaluation: Literal["auto", "test", "federated", "both"] = Field(
        "auto",
        description="who evaluates: test (the coordinator's test set), federated (devices, on held-out "
        "eval_fraction of their data; the coordinator needs no data), both, or auto (test; federated only "
        "when no data_dir is given and the default data set is not installed)",
    )
    eval_fraction: float = Field(
        0.1, gt=0, le=0.5, description="share of each device's data held out for federated evaluation"
    )
    eval_every: int = Field(
        0,
        ge=0,
        description="evaluate (and re-estimate BatchNorm) every k rounds and after the last; 0: every "
        "max(1, rounds // 20) rounds (serve and simulate alike: config.evaluates)",
    )
    eval_background: bool = Field(
        True, description="evaluate on a copy of the model while the next round runs (off: the round waits)"
    )
    seed: int = Field(0, description="seed of initialisation, selection and local shuffles")
    runs_dir: Path = Field(Path("runs"), description="parent folder of run directories")
    chunk_size: int = Field(
        1 << 20,
        ge=1024,
        le=MAX_CHUNK_SIZE,
        description="bytes per MQTT message; larger payloads are chunked (at most 256 MiB - 64 KiB, MQTT's limit)",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    preset: Optional[Literal["paper"]] = Field(
        None, description="protocol preset (paper: the NeFL paper's); explicit settings override its values"
    )
    lr_decay_at: list[float] = Field(
        default_factory=list,
        description="fractions of the rounds after which the lr is multiplied by lr_decay, comma-separated",
    )
    lr_decay: float = Field(0.1, gt=0, le=1, description="lr factor at each lr_decay_at milestone")
    lr_decay_round: Literal["next", "at"] = Field(
        "next",
        description="first round with the decayed lr: next (round f*T + 1) or at (round f*T itself, the paper's "
        "code: `if iter == args.epochs/2`)",
    )
    tier_window: int = Field(
        0,
        ge=0,
        description="each round a client of tier t trains a submodel drawn from tiers t-w..t+w (0: its own; "
        "the paper's code: 2)",
    )
    step_init: Literal["ode", "one"] = Field(
        "ode", description="initial step sizes: ode (blocks / kept blocks per stage) or one (the paper's)"
    )
    stem_pool: bool = Field(False, description="max-pool (3, stride 2) after the stem, as the paper's ResNet18/34")
    specs: Literal["nested", "paper"] = Field(
        "nested",
        description="submodel specs: nested (each submodel contains the smaller ones, in depth as in width) or "
        "paper (the NeFL paper code's widths and depth cuts; specs.paper_specs)",
    )
    normalize: bool = Field(
        False,
        description="normalise inputs per channel, (x - mean) / std, with the training data's statistics "
        "(computed by the coordinator at the start, recorded, carried in the manifest; every graph applies them)",
    )
    input_mean: list[float] = Field(
        default_factory=list, description="normalize: per-channel means (empty: computed from the training data)"
    )
    input_std: list[float] = Field(
        default_factory=list, description="normalize: per-channel stds (empty: computed from the training data)"
    )
    augment: bool = Field(False, description="simulate: random crop (pad 4) and horizontal flip of local batches")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="simulate: torch device of local training and evaluation (auto: cuda if available)"
    )

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        if data["preset"] not in PRESETS:
            raise ValueError(f"unknown preset {data['preset']!r}; choose one of: {', '.join(PRESETS)}")
        values = PRESETS[data["preset"]]
        merged = {**{k: v for k, v in values.items() if k != "train"}, **data}
        given = data.get("train") or {}
        if isinstance(given, dict):
            merged["train"] = {**values.get("train", {}), **given}
        return merged

    @field_validator("input_mean", "input_std", mode="before")
    @classmethod
    def _stats_text(cls, value: Any) -> Any:
        return _comma_floats(value, "input_mean / input_std must be comma-separated numbers, one per channel")

    @field_validator("lr_decay_at", mode="before")
    @classmethod
    def _decay_text(cls, value: Any) -> Any:
        return _comma_floats(value, "lr_decay_at must be comma-separated fractions")

    @field_validator("lr_decay_at")
    @classmethod
    def _decay_fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in value):
            raise ValueError("lr_decay_at must be fractions of the rounds in (0, 1), e.g. 0.5,0.75")
        return sorted(value)

    def lr_at(self, round_: int) -> float:
        """The local learning rate of round ``round_`` (1-based): ``train.lr`` times ``lr_decay`` for every
        milestone ``f`` in ``lr_decay_at`` that has passed: ``round_ > f * rounds`` (``lr_decay_round`` next),
        or ``round_ >= f * rounds`` (at; the paper's code decays at rounds T/2 and 3T/4 themselves, 250 and
        375 of 500. It compares ``iter == args.epochs/2``, so it never decays when f * T is not a whole
        number; here the milestone is then round ceil(f * T))."""
        if self.lr_decay_round == "at":
            passed = sum(round_ >= math.ceil(round(f * self.rounds, 9)) for f in self.lr_decay_at)
        else:
            passed = sum(round_ > int(f * self.rounds) for f in self.lr_decay_at)
        return self.train.lr * self.lr_decay**passed

    def robust_options(self) -> Optional[RobustOptions]:
        """The robust aggregation's parameters (None with ``aggregation = "exact"``)."""
        if self.aggregation != "robust":
            return None
        return RobustOptions(
            trim=self.robust_trim,
            clip=self.robust_clip,
            agree=self.robust_agree,
            agree_z=self.robust_agree_z,
            max_weight=self.robust_max_weight,
        )

    def network(self) -> ModelConfig:
        """The model shape of the run (model, data set, stem and step-size initialisation, submodel specs, and
        the input statistics once :meth:`with_input_stats` has filled them in)."""
        normalized = self.normalize and bool(self.input_mean)
        try:
            return replace(
                get_model_config(self.model, self.dataset),
                stem_pool=self.stem_pool,
                step_init=self.step_init,
                specs=self.specs,
                input_mean=tuple(self.input_mean) if normalized else (),
                input_std=tuple(self.input_std) if normalized else (),
            )
        except SpecError as exc:
            raise ConfigError(f"input_mean / input_std: {exc}") from None

    def with_input_stats(self, x: Any) -> RunConfig:
        """This config with ``input_mean`` / ``input_std`` computed from the training images ``x`` (N, C, H, W)
        when ``normalize`` is on and they are not given; otherwise this config."""
        if not self.normalize or self.input_mean:
            return self
        mean, std = channel_stats(x)
        return self.model_copy(update={"input_mean": list(mean), "input_std": list(std)})

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
        return _comma_floats(value, "gammas must be comma-separated numbers")

    @field_validator("gammas")
    @classmethod
    def _gammas(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < g <= 1 for g in value) or sorted(value) != value:
            raise ValueError("gammas must be increasing values in (0, 1], e.g. 0.2,0.4,0.6,0.8,1.0")
        return value


def _comma_floats(value: Any, rule: str) -> Any:
    """A list option given as text (``"0.5,0.75"``) as floats; any other value as it is."""
    if not isinstance(value, str):
        return value
    try:
        return [float(f) for f in value.split(",") if f.strip()]
    except ValueError:
        raise ValueError(f"{rule}, got {value!r}") from None


def _explain(exc: ValidationError, where: str = "") -> ConfigError:
    """One sentence for a failed validation: where (a file, else the options), each field and what is wrong
    with it; for an unknown key the nearest known one (difflib), as a misspelt ``roudns`` deserves."""
    lines = []
    for e in exc.errors():
        loc = ".".join(map(str, e["loc"]))
        if e["type"] == "extra_forbidden":
            model = TrainConfig if len(e["loc"]) > 1 and e["loc"][0] == "train" else RunConfig
            near = difflib.get_close_matches(str(e["loc"][-1]), list(model.model_fields), n=1)
            lines.append(f"{loc}: unknown key" + (f" (did you mean {near[0]!r}?)" if near else ""))
        else:
            lines.append(f"{loc}: {e['msg']}")
    return ConfigError(f"invalid configuration{f' in {where}' if where else ''}: " + "; ".join(lines))


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


def validate(data: dict[str, Any], where: str = "") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, where) from None


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
    return validate(_merge(data, overrides), f"{path} and the options" if path is not None else "")


def upgraded(data: dict[str, Any]) -> dict[str, Any]:
    """A run's recorded ``config.json`` in today's terms: runs recorded before ``bn`` existed re-estimated
    BatchNorm statistics on the server when ``bn_calibration`` > 0, and kept the clients' otherwise."""
    if "bn" not in data and "bn_calibration" in data:
        return {**data, "bn": "server" if data["bn_calibration"] else "tracked"}
    return data


def resume_config(run_dir: Path, overrides: dict[str, Any]) -> RunConfig:
    """The configuration of the run in ``run_dir`` with ``overrides`` applied. A key in
    :data:`FIXED_ON_RESUME` may only be repeated with its recorded value; any other key is applied."""
    path = run_dir / "config.json"
    try:
        data = upgraded(json.loads(path.read_text()))
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


EVALUATIONS_PER_RUN = 20
"""With ``eval_every = 0`` a run is evaluated about this many times (and after its last round)."""


def eval_every(cfg: RunConfig) -> int:
    """The evaluation period in rounds: ``cfg.eval_every``, or for 0 ``max(1, rounds // 20)`` (the one
    meaning of ``eval_every = 0``, in ``serve`` and ``simulate`` alike; ``eval_every = rounds``: only the
    last round)."""
    return cfg.eval_every or max(1, cfg.rounds // EVALUATIONS_PER_RUN)


def evaluates(cfg: RunConfig, round_: int) -> bool:
    """Whether round ``round_`` is evaluated: round 0 (before training), every ``eval_every(cfg)`` rounds,
    and the last round."""
    return round_ % eval_every(cfg) == 0 or round_ >= cfg.rounds
