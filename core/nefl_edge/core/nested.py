"""The global NeFL state and the map from it to a submodel, ``extract`` (the way back is the aggregation,
``core.nefedavg.NeFedAvg``).

The global state holds every consistent tensor once, at full size, and one copy of the inconsistent
tensors (BatchNorm, step sizes) per submodel. Consistent tensors of a submodel are prefix slices of the
global tensors, so a slice is fully described by the submodel tensor's shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nefl_edge.core.architecture import describe
from nefl_edge.core.specs import ModelConfig, SubmodelSpec, full_spec, param_layout

Tensors = dict[str, np.ndarray]


def prefix_slice(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


@dataclass
class GlobalState:
    """Consistent tensors at full size, and inconsistent tensors per submodel index."""

    config: ModelConfig
    specs: list[SubmodelSpec]
    consistent: Tensors
    inconsistent: list[Tensors]

    def copy(self) -> GlobalState:
        return GlobalState(
            self.config,
            list(self.specs),
            {k: v.copy() for k, v in self.consistent.items()},
            [{k: v.copy() for k, v in t.items()} for t in self.inconsistent],
        )

    def flat(self) -> Tensors:
        """All tensors under unique names (``sub<k>/<name>`` for inconsistent ones), for checkpoints."""
        out = {f"global/{k}": v for k, v in self.consistent.items()}
        for i, tensors in enumerate(self.inconsistent):
            out.update({f"sub{i}/{k}": v for k, v in tensors.items()})
        return out

    @classmethod
    def from_flat(cls, config: ModelConfig, specs: list[SubmodelSpec], flat: Tensors) -> GlobalState:
        state = init_global_state(config, specs, consistent={})
        for key, value in flat.items():
            scope, name = key.split("/", 1)
            target = state.consistent if scope == "global" else state.inconsistent[int(scope.removeprefix("sub"))]
            target[name] = np.asarray(value, dtype=np.float32)
        check_global_state(state)
        return state


def init_global_state(
    config: ModelConfig, specs: list[SubmodelSpec], consistent: Tensors, seed: int = 0
) -> GlobalState:
    """A fresh global state. ``consistent`` supplies initial conv/linear weights (e.g. from a PyTorch
    initialisation); missing ones are drawn He-normal with ``seed``. BatchNorm starts at (1, 0, 0, 1)
    and step sizes at (blocks in the stage / kept blocks), so that a shallower submodel covers the
    same 'time' of the residual ODE with fewer, longer steps (``config.step_init == "one"``: at 1, as the
    paper's code starts them)."""
    rng = np.random.default_rng(seed)
    full = param_layout(config, full_spec(config))
    cons: Tensors = {}
    for name, info in full.items():
        if info.kind != "consistent":
            continue
        cons[name] = _initial(name, info.shape, consistent, rng)
    inconsistent = []
    for spec in specs:
        tensors: Tensors = {}
        arch = describe(config, spec)
        stage_of = {block.step.name: block.stage for block in arch.blocks()}
        for name, info in param_layout(config, spec).items():
            if name in stage_of:
                stage = stage_of[name]
                # The ODE reading: a stage that skips blocks takes proportionally bigger steps.
                ode = config.learned_step and config.step_init == "ode"
                ratio = config.stage_blocks[stage] / len(spec.blocks[stage]) if ode else 1.0
                tensors[name] = np.full(info.shape, ratio, np.float32)
            elif info.kind == "inconsistent" and name.startswith(f"{arch.head.name}."):
                full_head = _initial(name, full[name].shape, consistent, rng)
                tensors[name] = full_head[prefix_slice(info.shape)].copy()
            elif info.kind == "inconsistent":
                one = name.endswith(("weight", "running_var"))
                tensors[name] = (np.ones if one else np.zeros)(info.shape, np.float32)
        inconsistent.append(tensors)
    return GlobalState(config, list(specs), cons, inconsistent)


def _initial(name: str, shape: tuple[int, ...], given: Tensors, rng: np.random.Generator) -> np.ndarray:
    if name in given:
        return np.asarray(given[name], dtype=np.float32).copy()
    if name.endswith("bias") or name.endswith("running_mean"):
        return np.zeros(shape, np.float32)
    if len(shape) == 1:  # BatchNorm scale
        return np.ones(shape, np.float32)
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def check_global_state(state: GlobalState) -> None:
    """Raise ``ValueError`` naming the first tensor that is missing or has the wrong shape."""
    full = param_layout(state.config, full_spec(state.config))
    for name, info in full.items():
        if info.kind == "consistent":
            _check(state.consistent, name, info.shape, "global")
    for i, spec in enumerate(state.specs):
        for name, info in param_layout(state.config, spec).items():
            if info.kind == "inconsistent":
                _check(state.inconsistent[i], name, info.shape, f"submodel {i}")


def _check(tensors: Tensors, name: str, shape: tuple[int, ...], where: str) -> None:
    if name not in tensors:
        raise ValueError(f"{where}: tensor {name!r} is missing")
    if tuple(tensors[name].shape) != shape:
        raise ValueError(f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")


def extract(state: GlobalState, index: int) -> Tensors:
    """The submodel ``index``'s tensors: nested slices of consistent tensors plus its own inconsistent ones."""
    layout = param_layout(state.config, state.specs[index])
    out: Tensors = {}
    for name, info in layout.items():
        if info.kind == "consistent":
            out[name] = state.consistent[name][prefix_slice(info.shape)].copy()
        else:
            out[name] = state.inconsistent[index][name].copy()
    return out
