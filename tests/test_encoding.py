"""Smaller update encodings (float16, int8 deltas): error bounds, hostile input, and a real run with float16."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from nefl_edge.coordinator.grid import InProcessGrid, Instruction
from nefl_edge.coordinator.records import read_jsonl
from nefl_edge.core.data import Dataset
from nefl_edge.core.encoding import SCALE_SUFFIX, EncodingError, decode_update, encode_update
from nefl_edge.core.nested import GlobalState, extract, init_global_state
from nefl_edge.core.schemas import TrainConfig
from nefl_edge.core.specs import full_spec, get_model_config, make_specs, param_count
from nefl_edge.core.wire import pack_tensors, unpack_tensors
from tests.helpers import Broker, make_shards, serve_until_done, wait_for

Tensors = dict[str, np.ndarray]


def weights(seed: int = 0) -> tuple[Tensors, Tensors]:
    """(weights sent, weights trained from them)."""
    rng = np.random.default_rng(seed)
    sent = {"conv": rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "bn": rng.random(8).astype(np.float32)}
    trained = {k: v + rng.standard_normal(v.shape).astype(np.float32) * np.float32(0.01) for k, v in sent.items()}
    return sent, trained


def over_the_wire(tensors: Tensors) -> Tensors:
    return unpack_tensors(pack_tensors(tensors, keep_dtype=True))


def test_float16_round_trip_is_within_half_an_ulp() -> None:
    sent, trained = weights()

    got = decode_update(over_the_wire(encode_update(trained, "float16")), "float16", lambda: sent)

    for name, value in trained.items():
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], value, rtol=2.0**-11, atol=0)


def test_int8_round_trip_is_within_half_a_step_and_a_quarter_of_the_bytes() -> None:
    sent, trained = weights()

    wire = encode_update(trained, "int8", sent)
    got = decode_update(over_the_wire(wire), "int8", lambda: sent)

    for name, value in trained.items():
        step = float(np.max(np.abs(value - sent[name]))) / 127
        assert float(np.max(np.abs(got[name] - value))) <= step / 2 + 1e-7
    assert len(pack_tensors(wire, keep_dtype=True)) < len(pack_tensors(trained)) / 2


def test_int8_of_an_unchanged_tensor_and_a_value_float16_cannot_hold() -> None:
    sent, _ = weights()
    big = {"conv": sent["conv"], "bn": np.full(8, 1e6, np.float32)}

    same = decode_update(over_the_wire(encode_update(sent, "int8", sent)), "int8", lambda: sent)
    kept = decode_update(over_the_wire(encode_update(big, "float16")), "float16", lambda: sent)

    np.testing.assert_array_equal(same["conv"], sent["conv"])
    np.testing.assert_array_equal(kept["bn"], big["bn"])


def hostile_cases() -> list[tuple[str, Callable[[Tensors], Tensors], str]]:
    scale = "conv" + SCALE_SUFFIX
    return [
        ("negative scale", lambda t: {**t, scale: np.array(-1.0, np.float32)}, "invalid scale"),
        ("nan scale", lambda t: {**t, scale: np.array(np.nan, np.float32)}, "invalid scale"),
        ("scale of two values", lambda t: {**t, scale: np.ones(2, np.float32)}, "lacks a float32 scalar"),
        ("float64 scale", lambda t: {**t, scale: np.array(1.0, np.float64)}, "lacks a float32 scalar"),
        ("missing scale", lambda t: {k: v for k, v in t.items() if k != scale}, "lacks a float32 scalar"),
        ("orphan scale", lambda t: {**t, "ghost" + SCALE_SUFFIX: np.array(1.0, np.float32)}, "has no tensor"),
        ("wrong shape", lambda t: {**t, "conv": np.zeros((2, 2), np.int8)}, "matches no weights"),
        ("unknown tensor", lambda t: {**t, "ghost": np.zeros(3, np.int8), "ghost@scale": t[scale]}, "matches no"),
        ("float64 tensor", lambda t: {**t, "bn": np.zeros(8, np.float64)}, "not what a int8 update"),
    ]


@pytest.mark.parametrize(("case", "mangle", "match"), hostile_cases(), ids=[c[0] for c in hostile_cases()])
def test_hostile_int8_updates_are_refused_with_the_reason(
    case: str, mangle: Callable[[Tensors], Tensors], match: str
) -> None:
    sent, trained = weights()
    wire = mangle(encode_update(trained, "int8", sent))

    with pytest.raises(EncodingError, match=match):
        decode_update(over_the_wire(wire), "int8", lambda: sent)


def test_an_int8_tensor_in_a_float16_update_is_refused() -> None:
    sent, trained = weights()

    with pytest.raises(EncodingError, match="float16"):
        decode_update(over_the_wire(encode_update(trained, "int8", sent)), "float16", lambda: sent)


def test_the_in_process_grid_gives_the_update_the_same_round_trip() -> None:
    config = get_model_config("resnet-small", "fmnist")
    state = init_global_state(config, make_specs(config, (0.2, 1.0)), {})
    rng = np.random.default_rng(0)

    def trainer(state: GlobalState, k: int, data: Dataset, train: TrainConfig) -> Tensors:
        return {n: v + rng.standard_normal(v.shape).astype(np.float32) for n, v in extract(state, k).items()}

    shard = Dataset(np.zeros((4, 1, 28, 28), np.float32), np.zeros(4, np.int64), "a")
    grid = InProcessGrid({"a": shard}, {"a": 0}, trainer)
    exact = next(iter(grid.run(1, state, [Instruction("a", 1, TrainConfig())])))
    rng = np.random.default_rng(0)
    coded = next(iter(grid.run(1, state, [Instruction("a", 1, TrainConfig(update_encoding="int8"))])))

    assert exact.tensors is not None and coded.tensors is not None and exact.tensors.keys() == coded.tensors.keys()
    sent = extract(state, 1)
    errors = []
    for name, value in exact.tensors.items():
        step = float(np.max(np.abs(value - sent[name]))) / 127
        errors.append(float(np.max(np.abs(coded.tensors[name] - value))))
        assert errors[-1] <= step / 2 + 1e-6
    assert max(errors) > 0  # the update did go through int8


@pytest.mark.integration
def test_a_served_run_with_float16_updates_completes(broker: Broker, tmp_path: Path) -> None:
    shards = make_shards(tmp_path, [600, 600])
    serve_until_done(
        broker.address,
        tmp_path,
        shards,
        *("--rounds", "1", "--deadline-s", "120", "--gammas", "0.2,1.0", "--min-clients", "2"),
        *("--eval-samples", "500", "--max-steps", "5", "--update-encoding", "float16", "--wait-clients-s", "90"),
        timeout=300,
    )
    out = wait_for(lambda: next((tmp_path / "runs").glob("default-*"), None), 10, "the run directory")
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["updates"] for r in records if r["round"] == 1] == [2, 2]
    assert "rejected" not in (tmp_path / "coordinator.log").read_text()
    full = get_model_config("resnet-small", "fmnist")
    uploaded = re.search(r"uploaded (\d+) KiB", (tmp_path / "dev1.log").read_text())  # dev1 trains gamma 1.0
    assert uploaded is not None and int(uploaded.group(1)) * 1024 < 0.55 * 4 * param_count(full, full_spec(full))
