"""Export: artifacts, manifest, cache, and parity of ONNX Runtime training with PyTorch."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from nefl_edge.coordinator.models import SubmodelNet, initial_consistent
from nefl_edge.core.artifacts import ArtifactError, load_manifest, submodel_paths
from nefl_edge.core.data import load_dataset
from nefl_edge.core.nefedavg import NeFedAvg
from nefl_edge.core.nested import GlobalState, extract, init_global_state
from nefl_edge.core.schemas import TrainConfig
from nefl_edge.core.specs import ModelConfig, SubmodelSpec
from nefl_edge.core.wire import pack_tensors, unpack_tensors
from nefl_edge.edge_client.trainer import OrtTrainingBackend
from nefl_edge.export.artifacts import export_set
from tests.fakes import torch_step


@pytest.fixture(scope="module")
def state(small_config: ModelConfig, small_specs: list[SubmodelSpec]) -> GlobalState:
    return init_global_state(small_config, small_specs, initial_consistent(small_config, seed=1))


@pytest.fixture(scope="module")
def batch(fmnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    data = load_dataset(fmnist_dir, "train")
    return data.x[:32], data.y[:32]


# lr 0.01 for the momentum case: at larger steps a pre-activation within ~1e-7 of zero can fall on the other
# side of a ReLU in one library's kernels, and that single flipped element moves a weight by more than 1e-5.
@pytest.mark.parametrize(
    ("cfg", "steps"),
    [
        (TrainConfig(lr=0.05, momentum=0.0, weight_decay=0.0), 1),
        (TrainConfig(lr=0.01, momentum=0.9, weight_decay=5e-4), 3),
    ],
    ids=["sgd-1-step", "momentum-wd-3-steps"],
)
def test_ort_step_matches_pytorch_for_every_default_submodel(
    small_artifacts: Path, state: GlobalState, batch: tuple[np.ndarray, np.ndarray], cfg: TrainConfig, steps: int
) -> None:
    manifest = load_manifest(small_artifacts)
    x, y = batch
    for sub in manifest.submodels:
        backend = OrtTrainingBackend(submodel_paths(small_artifacts, sub), sub.params, cfg)
        backend.load(extract(state, sub.index))
        net = SubmodelNet(state.config, state.specs[sub.index])
        for step in range(steps):
            # Compared per step from the same state: fp32 rounding differences grow chaotically over steps.
            net.load_tensors(backend.tensors())
            ref_loss = torch_step(net, x, y, cfg, backend.momentum_buffers())

            ort_loss, _ = backend.step(x, y)

            assert abs(ort_loss - ref_loss) <= 1e-6 * abs(ref_loss), (sub.index, step, ort_loss, ref_loss)
            got, want = backend.tensors(), net.tensors()
            for name, value in want.items():
                # 2e-5: on the nested specs' submodels with a 10-channel stem (gammas 0.2 and 0.4) ONNX Runtime's
                # step differs from a float64 PyTorch reference by up to 1.5e-5 on stem.conv.weight (measured,
                # issue 23), PyTorch's float32 step by < 1e-7; the other submodels agree within 1e-7.
                tol = 1e-4 if "running" in name else 2e-5
                diff = np.abs(got[name] - value).max()
                assert diff <= tol, f"submodel {sub.index} step {step}: {name} differs by {diff}"


def test_round_trip_touches_only_the_submodels_slices(
    small_artifacts: Path, state: GlobalState, batch: tuple[np.ndarray, np.ndarray]
) -> None:
    # The real path: the coordinator packs the extracted submodel, the device trains it, NeFedAvg re-nests it.
    manifest = load_manifest(small_artifacts)
    sub = manifest.submodels[1]
    backend = OrtTrainingBackend(submodel_paths(small_artifacts, sub), sub.params, TrainConfig())
    backend.load(unpack_tensors(pack_tensors(extract(state, sub.index))))

    for _ in range(2):
        backend.step(*batch)
    trained = backend.tensors()
    aggregator = NeFedAvg(state)
    aggregator.add(sub.index, trained, len(batch[1]))
    new = aggregator.result()

    changed = 0
    for name, old in state.consistent.items():
        mask = np.zeros(old.shape, bool)
        if name in trained:
            mask[tuple(slice(0, n) for n in trained[name].shape)] = True
            changed += int((new.consistent[name][mask] != old[mask]).sum())
        np.testing.assert_array_equal(new.consistent[name][~mask], old[~mask])
    assert changed > 0


def test_export_is_cached_and_fast(small_config: ModelConfig, small_specs: list[SubmodelSpec], tmp_path: Path) -> None:
    start = time.perf_counter()
    manifest = export_set(small_config, small_specs, tmp_path)
    first = time.perf_counter() - start
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.onnx")}

    export_set(small_config, small_specs, tmp_path)

    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.onnx")} == stamps
    assert len(manifest.submodels) == 5
    for sub in manifest.submodels:
        print(
            f"submodel {sub.index} gamma {sub.gamma:.2f}: "
            + ", ".join(f"{r} {f.size / 1024:.0f} KiB" for r, f in sub.files.items())
        )
    print(f"first export {first:.1f} s")


def test_export_refuses_a_foreign_folder(
    small_config: ModelConfig, small_specs: list[SubmodelSpec], tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("mine")

    with pytest.raises(ArtifactError, match="not an artifact folder"):
        export_set(small_config, small_specs, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_tampered_artifact_is_detected(small_artifacts: Path, tmp_path: Path) -> None:
    copy = tmp_path / "a"
    shutil.copytree(small_artifacts, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    target = copy / manifest["submodels"][0]["files"]["training"]["name"]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))

    with pytest.raises(ArtifactError, match="sha256"):
        load_manifest(copy)


def test_manifest_describes_each_submodel(small_artifacts: Path, small_specs: list[SubmodelSpec]) -> None:
    manifest = load_manifest(small_artifacts)

    assert manifest.input_shape == (1, 28, 28) and manifest.num_classes == 10
    for sub, spec in zip(manifest.submodels, small_specs):
        assert sub.gamma == spec.gamma and sub.width == spec.width
        names = {p.name for p in sub.params}
        assert any(n.endswith("running_mean") for n in names) and "head.weight" in names
        frozen = {p.name for p in sub.params if not p.trainable}
        assert frozen and all("running" in n for n in frozen)


def test_artifact_roles_are_one_vocabulary_and_the_manifest_keys_stay_strings(small_artifacts: Path) -> None:
    """The exporter writes one file per ``ArtifactRole``, the manifest keys them by the role's string value
    (the wire format before the enum), and the device's backends and evaluator ask only for roles it has."""
    from nefl_edge.core.schemas import SUBMODEL_ROLES, ArtifactRole, Manifest
    from nefl_edge.edge_client.trainer import BACKEND_FILES

    raw = json.loads((small_artifacts / "manifest.json").read_text())
    for sub_raw, sub in zip(raw["submodels"], load_manifest(small_artifacts).submodels):
        assert list(sub_raw["files"]) == ["training", "eval", "checkpoint", "portable", "stats"], sub_raw["files"]
        assert list(sub.files) == list(SUBMODEL_ROLES), f"manifest roles {list(sub.files)}"
        for role, entry in sub.files.items():
            assert entry.name.endswith("/" + role.file_name), f"{role} is written as {entry.name}"
            assert sub.files[role.value] is entry, f"a role's string value no longer finds its entry: {role}"
    assert len({r.file_name for r in ArtifactRole}) == len(ArtifactRole), "two roles share a file name"
    assert {r for roles in BACKEND_FILES.values() for r in roles} < set(ArtifactRole)
    manifest = Manifest.model_validate(raw)
    assert json.loads(manifest.to_json()) == raw, "the manifest no longer round-trips byte for byte as JSON"
    raw["submodels"][0]["files"]["weights"] = raw["submodels"][0]["files"]["eval"]
    with pytest.raises(ValueError, match="weights"):
        Manifest.model_validate(raw)
