from __future__ import annotations

import pytest

from nefl_edge.core.specs import (
    DEFAULT_GAMMAS,
    SpecError,
    SubmodelSpec,
    full_spec,
    get_model_config,
    make_specs,
    mflops,
    param_count,
    param_layout,
)


@pytest.mark.parametrize("name", ["resnet-small", "resnet18", "resnet34", "preact-resnet-small"])
@pytest.mark.parametrize("method", ["WD", "W"])
def test_default_gammas_are_reached(name: str, method: str) -> None:
    config = get_model_config(name, "cifar10" if "18" in name else "fmnist")

    specs = make_specs(config, DEFAULT_GAMMAS, method)  # type: ignore[arg-type]

    for gamma, spec in zip(DEFAULT_GAMMAS, specs):
        assert abs(spec.gamma - gamma) <= 0.03
        assert spec.gamma == pytest.approx(param_count(config, spec) / param_count(config, full_spec(config)), abs=1e-4)
    assert specs[-1].width == 1.0 and specs[-1].blocks == full_spec(config).blocks
    if method == "W":
        assert all(s.blocks == full_spec(config).blocks for s in specs)


@pytest.mark.parametrize(
    ("name", "dataset"), [("resnet-small", "fmnist"), ("resnet18", "cifar10"), ("resnet34", "cifar10")]
)
@pytest.mark.parametrize("method", ["WD", "W"])
def test_each_submodel_is_inside_the_next_and_costs_less(name: str, dataset: str, method: str) -> None:
    # Issue 23: the old depth choice per gamma was not nested (resnet18 WD: submodel 0 kept 11 11 11 10,
    # submodel 1 kept 10 10 10 11) and submodel 1 cost fewer MACs than submodel 0 (39.6 vs 43.0 MMAC).
    config = get_model_config(name, dataset)

    specs = make_specs(config, DEFAULT_GAMMAS, method)  # type: ignore[arg-type]

    for small, large in zip(specs, specs[1:]):
        for stage, (kept_small, kept_large) in enumerate(zip(small.blocks, large.blocks)):
            assert set(kept_small) <= set(kept_large), f"{name} {method}: stage {stage} of {small} not in {large}"
        assert small.width <= large.width, f"{name} {method}: {small} is wider than {large}"
        assert mflops(config, small) < mflops(config, large), f"{name} {method}: {small} costs more than {large}"
        assert param_count(config, small) < param_count(config, large), f"{name} {method}: {small} vs {large}"


@pytest.mark.parametrize("name", ["resnet-small", "resnet18"])
def test_the_smallest_submodel_does_not_depend_on_the_other_gammas(name: str) -> None:
    # fedavg-smallest asks for the smallest gamma alone; it must get the model NeFL's smallest submodel is.
    config = get_model_config(name, "cifar10" if name == "resnet18" else "fmnist")

    alone = make_specs(config, (0.2,))[0]

    assert alone == make_specs(config, DEFAULT_GAMMAS)[0]
    assert alone == make_specs(config, (0.2, 0.5, 1.0))[0]


def test_wd_mixes_width_and_depth_for_small_gammas() -> None:
    config = get_model_config("resnet18", "cifar10")

    smallest = make_specs(config, (0.2,), "WD")[0]

    assert smallest.width < 1.0
    assert smallest.blocks != full_spec(config).blocks


def test_depth_only_uses_full_width() -> None:
    config = get_model_config("resnet34", "cifar10")

    specs = make_specs(config, (0.5, 1.0), "D")

    assert all(s.width == 1.0 for s in specs)
    assert specs[0].blocks != full_spec(config).blocks


@pytest.mark.parametrize(("gammas", "method"), [((0.0,), "WD"), ((1.5,), "W"), ((0.2,), "D"), ((0.0001,), "WD")])
def test_unreachable_gamma_is_a_clear_error(gammas: tuple[float, ...], method: str) -> None:
    config = get_model_config("resnet-small")

    with pytest.raises(SpecError, match="gamma"):
        make_specs(config, gammas, method)  # type: ignore[arg-type]


def test_unknown_model_lists_the_choices() -> None:
    with pytest.raises(SpecError, match="resnet18"):
        get_model_config("vgg11")


def test_layout_counts_match_hand_count() -> None:
    # resnet-small, width 1: stem 16*1*9; stage0: 2 blocks of 2 convs 16*16*9; stage1: 32*16*9 + 32*32*9
    # + shortcut 32*16 + block1 2*32*32*9; stage2 likewise with 64; head 64*10 + 10; BN affine 2 per channel.
    config = get_model_config("resnet-small")
    convs = (
        16 * 9 + 4 * 16 * 16 * 9 + (32 * 16 * 9 + 3 * 32 * 32 * 9 + 32 * 16) + (64 * 32 * 9 + 3 * 64 * 64 * 9 + 64 * 32)
    )
    bn_channels = 16 + 4 * 16 + (5 * 32) + (5 * 64)
    steps = 6

    assert param_count(config, full_spec(config)) == convs + 64 * 10 + 10 + 2 * bn_channels + steps


def test_mflops_of_full_model_by_hand() -> None:
    config = get_model_config("resnet-small")
    macs = 28 * 28 * 16 * 9 + 4 * 28 * 28 * 16 * 16 * 9
    macs += 14 * 14 * (32 * 16 * 9 + 3 * 32 * 32 * 9 + 32 * 16) + 7 * 7 * (64 * 32 * 9 + 3 * 64 * 64 * 9 + 64 * 32)
    macs += 64 * 10

    assert mflops(config, full_spec(config)) == pytest.approx(macs / 1e6)


def test_spec_validation() -> None:
    config = get_model_config("resnet-small")

    with pytest.raises(SpecError, match="must include 0"):
        param_layout(config, SubmodelSpec(1.0, ((1,), (0, 1), (0, 1))))
    with pytest.raises(SpecError, match="width"):
        param_layout(config, SubmodelSpec(0.0, ((0,), (0,), (0,))))
