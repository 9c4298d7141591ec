"""Trained models out: `nefl-coord export-model` writes each submodel of a run as a plain ONNX inference
model whose logits in onnxruntime match the PyTorch submodel in eval mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from nefl_edge.coordinator import checkpoint
from nefl_edge.coordinator.config import RunConfig
from nefl_edge.coordinator.models import build_submodel, initial_consistent
from nefl_edge.core.data import load_dataset
from nefl_edge.core.nested import GlobalState, init_global_state
from nefl_edge.core.specs import ModelConfig, SubmodelSpec
from nefl_edge.export.inference import RunDirError, load_run

ROUND = 3


def perturbed_state(config: ModelConfig, specs: list[SubmodelSpec]) -> GlobalState:
    """Random consistent weights and per-submodel BatchNorm statistics and affine parameters far from (0, 1),
    so that a model exported with training-mode (batch) statistics would not match."""
    state = init_global_state(config, specs, initial_consistent(config, seed=7), seed=7)
    rng = np.random.default_rng(1)
    for tensors in state.inconsistent:
        for name, value in tensors.items():
            if name.endswith("running_mean"):
                tensors[name] = rng.normal(0, 0.5, value.shape).astype(np.float32)
            elif name.endswith("running_var"):
                tensors[name] = rng.uniform(0.3, 3.0, value.shape).astype(np.float32)
            elif name.endswith(("bn.weight", "bn1.weight", "bn2.weight")):
                tensors[name] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
            elif name.endswith(".step"):
                tensors[name] = (value * rng.uniform(0.8, 1.2)).astype(np.float32)
    return state


def write_run_dir(folder: Path, state: GlobalState) -> Path:
    """A run directory as `nefl-coord serve` leaves it: config, checkpoint + state file, metrics."""
    folder.mkdir()
    (folder / "config.json").write_text(RunConfig(run="fashion").model_dump_json())
    checkpoint.save(folder, checkpoint.Checkpoint(ROUND, state.flat(), {}, {}))
    rows = [
        {"round": r, "submodel": k, "accuracy": 0.5 + 0.01 * k + 0.1 * r}
        for r in range(ROUND + 2)  # a round after the checkpoint (not checkpointed) must not count
        for k in range(len(state.specs))
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_every_exported_submodel_matches_pytorch_eval_logits(
    small_config: ModelConfig, small_specs: list[SubmodelSpec], fmnist_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a trained-looking run and a real Fashion-MNIST batch.
    state = perturbed_state(small_config, small_specs)
    run_dir = write_run_dir(tmp_path / "fashion-20260101-000000", state)
    x = load_dataset(fmnist_dir, "test").x[:64]

    # Execute: the command a user runs.
    out = tmp_path / "models"
    result = subprocess.run(
        [sys.executable, "-m", "nefl_edge.coordinator", "export-model", "--run-dir", str(run_dir), "--out", str(out)],
        capture_output=True,
        text=True,
    )

    # Assert: one model per submodel, each equal to PyTorch in eval mode, with its metadata, and nothing but
    # standard inference operators.
    assert result.returncode == 0, result.stderr
    for k, spec in enumerate(small_specs):
        path = out / f"fashion-submodel-{k}.onnx"
        model = onnx.load(str(path))
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["nefl.run"] == "fashion" and meta["nefl.round"] == str(ROUND) and meta["nefl.submodel"] == str(k)
        assert float(meta["nefl.gamma"]) == pytest.approx(spec.gamma, abs=1e-4)
        assert float(meta["nefl.accuracy"]) == pytest.approx(0.5 + 0.01 * k + 0.1 * ROUND)
        assert json.loads(meta["nefl.blocks"]) == [list(b) for b in spec.blocks] and meta["nefl.version"]
        assert model.ir_version <= 9 and {o.domain: o.version for o in model.opset_import}[""] == 17
        assert {n.domain for n in model.graph.node} == {""}
        assert not [n for n in model.graph.node if n.op_type in ("Dropout", "SoftmaxCrossEntropyLoss")]
        for node in model.graph.node:
            if node.op_type == "BatchNormalization":
                assert all(a.i == 0 for a in node.attribute if a.name == "training_mode") and len(node.output) == 1

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = session.run(["logits"], {"input": x})
        with torch.no_grad():
            want = build_submodel(state, k).eval()(torch.from_numpy(x)).numpy()
        assert got.shape == (64, 10)
        assert np.abs(got - want).max() <= 1e-5, k
        train_mode = build_submodel(state, k).train()(torch.from_numpy(x)).detach().numpy()
        assert np.abs(train_mode - want).max() > 1e-2  # the statistics matter: the check above can fail


def test_export_names_what_is_wrong_with_a_run_dir(
    small_config: ModelConfig, small_specs: list[SubmodelSpec], tmp_path: Path
) -> None:
    with pytest.raises(RunDirError, match=r"config\.json is missing"):
        load_run(tmp_path)
    run_dir = write_run_dir(tmp_path / "run", perturbed_state(small_config, small_specs))
    state_file = run_dir / f"state-{ROUND:05d}.safetensors"
    state_file.write_bytes(state_file.read_bytes()[:-10])
    with pytest.raises(RunDirError, match="does not match the sha256"):
        load_run(run_dir)
