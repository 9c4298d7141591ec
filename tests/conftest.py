from __future__ import annotations

from pathlib import Path

import pytest

from nefl_edge.core.data import FASHION_MNIST_DIR, HOW_TO_GET_DATA
from nefl_edge.core.specs import ModelConfig, SubmodelSpec, get_model_config, make_specs


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    if not (FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz").is_file():
        pytest.fail(f"Fashion-MNIST is missing. {HOW_TO_GET_DATA} (`just setup` does it)")
    return FASHION_MNIST_DIR


@pytest.fixture(scope="session")
def small_config() -> ModelConfig:
    return get_model_config("resnet-small")


@pytest.fixture(scope="session")
def small_specs(small_config: ModelConfig) -> list[SubmodelSpec]:
    return make_specs(small_config)


@pytest.fixture(scope="session")
def small_artifacts(
    tmp_path_factory: pytest.TempPathFactory, small_config: ModelConfig, small_specs: list[SubmodelSpec]
) -> Path:
    from nefl_edge.export.artifacts import export_set

    out = tmp_path_factory.mktemp("artifacts")
    export_set(small_config, small_specs, out)
    return out


@pytest.fixture
def broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    from tests.helpers import Broker

    b = Broker(tmp_path).start()
    yield b
    b.stop()
