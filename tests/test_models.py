from __future__ import annotations

import numpy as np
import pytest
import torch

from nefl_edge.coordinator.models import SubmodelNet, build_submodel, global_forward, initial_consistent
from nefl_edge.core.nested import init_global_state
from nefl_edge.core.specs import get_model_config, make_specs, param_layout


@pytest.mark.parametrize(
    ("name", "dataset"),
    [("resnet-small", "fmnist"), ("preact-resnet-small", "fmnist"), ("resnet18", "cifar10"), ("resnet34", "cifar10")],
)
def test_extracted_submodel_matches_global_model_in_its_configuration(name: str, dataset: str) -> None:
    config = get_model_config(name, dataset)
    specs = make_specs(config)
    state = init_global_state(config, specs, initial_consistent(config, seed=0))
    rng = np.random.default_rng(0)
    for tensors in state.inconsistent:  # distinct BN statistics and steps per submodel
        for k, v in tensors.items():
            tensors[k] = (v + rng.uniform(0.1, 0.5, v.shape)).astype(np.float32)
    x = torch.from_numpy(
        rng.standard_normal((3, config.in_channels, config.image_size, config.image_size)).astype(np.float32)
    )

    for index in range(len(specs)):
        net = build_submodel(state, index).eval()
        with torch.no_grad():
            diff = (net(x) - global_forward(state, index, x)).abs().max().item()
        assert diff <= 1e-5, f"submodel {index}: max abs diff {diff}"


def test_state_dict_names_are_the_layout_names() -> None:
    config = get_model_config("resnet-small")
    for spec in make_specs(config):
        net = SubmodelNet(config, spec)
        layout = param_layout(config, spec)

        assert set(net.tensors()) == set(layout)
        for name, value in net.tensors().items():
            assert value.shape == layout[name].shape


def test_bn_calibration_makes_eval_mode_match_batch_statistics() -> None:
    from nefl_edge.coordinator.evaluation import calibrate_bn

    config = get_model_config("resnet-small")
    specs = make_specs(config)
    state = init_global_state(config, specs, initial_consistent(config, seed=0))
    x = np.random.default_rng(0).random((200, 1, 28, 28), dtype=np.float32)

    calibrate_bn(state, 0, x, batch=200)

    net = build_submodel(state, 0)
    with torch.no_grad():
        eval_out = net.eval()(torch.from_numpy(x))
        train_out = net.train()(torch.from_numpy(x))
    assert (eval_out - train_out).abs().max().item() < 1e-3
    assert not np.allclose(state.inconsistent[0]["stem.bn.running_var"], 1.0)
