"""The prepared full-data benchmark of issue 23 (bench/accuracy.py presets full-data, full-data-federated):
the settings the issue asks for, resolved into the run configuration each of its runs gets."""

from __future__ import annotations

import pytest

from bench.accuracy import PRESETS, paper_config


@pytest.mark.parametrize(("name", "bn"), [("full-data", "tracked"), ("full-data-federated", "federated")])
def test_full_data_presets_resolve_to_the_issues_protocol(name: str, bn: str) -> None:
    preset = PRESETS[name]

    assert "train_samples" not in preset, "the full-data benchmark trains on all 60,000 samples"
    assert preset["seeds"] == [0, 1, 2] and preset["test_samples"] == 10000
    assert set(preset["methods"].split(",")) == {"nefl-wd", "heterofl", "fjord-paper", "fedavg-smallest", "fedavg-full"}
    for method in preset["methods"].split(","):
        cfg = paper_config(method, 1, preset)
        assert (cfg.method, cfg.seed, cfg.rounds, cfg.train.epochs) == (method, 1, preset["rounds"], preset["epochs"])
        assert (cfg.bn, cfg.preset, cfg.specs, cfg.normalize, cfg.train.partial_batch) == (
            bn,
            "paper",
            "paper",
            True,
            True,
        )
        assert cfg.fraction == 0.1 and cfg.lr_at(preset["rounds"] // 2) == pytest.approx(0.01), method
