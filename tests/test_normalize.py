"""Inputs normalised per channel (issue 23): statistics the coordinator computes from its training data,
carried in the manifest and applied as the first operation of every submodel, so the device's ONNX Runtime
graphs and the coordinator's PyTorch paths see the same normalised input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from nefl_edge.coordinator.config import ConfigError, load_config
from nefl_edge.coordinator.models import SubmodelNet, build_submodel, initial_consistent
from nefl_edge.coordinator.simulate import simulate
from nefl_edge.core.artifacts import load_manifest, submodel_paths
from nefl_edge.core.data import Dataset, channel_stats, load_dataset
from nefl_edge.core.nested import GlobalState, extract, init_global_state
from nefl_edge.core.schemas import Manifest, TrainConfig
from nefl_edge.core.specs import get_model_config, make_specs
from nefl_edge.edge_client.portable import PortableBackend
from nefl_edge.edge_client.trainer import OrtTrainingBackend
from nefl_edge.export.artifacts import architecture_key, export_set
from tests.fakes import torch_step
from tests.reference import naive_forward


@pytest.fixture(scope="module")
def train(fmnist_dir: Path) -> Dataset:
    data = load_dataset(fmnist_dir, "train")
    return Dataset(data.x[:3000], data.y[:3000], "train-3000")


@pytest.fixture(scope="module")
def normalized(train: Dataset, tmp_path_factory: pytest.TempPathFactory) -> tuple[GlobalState, Path]:
    mean, std = channel_stats(train.x)
    config = replace(get_model_config("resnet-small"), input_mean=mean, input_std=std)
    specs = make_specs(config, (0.2, 1.0))
    out = tmp_path_factory.mktemp("normalized")
    export_set(config, specs, out)
    return init_global_state(config, specs, initial_consistent(config, 1)), out


def test_channel_stats_match_numpy_over_samples_and_pixels(train: Dataset) -> None:
    rgb = (
        np.random.default_rng(0).random((50, 3, 8, 8), np.float32) * np.array([1, 0.5, 0.2], np.float32)[:, None, None]
    )

    for x in (train.x, rgb):
        mean, std = channel_stats(x, chunk=7)
        want_mean = x.astype(np.float64).mean(axis=(0, 2, 3))
        want_std = x.astype(np.float64).std(axis=(0, 2, 3))
        assert np.allclose(mean, want_mean, atol=1e-9) and np.allclose(std, want_std, atol=1e-9), (mean, std)
    shards = [train.x[:1000], train.x[1000:1001], train.x[1001:]]
    assert np.allclose(channel_stats(shards), channel_stats(train.x), atol=1e-12), "shards differ from the union"


def test_device_graph_and_coordinator_see_the_same_normalised_input(
    normalized: tuple[GlobalState, Path], train: Dataset
) -> None:
    state, out = normalized
    config = state.config
    x = train.x[:16]
    want = (x.astype(np.float64) - np.array(config.input_mean)[None, :, None, None]) / np.array(config.input_std)[
        None, :, None, None
    ]
    manifest = load_manifest(out)
    for sub in manifest.submodels:
        # The device's evaluation graph, with the input of its first convolution as an extra output.
        model = onnx.load(str(submodel_paths(out, sub)["eval"]))
        first_conv = next(n for n in model.graph.node if n.op_type == "Conv")
        model.graph.output.append(onnx.helper.make_tensor_value_info(first_conv.input[0], onnx.TensorProto.FLOAT, None))
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        tensors = {**extract(state, sub.index), "input": x, "labels": train.y[:16]}
        feeds = {i.name: tensors[i.name] for i in session.get_inputs()}
        outputs = dict(zip(names, session.run(None, feeds)))
        device_sees = outputs[first_conv.input[0]]

        net = build_submodel(state, sub.index).eval()
        seen: list[torch.Tensor] = []
        net.stem.conv.register_forward_hook(lambda _m, inputs, _o, seen=seen: seen.append(inputs[0].detach()))
        with torch.no_grad():
            torch_logits = net(torch.from_numpy(x)).numpy()

        assert np.abs(device_sees - want).max() <= 1e-5, f"submodel {sub.index}: the device's graph input differs"
        assert np.abs(seen[0].numpy() - want).max() <= 1e-5, f"submodel {sub.index}: PyTorch's input differs"
        device_logits = next(v for k, v in outputs.items() if v.shape == torch_logits.shape)
        assert np.abs(device_logits - torch_logits).max() <= 1e-4, f"submodel {sub.index}: logits differ"
        naive_logits = naive_forward(state, sub.index, x)
        assert np.abs(naive_logits - torch_logits).max() <= 1e-4, f"submodel {sub.index}: the naive forward differs"


@pytest.mark.parametrize("backend_kind", ["ort-training", "portable"])
def test_device_training_step_with_normalised_inputs_matches_pytorch(
    normalized: tuple[GlobalState, Path], train: Dataset, backend_kind: str
) -> None:
    state, out = normalized
    cfg = TrainConfig(lr=0.05, momentum=0.0, weight_decay=0.0)
    x, y = train.x[:32], train.y[:32]
    for sub in load_manifest(out).submodels:
        files = submodel_paths(out, sub)
        backend = (
            OrtTrainingBackend(files, sub.params, cfg)
            if backend_kind == "ort-training"
            else PortableBackend(files, sub.params, cfg)
        )
        backend.load(extract(state, sub.index))
        net = SubmodelNet(state.config, state.specs[sub.index])
        net.load_tensors(extract(state, sub.index))
        ref_loss = torch_step(net, x, y, cfg, {})

        loss, _ = backend.step(x, y)

        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), f"{backend_kind} submodel {sub.index}: loss"
        for name, value in net.tensors().items():
            diff = np.abs(backend.tensors()[name] - value).max()
            assert diff <= (1e-4 if "running" in name else 1e-5), f"{backend_kind} {sub.index}: {name} by {diff}"


def test_manifest_carries_the_statistics_and_old_manifests_still_load(
    normalized: tuple[GlobalState, Path], small_artifacts: Path
) -> None:
    state, out = normalized
    manifest = load_manifest(out)

    assert manifest.normalize is not None
    assert tuple(manifest.normalize.mean) == state.config.input_mean
    assert tuple(manifest.normalize.std) == state.config.input_std
    assert manifest.model == json.loads(json.dumps(state.config.to_dict()))
    # A manifest written without normalisation has no such field at all, as before it existed, and loads.
    text = (small_artifacts / "manifest.json").read_text()
    assert "normalize" not in json.loads(text) and "input_mean" not in json.loads(text)["model"]
    old = load_manifest(small_artifacts)
    assert old.normalize is None and "input_mean" not in old.model
    assert Manifest.model_validate_json(text) == old


def test_configs_without_statistics_keep_their_architecture_keys() -> None:
    config = get_model_config("resnet-small")
    spec = make_specs(config, (1.0,))[0]
    before = {k: v for k, v in config.to_dict().items()}  # what to_dict wrote before the fields existed

    assert "input_mean" not in before and "specs" not in before
    assert architecture_key(config, spec) != architecture_key(
        replace(config, input_mean=(0.3,), input_std=(0.3,)), spec
    )


def test_simulate_normalises_with_the_statistics_of_the_clients_data(train: Dataset) -> None:
    cfg = load_config(
        None, {"normalize": True, "rounds": 1, "fraction": 1.0, "policy": "static", "device": "cpu",
               "gammas": [0.2, 1.0], "train.epochs": 1, "train.batch_size": 16},
    )  # fmt: skip
    shards = [Dataset(train.x[i * 40 : (i + 1) * 40], train.y[i * 40 : (i + 1) * 40], f"s{i}") for i in range(5)]
    test = Dataset(train.x[-100:], train.y[-100:], "test")

    result = simulate(cfg, shards, [0, 1, 0, 1, 0], test)

    assert result.state is not None
    mean, std = channel_stats(train.x[:200])
    assert np.allclose(result.state.config.input_mean, mean) and np.allclose(result.state.config.input_std, std)


def test_paper_preset_normalises_and_bad_statistics_are_refused() -> None:
    assert load_config(None, {"preset": "paper"}).normalize
    assert not load_config(None, {}).normalize
    two = load_config(None, {"normalize": True, "input_mean": "0.5,0.5", "input_std": "0.2,0.2"})
    with pytest.raises(ConfigError, match="input_mean"):
        two.network()
    zero = load_config(None, {"normalize": True, "input_mean": "0.5", "input_std": "0"})
    with pytest.raises(ConfigError, match="positive"):
        zero.network()
    given = load_config(None, {"normalize": True, "input_mean": "0.3", "input_std": "0.4"})
    assert given.with_input_stats(np.zeros((2, 1, 2, 2), np.float32)) is given
    assert given.network().input_mean == (0.3,) and given.network().input_std == (0.4,)


def test_serve_measures_the_statistics_once_and_the_recorded_config_keeps_them(train: Dataset, tmp_path: Path) -> None:
    from nefl_edge.coordinator.config import resume_config
    from nefl_edge.coordinator.run import ServeRun

    data = tmp_path / "train.npz"
    np.savez(data, x=train.x[:500], y=train.y[:500])
    overrides = {"normalize": True, "gammas": "0.2,1.0", "data_dir": str(data), "runs_dir": str(tmp_path)}
    run = ServeRun(load_config(None, overrides), tmp_path / "run")

    run.prepare()

    mean, std = channel_stats(train.x[:500])
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert np.allclose(recorded["input_mean"], mean) and np.allclose(recorded["input_std"], std), recorded
    assert run.config.input_mean == tuple(recorded["input_mean"])
    manifest = load_manifest(tmp_path / "run" / "artifacts")
    assert manifest.normalize is not None and tuple(manifest.normalize.mean) == run.config.input_mean
    np.savez(data, x=np.ones_like(train.x[:500]), y=train.y[:500])  # the data changed: the recorded stats hold
    resumed = ServeRun(resume_config(tmp_path / "run", {}), tmp_path / "again")  # the recorded configuration
    resumed.prepare()
    assert resumed.config.input_mean == run.config.input_mean


def test_serve_without_training_data_says_what_to_give(tmp_path: Path) -> None:
    from nefl_edge.coordinator.run import ServeRun

    cfg = load_config(None, {"normalize": True, "data_dir": str(tmp_path / "none"), "runs_dir": str(tmp_path)})

    with pytest.raises(ConfigError, match="--input-mean"):
        ServeRun(cfg, tmp_path / "run").prepare()


@pytest.mark.parametrize(
    ("mean", "std"),
    [([0.5], [0.0]), ([0.5], [-1.0]), ([float("nan")], [0.3]), ([0.5, 0.5], [0.3]), ([0.5], [float("inf")])],
)
def test_a_manifest_with_insane_statistics_is_refused(
    small_artifacts: Path, mean: list[float], std: list[float]
) -> None:
    data = json.loads((small_artifacts / "manifest.json").read_text())

    with pytest.raises(ValueError, match="normalize"):
        Manifest.model_validate({**data, "normalize": {"mean": mean, "std": std}})
