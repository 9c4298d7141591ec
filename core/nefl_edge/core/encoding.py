"""Smaller update encodings (``TrainConfig.update_encoding``): what a device sends instead of float32 tensors.

- ``float32`` (the default): the trained tensors as they are.
- ``float16``: every float tensor as float16; one whose values do not fit float16 (beyond +-65504) travels
  as float32.
- ``int8``: the change against the weights the device received, quantised per tensor to 8 bits:
  ``q = round(delta / scale)`` in -127..127 with ``scale = max|delta| / 127``; the tensor ``<name>`` becomes
  int8 ``q`` plus a float32 scalar ``<name>@scale``. A tensor without received weights of its shape travels
  as float32. Per element the error is at most ``scale / 2`` (half a quantisation step).

:func:`decode_update` is the receiving side and treats its input as hostile: a wrong dtype, shape or scale
raises :class:`EncodingError` saying which tensor, never anything else.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional

import numpy as np

ENCODINGS = ("float32", "float16", "int8")
SCALE_SUFFIX = "@scale"
FLOAT16_MAX = float(np.finfo(np.float16).max)

Tensors = Dict[str, np.ndarray]


class EncodingError(ValueError):
    """An encoded update that cannot be decoded (wrong dtype, shape, scale or names)."""


def encode_update(tensors: Mapping[str, np.ndarray], encoding: str, received: Optional[Tensors] = None) -> Tensors:
    """The tensors to send for ``encoding`` (pack them with ``pack_tensors(..., keep_dtype=True)``).
    ``received`` (the weights the device was sent) is needed for ``int8``."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown update encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    out: Tensors = {}
    for name, value in tensors.items():
        array = np.asarray(value, dtype=np.float32)
        if encoding == "float16" and array.size and float(np.max(np.abs(array))) <= FLOAT16_MAX:
            out[name] = array.astype(np.float16)
        elif encoding == "int8" and received is not None and _same_shape(received.get(name), array):
            delta = array - np.asarray(received[name], dtype=np.float32)
            peak = float(np.max(np.abs(delta))) if delta.size else 0.0
            scale = np.float32(peak / 127.0) if np.isfinite(peak) and peak > 0 else np.float32(0.0)
            q = np.zeros(delta.shape, np.int8) if scale == 0 else np.clip(np.rint(delta / scale), -127, 127)
            out[name] = q.astype(np.int8)
            out[name + SCALE_SUFFIX] = np.array(scale, np.float32)
        else:
            out[name] = array
    return out


def decode_update(
    tensors: Mapping[str, np.ndarray], encoding: str, reference: Callable[[], Mapping[str, np.ndarray]]
) -> Tensors:
    """float32 tensors from an update sent with ``encoding``; ``reference()`` returns the weights the device
    was sent (called only for int8 tensors). Raise :class:`EncodingError` for anything that does not fit."""
    if encoding not in ENCODINGS:
        raise EncodingError(f"unknown update encoding {encoding!r}")
    allowed = {"float32": (np.float32,), "float16": (np.float16, np.float32), "int8": (np.int8, np.float32)}
    out: Tensors = {}
    ref: Optional[Mapping[str, np.ndarray]] = None
    for name, value in tensors.items():
        if name.endswith(SCALE_SUFFIX) and encoding == "int8":
            if name[: -len(SCALE_SUFFIX)] not in tensors:
                raise EncodingError(f"scale {name!r} has no tensor")
            continue
        if value.dtype.type not in allowed[encoding]:
            raise EncodingError(f"tensor {name!r} is {value.dtype}, not what a {encoding} update may hold")
        if value.dtype == np.int8:
            scale = tensors.get(name + SCALE_SUFFIX)
            if scale is None or scale.dtype != np.float32 or scale.size != 1:
                raise EncodingError(f"int8 tensor {name!r} lacks a float32 scalar {name + SCALE_SUFFIX!r}")
            s = float(scale.reshape(()))
            if not np.isfinite(s) or s < 0:
                raise EncodingError(f"int8 tensor {name!r} has an invalid scale {s!r}")
            if ref is None:
                ref = reference()
            base = ref.get(name)
            if base is None or not _same_shape(base, value):
                raise EncodingError(f"int8 tensor {name!r} of shape {value.shape} matches no weights sent")
            out[name] = np.asarray(base, np.float32) + value.astype(np.float32) * np.float32(s)
        else:
            out[name] = np.asarray(value, np.float32)
    return out


def _same_shape(a: Optional[np.ndarray], b: np.ndarray) -> bool:
    return a is not None and tuple(np.shape(a)) == tuple(b.shape)
