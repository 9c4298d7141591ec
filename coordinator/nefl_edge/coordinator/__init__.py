"""The coordinator (``nefl-coord``): PyTorch side of nefl-edge. Needs Python 3.11+; the device side does not."""

import sys

if sys.version_info < (3, 11):  # pragma: no cover - checked by tests/test_pythons.py on an older Python
    raise ImportError(
        f"the nefl-edge coordinator (nefl-coord) needs Python 3.11 or newer, this is {sys.version.split()[0]}; "
        "the device side (nefl-edge join / agent) runs on Python 3.9+"
    )
