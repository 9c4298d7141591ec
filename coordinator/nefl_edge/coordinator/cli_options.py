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


def parameters(exclude: Iterable[str] = (), defaults: Optional[dict[str, Any]] = None) -> list[inspect.Parameter]:
    """Keyword-only typer parameters for the run settings (all default ``None``)."""
    defaults = defaults or {}
    params = []
    for key, name, info in fields():
        if key in exclude:
            continue
        shown = defaults.get(key, _default_text(info))
        help_text = f"{info.description or name} (default: {shown})"
        flag = f"--{name.replace('_', '-')}"
        kind = _cli_type(info.annotation)
        decl = f"{flag}/--no-{flag[2:]}" if kind is bool else flag
        option = typer.Option(decl, help=help_text, show_default=False, rich_help_panel="Run")
        annotation = Annotated[Optional[kind], option]  # type: ignore[misc,valid-type]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
    return params


def config_options(
    exclude: Iterable[str] = (), defaults: Optional[dict[str, Any]] = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command ``f(..., overrides: dict[str, Any])``: typer sees ``f``'s own parameters plus one
    option per run setting; ``f`` gets them as ``overrides`` (with ``defaults`` filled in where not given)."""
    excluded = set(exclude)
    generated = parameters(excluded, defaults)
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

        wrapper.__signature__ = inspect.Signature(own + generated)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {}
        return wrapper

    return decorate
