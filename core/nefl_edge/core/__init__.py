"""The kernel both sides of nefl-edge share: errors, durable files, the CLI frame, the protocol's messages,
wire format, update encoding, signing, identities, the MQTT transport, data loading, and the torch-free core of
submodel specs, nesting and NeFedAvg. It imports nothing of the device (``nefl_edge.edge_client``), the
coordinator (``nefl_edge.coordinator``) or the exporter (``nefl_edge.export``), and never torch or onnx.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nefl-edge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
