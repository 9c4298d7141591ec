"""nefl-edge: nested federated learning (NeFL) on edge devices.

The design's top-level folders are mapped into this namespace by the package configuration:
``nefl_edge.edge_client`` (the device), ``nefl_edge.export`` (ONNX export), ``nefl_edge.coordinator``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nefl-edge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
