"""Command-line options generated from :class:`coordinator.config.RunConfig`, so that every run setting is
declared once: its type, default, limits and help text come from the model, and ``--help`` shows the
model's default. A command decorated with :func:`config_options` receives the options it did not declare
itself as one ``overrides`` dict (``None``: not given), keyed like :func:`coordinator.config.load_config`
expects (``train.lr`` for the train table)."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic.fields import FieldInfo

from nefl_edge.coordinator.config import RunConfig
from nefl_edge.core.schemas import TrainConfig

TRAIN_EXCLUDED = {"seed", "eval_fraction"}  # per task, set by the round engine
SIMULATE_ONLY = ("augment", "device")  # torch-side options of in-process training
BROKER_PANEL, ROUNDS_PANEL, METHOD_PANEL, EVALUATION_PANEL, OUTPUT_PANEL = (
    "Broker and security", "Rounds", "Method and local training", "Evaluation", "Output",
)  # fmt: skip
_ROUNDS = {"run", "rounds", "fraction", "min_clients", "min_updates", "policy", "cover_submodels", "cover_rule",
           "deadline_s", "fit_steps", "wait_clients_s", "tier_window", "seed"}  # fmt: skip
_EVALUATION = {"eval_samples", "bn", "bn_calibration", "bn_device_samples", "evaluation", "eval_fraction",
               "eval_every", "eval_background"}  # fmt: skip


PANEL_ORDER = (None, BROKER_PANEL, ROUNDS_PANEL, METHOD_PANEL, EVALUATION_PANEL, OUTPUT_PANEL)


def _panel_rank(param: inspect.Parameter) -> int:
    """Where ``param``'s ``--help`` group comes: typer draws the groups in the order their first option
    appears, so the options are ordered by group (stable: within a group as declared)."""
    info = next((m for m in getattr(param.annotation, "__metadata__", ()) if hasattr(m, "rich_help_panel")), None)
    name = getattr(info, "rich_help_panel", None)
    return PANEL_ORDER.index(name) if name in PANEL_ORDER else len(PANEL_ORDER)


def panel(key: str) -> str:
    """The ``--help`` group of a run setting."""
    if key in _ROUNDS:
        return ROUNDS_PANEL
    if key in _EVALUATION:
        return EVALUATION_PANEL
    if key == "runs_dir":
        return OUTPUT_PANEL
    if key == "chunk_size":
        return BROKER_PANEL
    return METHOD_PANEL


def _cli_type(annotation: Any) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return _cli_type(inner[0]) if len(inner) == 1 else str
    if annotation in (int, float, bool, Path):
        return annotation
    return str  # Literal choices, lists (comma-separated) and names: validated by the model


def _default_text(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


def fields() -> list[tuple[str, str, FieldInfo]]:
    """(override key, option name, field) for every run setting."""
    out = [(name, name, f) for name, f in RunConfig.model_fields.items() if name != "train"]
    out += [(f"train.{n}", n, f) for n, f in TrainConfig.model_fields.items() if n not in TRAIN_EXCLUDED]
    return out


def parameters(
    exclude: Iterable[str] = (),
    defaults: Optional[dict[str, Any]] = None,
    helps: Optional[dict[str, str]] = None,
) -> list[inspect.Parameter]:
    """Keyword-only typer parameters for the run settings (all default ``None``), grouped by :func:`panel`;
    ``helps`` replaces a setting's description for this command."""
    defaults, helps = defaults or {}, helps or {}
    params = []
    for key, name, info in fields():
        if key in exclude:
            continue
        shown = defaults.get(key, _default_text(info))
        help_text = f"{helps.get(key) or info.description or name} (default: {shown})"
        flag = f"--{name.replace('_', '-')}"
        kind = _cli_type(info.annotation)
        decl = f"{flag}/--no-{flag[2:]}" if kind is bool else flag
        option = typer.Option(decl, help=help_text, show_default=False, rich_help_panel=panel(key))
        annotation = Annotated[Optional[kind], option]  # type: ignore[misc,valid-type]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
    return params


def config_options(
    exclude: Iterable[str] = (), defaults: Optional[dict[str, Any]] = None, helps: Optional[dict[str, str]] = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command ``f(..., overrides: dict[str, Any])``: typer sees ``f``'s own parameters plus one
    option per run setting; ``f`` gets them as ``overrides`` (with ``defaults`` filled in where not given)."""
    excluded = set(exclude)
    generated = parameters(excluded, defaults, helps)
    keys = {name: key for key, name, _ in fields() if key not in excluded}

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(func, include_extras=True)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(func).parameters.values()
            if p.name != "overrides"
        ]

        @functools.wraps(func)
        def wrapper(**kwargs: Any) -> Any:
            overrides = {keys[n]: kwargs.pop(n) for n in list(kwargs) if n in keys}
            for key, value in (defaults or {}).items():
                if overrides.get(key) is None:
                    overrides[key] = value
            return func(overrides=overrides, **kwargs)

        keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]  # typer passes keywords
        ordered = sorted(keyword + generated, key=_panel_rank)
        wrapper.__signature__ = inspect.Signature(ordered)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {}
        return wrapper

    return decorate
