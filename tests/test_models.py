from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from nefl_edge.coordinator.models import SubmodelNet, build_submodel, initial_consistent
from nefl_edge.core.architecture import BatchNorm, Conv, Linear, Relu, describe
from nefl_edge.core.nested import init_global_state
from nefl_edge.core.specs import ModelConfig, SubmodelSpec, get_model_config, make_specs, param_layout
from tests.reference import naive_forward

BASE = get_model_config("resnet-small")
VARIANTS = {
    "resnet-small": BASE,
    "preact-resnet-small": get_model_config("preact-resnet-small"),
    # resnet18/34's depth and strides at a tenth of their widths (the full widths: the slow cases below)
    "narrow-resnet18-cifar10": replace(get_model_config("resnet18", "cifar10"), stage_widths=(6, 13, 26, 51)),
    "narrow-resnet34-cifar10": replace(get_model_config("resnet34", "cifar10"), stage_widths=(6, 13, 26, 51)),
    # the baselines' sharing switches, the paper's pooled stem, input statistics, an odd input size
    "shared-bn-own-heads": replace(BASE, shared_bn=True, shared_head=False, learned_step=False),
    "preact-pooled-odd": replace(get_model_config("preact-resnet-small"), stem_pool=True, image_size=27),
    "normalised": replace(BASE, input_mean=(0.3,), input_std=(0.4,), stage_widths=(10, 21, 37)),
}


@pytest.mark.parametrize(
    "variant",
    [
        *VARIANTS,
        pytest.param("resnet18-cifar10", marks=pytest.mark.slow),
        pytest.param("resnet34-cifar10", marks=pytest.mark.slow),
    ],
)
def test_extracted_submodel_matches_the_naive_forward_of_the_global_model(variant: str) -> None:
    config: ModelConfig = VARIANTS.get(variant) or get_model_config(variant.removesuffix("-cifar10"), "cifar10")
    specs = make_specs(config)
    state = init_global_state(config, specs, initial_consistent(config, seed=0))
    rng = np.random.default_rng(0)
    for tensors in [state.consistent, *state.inconsistent]:  # distinct BN statistics, affines and steps
        for k, v in tensors.items():
            if v.ndim == 1:
                tensors[k] = (v + rng.uniform(0.1, 0.5, v.shape)).astype(np.float32)
    x = rng.standard_normal((3, config.in_channels, config.image_size, config.image_size)).astype(np.float32)

    for index in range(len(specs)):
        net = build_submodel(state, index).eval()
        with torch.no_grad():
            got = net(torch.from_numpy(x)).double().numpy()
        want = naive_forward(state, index, x)
        diff = np.abs(got - want).max()
        assert diff <= 1e-5 * max(1.0, np.abs(want).max()), f"{variant} submodel {index}: max abs diff {diff}"


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


def test_the_description_of_a_downsampling_block_by_hand() -> None:
    # resnet-small at width 0.5 (8, 16, 32 channels) on 28x28: stage 1's first block halves the map and widens
    # 8 -> 16 with a 1x1 projection; post-activation runs conv, BN, ReLU, conv, BN and a ReLU after the sum,
    # pre-activation runs BN, ReLU, conv, BN, ReLU, conv and no ReLU after the sum.
    spec = SubmodelSpec(0.5, ((0, 1), (0, 1), (0,)))
    for preact in (False, True):
        arch = describe(replace(BASE, preact=preact), spec)
        block = arch.stages[1][0]
        conv1, conv2 = Conv("stages.1.0.conv1", 8, 16, 3, 2, 1, 28), Conv("stages.1.0.conv2", 16, 16, 3, 1, 1, 14)
        bn1, bn2 = BatchNorm("stages.1.0.bn1", 8 if preact else 16), BatchNorm("stages.1.0.bn2", 16)
        body = (bn1, Relu(), conv1, bn2, Relu(), conv2) if preact else (conv1, bn1, Relu(), conv2, bn2)
        assert block.body == body, f"preact={preact}: body {block.body}"
        assert block.layers == (conv1, bn1, conv2, bn2), f"preact={preact}: declared {block.layers}"
        assert block.shortcut == (
            Conv("stages.1.0.shortcut.conv", 8, 16, 1, 2, 0, 28),
            BatchNorm("stages.1.0.shortcut.bn", 16),
        ), f"preact={preact}: shortcut {block.shortcut}"
        assert block.relu_after is not preact and block.out_size == 14
        assert [b.name for b in arch.blocks()] == ["stages.0.0", "stages.0.1", "stages.1.0", "stages.1.1", "stages.2.0"]
        assert arch.stages[0][0].shortcut == () and arch.stages[2][0].out_size == 7
        assert arch.tail == ((BatchNorm("final_bn", 32), Relu()) if preact else ())
        assert arch.head == Linear("head", 32, 10)
