"""Property tests of extract and NeFedAvg against independent references."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from nefl_edge.core.architecture import describe
from nefl_edge.core.nefedavg import NeFedAvg
from nefl_edge.core.nested import GlobalState, extract, init_global_state
from nefl_edge.core.specs import ModelConfig, SubmodelSpec, get_model_config

CONFIG = get_model_config("resnet-small")


@st.composite
def specs(draw: st.DrawFn, config: ModelConfig = CONFIG) -> SubmodelSpec:
    width = draw(st.floats(0.05, 1.0))
    blocks = tuple(tuple(range(draw(st.integers(1, n)))) for n in config.stage_blocks)
    return SubmodelSpec(width, blocks)


def random_state(spec_list: list[SubmodelSpec], seed: int) -> GlobalState:
    state = init_global_state(CONFIG, spec_list, consistent={}, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for tensors in [state.consistent, *state.inconsistent]:
        for k, v in tensors.items():
            tensors[k] = rng.standard_normal(v.shape).astype(np.float32)
    return state


@settings(max_examples=30, deadline=None)
@given(spec=specs(), seed=st.integers(0, 1000))
def test_extract_cuts_the_leading_block_the_description_gives(spec: SubmodelSpec, seed: int) -> None:
    # Every consistent tensor of a submodel is the leading corner of the global tensor, as large as the
    # network's description says (channel counts read from its records here, not from param_layout).
    state = random_state([spec], seed)
    arch = describe(CONFIG, spec)
    corners: dict[str, tuple[int, ...]] = {f"{c.name}.weight": c.weight_shape for c in arch.convs()}
    corners[f"{arch.head.name}.weight"] = (arch.head.c_out, arch.head.c_in)
    corners[f"{arch.head.name}.bias"] = (arch.head.c_out,)

    sub = extract(state, 0)

    assert {k for k in sub if k in state.consistent} == set(corners), "extract's consistent tensors"
    for name, corner in corners.items():
        want = state.consistent[name][tuple(slice(0, n) for n in corner)]
        np.testing.assert_array_equal(sub[name], want, err_msg=f"{name} is not the leading {corner} block")
    for name, value in state.inconsistent[0].items():
        np.testing.assert_array_equal(sub[name], value, err_msg=f"{name} is not the submodel's own copy")


@settings(max_examples=20, deadline=None)
@given(spec=specs(), seed=st.integers(0, 1000), samples=st.integers(1, 500))
def test_one_client_aggregation_returns_its_values_and_keeps_the_rest(
    spec: SubmodelSpec, seed: int, samples: int
) -> None:
    state = random_state([spec], seed)
    rng = np.random.default_rng(seed + 7)
    update = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in extract(state, 0).items()}
    agg = NeFedAvg(state)

    agg.add(0, update, samples)
    new = agg.result()

    for name, old in state.consistent.items():
        expected = old.copy()
        if name in update:
            expected[tuple(slice(0, n) for n in update[name].shape)] = update[name]
        np.testing.assert_allclose(new.consistent[name], expected, rtol=1e-6, atol=1e-6)
    for name, value in new.inconsistent[0].items():
        np.testing.assert_allclose(value, update[name], rtol=1e-6, atol=1e-6)


def naive_nefedavg(
    state: GlobalState, updates: list[tuple[int, dict[str, np.ndarray], int]], uniform: bool
) -> GlobalState:
    """Reference written without the aggregator's code: zero-padded full-size copies and masks per client."""
    out = state.copy()
    for name, old in state.consistent.items():
        num = np.zeros(old.shape)
        den = np.zeros(old.shape)
        for _index, tensors, n in updates:
            if name not in tensors:
                continue
            padded = np.zeros(old.shape)
            mask = np.zeros(old.shape)
            region = tuple(slice(0, s) for s in tensors[name].shape)
            padded[region] = tensors[name]
            mask[region] = 1
            w = 1.0 if uniform else n
            num += w * padded
            den += w * mask
        out.consistent[name] = np.where(den > 0, num / np.maximum(den, 1e-300), old).astype(np.float32)
    for i in range(len(state.specs)):
        mine = [(t, 1.0 if uniform else n) for idx, t, n in updates if idx == i]
        if mine:
            total = sum(w for _, w in mine)
            out.inconsistent[i] = {
                k: (sum(w * t[k] for t, w in mine) / total).astype(np.float32) for k in state.inconsistent[i]
            }
    return out


@settings(max_examples=20, deadline=None)
@given(
    spec_list=st.lists(specs(), min_size=1, max_size=4),
    seed=st.integers(0, 1000),
    clients=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 300)), min_size=1, max_size=8),
    uniform=st.booleans(),
)
def test_streaming_equals_naive_reference(
    spec_list: list[SubmodelSpec], seed: int, clients: list[tuple[int, int]], uniform: bool
) -> None:
    state = random_state(spec_list, seed)
    rng = np.random.default_rng(seed)
    updates = []
    for which, n in clients:
        index = which % len(spec_list)
        tensors = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in extract(state, index).items()}
        updates.append((index, tensors, n))
    agg = NeFedAvg(state, "uniform" if uniform else "samples")

    for index, tensors, n in updates:
        agg.add(index, tensors, n)
    got = agg.result()

    want = naive_nefedavg(state, updates, uniform)
    for name in state.consistent:
        np.testing.assert_allclose(got.consistent[name], want.consistent[name], rtol=1e-5, atol=1e-5)
    for i in range(len(spec_list)):
        for name in want.inconsistent[i]:
            np.testing.assert_allclose(got.inconsistent[i][name], want.inconsistent[i][name], rtol=1e-5, atol=1e-5)


def test_flat_round_trip_keeps_every_tensor() -> None:
    state = random_state([SubmodelSpec(0.5, ((0,), (0, 1), (0,))), SubmodelSpec(1.0, ((0, 1),) * 3)], 3)

    back = GlobalState.from_flat(CONFIG, state.specs, state.flat())

    for name, value in state.consistent.items():
        np.testing.assert_array_equal(back.consistent[name], value)
    for mine, theirs in zip(state.inconsistent, back.inconsistent):
        assert mine.keys() == theirs.keys()
        for name in mine:
            np.testing.assert_array_equal(mine[name], theirs[name])
