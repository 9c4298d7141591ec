"""Local data sets on the device (and the coordinator's test set): IDX (MNIST / Fashion-MNIST, gzipped or
not), CIFAR-10/100 python batches, and ``.npz`` files with ``x`` and ``y``.

Images come back as float32 NCHW in [0, 1], labels as int64.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence, Tuple, Union

import numpy as np

from nefl_edge.core.errors import BadInput

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
Split = Literal["train", "test"]
HOW_TO_GET_DATA = (
    "Fashion-MNIST comes with Debian: `sudo apt-get install dataset-fashion-mnist` puts it under "
    f"{FASHION_MNIST_DIR}. Or pass a folder of IDX files (MNIST / Fashion-MNIST), CIFAR-10/100 python "
    "batches, or an .npz file with arrays x and y."
)


class DataError(BadInput):
    """A data file that is missing or does not fit; the message says what to do."""


@dataclass
class Dataset:
    x: np.ndarray
    y: np.ndarray
    name: str

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def check_for(self, input_shape: Tuple[int, ...], num_classes: int) -> None:
        """Raise :class:`DataError` if the data does not fit a model's input shape and classes."""
        if tuple(self.x.shape[1:]) != tuple(input_shape):
            raise DataError(
                f"{self.name}: samples have shape {tuple(self.x.shape[1:])}, the model expects {tuple(input_shape)}"
            )
        if len(self) and (self.y.min() < 0 or self.y.max() >= num_classes):
            raise DataError(
                f"{self.name}: labels range over {self.y.min()}..{self.y.max()}, the model has {num_classes} classes"
            )


def _open(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:  # a download cut short: a clear error, not a traceback
        raise DataError(f"{path} is a damaged or truncated gzip file ({exc}); download it again") from None


def read_idx(path: Path) -> np.ndarray:
    data = _open(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: only unsigned-byte IDX files are supported (type 0x{dtype_code:02x})")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: {body.size} values for shape {dims}")
    return body.reshape(dims)


def _find(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_idx_folder(folder: Path, split: Split) -> Optional[Dataset]:
    prefix = "train" if split == "train" else "t10k"
    images = _find(folder, f"{prefix}-images-idx3-ubyte")
    labels = _find(folder, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    x, y = read_idx(images), read_idx(labels)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{folder}: {x.shape[0]} images but {y.shape[0]} labels")
    return Dataset(x[:, None, :, :].astype(np.float32) / 255.0, y.astype(np.int64), f"{folder} ({split})")


def _load_cifar_folder(folder: Path, split: Split) -> Optional[Dataset]:
    # CIFAR's own format is python pickle; this reads local files the user put there, never the network.
    if split == "train":
        files = sorted(folder.glob("data_batch_*")) or ([folder / "train"] if (folder / "train").is_file() else [])
    else:
        files = [p for p in (folder / "test_batch", folder / "test") if p.is_file()]
    if not files:
        return None
    xs, ys = [], []
    for path in files:
        try:
            with path.open("rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch.get(b"labels", batch.get(b"fine_labels")), np.int64))
        except (OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as exc:
            raise DataError(f"{path} is not a CIFAR python batch: {exc}") from None
    return Dataset(np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys), f"{folder} ({split})")


def load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = data["x"], data["y"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path} is not an .npz file with arrays x and y (or is truncated): {exc}") from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"{path}: x must be N x C x H x W (or N x H x W) and y of length N; got {x.shape}, {y.shape}")
    xf = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return Dataset(xf, y.astype(np.int64), str(path))


def load_dataset(path: Optional[Path] = None, split: Split = "train") -> Dataset:
    """Load a data set from a folder (IDX or CIFAR) or an ``.npz`` file; default Debian's Fashion-MNIST."""
    path = Path(path) if path is not None else FASHION_MNIST_DIR
    if not path.exists():
        raise DataError(f"no data at {path}. {HOW_TO_GET_DATA}")
    if path.is_file():
        if path.suffix != ".npz":
            raise DataError(f"{path}: a data file must be .npz with arrays x and y. {HOW_TO_GET_DATA}")
        return load_npz(path)
    for loader in (_load_idx_folder, _load_cifar_folder):
        found = loader(path, split)
        if found is not None:
            return found
    raise DataError(f"{path} holds no {split} split of a known format. {HOW_TO_GET_DATA}")


def channel_stats(
    x: Union[np.ndarray, Sequence[np.ndarray]], chunk: int = 4096
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of images ``x`` (N, C, H, W; or a list of such arrays, e.g.
    the clients' shards) over all samples and pixels, in float64 (the population std). The coordinator
    computes them from its training data for ``normalize = true``; every submodel then applies
    ``(x - mean) / std`` first, as the NeFL paper's code normalises CIFAR-10 with fixed per-channel
    statistics (its transforms.Normalize), departing from it in that the statistics are measured here."""
    arrays = [x] if isinstance(x, np.ndarray) else [a for a in x if len(a)]
    if not arrays or any(a.ndim != 4 or a.shape[1:] != arrays[0].shape[1:] for a in arrays) or not len(arrays[0]):
        raise DataError(f"channel statistics need non-empty N x C x H x W arrays of one shape, got {len(arrays)}")
    total = np.zeros(arrays[0].shape[1])
    squares = np.zeros(arrays[0].shape[1])
    count = 0
    for array in arrays:
        for lo in range(0, len(array), chunk):
            part = array[lo : lo + chunk].astype(np.float64)
            total += part.sum(axis=(0, 2, 3))
            squares += np.square(part).sum(axis=(0, 2, 3))
        count += array.shape[0] * array.shape[2] * array.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
