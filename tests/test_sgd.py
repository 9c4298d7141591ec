"""The one local SGD update (``nefl_edge.core.sgd``) in its three runtimes, each against one naive step written
here: numpy (``sgd_step``, the ``ort-training`` backend's), PyTorch (``torch_training.sgd_optimizer``,
simulation's) and the portable step graph (stock ``onnxruntime``), on a task's first step (no momentum buffer)
and on a later one (with a buffer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nefl_edge.coordinator.models import SubmodelNet, initial_consistent
from nefl_edge.coordinator.torch_training import sgd_optimizer
from nefl_edge.core.artifacts import load_manifest, submodel_paths
from nefl_edge.core.data import load_dataset
from nefl_edge.core.nested import extract, init_global_state
from nefl_edge.core.schemas import TrainConfig
from nefl_edge.core.sgd import sgd_step
from nefl_edge.core.specs import ModelConfig, SubmodelSpec
from nefl_edge.edge_client.portable import PortableBackend
from nefl_edge.edge_client.trainer import BACKEND_FILES, OrtTrainingBackend, has_training_build

Tensors = dict[str, np.ndarray]
CONFIGS = [
    TrainConfig(lr=0.05, momentum=0.0, weight_decay=0.0),
    TrainConfig(lr=0.05, momentum=0.0, weight_decay=5e-4),
    TrainConfig(lr=0.01, momentum=0.9, weight_decay=5e-4),
]
IDS = ["plain", "weight-decay", "momentum-weight-decay"]
GRADIENT_TOL = 5e-4
"""Portable vs PyTorch gradients, relative to each tensor's largest: 3.6e-5 measured (submodel 1, both batches)."""


