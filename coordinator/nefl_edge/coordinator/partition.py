"""Partitioners: how a data set is split over devices. Seeded and reproducible; one class per scheme.

- IID: a random permutation cut into equal parts.
- Dirichlet (Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
  Classification", 2019): for each class, shares over clients drawn from Dir(alpha); small alpha gives
  skewed label distributions. As flwr-datasets' ``DirichletPartitioner`` does, the draw is repeated until every
  client has at least ``min_size`` samples (or its equal share, when that is smaller), and after 11 failed draws
  it raises :class:`BadInput` (flwr-datasets: "The max number of attempts (10) was reached"). Unlike
  flwr-datasets, there is no self-balancing (flwr-datasets stops giving samples of later classes to a client
  above the average size, "not mentioned in the paper but implemented"); we follow Hsu et al.
- Shards (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
  2017): sort by label, cut into ``shards_per_client * N`` shards, deal them out at random.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from nefl_edge.core.data import Dataset
from nefl_edge.core.errors import BadInput

MAX_DRAWS = 11
"""Dirichlet draws before giving up, as flwr-datasets (its ``sampling_try`` runs 0..10)."""


class Partitioner(ABC):
    name: str

    def __init__(self, num_clients: int, seed: int = 0) -> None:
        if num_clients < 1:
            raise ValueError(f"the number of clients must be at least 1, got {num_clients}")
        self.num_clients = num_clients
        self.seed = seed

    @abstractmethod
    def split(self, labels: np.ndarray) -> list[np.ndarray]:
        """Disjoint index arrays, one per client, covering every sample."""


class IidPartitioner(Partitioner):
    name = "iid"

    def split(self, labels: np.ndarray) -> list[np.ndarray]:
        order = np.random.default_rng(self.seed).permutation(len(labels))
        return [np.sort(part) for part in np.array_split(order, self.num_clients)]


class DirichletPartitioner(Partitioner):
    name = "dirichlet"

    def __init__(self, num_clients: int, alpha: float, seed: int = 0, min_size: int = 10) -> None:
        super().__init__(num_clients, seed)
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha, self.min_size = alpha, min_size

    def split(self, labels: np.ndarray) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        need = min(self.min_size, len(labels) // self.num_clients)
        for _ in range(MAX_DRAWS):
            parts: list[list[int]] = [[] for _ in range(self.num_clients)]
            for c in np.unique(labels):
                idx = rng.permutation(np.flatnonzero(labels == c))
                shares = rng.dirichlet([self.alpha] * self.num_clients)
                cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
                for client, chunk in enumerate(np.split(idx, cuts)):
                    parts[client].extend(chunk.tolist())
            if min(len(p) for p in parts) >= need:
                return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
        raise BadInput(
            f"Dirichlet(alpha={self.alpha}) over {self.num_clients} clients left a client with fewer than {need} "
            f"samples in {MAX_DRAWS} draws; raise alpha, use fewer clients or more data"
        )


class ShardPartitioner(Partitioner):
    name = "shards"

    def __init__(self, num_clients: int, shards_per_client: int = 2, seed: int = 0) -> None:
        super().__init__(num_clients, seed)
        self.shards_per_client = shards_per_client

    def split(self, labels: np.ndarray) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        order = np.argsort(labels, kind="stable")
        shards = np.array_split(order, self.num_clients * self.shards_per_client)
        deal = rng.permutation(len(shards))
        return [
            np.sort(np.concatenate([shards[s] for s in deal[i :: self.num_clients]])) for i in range(self.num_clients)
        ]


def make_partitioner(scheme: str, num_clients: int, alpha: float = 0.5, seed: int = 0) -> Partitioner:
    if scheme == "iid":
        return IidPartitioner(num_clients, seed)
    if scheme == "dirichlet":
        return DirichletPartitioner(num_clients, alpha, seed)
    if scheme == "shards":
        return ShardPartitioner(num_clients, seed=seed)
    raise ValueError(f"unknown partition scheme {scheme!r}; choose iid, dirichlet or shards")


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def label_skew(hist: np.ndarray) -> float:
    """Mean over clients of 1 - (label entropy / log(classes)): 0 for uniform labels, 1 for one class each."""
    probs = hist / np.maximum(hist.sum(1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=1)
    return float(np.mean(1 - entropy / np.log(hist.shape[1])))


def split_dataset(data: Dataset, parts: list[np.ndarray]) -> list[Dataset]:
    """One in-memory ``Dataset`` per client (for simulation; ``write_shards`` writes them for devices)."""
    return [Dataset(data.x[p], data.y[p], f"client-{i}") for i, p in enumerate(parts)]


def write_shards(data: Dataset, parts: list[np.ndarray], out: Path, max_samples: int | None = None) -> list[Path]:
    """One ``client-XXX.npz`` per client (x as uint8 when the data came from 8-bit images)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(parts):
        idx = part[:max_samples] if max_samples else part
        x = np.round(data.x[idx] * 255).astype(np.uint8)
        path = out / f"client-{i:03d}.npz"
        np.savez(path, x=x, y=data.y[idx])
        paths.append(path)
    return paths


def plot_histogram(hist: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.4 * len(hist)), 4), dpi=100)
    bottom = np.zeros(len(hist))
    for c in range(hist.shape[1]):
        ax.bar(range(len(hist)), hist[:, c], bottom=bottom, label=str(c))
        bottom += hist[:, c]
    ax.set_xlabel("client")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend(title="label", fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