def naive_step(
    w: np.ndarray, g: np.ndarray, b: np.ndarray | None, lr: float, mom: float, wd: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """torch.optim.SGD's algorithm box (dampening 0, no Nesterov), element by element in float64."""
    new_w, new_b = np.empty(w.size), np.empty(w.size)
    for i, (wi, gi) in enumerate(zip(w.ravel().tolist(), g.ravel().tolist())):
        d = gi + wd * wi
        if mom:
            d = d if b is None else mom * float(b.ravel()[i]) + d
            new_b[i] = d
        new_w[i] = wi - lr * d
    return new_w.reshape(w.shape), (new_b.reshape(w.shape) if mom else None)


def close(got: np.ndarray, want: np.ndarray, what: str, tol: float = 2e-6) -> None:
    err = float(np.max(np.abs(got.astype(np.float64) - want) / (1.0 + np.abs(want))))
    assert err <= tol, f"{what}: {err:.2e} from the naive step"


def random_tensors(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((4, 3, 3)).astype(np.float32) for _ in range(3))  # type: ignore[return-value]


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_numpy_sgd_step_is_the_naive_step(cfg: TrainConfig, first: bool) -> None:
    w, g, b = random_tensors(1)
    prior = None if first else b

    new_w, new_b = sgd_step(w, g, prior, cfg)

    want_w, want_b = naive_step(w, g, prior, cfg.lr, cfg.momentum, cfg.weight_decay)
    assert new_w.dtype == np.float32
    close(new_w, want_w, "weight")
    assert (new_b is None) == (want_b is None), "a momentum buffer kept without momentum, or lost with it"
    if want_b is not None and new_b is not None:
        close(new_b, want_b, "buffer")
    np.testing.assert_array_equal(w, random_tensors(1)[0], err_msg="sgd_step changed its input")


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_torch_sgd_optimizer_is_the_naive_step(cfg: TrainConfig, first: bool) -> None:
    w, g, b = random_tensors(2)
    param = torch.nn.Parameter(torch.from_numpy(w.copy()))
    opt = sgd_optimizer([param], cfg)
    if not first and cfg.momentum:
        opt.state[param]["momentum_buffer"] = torch.from_numpy(b.copy())
    param.grad = torch.from_numpy(g.copy())

    opt.step()

    want_w, want_b = naive_step(w, g, None if first else b, cfg.lr, cfg.momentum, cfg.weight_decay)
    close(param.detach().numpy(), want_w, "weight")
    if want_b is not None:
        close(opt.state[param]["momentum_buffer"].numpy(), want_b, "buffer")


@pytest.fixture(scope="module")
def start(
    small_config: ModelConfig, small_specs: list[SubmodelSpec], fmnist_dir: Path
) -> tuple[Tensors, list, SubmodelNet]:  # type: ignore[type-arg]
    """Submodel 1's initial tensors, two batches, and the PyTorch module of submodel 1."""
    state = init_global_state(small_config, small_specs, initial_consistent(small_config, seed=5))
    data = load_dataset(fmnist_dir, "train")
    batches = [(data.x[i : i + 32], data.y[i : i + 32]) for i in (0, 32)]
    return extract(state, 1), batches, SubmodelNet(small_config, small_specs[1])


def device_backend(kind: str, small_artifacts: Path, cfg: TrainConfig) -> PortableBackend | OrtTrainingBackend:
    sub = load_manifest(small_artifacts).submodels[1]
    files = submodel_paths(small_artifacts, sub, BACKEND_FILES[kind])
    backend = PortableBackend if kind == "portable" else OrtTrainingBackend
    return backend(files, sub.params, cfg, threads=1)


def portable_gradients(small_artifacts: Path, tensors: Tensors, batch: tuple[np.ndarray, np.ndarray]) -> Tensors:
    """The portable graph's gradients at ``tensors`` on ``batch``: with momentum and weight decay 0 its new
    momentum buffer is the gradient itself (``0 * 0 + (g + 0 * w)``, exact in float32)."""
    probe = TrainConfig(lr=1.0, momentum=0.0, weight_decay=0.0)
    backend = device_backend("portable", small_artifacts, probe)
    backend.load(tensors, probe)
    backend.step(*batch)
    return backend.momentum_buffers()


def torch_gradients(net: SubmodelNet, tensors: Tensors, batch: tuple[np.ndarray, np.ndarray]) -> Tensors:
    net.load_tensors(tensors)
    net.train().zero_grad()
    torch.nn.functional.cross_entropy(net(torch.from_numpy(batch[0])), torch.from_numpy(batch[1])).backward()
    return {n: p.grad.numpy().copy() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["portable", "ort-training"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_device_backends_step_is_the_naive_step(
    kind: str,
    cfg: TrainConfig,
    small_artifacts: Path,
    start: tuple[Tensors, list, SubmodelNet],  # type: ignore[type-arg]
) -> None:
    """Two steps of a task on the real exported submodel: each equals the naive step on the gradient the
    backend computed for it. The training build's gradient is read from ONNX Runtime after the step; the
    portable graph's is measured apart (momentum and weight decay 0) and must be PyTorch's, so that a wrong
    factor in the graph's update cannot hide in it."""
    if kind == "ort-training" and not has_training_build():
        pytest.skip("no onnxruntime training build here")
    tensors, batches, net = start
    backend = device_backend(kind, small_artifacts, cfg)
    backend.load(tensors, cfg)
    buffers: dict[str, np.ndarray] | None = None
    for step, batch in enumerate(batches):
        before = backend.tensors()
        if isinstance(backend, PortableBackend):
            grads = portable_gradients(small_artifacts, before, batch)
        if isinstance(backend, PortableBackend) and step == 0:
            # from the initial weights only: after a step a pre-activation can sit within float32 noise of a
            # ReLU kink, and the two runtimes then take opposite sides (tests/test_portable.py)
            reference = torch_gradients(net, before, batch)
            for name, g in grads.items():
                err = float(np.abs(g - reference[name]).max() / np.abs(reference[name]).max())
                assert err <= GRADIENT_TOL, f"portable gradient of {name} is {err:.1e} from PyTorch's"
        backend.step(*batch)
        if isinstance(backend, OrtTrainingBackend):
            grads = {n: np.array(backend._state.parameters[n].grad) for n in backend._trainable}
        after, kept = backend.tensors(), backend.momentum_buffers()
        new_buffers = {}
        for name, g in grads.items():
            prior = None if buffers is None else buffers[name]
            want_w, want_b = naive_step(before[name], g, prior, cfg.lr, cfg.momentum, cfg.weight_decay)
            close(after[name], want_w, f"{kind} step {step} {name}")
            if want_b is not None:
                close(kept[name], want_b, f"{kind} step {step} buffer of {name}")
                new_buffers[name] = want_b
        assert grads and max(float(np.abs(g).max()) for g in grads.values()) > 1e-3, "no gradient to speak of"
        buffers = new_buffers if cfg.momentum else None
